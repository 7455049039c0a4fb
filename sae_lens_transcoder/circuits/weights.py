"""Input-invariant views: what the weights alone say about a feature.

Norm scales vary per token and are left out (set to 1); centring and norm weights are kept,
so these are the attributions of ``attribution.py`` divided by the activation and the
per-token scale.

A feature is addressed by its transcoders and its layer (the layer whose MLP input it reads).
The transcoders are any replacement set — a per-layer set or a cross-layer transcoder, whose
features write into every later covered layer — or one SAELens transcoder (or ``Splice``),
taken as the set of its one layer. What a feature writes is its decoder rows summed over the
layers it writes into (only those a downstream reader can see, where one is named).
"""

import torch
from sae_lens.saes.sae import SAE
from transformer_lens import HookedTransformer

from sae_lens_transcoder.circuits.norms import frozen_norm
from sae_lens_transcoder.circuits.trace import attn_output_norm, final_norm, transcoder_input_norm
from sae_lens_transcoder.replacement import PerLayerTranscoders, ReplacementSet, Splice

TokenScores = list[tuple[str, float]]
Transcoders = ReplacementSet | Splice | SAE  # type: ignore[type-arg]


def at_layer(transcoders: Transcoders, layer: int | None = None) -> tuple[ReplacementSet, int]:
    """``(set, layer)`` for the features of ``layer``; a set covering one layer needs no ``layer``."""
    replacement = transcoders if isinstance(transcoders, ReplacementSet) else PerLayerTranscoders([transcoders])
    if layer is None:
        if len(replacement.layers) != 1:
            raise ValueError(f"the transcoders cover layers {replacement.layers}: pass layer= (the layer the feature reads).")
        return replacement, replacement.layers[0]
    if layer not in replacement.layers:
        raise ValueError(f"layer={layer}: the transcoders cover layers {replacement.layers}.")
    return replacement, layer


def output_layers(replacement: ReplacementSet, layer: int, before: int | None = None) -> list[int]:
    """The layers whose MLP output ``layer``'s features write into (below ``before`` if given)."""
    return [out for out in replacement.layers if layer in replacement.sources(out) and (before is None or out < before)]


def encoder_directions(
    model: HookedTransformer, transcoders: Transcoders, layer: int | None = None, features: torch.Tensor | None = None
) -> torch.Tensor:
    """``[d_sae, d_model]`` (or the rows of ``features``): the residual directions the features'
    pre-activations read."""
    replacement, layer = at_layer(transcoders, layer)
    norm = transcoder_input_norm(model, replacement.hook_in(layer), layer)
    columns = slice(None) if features is None else features
    return norm.read_direction(replacement.encoder(layer)[:, columns].T)


def encoder_direction(model: HookedTransformer, transcoders: Transcoders, feature: int, layer: int | None = None) -> torch.Tensor:
    """The residual direction feature ``feature``'s pre-activation reads."""
    return encoder_directions(model, transcoders, layer, torch.tensor([feature]))[0]


def decoder_directions(
    transcoders: Transcoders, layer: int | None = None, before: int | None = None, features: torch.Tensor | None = None
) -> torch.Tensor:
    """``[d_sae, d_model]`` (or the rows of ``features``): what each feature writes per unit of
    activation, summed over the layers it writes into — all of them, or those below ``before``
    (what the MLP or attention of layer ``before`` reads)."""
    replacement, layer = at_layer(transcoders, layer)
    outputs = output_layers(replacement, layer, before)
    if not outputs:
        raise ValueError(f"layer {layer}'s features write nothing that layer {before} reads: they are not upstream of it.")
    rows = slice(None) if features is None else features
    return sum(replacement.decoder(layer, out)[rows] for out in outputs)  # type: ignore[return-value]


def ov_pullback(model: HookedTransformer, layer: int, head: int, direction: torch.Tensor) -> torch.Tensor:
    """The source-token residual direction that head ``head`` of ``layer`` maps onto ``direction``
    (attention weight 1): ``W_V W_O direction`` read through ``ln1`` (and, on Gemma 2/3, the
    post-attention norm's weight)."""
    attn = model.blocks[layer].attn
    norm = frozen_norm(model.blocks[layer].ln1, f"blocks.{layer}.ln1.hook_scale", full_output=True)
    written = attn_output_norm(model, layer).read_direction(direction)
    return norm.read_direction(attn.W_V[head] @ (attn.W_O[head] @ written))


