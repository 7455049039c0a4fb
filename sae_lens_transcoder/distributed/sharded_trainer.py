"""The set trainer of a layer-sharded run: each rank trains only the transcoders it owns, on
the global batch its :class:`~sae_lens_transcoder.distributed.layers.GlobalBatches` gathers.

An owner alone holds its transcoders' gradients and optimizer state, so nothing is
all-reduced, and since each owner sees the whole global batch its statistics (activation
scale, firing counts, token count) are those of one process with no reduction either. What
the ranks must share is done here: each owner writes its own ``layer_i`` directories into
the checkpoint being built (published once every rank has written its part), logged metrics
and the evaluation go through rank 0, and at the end every owner sends its trained
transcoders to all ranks, so every rank ends with the whole set (and rank 0 writes it).
"""

from pathlib import Path
from typing import Any

import torch
import wandb
from sae_lens.saes.sae import TrainingSAE, TrainStepOutput
from sae_lens.training.activation_scaler import ActivationScaler

from sae_lens_transcoder.distributed.collectives import PeerFailure, broadcast_module_, broadcast_object, gather_to_writer
from sae_lens_transcoder.distributed.layers import GlobalBatches, layer_owners
from sae_lens_transcoder.distributed.trainer import DataParallelSetTrainer
from sae_lens_transcoder.distributed.world import current_world
from sae_lens_transcoder.training.set_trainer import TranscoderSetTrainer
from sae_lens_transcoder.training.trainer import TranscoderTrainer


