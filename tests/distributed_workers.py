"""What each rank runs in tests/test_distributed.py: a real runner in a real gloo group.

Kept apart from the test module so spawned ranks import only this (and conftest's builders).
"""

import copy
import datetime
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from datasets import Dataset
from sae_lens import LanguageModelSAERunnerConfig
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from sae_lens.util import temporary_seed

from sae_lens_transcoder import TrainingTranscoder, TranscoderTrainingRunner
from sae_lens_transcoder.cli import main
from sae_lens_transcoder.hooks import mlp_out_hook
from tests.conftest import build_model, runner_config

BATCH = 256  # the global batch
N_STEPS = 40
WRITE_EVENTS = ("os.rename", "os.replace", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.chmod")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dataset() -> Dataset:
    ids = torch.randint(1, 300, (600, 32), generator=torch.Generator().manual_seed(1))
    return Dataset.from_dict({"input_ids": ids.tolist()})


def job_config(root: Path, name: str, **overrides: Any) -> LanguageModelSAERunnerConfig[Any]:
    """The run every test trains: checkpoints, dead-feature windows and warm-ups straddling
    them, the activation scale estimated, biases initialised from the data."""
    settings: dict[str, Any] = dict(
        training_tokens=BATCH * N_STEPS,
        train_batch_size_tokens=BATCH,
        n_checkpoints=3,
        checkpoint_path=str(root / name / "ckpt"),
        output_path=str(root / name / "out"),
        feature_sampling_window=7,
        dead_feature_window=5,
        lr_warm_up_steps=4,
        lr_scheduler_name="cosineannealing",
        activations_mixing_fraction=0.0,  # the data order of one process is then defined
    )
    sae = {"normalize_activations": "expected_average_only_in", **overrides.pop("sae", {})}
    if sae.get("architecture", "transcoder") == "transcoder":
        sae["l1_warm_up_steps"] = 10
    settings["sae"] = sae
    settings.update(overrides)
    return runner_config(**settings)


def tiny_clt_train_argv(out: Path) -> list[str]:
    """`train` of a small CLT on the bundled tiny model into ``out``, for the distributed modes' refusals."""
    return [
        "train", "--architecture", "clt", "--mlp_layers", "all", "--d_in", "128", "--d_sae", "96", "--normalize_activations", "none",
        "--model_name", "tiny-gpt2", "--dataset_path", "embedded", "--is_dataset_tokenized", "False", "--streaming", "False",
        "--context_size", "64", "--log_to_wandb", "False", "--output_path", str(out),
    ]


class KillsAtStep:
    """Mixed into a training SAE class: dies (SIGKILL, no clean-up) in the middle of training
    step ``at_step``, like a lost machine."""

    at_step = 25

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        if step_input.n_training_steps == self.at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().training_forward_pass(step_input)  # type: ignore[misc,no-any-return]


class KillAt(KillsAtStep, TrainingTranscoder):
    """A transcoder that dies in step 25."""


def set_dying_at_layer(cfg: LanguageModelSAERunnerConfig[Any], n_layers: int, kill_layer: int) -> dict[int, Any]:
    """The runner's initial set of MLPs 0..n_layers-1 (seeded per layer, as it builds them),
    with ``kill_layer``'s transcoder a :class:`KillAt`."""
    saes = {}
    for layer in range(n_layers):
        layer_cfg = replace(copy.deepcopy(cfg.sae), mlp_layer=layer, mlp_layers=None, hook_name_out=mlp_out_hook(layer))
        with temporary_seed(cfg.seed + layer):
            saes[layer] = (KillAt if layer == kill_layer else TrainingTranscoder)(layer_cfg)
    return saes


def record_writes(under: Path) -> list[str]:
    """Every file or directory change this process makes under ``under`` from Python (opening
    for writing, renaming, creating, removing), as ``"event path"`` lines. Files that Rust
    code writes (safetensors) are not seen; the runner names those per rank."""
    seen: list[str] = []
    root = str(under)

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open":
            path, mode, flags = args
            writes = any(c in (mode or "") for c in "wax+") or bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        elif event in WRITE_EVENTS:
            path, writes = args[0], True
        else:
            return
        if writes and isinstance(path, str | os.PathLike) and os.fspath(path).startswith(root):
            seen.append(f"{event} {os.fspath(path)}")

    sys.addaudithook(hook)
    return seen


@contextmanager
def errors_recorded(results: Path, rank: int) -> Iterator[None]:
    """Run a rank's work: an error is written to ``results/rank<r>.error`` (for the test to read)
    and raised; the process group ends either way."""
    try:
        yield
    except BaseException as error:
        (results / f"rank{rank}.error").write_text(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_rank(rank: int, world_size: int, port: int, job: dict[str, Any], results: str) -> None:
    """Train ``job`` as ``rank``; write the transcoder's state (or the error) under ``results``."""
    # The fork server's environment is the one it started with: a job's own variables go here.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **job.get("env", {}))
    torch.set_num_threads(1)
    out = Path(results)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    writes = record_writes(Path(job["root"]) / job["name"]) if rank > 0 else []
    with errors_recorded(out, rank):
        cfg = job_config(Path(job["root"]), job["name"], **job.get("overrides", {}))
        sae, saes = None, None
        if rank == job.get("kill_rank"):
            if cfg.sae.mlp_layers is None:
                with temporary_seed(cfg.seed + 1):  # the runner's initial weights for MLP 1
                    sae = KillAt(cfg.sae)
            else:
                saes = set_dying_at_layer(cfg, job["n_layers"], job["kill_layer"])
        runner = TranscoderTrainingRunner(
            cfg,
            override_model=build_model("gpt2", n_layers=job.get("n_layers", 2)),
            override_dataset=dataset(),
            override_sae=sae,
            override_saes=saes,
            distributed_layers=job.get("layers", "replicate"),
        )
        runner.run()
        assert runner.trainer is not None
        trainers = runner.trainer.trainers
        torch.save(
            {
                "weights": {name: trainer.sae.state_dict() for name, trainer in trainers.items()},
                "set": {layer: transcoder.state_dict() for layer, transcoder in runner.transcoders.items()},
                "since_fired": {name: trainer.n_forward_passes_since_fired for name, trainer in trainers.items()},
                "act_freq": {name: trainer.act_freq_scores for name, trainer in trainers.items()},
                "steps": runner.trainer.n_training_steps,
                "checkpoint_path": cfg.checkpoint_path,
                "writes": list(writes),
            },
            out / f"rank{rank}.pt",
        )


def attribute_rank(rank: int, world_size: int, port: int, job: dict[str, Any], results: str) -> None:
    """``sae-lens-transcoder attribute job["argv"]`` as ``rank`` (the error, if any, under ``results``)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    with errors_recorded(Path(results), rank):
        main(job["argv"])


def spawn_ranks(
    job: dict[str, Any], results: Path, world_size: int = 2, join_timeout_s: float = 240, target: Callable[..., None] = run_rank
) -> list[int | None]:
    """Start the ranks as separate processes running ``target`` and wait for each; their exit codes."""
    results.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # A fork server that imported everything once forks each rank: no per-rank start-up.
    context = mp.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    processes = [context.Process(target=target, args=(r, world_size, port, job, str(results))) for r in range(world_size)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(join_timeout_s)
    codes = [process.exitcode for process in processes]
    for process in processes:
        if process.is_alive():
            process.kill()
    return codes
