"""Norms with their scale frozen at the prompt: affine maps a direction can be pulled back through."""

from dataclasses import dataclass

import torch
from torch import nn
from transformer_lens.components import LayerNorm, LayerNormPre


@dataclass(frozen=True)
class FrozenNorm:
    """``x = center?(r) / scale * weight + bias`` with ``scale`` taken from the prompt.

    ``scale_hook`` names the cached scale; ``None`` means the reader sees the raw residual.
    """

    scale_hook: str | None
    centered: bool = False
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def apply(self, resid: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        x = resid - resid.mean(-1, keepdim=True) if self.centered else resid
        x = x / scale
        if self.weight is not None:
            x = x * self.weight
        return x + self.bias if self.bias is not None else x

    def pull_back(self, direction: torch.Tensor, scale: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual direction, constant) with ``direction · x == residual_direction · r + constant``."""
        v = direction * self.weight if self.weight is not None else direction
        constant = direction @ self.bias if self.bias is not None else direction.new_zeros(())
        if self.centered:
            v = v - v.mean(-1, keepdim=True)
        return v / scale, constant

    def read_direction(self, direction: torch.Tensor) -> torch.Tensor:
        """The residual direction read, up to the per-token scale (for weight-based views)."""
        return self.pull_back(direction, 1.0)[0]


def frozen_norm(module: nn.Module, scale_hook: str, full_output: bool) -> FrozenNorm:
    """The frozen form of a TransformerLens norm; ``full_output`` includes its weight and bias
    (what the next module reads), otherwise it is ``hook_normalized``."""
    if not hasattr(module, "hook_scale"):  # normalization_type=None: an identity
        return FrozenNorm(scale_hook=None)
    centered = isinstance(module, (LayerNorm, LayerNormPre))
    weight = getattr(module, "w", None) if full_output else None
    bias = getattr(module, "b", None) if full_output else None
    return FrozenNorm(scale_hook=scale_hook, centered=centered, weight=weight, bias=bias)
