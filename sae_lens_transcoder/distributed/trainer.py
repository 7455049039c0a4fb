"""Data-parallel trainers: every rank holds a replica of every transcoder and trains it on its
own shard of the stream, so that each step is the step one process would take on the global
batch (the ranks' batches side by side).

SAELens's ``SAETrainer`` calls ``training_forward_pass``, not ``forward``, so DDP (which
hooks ``forward``) cannot wrap the transcoder; its gradients are averaged instead by
``torch.distributed.all_reduce`` in post-accumulate-grad hooks, which run inside
``backward`` and so before SAELens clips the gradient norm.
"""

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from sae_lens.saes.sae import TrainingSAE, TrainStepOutput

from sae_lens_transcoder.distributed.checkpoint import latest_complete_checkpoint
from sae_lens_transcoder.distributed.collectives import (
    PeerFailure,
    all_ranks_ok,
    all_reduce_,
    broadcast_from_writer,
    broadcast_module_,
    max_of_int,
    mean_of_floats,
)
from sae_lens_transcoder.distributed.replicas import mean_across_replicas, replicas_in_sync, syncing_world
from sae_lens_transcoder.distributed.world import World, current_world
from sae_lens_transcoder.training.checkpoint_view import CHECKPOINT_COMPLETE_FILENAME
from sae_lens_transcoder.training.set_trainer import TranscoderSetTrainer, new_partial_checkpoint, publish_checkpoint
from sae_lens_transcoder.training.trainer import TranscoderTrainer


class CheckpointNotWritten(RuntimeError):
    """Some rank could not write its part of a checkpoint, so none of it was kept."""


def _average_gradient(param: torch.Tensor) -> None:
    world = syncing_world()
    if world is None or param.grad is None:
        return
    all_reduce_(param.grad, what="averaging gradients")
    param.grad.div_(world.size)


def _mean_of_numbers(metrics: dict[str, Any], world: World, what: str) -> dict[str, Any]:
    """Numeric metrics averaged over ranks (per-rank means of equal-sized batches); others kept."""
    keys = [k for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)]
    means = mean_of_floats([float(metrics[k]) for k in keys], world, what)
    return metrics | {k: (round(m) if isinstance(metrics[k], int) else m) for k, m in zip(keys, means)}


