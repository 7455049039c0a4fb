"""Where this process stands in a ``torch.distributed`` job: its rank, the world, who writes.

Training is data parallel whenever the runner finds a default process group of more than one
rank; outside one, everything here says "rank 0 of 1" and costs nothing.
"""

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class World:
    """This rank and the number of ranks training the same transcoders."""

    rank: int = 0
    size: int = 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 alone writes logs, wandb, checkpoints' shared files and final outputs."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.size > 1


def current_world() -> World:
    """The default process group's rank and size, or a world of one without a group."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def backend_for(device: str) -> str:
    """NCCL for CUDA training, gloo for CPU (NCCL has no CPU tensors, gloo is slow on GPUs)."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def launched_by_torchrun() -> bool:
    """torchrun (and any launcher using its env rendezvous) sets these for every rank."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


@contextmanager
def process_group_from_env(device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[World]:
    """Join torchrun's rendezvous for the duration of a command, if launched by torchrun.

    An existing default group (a caller's own) is used as it is and left open; without
    torchrun's variables this is a world of one. ``timeout_s`` bounds every collective, so a
    rank that died makes the others fail instead of waiting forever.
    """
    if dist.is_initialized() or not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        yield current_world()
        return
    backend = backend_for(device)
    device_id = None
    if backend == "nccl":
        # "cuda" then means this rank's GPU, for the runner's config and SAELens alike.
        device_id = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device_id)
    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, size = next(dist.rendezvous("env://", timeout=timeout))
    # torchrun keeps its store across --max-restarts attempts, and a new attempt would read
    # the keys the dead one left (a dead rank's address): each attempt gets keys of its own.
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"sae_lens_transcoder/attempt_{attempt}/", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout, device_id=device_id)
    try:
        yield current_world()
    finally:
        dist.destroy_process_group()
