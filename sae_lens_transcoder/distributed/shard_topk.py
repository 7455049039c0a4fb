"""TopK over the features of a feature-sharded cross-layer transcoder (``distributed.feature_shards``).

Every rank holds a share of each layer's features; the k codes one process would keep per token
and layer are among the ranks' own top k, so gathering those gives the global k-th largest
value, and each rank keeps its codes at or above it.
"""

import torch

from sae_lens_transcoder.distributed.collectives import all_gather_rows


@torch.no_grad()
def _global_cut(hidden_pre: torch.Tensor, k: int) -> torch.Tensor:
    """``[..., 1]``: the k-th largest pre-activation over every shard's features, from each
    rank's own top k (the global top k is among them)."""
    local = hidden_pre.topk(min(k, hidden_pre.shape[-1]), dim=-1).values
    everywhere = all_gather_rows(local.movedim(-1, 0), "gathering the shards' top k").movedim(0, -1)
    return everywhere.topk(k, dim=-1).values[..., -1:]


def topk_across_shards(hidden_pre: torch.Tensor, k: int) -> torch.Tensor:
    """TopK over all features of a feature-sharded CLT, on this rank's share ``[..., d_sae/N]``:
    the codes at or above the global k-th largest, through a ReLU, as SAELens's ``TopK`` keeps
    (ties at the cut are all kept, where one process would keep k of them); the gradient
    reaches the kept positive codes, as there."""
    return (hidden_pre * (hidden_pre >= _global_cut(hidden_pre, k))).relu()
