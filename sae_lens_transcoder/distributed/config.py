"""Checking and completing a runner config for the world it trains in."""

from typing import Any

from sae_lens.config import LanguageModelSAERunnerConfig

from sae_lens_transcoder.distributed.collectives import broadcast_from_writer
from sae_lens_transcoder.distributed.data import per_rank_batch_tokens
from sae_lens_transcoder.distributed.world import World


def prepare_config_for_world(cfg: LanguageModelSAERunnerConfig[Any], world: World) -> None:
    """Refuse what data parallelism cannot do, and give every rank rank 0's run directory.

    SAELens appends a random run id to ``checkpoint_path`` in each process; all ranks must
    write into the same checkpoint, rank 0's.
    """
    if not world.is_distributed:
        return
    per_rank_batch_tokens(cfg.train_batch_size_tokens, world)
    if cfg.sae.normalize_activations == "covariance_whitening":
        raise ValueError(
            "sae.normalize_activations='covariance_whitening' is not supported in data-parallel training "
            "(its statistics would be each rank's own); use 'expected_average_only_in' or 'none', or train on one rank."
        )
    cfg.checkpoint_path = broadcast_from_writer(cfg.checkpoint_path, world, "agreeing on the checkpoint path")
