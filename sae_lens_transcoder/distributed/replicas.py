"""Keeping data-parallel replicas of a transcoder identical where gradients do not reach.

Some training state is written from the batch itself, not through the optimizer: biases
initialised from the first batch's means, BatchTopK's running threshold. Each rank sees a
different batch, so these are reduced over the ranks *while a data-parallel fit runs* (set by
:func:`replicas_in_sync`); outside one, or in one process, the helpers return their input.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from sae_lens_transcoder.distributed.collectives import all_reduce_
from sae_lens_transcoder.distributed.world import World

_in_sync: World | None = None


@contextmanager
def replicas_in_sync(world: World) -> Iterator[None]:
    """Reduce batch-derived state over ``world``'s ranks until the block ends."""
    global _in_sync
    previous, _in_sync = _in_sync, world if world.is_distributed else None
    try:
        yield
    finally:
        _in_sync = previous


def syncing_world() -> World | None:
    """The world being kept in sync, None outside a data-parallel fit."""
    return _in_sync


def mean_across_replicas(tensor: torch.Tensor) -> torch.Tensor:
    """The mean over ranks (equal batch sizes: the whole global batch's mean)."""
    if _in_sync is None:
        return tensor
    return all_reduce_(tensor.clone(), what="averaging a batch statistic") / _in_sync.size


def min_across_replicas(tensor: torch.Tensor) -> torch.Tensor:
    """The minimum over ranks: e.g. an EMA of each rank's batch minimum, reduced by MIN, is
    the EMA of the global batch's minimum, since the update is increasing in the minimum."""
    if _in_sync is None:
        return tensor
    return all_reduce_(tensor.clone(), dist.ReduceOp.MIN, what="reducing a batch minimum")
