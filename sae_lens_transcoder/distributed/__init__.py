"""Training on several processes, GPUs or machines with ``torch.distributed`` (torchrun).

Inside a default process group of N > 1 ranks the runner trains data parallel: rank r reads
its shard of the token stream, gradients and batch statistics are averaged so every rank
holds the same transcoders, and rank 0 alone writes logs, checkpoints' shared files and the
outputs (each rank adds its own data position to checkpoints). A set can instead be layer
sharded (``distributed_layers="shard"``, see :mod:`.layers`): each rank trains its own share of
the transcoders on the global batch, and a cross-layer transcoder feature sharded
(``distributed_layers="shard_features"``, see :mod:`.feature_shards`): each rank trains its share
of every layer's features on the global batch. :mod:`.prompts` shares work over many prompts.
"""

from sae_lens_transcoder.distributed.collectives import PeerFailure
from sae_lens_transcoder.distributed.feature_trainer import FeatureShardedSetTrainer
from sae_lens_transcoder.distributed.prompts import PromptsFailed, over_prompts
from sae_lens_transcoder.distributed.sharded_trainer import LayerShardedSetTrainer
from sae_lens_transcoder.distributed.trainer import CheckpointNotWritten, DataParallelSetTrainer
from sae_lens_transcoder.distributed.world import World, backend_for, current_world, process_group_from_env

__all__ = [
    "CheckpointNotWritten",
    "DataParallelSetTrainer",
    "FeatureShardedSetTrainer",
    "LayerShardedSetTrainer",
    "PeerFailure",
    "PromptsFailed",
    "World",
    "backend_for",
    "current_world",
    "over_prompts",
    "process_group_from_env",
]
