"""The few collectives training needs, each failing with :class:`PeerFailure`, not a hang.

Gloo raises a ``RuntimeError`` as soon as a peer's socket closes, and every backend raises
one when the process group's timeout passes; both become a :class:`PeerFailure` that says
what to do. (NCCL's watchdog may instead abort the process after the timeout, with its own
message.)
"""

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from sae_lens_transcoder.distributed.world import World

T = TypeVar("T")


class PeerFailure(RuntimeError):
    """A collective with the other ranks failed: one died, hung or cannot be reached."""


def _guarded(what: str, call: Callable[[], T]) -> T:
    try:
        return call()
    except PeerFailure:
        raise
    except RuntimeError as error:
        rank = dist.get_rank() if dist.is_initialized() else 0
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PeerFailure(
            f"rank {rank}: {what} with the other ranks failed ({first_line}); another rank has "
            "probably died, hung or become unreachable (see its log)."
        ) from error


def collective_device() -> torch.device:
    """Where small tensors go for a collective: NCCL only takes CUDA tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM, what: str = "an all-reduce") -> torch.Tensor:
    """In place over the default group, moved to the backend's device and back if needed."""
    device = collective_device()
    if tensor.device == device:
        _guarded(what, lambda: dist.all_reduce(tensor, op=op))
        return tensor
    moved = tensor.to(device)
    _guarded(what, lambda: dist.all_reduce(moved, op=op))
    tensor.copy_(moved)
    return tensor


def mean_of_floats(values: list[float], world: World, what: str) -> list[float]:
    """The mean over ranks of each value (each rank gives the same number of them)."""
    if not values:
        return []
    summed = all_reduce_(torch.tensor(values, dtype=torch.float64), what=what)
    return (summed / world.size).tolist()


def max_of_int(value: int, what: str) -> int:
    return int(all_reduce_(torch.tensor([value], dtype=torch.int64), dist.ReduceOp.MAX, what).item())


def all_ranks_ok(ok: bool, what: str) -> bool:
    """True only if every rank says ``ok``: the ranks decide together, so none goes on alone."""
    return bool(all_reduce_(torch.tensor([int(ok)], dtype=torch.int64), dist.ReduceOp.MIN, what).item())


def broadcast_from_writer(value: Any, world: World, what: str) -> Any:
    """Rank 0's ``value`` on every rank (picklable objects: paths, names, flags)."""
    if not world.is_distributed:
        return value
    box = [value if world.is_writer else None]
    _guarded(what, lambda: dist.broadcast_object_list(box, src=0, device=collective_device()))
    return box[0]


def broadcast_module_(module: torch.nn.Module, what: str) -> None:
    """Every parameter and buffer as rank 0 has it (as DDP does when it wraps a module)."""
    for tensor in module.state_dict().values():
        if isinstance(tensor, torch.Tensor):
            device = collective_device()
            moved = tensor if tensor.device == device else tensor.to(device)
            _guarded(what, lambda: dist.broadcast(moved, src=0))
            if moved is not tensor:
                tensor.copy_(moved)


__all__ = [
    "PeerFailure",
    "all_ranks_ok",
    "all_reduce_",
    "broadcast_from_writer",
    "broadcast_module_",
    "max_of_int",
    "mean_of_floats",
]
