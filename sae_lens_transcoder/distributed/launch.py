"""What a restarted torchrun job needs: the same command finds where the last attempt got to."""

from pathlib import Path
from typing import Any

from sae_lens.config import LanguageModelSAERunnerConfig

from sae_lens_transcoder.distributed.checkpoint import latest_complete_checkpoint
from sae_lens_transcoder.distributed.collectives import broadcast_from_writer
from sae_lens_transcoder.distributed.world import World
from sae_lens_transcoder.training.checkpoint_view import CHECKPOINT_COMPLETE_FILENAME


def resume_latest(cfg: LanguageModelSAERunnerConfig[Any], world: World) -> None:
    """Point ``resume_from_checkpoint`` at the newest complete checkpoint of any earlier run
    under ``checkpoint_path`` (rank 0 looks, so every rank resumes from the same one); leave
    it unset when there is none, so the first attempt starts fresh. Give each experiment its
    own ``checkpoint_path``: another run's checkpoints there would be taken too."""
    if cfg.checkpoint_path is None:
        raise ValueError("--resume-latest needs --checkpoint_path: it resumes from the checkpoints saved there.")
    if cfg.resume_from_checkpoint is not None:
        raise ValueError("give either --resume-latest or --resume_from_checkpoint, not both.")
    # SAELens appended this run's id to checkpoint_path; earlier runs are its siblings.
    base = Path(cfg.checkpoint_path).parent
    found = latest_complete_checkpoint(base, CHECKPOINT_COMPLETE_FILENAME) if world.is_writer else None
    latest = broadcast_from_writer(found, world, "agreeing on the checkpoint to resume from")
    if latest is not None:
        cfg.resume_from_checkpoint = str(latest)
