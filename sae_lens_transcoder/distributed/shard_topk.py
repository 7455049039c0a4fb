"""TopK and BatchTopK over the features of a feature-sharded cross-layer transcoder
(``distributed.feature_shards``).

Every rank holds a share of each layer's features; the k codes one process would keep per token
and layer (BatchTopK: the k · batch codes of a layer over the whole batch) are among the ranks'
own top ones, so gathering those gives the global cut, and each rank keeps its codes at or above
it. Ties at the cut are all kept, where one process would keep as many as it counts.
"""

import torch
import torch.distributed as dist

from sae_lens_transcoder.distributed.collectives import all_gather_rows, all_reduce_


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
    (ties at the cut: see above); the gradient reaches the kept positive codes, as there."""
    return (hidden_pre * (hidden_pre >= _global_cut(hidden_pre, k))).relu()


def batch_topk_across_shards(hidden_pre: torch.Tensor, k: float) -> torch.Tensor:
    """SAELens's ``BatchTopK`` over all features of one layer, ``hidden_pre [..., d_sae/N]`` being
    this rank's share: the ``k · batch`` largest ReLU codes over the whole batch and every shard."""
    acts = hidden_pre.relu()
    n_kept = int(k * acts.shape[:-1].numel())
    with torch.no_grad():
        local = acts.flatten().topk(min(n_kept, acts.numel())).values
        cut = all_gather_rows(local, "gathering the shards' batch top k").topk(n_kept).values[-1]
    return acts * (acts >= cut)


@torch.no_grad()
def min_over_shards(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise minimum of every rank's ``tensor`` (e.g. the smallest code a layer kept)."""
    return all_reduce_(tensor.clone(), dist.ReduceOp.MIN, what="reducing the shards' smallest kept codes")
