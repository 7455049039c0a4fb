"""Feature sharding of a cross-layer transcoder (``distributed_layers="shard_features"``): rank r
of N holds features ``[r·d_sae/N, (r+1)·d_sae/N)`` of every layer, so a CLT too large for one
GPU's weights, gradients and Adam state trains on N.

A shard is an ordinary :class:`TrainingCrossLayerTranscoder` of ``d_sae/N`` features per layer
(its slice of ``W_enc``, ``b_enc``, the ``W_dec`` rows and JumpReLU thresholds) whose
``feature_shards`` names the world: it then sums its features' part of the reconstruction and
of the sparsity penalties over the ranks (:func:`~.collectives.sum_over_ranks`), so every rank
computes the whole CLT's loss on the global batch, which :class:`GatheredBatches` gives every
rank. ``b_dec`` and ``W_skip`` are replicated: they get the same gradient on every rank. Codes
are elementwise in ReLU and JumpReLU; TopK and BatchTopK cut codes across all features, so each
shard keeps its codes at or above the cut gathered from every shard (``shard_topk``), and
BatchTopK's running threshold follows the smallest code any shard kept.
"""

import copy
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch

from sae_lens_transcoder.distributed.collectives import all_gather_rows, all_reduce_, gather_tensors_to_writer
from sae_lens_transcoder.distributed.world import World
from sae_lens_transcoder.saes.clt import TrainingCLTConfig, TrainingCrossLayerTranscoder

# SAETrainer._train_step clips every step's gradient to this norm over the module's parameters.
SAE_LENS_MAX_GRAD_NORM = 1.0


def check_feature_sharding(world: World, cfg: TrainingCLTConfig) -> None:
    """Refuse a feature sharding that cannot run, naming the setting and what to do instead."""
    if not world.is_distributed:
        raise ValueError(
            "distributed_layers='shard_features' splits a cross-layer transcoder's features over the ranks of a "
            "torchrun job, and this process is alone. Launch it under torchrun with more than one rank, or use "
            "distributed_layers='replicate' on one process."
        )
    if cfg.d_sae % world.size:
        raise ValueError(
            f"distributed_layers='shard_features' gives each of the {world.size} ranks an equal share of every "
            f"layer's features, but sae.d_sae={cfg.d_sae} does not divide by {world.size}; use a multiple of "
            f"{world.size} (e.g. {(cfg.d_sae // world.size + 1) * world.size})."
        )


def feature_dim(name: str) -> int | None:
    """The dimension of a CLT state entry that counts features, None for a replicated one."""
    if name.startswith("W_dec."):
        return 0  # [d_sae, L - i, d_out]
    return {"W_enc": 2, "b_enc": 1, "log_threshold": 1}.get(name)


def _with_features(clt: TrainingCrossLayerTranscoder, d_sae: int, device: str) -> TrainingCrossLayerTranscoder:
    """An empty CLT like ``clt`` with ``d_sae`` features per layer; its init draws from a forked
    RNG, so building it changes no random stream the run goes on to use."""
    cfg = replace(copy.deepcopy(clt.cfg), d_sae=d_sae, device=device)
    with torch.random.fork_rng(devices=[]):
        return type(clt)(cfg)


@torch.no_grad()
def shard_clt(clt: TrainingCrossLayerTranscoder, world: World, device: str) -> TrainingCrossLayerTranscoder:
    """This rank's share of ``clt``'s features, on ``device`` (``clt`` is left as it was)."""
    width = clt.cfg.d_sae // world.size
    shard = _with_features(clt, width, device)
    state = {
        name: tensor if (dim := feature_dim(name)) is None else tensor.narrow(dim, world.rank * width, width)
        for name, tensor in clt.state_dict().items()
    }
    shard.load_state_dict(state)
    shard.feature_shards = world
    shard._data_init_pending = clt._data_init_pending
    return shard.train(clt.training)


