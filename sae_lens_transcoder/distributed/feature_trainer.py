"""The trainers of a feature-sharded CLT run (see :mod:`.feature_shards`): every rank trains its
share of the CLT's features on the global batch, each step the same step one process takes.

Nothing is averaged: the loss is the whole CLT's on every rank, so each rank's backward gives
its features their own gradients and the replicated ``b_dec``/``W_skip`` the same gradient
everywhere. What a shard counts alone is reduced where it is reported: logged L0 and dead
features are summed over the ranks, sparsity windows gathered, the final metadata summed.
Dead-feature counters themselves stay each rank's own features'. Each rank writes its share
into the checkpoint being built (published once every rank has written its part); at the end
rank 0 gathers the whole CLT, which the runner saves.
"""

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from sae_lens.saes.sae import TrainingSAE, TrainStepOutput

from sae_lens_transcoder.distributed.collectives import PeerFailure, all_reduce_, gather_tensors_to_writer, mean_of_floats
from sae_lens_transcoder.distributed.feature_shards import GatheredBatches, ShardedGradientClip, gather_whole_clt, shard_dir_name
from sae_lens_transcoder.distributed.trainer import DataParallelSetTrainer
from sae_lens_transcoder.distributed.checkpoint import written_world_size
from sae_lens_transcoder.distributed.world import current_world
from sae_lens_transcoder.saes.clt import TrainingCrossLayerTranscoder
from sae_lens_transcoder.training.set_trainer import TranscoderSetTrainer
from sae_lens_transcoder.training.trainer import TranscoderTrainer

_SUMMED = ("metrics/l0", "sparsity/dead_features")
_AVERAGED = ("sparsity/mean_passes_since_fired",)  # a mean over features; the shards are equal-sized


def _summed(value: float, what: str) -> float:
    return float(all_reduce_(torch.tensor([value], dtype=torch.float64), what=what).item())


