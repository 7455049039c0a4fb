"""Data-parallel training on 2 CPU ranks (gloo), spawned here: the same training as one
process on the global batch, exact resume after a rank is killed, one writer, torchrun."""

import json
from collections.abc import Iterator
from contextlib import contextmanager
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from sae_lens import SAE, LoggingConfig

from sae_lens_transcoder import TranscoderTrainingRunner
from sae_lens_transcoder.cli import main
from sae_lens_transcoder.distributed.data import per_rank_batch_tokens
from sae_lens_transcoder.distributed.launch import resume_latest
from sae_lens_transcoder.distributed.layers import check_enough_layers
from sae_lens_transcoder.distributed.world import World
from sae_lens_transcoder.replacement.saving import layer_dir
from sae_lens_transcoder.training.checkpoint_view import CHECKPOINT_COMPLETE_FILENAME
from tests.conftest import build_model
from sae_lens_transcoder.models import load_model
from tests.circuit_fixtures import save_random_transcoders
from tests.wandb_offline import history_rows
from tests.distributed_workers import attribute_rank, dataset, job_config, spawn_ranks, tiny_clt_train_argv

REPO = Path(__file__).resolve().parents[1]
STORE_BATCH_PROMPTS = 4  # 4 x 32 tokens: one LLM batch is one rank's share of the 256-token global batch


def _checkpoints(root: Path, name: str) -> list[Path]:
    found = [c for c in (root / name / "ckpt").glob("*/*") if not c.name.startswith(".")]
    return sorted(found, key=lambda c: int(c.name))


def _rank_order(ds: Dataset, world: int = 2) -> Dataset:
    """The rows in the order one process must read them to see the ranks' batches side by side:
    rank r reads the r-th contiguous shard, one LLM batch per training step."""
    ids = torch.tensor(ds["input_ids"])
    n = len(ids) // world
    shards = [ids[r * n : (r + 1) * n] for r in range(world)]
    blocks = [shard[i : i + STORE_BATCH_PROMPTS] for i in range(0, n, STORE_BATCH_PROMPTS) for shard in shards]
    return Dataset.from_dict({"input_ids": torch.cat(blocks).tolist()})


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def full_run(root: Path) -> dict[int, dict[str, Any]]:
    """The uninterrupted 2-rank run, as each rank ended it."""
    codes = spawn_ranks({"root": str(root), "name": "full"}, root / "full-results")
    errors = [p.read_text() for p in (root / "full-results").glob("*.error")]
    assert codes == [0, 0], errors
    return {rank: torch.load(root / "full-results" / f"rank{rank}.pt") for rank in (0, 1)}


def _train_single(root: Path, name: str, n_layers: int = 2, **overrides: Any) -> TranscoderTrainingRunner:
    """One process on the global batch, reading the ranks' data side by side (on one thread, as
    each rank runs: two threads on this machine's two shared cores take 20 times longer)."""
    single = TranscoderTrainingRunner(
        job_config(root, name, store_batch_size_prompts=2 * STORE_BATCH_PROMPTS, **overrides),
        override_model=build_model("gpt2", n_layers=n_layers),
        override_dataset=_rank_order(dataset()),
    )
    with _one_thread():
        single.run()
    return single


