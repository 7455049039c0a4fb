"""Transcoders with random, non-trivial weights for the circuit tests."""

from collections.abc import Sequence
from pathlib import Path

import torch
from sae_lens.saes.sae import SAE, SAEMetadata
from sae_lens.saes.transcoder import (
    JumpReLUTranscoder,
    JumpReLUTranscoderConfig,
    JumpReLUSkipTranscoder,
    JumpReLUSkipTranscoderConfig,
    SkipTranscoder,
    SkipTranscoderConfig,
    Transcoder,
    TranscoderConfig,
)
from transformer_lens import HookedTransformer

from sae_lens_transcoder.saes.topk_transcoder import (
    TopKSkipTranscoder,
    TopKSkipTranscoderConfig,
    TopKTranscoder,
    TopKTranscoderConfig,
)

D_SAE = 96


def random_transcoder(
    model: HookedTransformer, layer: int, hook: str = "mlp.hook_in", kind: str = "relu", seed: int = 0
) -> SAE:  # type: ignore[type-arg]
    """A transcoder of ``model``'s MLP ``layer`` whose features fire on about half the tokens."""
    torch.manual_seed(seed + layer)
    d = model.cfg.d_model
    meta = SAEMetadata(hook_name=f"blocks.{layer}.{hook}", hook_name_out=f"blocks.{layer}.hook_mlp_out")
    common = dict(d_in=d, d_sae=D_SAE, d_out=d, apply_b_dec_to_input=False, metadata=meta)
    if kind == "relu":
        tc: SAE = Transcoder(TranscoderConfig(**common))  # type: ignore[type-arg]
    elif kind == "skip":
        tc = SkipTranscoder(SkipTranscoderConfig(**common))
    elif kind == "jumprelu":
        tc = JumpReLUTranscoder(JumpReLUTranscoderConfig(**common))
    elif kind == "jumprelu_skip":
        tc = JumpReLUSkipTranscoder(JumpReLUSkipTranscoderConfig(**common))
    elif kind == "topk":
        tc = TopKTranscoder(TopKTranscoderConfig(**common, k=12))
    elif kind == "topk_skip":
        tc = TopKSkipTranscoder(TopKSkipTranscoderConfig(**common, k=12))
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for name, param in tc.named_parameters():
            param.copy_(0.3 * torch.randn_like(param) if name != "threshold" else 0.05 * torch.rand_like(param))
    return tc


def save_random_transcoders(model: HookedTransformer, folder: Path, layers: Sequence[int]) -> list[str]:
    """A random ``ln2.hook_normalized`` transcoder per layer, saved for the CLI as ``folder/layer<i>``
    (metadata naming the model); their directories."""
    dirs = []
    for layer in layers:
        tc = random_transcoder(model, layer, hook="ln2.hook_normalized")
        tc.cfg.metadata.model_name = model.cfg.model_name
        tc.save_model(folder / f"layer{layer}")
        dirs.append(str(folder / f"layer{layer}"))
    return dirs