class FeatureShardTrainer(TranscoderTrainer):
    """One rank's share of a CLT: its gradient clipped to the whole CLT's norm, its reports
    reduced to the whole CLT's."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.world = current_world()
        assert isinstance(self.sae, TrainingCrossLayerTranscoder) and self.sae.feature_shards == self.world
        self.clip = ShardedGradientClip(self.sae)
        self.optimizer.register_step_pre_hook(lambda *_: self.clip.check_clipped())

    def step(self, batch: torch.Tensor) -> TrainStepOutput:
        try:
            return super().step(batch)
        except dist.DistError as error:  # raised by a collective in backward (the shards' sums)
            raise PeerFailure(
                f"rank {self.world.rank}: a feature-sharded training step with the other ranks failed ({error}); another "
                "rank has probably died, hung or become unreachable (see its log)."
            ) from error

    @torch.no_grad()
    def build_train_step_log_dict(self, output: TrainStepOutput, n_training_samples: int) -> dict[str, Any]:
        log = super().build_train_step_log_dict(output=output, n_training_samples=n_training_samples)
        summed = {key: _summed(float(log[key]), "summing logged metrics") for key in _SUMMED}
        averaged = dict(zip(_AVERAGED, mean_of_floats([float(log[k]) for k in _AVERAGED], self.world, "averaging logged metrics")))
        return log | summed | averaged

    @torch.no_grad()
    def _build_sparsity_log_dict(self) -> dict[str, Any]:
        # Overrides a private: SAELens's window log reads this shard's firing counts; rank 0
        # logs the whole CLT's, gathered in its order (each layer's features, rank by rank).
        L = self.sae.cfg.n_layers  # type: ignore[attr-defined]
        found = gather_tensors_to_writer(self.act_freq_scores.reshape(L, -1), "gathering feature firing counts")
        if found is None:
            return super()._build_sparsity_log_dict()  # never logged: only rank 0 logs
        kept, self.act_freq_scores = self.act_freq_scores, torch.cat(found, dim=1).flatten()
        try:
            return super()._build_sparsity_log_dict()
        finally:
            self.act_freq_scores = kept

    @torch.no_grad()
    def set_final_sae_metadata(self) -> None:
        super().set_final_sae_metadata()
        metadata = self.sae.cfg.metadata
        if self.n_frac_active_samples > 0:
            metadata.l0 = _summed(metadata.l0, "summing the final L0")
            metadata.num_dead_features = round(_summed(metadata.num_dead_features, "summing dead features"))

    def remove_gradient_hooks(self) -> None:
        self.clip.remove()


class FeatureShardedSetTrainer(DataParallelSetTrainer):
    """The set trainer (one CLT, named ``clt``) on one rank of a feature-sharded run. From the
    data-parallel trainer it keeps the ranks' agreement on stopping and the checkpoint
    protocol; ``whole_clt`` is, on rank 0 once fit has ended, the whole trained CLT."""

    trainers: dict[str, FeatureShardTrainer]  # type: ignore[assignment]
    trainer_class = FeatureShardTrainer

    def __init__(self, *args: Any, data_provider: Any, **kwargs: Any):
        super().__init__(*args, data_provider=GatheredBatches(data_provider), **kwargs)
        self.whole_clt: TrainingCrossLayerTranscoder | None = None

    def fit(self) -> dict[str, TrainingSAE[Any]]:
        # TranscoderSetTrainer's fit: no replicas to copy from rank 0 or to keep in sync.
        try:
            TranscoderSetTrainer.fit(self)
            (shard,) = self.saes.values()
            assert isinstance(shard, TrainingCrossLayerTranscoder)
            self.whole_clt = gather_whole_clt(shard, self.world)
        except PeerFailure as failure:
            raise PeerFailure(f"{failure} {self._resume_hint()}") from failure.__cause__
        finally:
            for trainer in self.trainers.values():
                trainer.remove_gradient_hooks()
        return self.saes

    def _estimate_scaling_factors(self) -> None:
        # Every rank's batches are the global ones (CLTs train unscaled anyway).
        TranscoderSetTrainer._estimate_scaling_factors(self)

    def _run_and_log_evals(self) -> None:
        # The evaluator splices the CLT into each rank's own evaluation batches, but a shard's
        # forward sums over ranks that must see the same tokens: not evaluated during training.
        return

    def _write_checkpoint_part(self, partial: Path, wandb_aliases: list[str] | None) -> None:
        """Every rank writes its share of the CLT (and its data position) into ``partial``."""
        for name, trainer in self.trainers.items():
            trainer.save_checkpoint(checkpoint_name=shard_dir_name(name, self.world), base_path=partial, wandb_aliases=wandb_aliases)
        assert self.save_checkpoint_fn is not None
        self.save_checkpoint_fn(checkpoint_path=partial)

    def load_checkpoint(self, path: str | Path) -> None:
        """This rank's share, from a checkpoint a feature-sharded run of as many ranks wrote."""
        path = Path(path)
        for name, trainer in self.trainers.items():
            shard = path / shard_dir_name(name, self.world)
            if not shard.is_dir():
                raise ValueError(self._unresumable(path, name))
            trainer.load_trainer_state(shard)
            trainer.sae.load_weights_from_checkpoint(shard)
        any_trainer = next(iter(self.trainers.values()))
        self.n_training_steps = any_trainer.n_training_steps
        self.n_training_samples = any_trainer.n_training_samples
        self.checkpoint_thresholds = [t for t in self.checkpoint_thresholds if t >= self.n_training_samples]
        self.resumed_from = path

    def _unresumable(self, path: Path, name: str) -> str:
        if (path / name).is_dir():
            return (
                f"{path} holds the whole CLT ({name}/), written by one process or a data-parallel run; resume it with "
                "distributed_layers='replicate', or start the feature-sharded run afresh."
            )
        written = written_world_size(path) if path.is_dir() else None
        return (
            f"{path} has no {shard_dir_name(name, self.world)}/: it was not written by a feature-sharded run of "
            f"{self.world.size} ranks (its data positions are of {written} rank(s)). Resume a feature-sharded "
            "checkpoint with as many ranks as wrote it and distributed_layers='shard_features'."
        )


__all__ = ["FeatureShardTrainer", "FeatureShardedSetTrainer"]