@torch.no_grad()
def gather_whole_clt(shard: TrainingCrossLayerTranscoder, world: World) -> TrainingCrossLayerTranscoder | None:
    """The whole CLT on rank 0's CPU (None on the other ranks), its features gathered from every
    rank one layer at a time, so that beyond the result rank 0 holds one layer's slices."""
    assert shard.feature_shards == world
    whole = _with_features(shard, shard.cfg.d_sae * world.size, "cpu") if world.is_writer else None
    target = whole.state_dict() if whole is not None else {}
    for name, tensor in shard.state_dict().items():
        dim = feature_dim(name)
        if dim is None:  # replicated: rank 0's copy is every rank's
            if whole is not None:
                target[name].copy_(tensor)
            continue
        # W_dec.<i> is one layer already; the others hold every layer, in their first dimension.
        for index, part in ([(None, tensor)] if dim == 0 else list(enumerate(tensor))):
            found = gather_tensors_to_writer(part, f"gathering the CLT's {name} to rank 0")
            if found is not None:
                joined = torch.cat(found, dim=0 if dim == 0 else dim - 1)
                (target[name] if index is None else target[name][index]).copy_(joined)
    if whole is not None:
        whole._data_init_pending = False
        whole.train(shard.training)
    return whole


def shard_dir_name(name: str, world: World) -> str:
    """The checkpoint sub-directory of this rank's share of the CLT trained as ``name``."""
    return f"{name}.features{world.rank}-of-{world.size}"


class GatheredBatches(Iterator[dict[str, torch.Tensor]]):
    """The set trainer's data provider on one rank of a feature-sharded run: draws this rank's
    batch from ``source`` and yields every rank's, one under the other in rank order (the
    global batch one process trains on). Every ``next`` is a collective."""

    def __init__(self, source: Iterator[dict[str, torch.Tensor]]):
        self.source = source

    def __next__(self) -> dict[str, torch.Tensor]:
        return {name: all_gather_rows(batch, "gathering the global batch") for name, batch in next(self.source).items()}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.source, name)


class ShardedGradientClip:
    """SAELens clips each step's gradient to norm 1 over the module's parameters: on a shard
    that would be the shard's norm. Once the step's last gradient has been accumulated (inside
    ``backward``), this clips to the whole CLT's norm, as one process would, the sharded
    parameters' squares summed over the ranks and the replicated ones (equal everywhere)
    counted once; SAELens's clip then finds a norm of at most 1 and keeps the gradients."""

    def __init__(self, shard: TrainingCrossLayerTranscoder):
        named = [(name, p) for name, p in shard.named_parameters() if p.requires_grad]
        self.sharded = [p for name, p in named if feature_dim(name) is not None]
        self.replicated = [p for name, p in named if feature_dim(name) is None]
        self.n_params = len(named)
        self.pending = self.n_params
        self._hooks = [p.register_post_accumulate_grad_hook(self._arrived) for _, p in named]

    def _arrived(self, param: torch.Tensor) -> None:  # noqa: ARG002
        self.pending -= 1
        if self.pending == 0:
            self.pending = self.n_params
            self._clip()

    def check_clipped(self) -> None:
        """Called before the optimizer steps: every parameter's gradient came, so the clip ran."""
        if self.pending != self.n_params:
            missing = self.pending
            self.pending = self.n_params
            raise RuntimeError(
                f"{missing} of the feature shard's {self.n_params} parameters got no gradient this step, so its "
                "gradient could not be clipped to the whole CLT's norm; every parameter must take part in the loss."
            )

    @torch.no_grad()
    def _clip(self) -> None:
        def squares(params: list[torch.Tensor]) -> torch.Tensor:
            assert all(p.grad is not None for p in params)
            norms = [torch.linalg.vector_norm(p.grad) for p in params]  # type: ignore[arg-type]
            return torch.stack(norms).pow(2).sum() if norms else torch.zeros((), device=self.sharded[0].device)

        total_sq = all_reduce_(squares(self.sharded), what="summing the shards' gradient norms") + squares(self.replicated)
        scale = (SAE_LENS_MAX_GRAD_NORM / (total_sq.sqrt() + 1e-6)).clamp(max=1.0)
        for p in self.sharded + self.replicated:
            p.grad.mul_(scale)  # type: ignore[union-attr]

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
