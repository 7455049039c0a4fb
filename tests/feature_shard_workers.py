"""What each rank runs in tests/test_feature_sharding.py: a feature-sharded CLT in a real gloo group.

Kept apart from the test module so spawned ranks import only this (and the data-parallel
workers' helpers).
"""

import copy
import datetime
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from sae_lens import LanguageModelSAERunnerConfig
from sae_lens.util import temporary_seed

from sae_lens_transcoder import TranscoderTrainingRunner
from sae_lens_transcoder.saes.clt import TrainingCrossLayerTranscoder
from tests.conftest import build_model
from tests.distributed_workers import KillsAtStep, dataset, errors_recorded, job_config

N_LAYERS = 2


class KillAtCLT(KillsAtStep, TrainingCrossLayerTranscoder):
    """A cross-layer transcoder that dies in step 25."""


def dying_clt(cfg: LanguageModelSAERunnerConfig[Any]) -> KillAtCLT:
    """The runner's initial CLT over every MLP (seeded as it builds it), as a :class:`KillAtCLT`."""
    clt_cfg = replace(copy.deepcopy(cfg.sae), n_layers=N_LAYERS, mlp_layer=None, hook_name_out=None)
    with temporary_seed(cfg.seed):
        return KillAtCLT(clt_cfg)


def run_feature_sharded_rank(rank: int, world_size: int, port: int, job: dict[str, Any], results: str) -> None:
    """Train ``job`` feature sharded as ``rank``; write its share, counters and (rank 0) the whole CLT."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **job.get("env", {}))
    torch.set_num_threads(1)
    out = Path(results)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    with errors_recorded(out, rank):
        cfg = job_config(Path(job["root"]), job["name"], **job.get("overrides", {}))
        runner = TranscoderTrainingRunner(
            cfg,
            override_model=build_model("gpt2", n_layers=N_LAYERS),
            override_dataset=dataset(),
            override_sae=dying_clt(cfg) if rank == job.get("kill_rank") else None,
            distributed_layers="shard_features",
        )
        trained = runner.run()
        assert runner.trainer is not None
        (trainer,) = runner.trainer.trainers.values()
        torch.save(
            {
                "shard": trainer.sae.state_dict(),
                "whole": trained.state_dict() if rank == 0 else None,
                "since_fired": trainer.n_forward_passes_since_fired,
                "act_freq": trainer.act_freq_scores,
                "steps": runner.trainer.n_training_steps,
                "l0": trained.cfg.metadata.l0,
                "dead": trained.cfg.metadata.num_dead_features,
            },
            out / f"rank{rank}.pt",
        )
