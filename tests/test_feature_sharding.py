"""Feature sharding of a cross-layer transcoder over 2 CPU ranks (gloo), spawned here: each rank
trains half of every layer's features on the global batch, the same training as one process
on the whole CLT; the saved output is the whole CLT; a killed run resumes bit-identically."""

from pathlib import Path
from typing import Any

import pytest
import torch

from sae_lens_transcoder import TranscoderTrainingRunner
from sae_lens_transcoder.cli import main
from sae_lens_transcoder.distributed.feature_shards import check_feature_sharding, feature_dim
from sae_lens_transcoder.distributed.world import World
from sae_lens_transcoder.saes.clt import JumpReLUCLTConfig
from sae_lens_transcoder.saes.clt_files import load_clt
from sae_lens_transcoder.training.checkpoint_view import CHECKPOINT_COMPLETE_FILENAME
from tests.conftest import build_model
from tests.distributed_workers import dataset, job_config, spawn_ranks, tiny_clt_train_argv
from tests.feature_shard_workers import N_LAYERS, run_feature_sharded_rank
from tests.test_distributed import _checkpoints, _train_single

CLT = {"architecture": "clt", "mlp_layer": None, "mlp_layers": "all", "d_sae": 96, "l1_coefficient": 1e-3, "normalize_activations": "none"}
JUMPRELU_CLT = {**CLT, "architecture": "jumprelu_clt", "l0_coefficient": 1e-3, "jumprelu_init_threshold": 0.05}
del JUMPRELU_CLT["l1_coefficient"]
TOPK_CLT = {**CLT, "architecture": "topk_clt", "k": 8}
del TOPK_CLT["l1_coefficient"]
HALF = 96 // 2


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("feature-sharding")


def _spawn(root: Path, name: str, **job: Any) -> tuple[list[int | None], Path]:
    results = root / f"{name}-results"
    codes = spawn_ranks({"root": str(root), "name": name, **job}, results, target=run_feature_sharded_rank)
    return codes, results


def _ranks(results: Path) -> tuple[dict[str, Any], ...]:
    return tuple(torch.load(results / f"rank{rank}.pt") for rank in (0, 1))


def _share(name: str, whole: torch.Tensor, rank: int) -> torch.Tensor:
    dim = feature_dim(name)
    return whole if dim is None else whole.narrow(dim, rank * HALF, HALF)


def _assert_sharded_run_is_one_process(ranks: tuple[dict[str, Any], ...], single: TranscoderTrainingRunner) -> None:
    assert single.trainer is not None
    (trainer,) = single.trainer.trainers.values()
    whole = single.sae.state_dict()
    for rank, state in enumerate(ranks):
        assert state["steps"] == single.trainer.n_training_steps == 40
        for key, value in whole.items():
            torch.testing.assert_close(state["shard"][key], _share(key, value, rank), rtol=0, atol=1e-5)
        # Dead-feature statistics are each shard's own features' (layer-major, the rank's half of each layer).
        for counter in ("since_fired", "act_freq"):
            mine = getattr(trainer, {"since_fired": "n_forward_passes_since_fired", "act_freq": "act_freq_scores"}[counter])
            expected = mine.reshape(N_LAYERS, -1)[:, rank * HALF : (rank + 1) * HALF].flatten()
            assert torch.equal(state[counter], expected), counter
    # Rank 0 gathered the whole CLT; its final metadata sums the shards' (as one process counts them).
    for key, value in whole.items():
        torch.testing.assert_close(ranks[0]["whole"][key], value, rtol=0, atol=1e-5)
    assert ranks[0]["dead"] == single.sae.cfg.metadata.num_dead_features
    assert ranks[0]["l0"] == pytest.approx(single.sae.cfg.metadata.l0, rel=1e-6)


@pytest.fixture(scope="module")
def relu_run(root: Path) -> tuple[dict[str, Any], ...]:
    codes, results = _spawn(root, "relu", overrides={"sae": CLT})
    assert codes == [0, 0], [p.read_text() for p in results.glob("*.error")]
    return _ranks(results)


def test_a_feature_sharded_relu_clt_trains_as_one_process_does(root: Path, relu_run: tuple[dict[str, Any], ...]) -> None:
    single = _train_single(root, "relu-single", sae=CLT)
    _assert_sharded_run_is_one_process(relu_run, single)
    # The output is the whole CLT in circuit-tracer's layout, equal to one process's.
    loaded = load_clt(root / "relu" / "out").clt
    assert loaded.cfg.d_sae == 96 and loaded.feature_shards is None
    for key, value in single.sae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=1e-5)
    # Each checkpoint holds both ranks' shares and data positions; none was left partial.
    for checkpoint in _checkpoints(root, "relu"):
        assert (checkpoint / CHECKPOINT_COMPLETE_FILENAME).is_file()
        assert sorted(p.name for p in checkpoint.glob("clt*")) == ["clt.features0-of-2", "clt.features1-of-2"]
        assert len(list(checkpoint.glob("stream_state.rank*-of-2.safetensors"))) == 2
    assert not list((root / "relu" / "ckpt").glob("*/.*"))