@torch.no_grad()
def feature_connections(
    model: HookedTransformer,
    upstream: Transcoders,
    downstream: Transcoders,
    feature: int,
    upstream_layer: int | None = None,
    downstream_layer: int | None = None,
) -> torch.Tensor:
    """``W_dec' · f_enc``: every upstream feature's connection to ``feature`` through the residual
    (for a cross-layer transcoder, its writes into the layers below ``feature``'s)."""
    down_set, down = at_layer(downstream, downstream_layer)
    direction = encoder_direction(model, down_set, feature, down)
    return decoder_directions(upstream, upstream_layer, before=down) @ direction


@torch.no_grad()
def ov_connections(
    model: HookedTransformer,
    upstream: Transcoders,
    downstream: Transcoders,
    feature: int,
    layer: int,
    head: int,
    upstream_layer: int | None = None,
    downstream_layer: int | None = None,
) -> torch.Tensor:
    """``W_dec' · W_OV · f_enc``: connections through one head of ``layer`` (attention weight 1),
    from what the upstream features write into the residual that head reads."""
    direction = encoder_direction(model, downstream, feature, downstream_layer)
    return decoder_directions(upstream, upstream_layer, before=layer) @ ov_pullback(model, layer, head, direction)


@torch.no_grad()
def de_embedding(
    model: HookedTransformer, transcoders: Transcoders, feature: int, head: tuple[int, int] | None = None, layer: int | None = None
) -> torch.Tensor:
    """``W_E f_enc`` per vocabulary token, or ``W_E W_OV f_enc`` through ``head=(layer, head)``."""
    direction = encoder_direction(model, transcoders, feature, layer)
    if head is not None:
        direction = ov_pullback(model, head[0], head[1], direction)
    return model.W_E @ direction


def logit_lens_readers(model: HookedTransformer) -> torch.Tensor:
    """``[d_vocab, d_model]``: each token's unembedding read through the final norm's weight."""
    return final_norm(model).read_direction(model.W_U.T)


@torch.no_grad()
def logit_lens(model: HookedTransformer, transcoders: Transcoders, feature: int, layer: int | None = None) -> torch.Tensor:
    """``W_dec[i] W_U`` per vocabulary token, read through the final norm's weight (a
    cross-layer feature's decoders summed over the layers it writes into)."""
    written = decoder_directions(transcoders, layer, features=torch.tensor([feature]))[0]
    return logit_lens_readers(model) @ written


@torch.no_grad()
def writes(transcoders: Transcoders, feature: int, layer: int | None = None) -> list[tuple[int, float]]:
    """``(output layer, ‖decoder row‖)`` for every layer the feature writes into."""
    replacement, layer = at_layer(transcoders, layer)
    return [(out, float(replacement.decoder(layer, out)[feature].norm())) for out in output_layers(replacement, layer)]


@torch.no_grad()
def ov_norm_map(model: HookedTransformer, transcoders: Transcoders, feature: int, layer: int | None = None) -> torch.Tensor:
    """``[layers, n_heads]`` of ``‖W_OV f_enc‖`` for the attention layers upstream of the feature."""
    replacement, layer = at_layer(transcoders, layer)
    direction = encoder_direction(model, replacement, feature, layer)
    n_attn = layer if model.cfg.parallel_attn_mlp else layer + 1
    norms = torch.zeros(n_attn, model.cfg.n_heads, dtype=direction.dtype)
    for attn_layer in range(n_attn):
        for head in range(model.cfg.n_heads):
            norms[attn_layer, head] = ov_pullback(model, attn_layer, head, direction).norm()
    return norms


def top_tokens(model: HookedTransformer, scores: torch.Tensor, k: int = 10) -> tuple[TokenScores, TokenScores]:
    """The ``k`` highest and ``k`` lowest scoring vocabulary tokens, as strings."""
    def named(indices: torch.Tensor) -> TokenScores:
        return [(model.to_single_str_token(int(i)), float(scores[i])) for i in indices]

    return named(scores.topk(k).indices), named((-scores).topk(k).indices)
