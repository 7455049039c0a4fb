"""Each rank's share of the token stream and of the global training batch.

``train_batch_size_tokens`` and ``training_tokens`` keep their one-process meaning (the
global batch, the total), so a config trains the same way on any number of ranks; the LLM
batch (``store_batch_size_prompts``) and the shuffle buffer are each rank's own.
"""

from typing import Any

import torch

from datasets import Dataset, IterableDataset
from datasets.distributed import split_dataset_by_node

from sae_lens_transcoder.distributed.world import World


def per_rank_batch_tokens(global_batch_tokens: int, world: World) -> int:
    """The rows each rank trains on per step; the global batch must split evenly."""
    if global_batch_tokens % world.size:
        raise ValueError(
            f"train_batch_size_tokens={global_batch_tokens} is the global batch and must split evenly over "
            f"the {world.size} ranks; use a multiple of {world.size} (e.g. "
            f"{(global_batch_tokens // world.size + 1) * world.size})."
        )
    return global_batch_tokens // world.size


def shard_dataset(dataset: Any, world: World) -> Any:
    """This rank's disjoint part of the dataset, by HF ``datasets``' own splitter: contiguous
    blocks of a map-style dataset; whole files of a streaming one when they divide evenly,
    else every ``world.size``-th example."""
    if not world.is_distributed:
        return dataset
    if not isinstance(dataset, Dataset | IterableDataset):
        raise ValueError(
            f"data-parallel training needs a datasets.Dataset or IterableDataset to shard; got "
            f"{type(dataset).__name__}. Pass dataset_path or a single split, not a DatasetDict."
        )
    shard = split_dataset_by_node(dataset, rank=world.rank, world_size=world.size)
    if isinstance(shard, Dataset) and len(shard) == 0:
        raise ValueError(
            f"dataset_path has {len(dataset)} rows, too few to give each of the {world.size} ranks one; "
            "use a larger dataset or fewer ranks."
        )
    return shard


def rank_share(sequences: torch.Tensor, world: World, batch_size: int) -> torch.Tensor:
    """This rank's batches of ``batch_size`` sequences: every ``world.size``-th, so the ranks
    score the very batches one process would (mean ablation uses each batch's own mean)."""
    if not world.is_distributed:
        return sequences
    batches = sequences.split(batch_size)
    if len(batches) < world.size:
        raise ValueError(
            f"{len(batches)} batch(es) of {batch_size} sequences cannot be shared by {world.size} ranks; raise "
            f"--n-tokens to at least {world.size * batch_size} context lengths or use fewer ranks."
        )
    return torch.cat(batches[world.rank :: world.size])
