"""Layer sharding of a transcoder set: which rank owns which transcoder, and the exchange
that gives each owner its layers' columns of every rank's batch.

Every rank runs the LLM on its own shard of the stream, as in data-parallel training; the
set's layers are then dealt round-robin (the i-th layer of the set, in layer order, to rank
i mod N), and each step one ``all_to_all`` sends every owner its layers' columns of every
rank's packed batch. An owner's transcoders so train on the ranks' batches one under the
other, in rank order: the global batch that one process, or data parallelism, trains on.
"""

from collections.abc import Iterator
from typing import Any, Literal

import torch

from sae_lens_transcoder.distributed.collectives import all_to_all_rows
from sae_lens_transcoder.distributed.world import World

# "shard_features" splits a cross-layer transcoder's features over the ranks (see .feature_shards).
LayerMode = Literal["replicate", "shard", "shard_features"]
LAYER_MODES: tuple[LayerMode, ...] = ("replicate", "shard", "shard_features")


def chosen_layer_mode(sae_cfg: Any, given: LayerMode | None) -> LayerMode:
    """The runner's ``distributed_layers`` argument if given, else the config's ``sae.distributed_layers``."""
    return given if given is not None else getattr(sae_cfg, "distributed_layers", "replicate")


def check_layer_mode(mode: str, is_clt: bool) -> None:
    """Refuse a sharding that cannot run, naming the setting and what to do instead."""
    if mode not in LAYER_MODES:
        raise ValueError(f"distributed_layers={mode!r} is not one of {LAYER_MODES}.")
    if mode == "shard" and is_clt:
        raise ValueError(
            "distributed_layers='shard' cannot split a cross-layer transcoder: it is one module whose "
            "encoders write to every later layer. Use distributed_layers='shard_features' (its features "
            "split over the ranks) or distributed_layers='replicate' (data parallel)."
        )
    if mode == "shard_features" and not is_clt:
        raise ValueError(
            "distributed_layers='shard_features' splits a cross-layer transcoder's features over the ranks; "
            "a transcoder or per-layer set is not one. Use distributed_layers='shard' (a set's layers split "
            "over the ranks) or distributed_layers='replicate' (data parallel)."
        )


def check_enough_layers(world: World, n_layers: int) -> None:
    """Every rank of a layer-sharded run must own a transcoder (each step's count comes from one)."""
    if world.size > n_layers:
        raise ValueError(
            f"distributed_layers='shard' gives each rank at least one transcoder, but the set has {n_layers} "
            f"layer(s) for {world.size} ranks; train on at most {n_layers} ranks, add layers (sae.mlp_layers), "
            "or use distributed_layers='replicate'."
        )


def layer_owners(names: list[str], world: World) -> dict[str, int]:
    """The owning rank of each transcoder, round-robin in the set's order."""
    return {name: i % world.size for i, name in enumerate(names)}


class GlobalBatches(Iterator[dict[str, torch.Tensor]]):
    """The set trainer's data provider on one rank of a layer-sharded run: draws this rank's
    batch ``{name: [B_local, width]}`` (every layer) from ``source`` and yields, for the
    layers this rank owns, ``{name: [N * B_local, width]}`` (every rank's rows, rank order).

    Every ``next`` is a collective, so all ranks draw the same number of batches. Other
    attributes (e.g. the evaluator's ``paused``) are the source's.
    """

    def __init__(self, source: Iterator[dict[str, torch.Tensor]], owners: dict[str, int], world: World):
        self.source = source
        self.world = world
        self.owned_by = [[name for name, owner in owners.items() if owner == r] for r in range(world.size)]

    def __next__(self) -> dict[str, torch.Tensor]:
        local = next(self.source)
        mine = self.owned_by[self.world.rank]
        send = [torch.cat([local[name] for name in names], dim=1) for names in self.owned_by]
        rows = send[0].shape[0]
        width = sum(local[name].shape[1] for name in mine)
        received = all_to_all_rows(send, [(rows, width)] * self.world.size, "sending activations to their layers' owners")
        stacked = torch.cat(received, dim=0)
        widths = [local[name].shape[1] for name in mine]
        return dict(zip(mine, stacked.split(widths, dim=1)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.source, name)
