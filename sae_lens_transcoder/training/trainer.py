"""SAELens's ``SAETrainer`` made exact to stop and resume, and strict about non-finite losses.

What it adds, all through the trainer's public seams except the progress bar:
- stop requests (SIGINT/SIGTERM) are honoured only between steps, where the state is whole,
  with a checkpoint written first;
- a resumed trainer has the same step counter and pending checkpoints as the uninterrupted
  run (SAELens saves mid-step, one step behind, and re-arms every checkpoint threshold);
- checkpoint directories appear complete or not at all;
- a NaN/inf loss stops training at once, naming the step, before anything is saved.
"""

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from sae_lens.saes.sae import TrainStepOutput
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_transcoder._sae_lens_privates import InterruptedException


class TrainingInterrupted(InterruptedException):
    """Training stopped on request after saving a resumable checkpoint (or with none configured)."""

    def __init__(self, message: str, checkpoint: Path | None, signal_number: int | None):
        super().__init__(message)
        self.checkpoint = checkpoint
        self.signal_number = signal_number


class NonFiniteLossError(ValueError):
    """A training step produced a NaN or inf loss."""


class TranscoderTrainer(SAETrainer):  # type: ignore[type-arg]
    """``SAETrainer`` plus exact interruption and resume; used by our runner for every run."""

    def __init__(self, *args: Any, stop_requested: Callable[[], int | None] = lambda: None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.stop_requested = stop_requested

    def step(self, batch: torch.Tensor) -> TrainStepOutput:
        output = super().step(batch)
        if not torch.isfinite(output.loss):
            losses = ", ".join(f"{k}={v.item():.4g}" for k, v in output.losses.items())
            raise NonFiniteLossError(
                f"training step {self.n_training_steps}: the loss is {output.loss.item()} ({losses}). "
                "Lower lr or the sparsity coefficient, or check the activations' scale; nothing was "
                "saved from this step and the last complete checkpoint is kept."
            )
        return output

    def maybe_reset_sparsity(self) -> dict[str, Any]:
        # Called first in every iteration of SAETrainer.fit: the one point between two steps.
        signal_number = self.stop_requested()
        if signal_number is not None:
            self._stop(signal_number)
        return super().maybe_reset_sparsity()

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

    def load_trainer_state(self, checkpoint_path: Path | str) -> None:
        super().load_trainer_state(checkpoint_path)
        # SAETrainer checkpoints after a step but before counting it; every step sees a
        # full batch, so the number of finished steps follows from the samples.
        self.n_training_steps = self.n_training_samples // self.cfg.train_batch_size_samples
        # Thresholds already passed were checkpointed by the run being resumed.
        self.checkpoint_thresholds = [t for t in self.checkpoint_thresholds if t >= self.n_training_samples]

    def save_checkpoint(
        self,
        checkpoint_name: str,
        base_path: Path | str | None = None,
        wandb_aliases: list[str] | None = None,
    ) -> None:
        base = base_path if base_path is not None else self.cfg.checkpoint_path
        if base is None:
            super().save_checkpoint(checkpoint_name, base_path, wandb_aliases)
            return
        base = Path(base)
        base.mkdir(parents=True, exist_ok=True)
        target = base / checkpoint_name
        if target.exists():
            return  # written at this very state already (a periodic checkpoint, then a stop)
        partial = Path(tempfile.mkdtemp(prefix=f".{checkpoint_name}.", suffix=".partial", dir=base))
        try:
            super().save_checkpoint(partial.name, base, wandb_aliases)
            os.chmod(partial, 0o755)
            os.rename(partial, target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    def _update_pbar(self, step_output: TrainStepOutput, pbar: Any, update_interval: int = 100) -> None:
        # Overrides a private: SAELens moves the bar only every 100 steps (minutes at 0 on CPU).
        pbar.update(self.cfg.train_batch_size_samples)
        if self.n_training_steps % update_interval == 1 or update_interval == 1:
            losses = " | ".join(f"{name}: {value.item():.5f}" for name, value in step_output.losses.items())
            pbar.set_description(f"{self.n_training_steps}| {losses}", refresh=False)
