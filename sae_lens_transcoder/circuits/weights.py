"""Input-invariant views: what the weights alone say about a feature.

Norm scales vary per token and are left out (set to 1); centring and norm weights are kept,
so these are the attributions of ``attribution.py`` divided by the activation and the
per-token scale.
"""

import torch
from transformer_lens import HookedTransformer

from sae_lens_transcoder.circuits.norms import frozen_norm
from sae_lens_transcoder.circuits.trace import attn_output_norm, final_norm, transcoder_input_norm
from sae_lens_transcoder.replacement import PerLayerTranscoders, Splice

TokenScores = list[tuple[str, float]]


def encoder_direction(model: HookedTransformer, splice: Splice, feature: int) -> torch.Tensor:
    """The residual direction feature ``feature``'s pre-activation reads."""
    encoder = PerLayerTranscoders([splice]).encoder(splice.layer)
    return transcoder_input_norm(model, splice.hook_name, splice.layer).read_direction(encoder[:, feature])


def decoder_directions(splice: Splice) -> torch.Tensor:
    """``[d_sae, d_model]``: what each feature writes per unit of activation (into its own layer)."""
    return PerLayerTranscoders([splice]).decoder(splice.layer, splice.layer)


def ov_pullback(model: HookedTransformer, layer: int, head: int, direction: torch.Tensor) -> torch.Tensor:
    """The source-token residual direction that head ``head`` of ``layer`` maps onto ``direction``
    (attention weight 1): ``W_V W_O direction`` read through ``ln1`` (and, on Gemma 2/3, the
    post-attention norm's weight)."""
    attn = model.blocks[layer].attn
    norm = frozen_norm(model.blocks[layer].ln1, f"blocks.{layer}.ln1.hook_scale", full_output=True)
    written = attn_output_norm(model, layer).read_direction(direction)
    return norm.read_direction(attn.W_V[head] @ (attn.W_O[head] @ written))


@torch.no_grad()
def feature_connections(model: HookedTransformer, upstream: Splice, downstream: Splice, feature: int) -> torch.Tensor:
    """``W_dec' · f_enc``: every upstream feature's connection to ``feature`` through the residual."""
    return decoder_directions(upstream) @ encoder_direction(model, downstream, feature)


@torch.no_grad()
def ov_connections(
    model: HookedTransformer, upstream: Splice, downstream: Splice, feature: int, layer: int, head: int
) -> torch.Tensor:
    """``W_dec' · W_OV · f_enc``: connections through one head (attention weight 1)."""
    return decoder_directions(upstream) @ ov_pullback(model, layer, head, encoder_direction(model, downstream, feature))


@torch.no_grad()
def de_embedding(model: HookedTransformer, splice: Splice, feature: int, head: tuple[int, int] | None = None) -> torch.Tensor:
    """``W_E f_enc`` per vocabulary token, or ``W_E W_OV f_enc`` through ``head=(layer, head)``."""
    direction = encoder_direction(model, splice, feature)
    if head is not None:
        direction = ov_pullback(model, head[0], head[1], direction)
    return model.W_E @ direction


@torch.no_grad()
def logit_lens(model: HookedTransformer, splice: Splice, feature: int) -> torch.Tensor:
    """``W_dec[i] W_U`` per vocabulary token, read through the final norm's weight."""
    readers = final_norm(model).read_direction(model.W_U.T)
    return readers @ decoder_directions(splice)[feature]


@torch.no_grad()
def ov_norm_map(model: HookedTransformer, splice: Splice, feature: int) -> torch.Tensor:
    """``[layers, n_heads]`` of ``‖W_OV f_enc‖`` for the attention layers upstream of the feature."""
    direction = encoder_direction(model, splice, feature)
    n_attn = splice.layer if model.cfg.parallel_attn_mlp else splice.layer + 1
    norms = torch.zeros(n_attn, model.cfg.n_heads, dtype=direction.dtype)
    for layer in range(n_attn):
        for head in range(model.cfg.n_heads):
            norms[layer, head] = ov_pullback(model, layer, head, direction).norm()
    return norms


def top_tokens(model: HookedTransformer, scores: torch.Tensor, k: int = 10) -> tuple[TokenScores, TokenScores]:
    """The ``k`` highest and ``k`` lowest scoring vocabulary tokens, as strings."""
    def named(indices: torch.Tensor) -> TokenScores:
        return [(model.to_single_str_token(int(i)), float(scores[i])) for i in indices]

    return named(scores.topk(k).indices), named((-scores).topk(k).indices)