def test_a_feature_sharded_jumprelu_clt_trains_as_one_process_does(root: Path) -> None:
    overrides = {"sae": JUMPRELU_CLT, "n_checkpoints": 0}
    codes, results = _spawn(root, "jumprelu", overrides=overrides)
    assert codes == [0, 0], [p.read_text() for p in results.glob("*.error")]
    ranks = _ranks(results)
    single = _train_single(root, "jumprelu-single", **overrides)
    assert "log_threshold" in ranks[0]["shard"] and ranks[0]["shard"]["log_threshold"].shape == (N_LAYERS, HALF)
    _assert_sharded_run_is_one_process(ranks, single)


@pytest.mark.parametrize("architecture", ["topk_clt", "batchtopk_clt"])
def test_a_feature_sharded_topk_clt_keeps_the_top_k_of_all_features(root: Path, architecture: str) -> None:
    """Each shard keeps its codes at or above the cut gathered from every shard (per token for
    TopK, over the batch for BatchTopK, whose running threshold follows the smallest code any
    shard kept): the codes, and so the training, of one process over the whole CLT."""
    overrides = {"sae": {**TOPK_CLT, "architecture": architecture}, "n_checkpoints": 0}
    codes, results = _spawn(root, architecture, overrides=overrides)
    assert codes == [0, 0], [p.read_text() for p in results.glob("*.error")]
    single = _train_single(root, f"{architecture}-single", **overrides)
    ranks = _ranks(results)
    _assert_sharded_run_is_one_process(ranks, single)
    if architecture == "topk_clt":  # k per token and layer, summed over the shards
        assert ranks[0]["l0"] == pytest.approx(8 * N_LAYERS, rel=1e-6)
    else:
        threshold = single.sae.topk_threshold
        assert bool((threshold > 0).all()) and torch.equal(ranks[1]["shard"]["topk_threshold"], ranks[0]["shard"]["topk_threshold"])


def test_a_killed_feature_sharded_run_resumes_bit_identically(root: Path, relu_run: tuple[dict[str, Any], ...]) -> None:
    codes, results = _spawn(root, "killed", overrides={"sae": CLT}, kill_rank=1)
    assert codes == [1, -9]  # rank 1 SIGKILLed in step 25; rank 0 failed at the next collective, did not hang
    error = (results / "rank0.error").read_text()
    assert error.startswith("PeerFailure: rank 0: ") and "with the other ranks failed" in error, error
    checkpoints = _checkpoints(root, "killed")
    assert [int(c.name) for c in checkpoints] == [11 * 256, 21 * 256]
    assert f"--resume_from_checkpoint {checkpoints[-1]}" in error
    restart = {"sae": CLT, "resume_from_checkpoint": str(checkpoints[-1]), "checkpoint_path": str(root / "killed" / "ckpt")}
    codes, results = _spawn(root, "resumed", overrides=restart)
    assert codes == [0, 0], [p.read_text() for p in results.glob("*.error")]
    for rank, state in enumerate(_ranks(results)):
        for key, value in relu_run[rank]["shard"].items():
            assert torch.equal(state["shard"][key], value), f"rank {rank}: {key} differs after resuming"
        assert torch.equal(state["since_fired"], relu_run[rank]["since_fired"])
        assert torch.equal(state["act_freq"], relu_run[rank]["act_freq"])
    for key, value in relu_run[0]["whole"].items():
        assert torch.equal(_ranks(results)[0]["whole"][key], value), key


def test_feature_sharding_refuses_what_it_cannot_split(root: Path, relu_run: tuple[dict[str, Any], ...]) -> None:
    del relu_run
    model, data = build_model("gpt2", n_layers=N_LAYERS), dataset()
    with pytest.raises(ValueError, match=r"distributed_layers='shard_features' .* this process is alone.*distributed_layers='replicate'"):
        TranscoderTrainingRunner(job_config(root, "alone", sae=CLT), override_model=model, override_dataset=data, distributed_layers="shard_features")
    per_layer_set = {"mlp_layer": None, "mlp_layers": "all"}
    with pytest.raises(ValueError, match=r"a transcoder or per-layer set is not one. Use distributed_layers='shard'"):
        TranscoderTrainingRunner(
            job_config(root, "set", sae=per_layer_set), override_model=model, override_dataset=data, distributed_layers="shard_features"
        )
    clt_cfg = job_config(root, "cfg", sae=JUMPRELU_CLT).sae
    with pytest.raises(ValueError, match=r"sae.d_sae=96 does not divide by 5; use a multiple of 5 \(e.g. 100\)"):
        check_feature_sharding(World(rank=0, size=5), clt_cfg)
    assert isinstance(clt_cfg, JumpReLUCLTConfig)
    check_feature_sharding(World(rank=0, size=2), clt_cfg)  # what the tests above train
    # The command line's flag reaches the runner (the one-process refusal).
    with pytest.raises(SystemExit, match="train: distributed_layers='shard_features' .* this process is alone"):
        main([*tiny_clt_train_argv(root / "cli-out"), "--distributed-layers", "shard_features"])
    # A 2-rank feature-sharded checkpoint resumes on 2 ranks only.
    checkpoint = _checkpoints(root, "relu")[0]
    runner = TranscoderTrainingRunner(
        job_config(root, "one", sae=CLT, resume_from_checkpoint=str(checkpoint)), override_model=model, override_dataset=data
    )
    with pytest.raises(ValueError, match="written by a run of 2 rank.*this run has 1.*resume with exactly 2"):
        runner.run()


