"""SAELens's ``MultiSAETrainer`` for a transcoder set: N transcoders in lockstep on one
activation stream, exact to stop and resume. A single transcoder is the set of one.

Each transcoder keeps its own :class:`TranscoderTrainer` (optimizer, schedules, scaler,
dead-feature counters); the coordinator adds what ``TranscoderTrainer`` adds to one run:
stop requests honoured between steps after a checkpoint, resumed checkpoint thresholds,
checkpoint directories that appear whole, progress from the first step, and training on the
batches the activation-scale estimate reads.
"""

import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from sae_lens.saes.sae import TrainStepOutput
from sae_lens.training.multi_sae_trainer import MultiSAETrainer

from sae_lens_transcoder.training.trainer import TrainingInterrupted, TranscoderTrainer


class TranscoderSetTrainer(MultiSAETrainer):
    """``MultiSAETrainer`` whose per-transcoder trainers are :class:`TranscoderTrainer`."""

    trainers: dict[str, TranscoderTrainer]  # type: ignore[assignment]
    trainer_class: type[TranscoderTrainer] = TranscoderTrainer

    def __init__(
        self,
        *args: Any,
        stop_requested: Callable[[], int | None] = lambda: None,
        replayed_batches: Callable[[], AbstractContextManager[None]] = nullcontext,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.stop_requested = stop_requested
        self.replayed_batches = replayed_batches
        # MultiSAETrainer builds plain SAETrainers inline (no trainer seam): rebuild them as
        # ours with the same per-transcoder config it gave them.
        per_sae_cfg = replace(self.cfg, n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False)
        self.trainers = {
            name: self.trainer_class(cfg=per_sae_cfg, sae=sae, data_provider=iter(()))
            for name, sae in self.saes.items()
        }

    def _estimate_scaling_factors(self) -> None:
        # Overrides a private: SAELens estimates the activation scale from the first
        # n_batches_for_norm_estimate training batches and then drops them; replayed, they are
        # trained on too, so no LLM batch is computed for nothing.
        with self.replayed_batches():
            super()._estimate_scaling_factors()

    def _maybe_log_sparsity(self, final: bool = False) -> None:
        # Overrides a private: it runs first in every iteration of fit, between two steps.
        signal_number = None if final else self.stop_requested()
        if signal_number is not None:
            self._stop(signal_number)
        super()._maybe_log_sparsity(final)

    def _stop(self, signal_number: int) -> None:
        checkpoint = None
        if self.cfg.checkpoint_path is not None:
            self.save_checkpoint(checkpoint_name=str(self.n_training_samples))
            checkpoint = Path(self.cfg.checkpoint_path) / str(self.n_training_samples)
            how = f"resume with --resume_from_checkpoint {checkpoint}"
        else:
            how = "no checkpoint was saved (checkpoint_path is None)"
        raise TrainingInterrupted(
            f"training stopped by signal {signal_number} after {self.n_training_steps} steps "
            f"({self.n_training_samples:,} tokens); {how}.",
            checkpoint,
            signal_number,
        )

    def load_checkpoint(self, path: str | Path) -> None:
        super().load_checkpoint(path)
        # Thresholds already passed were checkpointed by the run being resumed.
        self.checkpoint_thresholds = [t for t in self.checkpoint_thresholds if t >= self.n_training_samples]

    def save_checkpoint(self, checkpoint_name: str, wandb_aliases: list[str] | None = None) -> None:
        if self.cfg.checkpoint_path is None:
            super().save_checkpoint(checkpoint_name, wandb_aliases)
            return
        base = Path(self.cfg.checkpoint_path)
        base.mkdir(parents=True, exist_ok=True)
        target = base / checkpoint_name
        if target.exists():
            return  # written at this very state already (a periodic checkpoint, then a stop)
        partial = new_partial_checkpoint(base, checkpoint_name)
        try:
            super().save_checkpoint(partial.name, wandb_aliases)
            publish_checkpoint(partial, target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    def feature_sparsities(self) -> dict[str, torch.Tensor]:
        """Each transcoder's log feature sparsity by name, as the final outputs record it (a
        layer-sharded trainer has it for layers other ranks trained, too)."""
        return {name: trainer.log_feature_sparsity for name, trainer in self.trainers.items()}

    def _update_pbar(self, step_outputs: dict[str, TrainStepOutput], pbar: Any, update_interval: int = 100) -> None:  # noqa: ARG002
        # Overrides a private: SAELens moves the bar only every 100 steps (minutes at 0 on
        # CPU) and starts a resumed run's bar at 0; show the tokens trained so far instead.
        pbar.update(self.n_training_samples - pbar.n)
        losses = {name: out.loss.item() for name, out in step_outputs.items()}
        if len(losses) <= 4:
            text = " | ".join(f"{name}: {loss:.4f}" for name, loss in losses.items())
        else:
            worst = max(losses, key=losses.__getitem__)
            text = f"mean loss {sum(losses.values()) / len(losses):.4f}, highest {worst}: {losses[worst]:.4f}"
        pbar.set_description(f"step {self.n_training_steps} | {text}", refresh=False)


def new_partial_checkpoint(base: Path, checkpoint_name: str) -> Path:
    """A fresh hidden directory beside the checkpoint, which appears only once complete."""
    return Path(tempfile.mkdtemp(prefix=f".{checkpoint_name}.", suffix=".partial", dir=base))


def publish_checkpoint(partial: Path, target: Path) -> None:
    """Rename a fully written checkpoint into place (readable like any directory)."""
    os.chmod(partial, 0o755)
    os.rename(partial, target)