class DataParallelTrainer(TranscoderTrainer):
    """One transcoder's trainer on one rank: gradients averaged over the ranks, dead-feature
    counters and the token count those of the global batch, logged metrics averaged."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.world = current_world()
        self._gradient_hooks = [
            p.register_post_accumulate_grad_hook(_average_gradient) for p in self.sae.parameters() if p.requires_grad
        ]

    def remove_gradient_hooks(self) -> None:
        """The transcoder is an ordinary module again (e.g. for attribution after training)."""
        for hook in self._gradient_hooks:
            hook.remove()
        self._gradient_hooks = []

    def reduced_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return mean_across_replicas(loss.detach())

    def step(self, batch: torch.Tensor) -> TrainStepOutput:
        fired_before = self.act_freq_scores.clone()
        output = super().step(batch)
        # A feature fired in the global batch iff on some rank: firing counts add up, and
        # "steps since fired" is the smallest over the ranks (all started equal).
        fired = all_reduce_(self.act_freq_scores - fired_before, what="summing feature firing counts")
        self.act_freq_scores = fired_before + fired
        all_reduce_(self.n_forward_passes_since_fired, dist.ReduceOp.MIN, what="reducing dead-feature counters")
        # The counts SAELens schedules by (checkpoints, the end) are of global tokens.
        self.n_training_samples += (self.world.size - 1) * batch.shape[0]
        return output

    @torch.no_grad()
    def build_train_step_log_dict(self, output: TrainStepOutput, n_training_samples: int) -> dict[str, Any]:
        log = super().build_train_step_log_dict(output=output, n_training_samples=n_training_samples)
        return _mean_of_numbers(log, self.world, "averaging logged metrics")


class DataParallelSetTrainer(TranscoderSetTrainer):
    """The set trainer on one rank of a data-parallel run; the ranks agree on every decision
    (stop, checkpoint, scaling factor) so they always run the same collectives. (The
    evaluator sums its statistics over the ranks itself.)"""

    trainers: dict[str, DataParallelTrainer]  # type: ignore[assignment]
    trainer_class = DataParallelTrainer

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.world = current_world()
        self.resumed_from: Path | None = None
        local_stop = self.stop_requested
        # A signal reaches the ranks at different steps; all stop after the first step any saw it.
        self.stop_requested = lambda: max_of_int(local_stop() or 0, "agreeing on a stop request") or None

    def fit(self) -> dict[str, TrainingSAE[Any]]:
        with replicas_in_sync(self.world):
            try:
                for sae in self.saes.values():
                    broadcast_module_(sae, "copying rank 0's transcoder weights")
                return super().fit()
            except PeerFailure as failure:
                raise PeerFailure(f"{failure} {self._resume_hint()}") from failure.__cause__
            finally:
                for trainer in self.trainers.values():
                    trainer.remove_gradient_hooks()

    def _resume_hint(self) -> str:
        if self.cfg.checkpoint_path is None:
            return "No checkpoint was configured (checkpoint_path is None); the run must start again."
        # This run's last checkpoint, else the one it resumed from.
        latest = latest_complete_checkpoint(Path(self.cfg.checkpoint_path), CHECKPOINT_COMPLETE_FILENAME, pattern="*")
        if latest is None and self.resumed_from is not None:
            latest = self.resumed_from
        if latest is None:
            return "No complete checkpoint was written yet; the run must start again."
        return (
            f"The last complete checkpoint, {latest}, is intact: restart all ranks with "
            f"--resume_from_checkpoint {latest} (or --resume-latest, e.g. under torchrun --max-restarts)."
        )

    def load_checkpoint(self, path: str | Path) -> None:
        super().load_checkpoint(path)
        self.resumed_from = Path(path)

    @torch.no_grad()
    def _estimate_scaling_factors(self) -> None:
        # Each rank estimates from its own batches; the global mean norm is the mean of the
        # ranks' mean norms (equal batch counts and sizes), and the factor is sqrt(d_in) over it.
        pending = [name for name, t in self.trainers.items() if t.activation_scaler.scaling_factor is None]
        super()._estimate_scaling_factors()
        for name in pending:
            scaler = self.trainers[name].activation_scaler
            if scaler.scaling_factor is None:
                continue
            root_d = self.saes[name].cfg.d_in**0.5
            (mean_norm,) = mean_of_floats([root_d / scaler.scaling_factor], self.world, "averaging activation norms")
            scaler.scaling_factor = root_d / mean_norm

    def save_checkpoint(self, checkpoint_name: str, wandb_aliases: list[str] | None = None) -> None:
        """Rank 0 writes the shared files, every rank its data position, into one hidden
        directory that rank 0 renames into place only once every rank has written its part."""
        if self.cfg.checkpoint_path is None:
            if self.world.is_writer:  # a wandb-only checkpoint, or nothing
                super().save_checkpoint(checkpoint_name, wandb_aliases)
            return
        base = Path(self.cfg.checkpoint_path)
        target = base / checkpoint_name
        partial = None
        if self.world.is_writer and not target.exists():
            base.mkdir(parents=True, exist_ok=True)
            partial = new_partial_checkpoint(base, checkpoint_name)
        partial = broadcast_from_writer(partial, self.world, "agreeing on the checkpoint directory")
        if partial is None:
            return  # written at this very state already (a periodic checkpoint, then a stop)
        error: Exception | None = None
        try:
            self._write_checkpoint_part(partial, wandb_aliases)
        except Exception as e:  # noqa: BLE001  (re-raised below, after the ranks agree)
            error = e
        everyone = all_ranks_ok(error is None, "confirming every rank wrote its checkpoint files")
        try:
            if error is not None:
                raise error
            if not everyone:
                raise CheckpointNotWritten(
                    f"another rank could not write its part of checkpoint {target} (see its error); the "
                    "checkpoint was discarded and the earlier ones are intact."
                )
            if self.world.is_writer:
                publish_checkpoint(partial, target)
        finally:
            if self.world.is_writer:
                shutil.rmtree(partial, ignore_errors=True)

    def _write_checkpoint_part(self, partial: Path, wandb_aliases: list[str] | None) -> None:
        """This rank's files of a checkpoint: rank 0 the transcoders and shared files, the
        others only their data position (through the runner's ``save_checkpoint_fn``)."""
        if self.world.is_writer:
            super(TranscoderSetTrainer, self).save_checkpoint(partial.name, wandb_aliases)
        else:
            assert self.save_checkpoint_fn is not None
            self.save_checkpoint_fn(checkpoint_path=partial)

    def _update_pbar(self, step_outputs: dict[str, TrainStepOutput], pbar: Any, update_interval: int = 100) -> None:
        if self.world.is_writer:  # one progress bar for the run, not one per rank
            super()._update_pbar(step_outputs, pbar, update_interval)