def test_the_mode_is_a_config_field_in_python_yaml_and_flags(tmp_path: Path) -> None:
    """``sae.distributed_layers`` picks the mode from a config (dict or YAML file) as the runner's
    argument and ``--distributed-layers`` do; a value that is no mode is refused by name."""
    import yaml

    model, data = build_model("gpt2", n_layers=N_LAYERS), dataset()
    with pytest.raises(ValueError, match=r"distributed_layers='shard_features' .* this process is alone"):
        TranscoderTrainingRunner(
            job_config(tmp_path, "dict", sae={**CLT, "distributed_layers": "shard_features"}), override_model=model, override_dataset=data
        )
    config = {
        "model_name": "tiny-gpt2", "dataset_path": "embedded", "is_dataset_tokenized": False, "streaming": False,
        "context_size": 64, "logger": {"log_to_wandb": False}, "output_path": str(tmp_path / "out"),
        "sae": {"architecture": "clt", "mlp_layers": "all", "d_in": 128, "d_sae": 96, "normalize_activations": "none",
                "distributed_layers": "shard_features"},
    }
    path = tmp_path / "clt.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit, match="train: distributed_layers='shard_features' .* this process is alone"):
        main(["train", "--config", str(path)])
    del config["sae"]["distributed_layers"]
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit, match="train: distributed_layers='shard_features' .* this process is alone"):
        main(["train", "--config", str(path), "--distributed_layers", "shard_features"])
    config["sae"]["distributed_layers"] = "shard_all"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit, match=r"sae.distributed_layers must be one of replicate, shard, shard_features; got 'shard_all'"):
        main(["train", "--config", str(path)])


def test_a_whole_clt_checkpoint_is_refused_by_a_feature_sharded_run(root: Path) -> None:
    """A data-parallel checkpoint of 2 ranks holds the whole CLT, not the ranks' shares:
    resuming it feature sharded is refused on every rank, naming what would resume it."""
    codes = spawn_ranks({"root": str(root), "name": "replicated", "overrides": {"sae": CLT}}, root / "replicated-results")
    assert codes == [0, 0]
    checkpoint = _checkpoints(root, "replicated")[0]
    restart = {"sae": CLT, "resume_from_checkpoint": str(checkpoint), "checkpoint_path": str(root / "whole-resumed" / "ckpt")}
    codes, results = _spawn(root, "whole-resumed", overrides=restart)
    assert codes == [1, 1]
    for rank in (0, 1):
        error = (results / f"rank{rank}.error").read_text()
        assert "holds the whole CLT (clt/)" in error and "distributed_layers='replicate'" in error, error


def test_rank_0_logs_the_whole_clts_metrics(root: Path) -> None:
    """wandb (offline) holds one run, rank 0's, whose L0 is the whole CLT's (TopK: up to k per
    layer, summed over the shards) and whose sparsity windows are logged on schedule."""
    from sae_lens import LoggingConfig

    from tests.wandb_offline import history_rows

    logger = LoggingConfig(log_to_wandb=True, wandb_project="sae-lens-transcoder-test", wandb_log_frequency=5)
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(root / "fs-wandb"), "WANDB_SILENT": "true"}
    (root / "fs-wandb").mkdir()
    overrides = {"sae": TOPK_CLT, "logger": logger, "n_checkpoints": 0}
    codes, results = _spawn(root, "fs-wandb", overrides=overrides, env=env)
    assert codes == [0, 0], [p.read_text() for p in results.glob("*.error")]
    (run_file,) = (root / "fs-wandb").glob("wandb/offline-run-*/run-*.wandb")
    rows = history_rows(run_file)
    l0 = [r["clt/metrics/l0"] for r in rows if "clt/metrics/l0" in r]
    # At most k per layer (a top code at or below 0 is no code); one shard's own count would be about half.
    assert len(l0) == 8 and all(8 * N_LAYERS / 2 < value <= 8 * N_LAYERS for value in l0) and l0.count(8 * N_LAYERS) >= 6
    assert [r["_step"] for r in rows if "clt/metrics/mean_log10_feature_sparsity" in r] == [7, 14, 21, 28, 35]