@contextmanager
def _one_thread() -> Iterator[None]:
    """Torch on one thread, as each spawned rank is (its float sums are then the ranks')."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _assert_ranks_match_one_process(ranks: tuple[dict[str, Any], ...], single: TranscoderTrainingRunner) -> None:
    assert single.trainer is not None
    for name, trainer in single.trainer.trainers.items():
        for key, value in trainer.sae.state_dict().items():
            torch.testing.assert_close(ranks[0]["weights"][name][key], value, rtol=0, atol=1e-5)
            assert torch.equal(ranks[0]["weights"][name][key], ranks[1]["weights"][name][key]), f"the ranks' {name}.{key} differ"
        for rank in ranks:
            assert rank["steps"] == single.trainer.n_training_steps == 40
            # Dead-feature statistics are the global batch's, on every rank.
            assert torch.equal(rank["since_fired"][name], trainer.n_forward_passes_since_fired)
            assert torch.equal(rank["act_freq"][name], trainer.act_freq_scores)


def test_two_ranks_train_as_one_process_does_on_the_global_batch(root: Path, full_run: dict[int, dict[str, Any]]) -> None:
    _assert_ranks_match_one_process((full_run[0], full_run[1]), _train_single(root, "single"))
    assert full_run[0]["checkpoint_path"] == full_run[1]["checkpoint_path"]


def test_a_two_rank_set_trains_as_one_process_does(root: Path) -> None:
    layers = {"sae": {"mlp_layer": None, "mlp_layers": "0-1"}, "n_checkpoints": 0}
    codes = spawn_ranks({"root": str(root), "name": "set", "overrides": layers}, root / "set-results")
    assert codes == [0, 0], [p.read_text() for p in (root / "set-results").glob("*.error")]
    ranks = tuple(torch.load(root / "set-results" / f"rank{rank}.pt") for rank in (0, 1))
    assert sorted(ranks[0]["weights"]) == ["layer_0", "layer_1"]
    _assert_ranks_match_one_process(ranks, _train_single(root, "single-set", **layers))


SHARDED_SET = {"sae": {"mlp_layer": None, "mlp_layers": "all"}}


@pytest.fixture(scope="module")
def sharded_run(root: Path) -> tuple[dict[str, Any], ...]:
    """The uninterrupted layer-sharded 2-rank run of a 3-layer set, as each rank ended it."""
    job = {"root": str(root), "name": "sharded", "overrides": SHARDED_SET, "layers": "shard", "n_layers": 3}
    codes = spawn_ranks(job, root / "sharded-results")
    assert codes == [0, 0], [p.read_text() for p in (root / "sharded-results").glob("*.error")]
    return tuple(torch.load(root / "sharded-results" / f"rank{rank}.pt") for rank in (0, 1))


def test_a_layer_sharded_set_trains_as_one_process_does(root: Path, sharded_run: tuple[dict[str, Any], ...]) -> None:
    # Round-robin: rank 0 trains layers 0 and 2, rank 1 layer 1, each on both ranks' batches.
    assert sorted(sharded_run[0]["weights"]) == ["layer_0", "layer_2"]
    assert sorted(sharded_run[1]["weights"]) == ["layer_1"]
    single = _train_single(root, "single-sharded", n_layers=3, **SHARDED_SET)
    assert single.trainer is not None
    for rank in sharded_run:
        assert rank["steps"] == single.trainer.n_training_steps == 40
        for name in rank["weights"]:
            trainer = single.trainer.trainers[name]
            assert torch.equal(rank["since_fired"][name], trainer.n_forward_passes_since_fired)
            assert torch.equal(rank["act_freq"][name], trainer.act_freq_scores)
    # Every rank ends with the whole trained set, its owners' transcoders.
    for layer, transcoder in single.transcoders.items():
        for key, value in transcoder.state_dict().items():
            torch.testing.assert_close(sharded_run[0]["set"][layer][key], value, rtol=0, atol=1e-5)
            assert torch.equal(sharded_run[0]["set"][layer][key], sharded_run[1]["set"][layer][key]), f"the ranks' layer {layer} {key} differ"
    # Rank 0 saved all three layers, as written by their owners' training.
    for layer in (0, 1, 2):
        written = SAE.load_from_disk(root / "sharded" / "out" / layer_dir(layer))
        assert torch.equal(written.W_dec.detach(), sharded_run[1]["set"][layer]["W_dec"]), layer
    # Each owner wrote its layers into every checkpoint (each loads in plain SAELens); none left partial.
    for checkpoint in _checkpoints(root, "sharded"):
        assert (checkpoint / CHECKPOINT_COMPLETE_FILENAME).is_file()
        assert sorted(p.name for p in checkpoint.glob("layer_*")) == ["layer_0", "layer_1", "layer_2"]
        assert all(isinstance(SAE.load_from_disk(checkpoint / f"layer_{layer}"), SAE) for layer in (0, 1, 2))
    assert not list((root / "sharded" / "ckpt").glob("*/.*"))


def test_a_layer_sharded_batchtopk_set_trains_as_one_process_does(root: Path) -> None:
    # Unlike data parallelism, each owner picks the top k x batch of the whole global batch.
    topk = {"sae": {"architecture": "batchtopk_transcoder", "k": 8, "mlp_layer": None, "mlp_layers": "all"}, "n_checkpoints": 0}
    job = {"root": str(root), "name": "sharded-topk", "overrides": topk, "layers": "shard"}
    codes = spawn_ranks(job, root / "sharded-topk-results")
    assert codes == [0, 0], [p.read_text() for p in (root / "sharded-topk-results").glob("*.error")]
    ranks = [torch.load(root / "sharded-topk-results" / f"rank{rank}.pt")["set"] for rank in (0, 1)]
    single = _train_single(root, "single-sharded-topk", **topk)
    for layer, transcoder in single.transcoders.items():
        assert (transcoder.topk_threshold > 0).all()
        for key, value in transcoder.state_dict().items():
            torch.testing.assert_close(ranks[0][layer][key], value, rtol=0, atol=1e-5)
            assert torch.equal(ranks[1][layer][key], ranks[0][layer][key])


def test_a_killed_sharded_run_resumes_bit_identically(root: Path, sharded_run: tuple[dict[str, Any], ...]) -> None:
    job = {"root": str(root), "overrides": SHARDED_SET, "layers": "shard", "n_layers": 3}
    codes = spawn_ranks({**job, "name": "sharded-killed", "kill_rank": 1, "kill_layer": 1}, root / "sharded-killed-results")
    assert codes == [1, -9]  # rank 1 SIGKILLed in step 25, in its layer's forward pass; rank 0 failed, did not hang
    error = (root / "sharded-killed-results" / "rank0.error").read_text()
    # Rank 0 may have finished step 25 (its owners got rank 1's rows before it died): it fails at the next collective.
    assert error.startswith("PeerFailure: rank 0: ") and "with the other ranks failed" in error, error
    checkpoints = _checkpoints(root, "sharded-killed")
    assert [int(c.name) for c in checkpoints] == [11 * 256, 21 * 256]
    restart = {**SHARDED_SET, "resume_from_checkpoint": str(checkpoints[-1]), "checkpoint_path": str(root / "sharded-killed" / "ckpt")}
    resumed = spawn_ranks({**job, "name": "sharded-resumed", "overrides": restart}, root / "sharded-resumed-results")
    assert resumed == [0, 0], [p.read_text() for p in (root / "sharded-resumed-results").glob("*.error")]
    for rank in (0, 1):
        state = torch.load(root / "sharded-resumed-results" / f"rank{rank}.pt")
        for layer, transcoder in sharded_run[rank]["set"].items():
            for key, value in transcoder.items():
                assert torch.equal(state["set"][layer][key], value), f"rank {rank}: layer {layer} {key} differs after resuming"
        for name in sharded_run[rank]["weights"]:
            assert torch.equal(state["since_fired"][name], sharded_run[rank]["since_fired"][name])
            assert torch.equal(state["act_freq"][name], sharded_run[rank]["act_freq"][name])


def test_rank_0_logs_every_layer_of_a_sharded_set(root: Path) -> None:
    logger = LoggingConfig(log_to_wandb=True, wandb_project="sae-lens-transcoder-test", wandb_log_frequency=5, eval_every_n_wandb_logs=4)
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(root / "sharded-wandb"), "WANDB_SILENT": "true"}
    (root / "sharded-wandb").mkdir()
    job = {"root": str(root), "name": "sharded-wandb", "layers": "shard", "n_layers": 3, "env": env}
    codes = spawn_ranks({**job, "overrides": {**SHARDED_SET, "logger": logger, "n_checkpoints": 1}}, root / "sharded-wandb-results")
    assert codes == [0, 0], [p.read_text() for p in (root / "sharded-wandb-results").glob("*.error")]
    (run_file,) = (root / "sharded-wandb").glob("wandb/offline-run-*/run-*.wandb")  # one run: rank 0's
    rows = history_rows(run_file)
    for layer in ("layer_0", "layer_1", "layer_2"):  # rank 1 trained layer_1, rank 0 the others
        train = [r for r in rows if f"{layer}/losses/mse_loss" in r]
        assert len(train) == 8 and train[-1][f"{layer}/losses/mse_loss"] < train[0][f"{layer}/losses/mse_loss"]
        # Evaluated (with weight histograms) after steps 20 and 40; sparsity windows of 7 steps.
        assert len([r for r in rows if f"{layer}/eval/explained_variance" in r and f"{layer}/weights/W_dec_norms/values" in r]) == 2
        assert [r["_step"] for r in rows if f"{layer}/metrics/mean_log10_feature_sparsity" in r] == [7, 14, 21, 28, 35]


def test_layer_sharding_refuses_what_it_cannot_split(root: Path) -> None:
    clt = {"sae": {"architecture": "clt", "mlp_layer": None, "mlp_layers": "all", "d_sae": 96, "normalize_activations": "none"}}
    codes = spawn_ranks({"root": str(root), "name": "sharded-clt", "overrides": clt, "layers": "shard"}, root / "sharded-clt-results")
    assert codes == [1, 1]
    error = (root / "sharded-clt-results" / "rank0.error").read_text()
    assert "distributed_layers='shard' cannot split a cross-layer transcoder" in error and "distributed_layers='replicate'" in error
    with pytest.raises(ValueError, match=r"set has 2 layer\(s\) for 3 ranks; train on at most 2 ranks"):
        check_enough_layers(World(rank=0, size=3), n_layers=2)
    # The command line's flag reaches the runner (the same refusal in one process).
    with pytest.raises(SystemExit, match="train: distributed_layers='shard' cannot split a cross-layer transcoder"):
        main([*tiny_clt_train_argv(root / "cli-out"), "--distributed-layers", "shard"])


def test_a_two_rank_cross_layer_transcoder_trains_as_one_process_does(root: Path) -> None:
    clt = {
        "sae": {"architecture": "clt", "mlp_layer": None, "mlp_layers": "all", "d_sae": 96, "l1_coefficient": 1e-3, "normalize_activations": "none"},
        "n_checkpoints": 0,
        "feature_sampling_window": 1000,  # main's CLT trainer cannot reset its firing counts yet (resized after a window)
    }
    codes = spawn_ranks({"root": str(root), "name": "clt", "overrides": clt}, root / "clt-results")
    assert codes == [0, 0], [p.read_text() for p in (root / "clt-results").glob("*.error")]
    ranks = tuple(torch.load(root / "clt-results" / f"rank{rank}.pt") for rank in (0, 1))
    _assert_ranks_match_one_process(ranks, _train_single(root, "single-clt", **clt))


@pytest.mark.parametrize(
    "sae",
    [
        {"architecture": "batchtopk_transcoder", "k": 8},
        {"architecture": "batchtopk_clt", "k": 8, "mlp_layer": None, "mlp_layers": "all", "d_sae": 96, "normalize_activations": "none"},
    ],
    ids=["transcoder", "clt"],
)
def test_batchtopk_replicas_stay_identical(root: Path, sae: dict[str, Any]) -> None:
    # BatchTopK picks the top k x batch of each rank's own batch (not the global one), so only
    # agreement is checked: its running threshold, a buffer no gradient reaches, included.
    name = f"batchtopk-{sae['architecture']}"
    overrides = {"sae": sae, "n_checkpoints": 0, "feature_sampling_window": 1000}
    codes = spawn_ranks({"root": str(root), "name": name, "overrides": overrides}, root / f"{name}-results")
    assert codes == [0, 0], [p.read_text() for p in (root / f"{name}-results").glob("*.error")]
    ranks = [torch.load(root / f"{name}-results" / f"rank{rank}.pt")["weights"] for rank in (0, 1)]
    (trainer,) = ranks[0]
    assert "topk_threshold" in ranks[0][trainer] and (ranks[0][trainer]["topk_threshold"] > 0).all()
    for key, value in ranks[0][trainer].items():
        assert torch.equal(value, ranks[1][trainer][key]), f"the ranks' {key} differ"


def test_only_rank_0_writes_except_each_ranks_data_position(root: Path, full_run: dict[int, dict[str, Any]]) -> None:
    # Rank 1 created, opened for writing, renamed or removed nothing in the run's directories
    # (its own data position is written by safetensors, which the audit hook does not see).
    assert full_run[1]["writes"] == []
    checkpoints = _checkpoints(root, "full")
    assert len(checkpoints) == 3
    for checkpoint in checkpoints:
        assert (checkpoint / CHECKPOINT_COMPLETE_FILENAME).is_file()
        ranks = sorted(p.name for p in checkpoint.glob("stream_state*"))
        assert ranks == ["stream_state.rank0-of-2.safetensors", "stream_state.rank1-of-2.safetensors"]
    assert not list((root / "full" / "ckpt").glob("*/.*"))  # no partial checkpoint left behind
    assert isinstance(SAE.load_from_disk(root / "full" / "out"), SAE)


def test_a_killed_rank_fails_the_other_and_resume_is_bit_identical(root: Path, full_run: dict[int, dict[str, Any]]) -> None:
    results = root / "killed-results"
    codes = spawn_ranks({"root": str(root), "name": "killed", "kill_rank": 1}, results, join_timeout_s=180)
    assert codes[1] == -9  # SIGKILLed in step 25
    assert codes[0] == 1, "rank 0 did not fail within the bound (it hung or went on alone)"
    error = (results / "rank0.error").read_text()
    checkpoints = _checkpoints(root, "killed")
    # Checkpoints after steps 11 and 21 were complete before the kill; nothing after.
    assert [int(c.name) for c in checkpoints] == [11 * 256, 21 * 256]
    assert all((c / CHECKPOINT_COMPLETE_FILENAME).is_file() for c in checkpoints)
    assert error.startswith("PeerFailure: rank 0: averaging gradients with the other ranks failed"), error
    assert f"--resume_from_checkpoint {checkpoints[-1]}" in error
    assert not (root / "killed" / "out").exists()

    # Restarted as torchrun --max-restarts would: same checkpoint_path, so a new run id under it.
    restart = {"resume_from_checkpoint": str(checkpoints[-1]), "checkpoint_path": str(root / "killed" / "ckpt")}
    resumed = spawn_ranks({"root": str(root), "name": "resumed", "overrides": restart}, root / "resumed-results")
    assert resumed == [0, 0], [p.read_text() for p in (root / "resumed-results").glob("*.error")]
    for rank in (0, 1):
        state = torch.load(root / "resumed-results" / f"rank{rank}.pt")
        for key, value in full_run[rank]["weights"]["layer_1"].items():
            assert torch.equal(state["weights"]["layer_1"][key], value), f"rank {rank}: {key} differs after resuming"
        assert torch.equal(state["since_fired"]["layer_1"], full_run[rank]["since_fired"]["layer_1"])
        assert torch.equal(state["act_freq"]["layer_1"], full_run[rank]["act_freq"]["layer_1"])
    # The resumed run wrote only the checkpoint still ahead of it, as the full run named it,
    # and that is where a further restart with --resume-latest goes on from.
    (ahead,) = [c for c in _checkpoints(root, "killed") if c.parent != checkpoints[-1].parent]
    assert ahead.name == _checkpoints(root, "full")[-1].name
    cfg = job_config(root, "killed")
    resume_latest(cfg, World())
    assert cfg.resume_from_checkpoint == str(ahead)


def test_a_two_rank_checkpoint_refuses_to_resume_on_one(root: Path, full_run: dict[int, dict[str, Any]]) -> None:
    del full_run
    checkpoint = _checkpoints(root, "full")[0]
    runner = TranscoderTrainingRunner(
        job_config(root, "one", resume_from_checkpoint=str(checkpoint)), override_model=build_model("gpt2"), override_dataset=dataset()
    )
    with pytest.raises(ValueError, match="written by a run of 2 rank.*this run has 1.*resume with exactly 2"):
        runner.run()


def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused() -> None:
    with pytest.raises(ValueError, match="train_batch_size_tokens=250 is the global batch.*multiple of 3 .e.g. 252"):
        per_rank_batch_tokens(250, World(rank=0, size=3))


def _torchrun_train(tmp_path: Path, *extra: str) -> list[str]:
    torchrun = Path(sys.executable).parent / "torchrun"
    return [
        str(torchrun), "--standalone", "--nproc_per_node", "2", *extra, "-m", "sae_lens_transcoder", "train",
        "--architecture", "transcoder", "--model_name", "tiny-gpt2", "--dataset_path", "embedded",
        "--is_dataset_tokenized", "False", "--streaming", "False", "--mlp_layer", "1", "--d_in", "128",
        "--d_sae", "256", "--context_size", "64", "--train_batch_size_tokens", "256", "--n_batches_in_buffer", "8",
        "--store_batch_size_prompts", "2", "--output_path", str(tmp_path / "out"), "--checkpoint_path",
        str(tmp_path / "ck"), "--log_to_wandb", "False", "--eval-tokens", "0", "--dist-timeout", "60",
    ]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _worker_of_rank(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker process for ``rank`` (Linux /proc)."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    for pid in map(int, children):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"torchrun {launcher} has no worker of rank {rank} among {children}")


@pytest.fixture(scope="module")
def restarted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """``torchrun --max-restarts 1 ... train --resume-latest`` with rank 1 killed after the
    first complete checkpoint: (its directory, stdout, stderr)."""
    tmp_path = tmp_path_factory.mktemp("torchrun")
    command = _torchrun_train(tmp_path, "--max-restarts", "1") + [
        "--training_tokens", "16384", "--n_checkpoints", "3", "--resume-latest"
    ]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=ENV)
    try:
        while not list((tmp_path / "ck").glob(f"*/*/{CHECKPOINT_COMPLETE_FILENAME}")):
            assert launcher.poll() is None, launcher.communicate()[1][-3000:]
            time.sleep(0.1)
        os.kill(_worker_of_rank(launcher.pid, 1), signal.SIGKILL)  # a lost machine, mid-run
        stdout, stderr = launcher.communicate(timeout=300)
    finally:
        launcher.kill()
    assert launcher.returncode == 0, stderr[-3000:]
    return tmp_path, stdout, stderr


def test_torchrun_max_restarts_resumes_from_the_last_complete_checkpoint(restarted: tuple[Path, str, str]) -> None:
    tmp_path, stdout, stderr = restarted
    # Whether rank 0 prints its PeerFailure here is a race: torchrun's agent may SIGTERM it first
    # (the two-rank kill test checks that message without torchrun in between).
    assert stdout.count("trained 16,384 tokens") == 1, stdout  # rank 0 reports, once
    # The restart went on from the killed run's last complete checkpoint, in a run directory of its own.
    runs = sorted((tmp_path / "ck").iterdir(), key=lambda p: min(c.stat().st_mtime for c in p.iterdir()))
    assert len(runs) == 2
    done, later = ([c for c in run.iterdir() if not c.name.startswith(".")] for run in runs)
    latest = max(done, key=lambda c: int(c.name))
    assert later and min(int(c.name) for c in later) > int(latest.name)
    assert json.loads((later[0] / "runner_cfg.json").read_text())["resume_from_checkpoint"] == str(latest)
    for checkpoint in done + later:
        assert sorted(p.name for p in checkpoint.glob("stream_state*")) == [
            "stream_state.rank0-of-2.safetensors", "stream_state.rank1-of-2.safetensors"
        ]
    assert isinstance(SAE.load_from_disk(tmp_path / "out"), SAE)


def test_torchrun_evaluate_sums_over_ranks(restarted: tuple[Path, str, str]) -> None:
    tmp_path = restarted[0]
    # Each rank scores half the batches; the summed statistics are those of all of them.
    evaluate = ["evaluate", str(tmp_path / "out"), "--n-tokens", "2048", "--context-size", "64", "--device", "cpu"]
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "sae_lens_transcoder"]
    result = subprocess.run(
        torchrun + evaluate + ["--json", str(tmp_path / "two.json")], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=ENV
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(str(tmp_path / "out")) == 1, result.stdout  # one table, from rank 0
    main(evaluate + ["--json", str(tmp_path / "one.json")])
    (two,), (one,) = (json.loads((tmp_path / f"{n}.json").read_text())["rows"] for n in ("two", "one"))
    assert two["n_tokens"] == one["n_tokens"] > 0
    for key, value in one.items():
        if isinstance(value, float):
            assert two[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert two["feature_density"] == pytest.approx(one["feature_density"], abs=1e-9)


PROMPTS = ["To be, or not to be, that is the", "The cat sat on the", "One, two, three,", "Once upon a time there was a"]


def test_two_ranks_attribute_a_prompts_file_as_one_process_does(tmp_path: Path) -> None:
    model = load_model("tiny-gpt2")
    transcoders = save_random_transcoders(model, tmp_path, range(model.cfg.n_layers))
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    argv = ["attribute", "--transcoders", *transcoders, "--prompts-file", str(tmp_path / "prompts.txt"), "--max-expansions", "12"]
    codes = spawn_ranks({"argv": argv + ["--out", str(tmp_path / "two")]}, tmp_path / "two-results", target=attribute_rank)
    assert codes == [0, 0], [p.read_text() for p in (tmp_path / "two-results").glob("*.error")]
    with _one_thread():
        main(argv + ["--out", str(tmp_path / "one")])
    one, two = (json.loads((tmp_path / n / "index.json").read_text())["prompts"] for n in ("one", "two"))
    assert [p["prompt"] for p in two] == [p["prompt"] for p in one] == PROMPTS
    for a, b in zip(one, two):
        assert b["root"] == a["root"] and b["n_nodes"] == a["n_nodes"] > 1 and b["top_paths"] == a["top_paths"]
        assert b["root_value"] == pytest.approx(a["root_value"], abs=1e-6)
        graphs = [json.loads((tmp_path / n / a["dir"] / "graph.json").read_text()) for n in ("one", "two")]
        assert [n["node_id"] for n in graphs[1]["nodes"]] == [n["node_id"] for n in graphs[0]["nodes"]]
        for x, y in zip(graphs[0]["nodes"], graphs[1]["nodes"]):
            assert y["influence"] == pytest.approx(x["influence"], abs=1e-6)
        assert graphs[1]["metadata"]["prompt"] == a["prompt"]
    # Rank 1 wrote its prompts' folders, rank 0 its own and the index: nothing else is there.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["index.json", "prompt_0000", "prompt_0001", "prompt_0002", "prompt_0003"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(SystemExit, match="--prompts-file .*empty.txt holds no prompt; write one prompt per line"):
        main(["attribute", "--transcoders", *transcoders, "--prompts-file", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "x")])


def test_one_prompt_under_torchrun_is_rank_0s_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``attribute --prompt`` on a rank other than 0 of a torchrun job loads nothing and writes
    nothing (rank 0 writes the graph); under rank 0's variables it attributes as alone."""
    from sae_lens_transcoder.circuits.command import attribute

    (transcoder,) = save_random_transcoders(load_model("tiny-gpt2"), tmp_path, [1])
    argv = ["attribute", "--transcoders", transcoder, "--prompt", PROMPTS[1], "--max-expansions", "4"]
    for name, value in {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999", "RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    assert attribute(argv[1:] + ["--out", str(tmp_path / "rank1")]) == {"rank": 1}
    assert not (tmp_path / "rank1").exists()
    monkeypatch.setenv("RANK", "0")
    summary = attribute(argv[1:] + ["--out", str(tmp_path / "rank0")])
    assert summary["n_nodes"] > 1 and (tmp_path / "rank0" / "graph.json").is_file()


def test_the_backend_follows_the_device() -> None:
    """NCCL for CUDA devices (any index), gloo for CPU: chosen from the runner's device, not asked for."""
    from sae_lens_transcoder.distributed.world import backend_for

    assert [backend_for(d) for d in ("cuda", "cuda:1", "cpu")] == ["nccl", "nccl", "gloo"]