class LayerShardedSetTrainer(DataParallelSetTrainer):
    """Given the whole set (``saes``, every rank alike), trains this rank's share of it.

    From the data-parallel trainer it keeps the ranks' agreement on stopping and the
    checkpoint protocol; its trainers are plain :class:`TranscoderTrainer` (no gradient
    averaging) and nothing is kept in sync, since no other rank holds a copy being trained.
    """

    trainers: dict[str, TranscoderTrainer]  # type: ignore[assignment]
    trainer_class = TranscoderTrainer

    def __init__(self, *args: Any, saes: dict[str, TrainingSAE[Any]], hook_names: dict[str, str], data_provider: Any, **kwargs: Any):
        world = current_world()
        if len({sae.cfg.normalize_activations for sae in saes.values()}) > 1:
            raise ValueError(
                "distributed_layers='shard' needs one sae.normalize_activations for every transcoder of the set "
                "(the ranks estimate the activation scale together); give the transcoders the same setting."
            )
        self.owners = layer_owners(list(saes), world)
        self.all_saes = dict(saes)
        owned = [name for name in saes if self.owners[name] == world.rank]
        super().__init__(
            *args,
            saes={name: saes[name] for name in owned},
            hook_names={name: hook_names[name] for name in owned},
            data_provider=GlobalBatches(data_provider, self.owners, world),
            **kwargs,
        )
        self.final_sparsity: dict[str, torch.Tensor] | None = None

    def fit(self) -> dict[str, TrainingSAE[Any]]:
        # TranscoderSetTrainer's fit: no replicas to copy from rank 0 or to keep in sync.
        try:
            TranscoderSetTrainer.fit(self)
            self._share_final_transcoders()
        except PeerFailure as failure:
            raise PeerFailure(f"{failure} {self._resume_hint()}") from failure.__cause__
        return self.all_saes

    def _estimate_scaling_factors(self) -> None:
        # The owner's batches are the global ones: one process's estimate, nothing to average.
        TranscoderSetTrainer._estimate_scaling_factors(self)

    def _write_checkpoint_part(self, partial: Path, wandb_aliases: list[str] | None) -> None:
        """Every rank writes its own transcoders' directories and its data position."""
        super(TranscoderSetTrainer, self).save_checkpoint(partial.name, wandb_aliases)

    def feature_sparsities(self) -> dict[str, torch.Tensor]:
        if self.final_sparsity is None:
            raise RuntimeError("the set's feature sparsities are known on every rank only once fit has ended")
        return self.final_sparsity

    def _share_final_transcoders(self) -> None:
        """Every owner's trained transcoders (weights, final sparsity and metadata) on every rank."""
        self.final_sparsity = {}
        for name, sae in self.all_saes.items():
            owner = self.owners[name]
            broadcast_module_(sae, "sending the trained transcoders to every rank", src=owner)
            mine = self.trainers.get(name)
            summary = None if mine is None else (mine.log_feature_sparsity, sae.cfg.metadata.l0, sae.cfg.metadata.num_dead_features)
            sparsity, sae.cfg.metadata.l0, sae.cfg.metadata.num_dead_features = broadcast_object(
                summary, owner, "sending the transcoders' final statistics to every rank"
            )
            self.final_sparsity[name] = sparsity

    def _gathered_log(self, local: dict[str, Any], what: str) -> dict[str, Any]:
        """The ranks' log entries merged on rank 0 (each layer's from its owner); {} elsewhere."""
        found = gather_to_writer(local, self.world, what)
        return {k: v for part in found or [] for k, v in part.items()}

    def _maybe_log_sparsity(self, final: bool = False) -> None:
        # As the set trainer does, the owners' sparsity windows merged before rank 0 logs them.
        signal_number = None if final else self.stop_requested()
        if signal_number is not None:
            self._stop(signal_number)
        local: dict[str, Any] = {}
        for name, trainer in self.trainers.items():
            log = trainer.full_sparsity_window_log() if final else trainer.maybe_reset_sparsity()
            local |= {f"{name}/{k}": v for k, v in log.items()}
        if not self.cfg.logger.log_to_wandb:
            return
        combined = self._gathered_log(local, "gathering the layers' sparsity logs")
        if combined and self.world.is_writer:
            wandb.log(combined, step=self.n_training_steps)

    @torch.no_grad()
    def _log_train_step(self, step_outputs: dict[str, TrainStepOutput]) -> None:
        if not self._is_logging_step():
            return
        local = {
            f"{name}/{k}": v
            for name, trainer in self.trainers.items()
            for k, v in trainer.build_train_step_log_dict(output=step_outputs[name], n_training_samples=self.n_training_samples).items()
        }
        combined = self._gathered_log(local, "gathering the layers' training metrics")
        if self.world.is_writer:
            wandb.log({"details/n_training_samples": self.n_training_samples} | combined, step=self.n_training_steps)

    @torch.no_grad()
    def _run_and_log_evals(self) -> None:
        """The set evaluated as a whole on every rank (the evaluator sums over the ranks'
        tokens), after each owner sent its current transcoders and scales to all ranks."""
        if (self.n_training_steps + 1) % (self.cfg.logger.wandb_log_frequency * self.cfg.logger.eval_every_n_wandb_logs) != 0:
            return
        scalers: dict[str, ActivationScaler] = {}
        for name, sae in self.all_saes.items():
            owner = self.owners[name]
            broadcast_module_(sae, "sending the transcoders to every rank for evaluation", src=owner)
            mine = self.trainers.get(name)
            scale = broadcast_object(mine and mine.activation_scaler.scaling_factor, owner, "sending activation scales")
            scalers[name] = mine.activation_scaler if mine is not None else ActivationScaler(scaling_factor=scale)
        for sae in self.all_saes.values():
            sae.eval()
        try:
            if self.evaluator is not None:
                metrics = self.evaluator(
                    saes=self.all_saes, data_provider=self.data_provider, activation_scalers=scalers, hook_names=self.hook_names
                )
                if self.world.is_writer:
                    wandb.log(metrics, step=self.n_training_steps)
            if self.world.is_writer:
                histograms = {f"{name}/{k}": wandb.Histogram(v) for name, sae in self.all_saes.items() for k, v in sae.log_histograms().items()}  # type: ignore[arg-type]
                if histograms:
                    wandb.log(histograms, step=self.n_training_steps)
        finally:
            for sae in self.all_saes.values():
                sae.train()
