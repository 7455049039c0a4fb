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
import torch.distributed.nn.functional as dist_autograd

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


def broadcast_module_(module: torch.nn.Module, what: str, src: int = 0) -> None:
    """Every parameter and buffer as rank ``src`` has it (as DDP does from rank 0 when it
    wraps a module)."""
    for tensor in module.state_dict().values():
        if isinstance(tensor, torch.Tensor):
            device = collective_device()
            moved = tensor if tensor.device == device else tensor.to(device)
            _guarded(what, lambda: dist.broadcast(moved, src=src))
            if moved is not tensor:
                tensor.copy_(moved)


def broadcast_object(value: Any, src: int, what: str) -> Any:
    """Rank ``src``'s picklable ``value`` on every rank."""
    box = [value if dist.get_rank() == src else None]
    _guarded(what, lambda: dist.broadcast_object_list(box, src=src, device=collective_device()))
    return box[0]


def gather_to_writer(value: Any, world: World, what: str) -> list[Any] | None:
    """Every rank's picklable ``value``, in rank order, on rank 0 (None on the others)."""
    if not world.is_distributed:
        return [value]
    found: list[Any] | None = [None] * world.size if world.is_writer else None
    _guarded(what, lambda: dist.gather_object(value, found, dst=0))
    return found


def all_to_all_rows(send: list[torch.Tensor], receive_shapes: list[tuple[int, ...]], what: str) -> list[torch.Tensor]:
    """Send ``send[r]`` to rank r and receive one tensor of ``receive_shapes[s]`` from each
    rank s, in one ``all_to_all_single`` of the flattened tensors (any shapes, one dtype)."""
    device = collective_device()
    dtype = send[0].dtype
    flat = torch.cat([t.reshape(-1) for t in send]).to(device)
    sizes_in = [t.numel() for t in send]
    sizes_out = [int(torch.Size(shape).numel()) for shape in receive_shapes]
    received = torch.empty(sum(sizes_out), dtype=dtype, device=device)
    _guarded(what, lambda: dist.all_to_all_single(received, flat, sizes_out, sizes_in))
    received = received.to(send[0].device)
    return [chunk.view(shape) for chunk, shape in zip(received.split(sizes_out), receive_shapes)]


def sum_over_ranks(partial: torch.Tensor, world: World) -> torch.Tensor:
    """The sum of every rank's ``partial``, differentiable: for a loss every rank computes
    alike from the sum (feature sharding), each rank's backward gives ``partial`` the loss's
    own gradient.

    ``torch.distributed.nn.functional.all_reduce`` sums in its backward too, so the N equal
    upstream gradients would arrive N times over; they are divided by N on the way in. (The
    backward's all-reduce runs inside ``backward``, where a failed peer surfaces as the
    trainer step's error; the forward's is bounded like every other collective here.)
    """
    total = _guarded("summing the feature shards' outputs", lambda: dist_autograd.all_reduce(partial))
    if total.requires_grad:
        total.register_hook(lambda grad: grad / world.size)
    return total


def all_gather_rows(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """Every rank's ``tensor`` (one shape on all ranks) stacked along dim 0, in rank order."""
    device = collective_device()
    moved = tensor.contiguous().to(device)
    found = [torch.empty_like(moved) for _ in range(dist.get_world_size())]
    _guarded(what, lambda: dist.all_gather(found, moved))
    return torch.cat(found).to(tensor.device)


def gather_tensors_to_writer(tensor: torch.Tensor, what: str) -> list[torch.Tensor] | None:
    """Every rank's ``tensor`` (one shape on all ranks), in rank order, on rank 0's CPU (None elsewhere)."""
    device = collective_device()
    moved = tensor.contiguous().to(device)
    found = [torch.empty_like(moved) for _ in range(dist.get_world_size())] if dist.get_rank() == 0 else None
    _guarded(what, lambda: dist.gather(moved, found, dst=0))
    return None if found is None else [t.cpu() for t in found]


__all__ = [
    "PeerFailure",
    "all_ranks_ok",
    "all_gather_rows",
    "all_reduce_",
    "all_to_all_rows",
    "broadcast_from_writer",
    "broadcast_module_",
    "broadcast_object",
    "gather_tensors_to_writer",
    "gather_to_writer",
    "max_of_int",
    "mean_of_floats",
    "sum_over_ranks",
]
