"""Training on several processes, GPUs or machines with ``torch.distributed`` (torchrun).

Inside a default process group of N > 1 ranks the runner trains data parallel: rank r reads
its shard of the token stream, gradients and batch statistics are averaged so every rank
holds the same transcoders, and rank 0 alone writes logs, checkpoints' shared files and the
outputs (each rank adds its own data position to checkpoints).
"""

from sae_lens_transcoder.distributed.collectives import PeerFailure
from sae_lens_transcoder.distributed.trainer import CheckpointNotWritten, DataParallelSetTrainer
from sae_lens_transcoder.distributed.world import World, backend_for, current_world, process_group_from_env

__all__ = [
    "CheckpointNotWritten",
    "DataParallelSetTrainer",
    "PeerFailure",
    "World",
    "backend_for",
    "current_world",
    "process_group_from_env",
]
