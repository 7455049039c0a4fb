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
from tests.distributed_workers import dataset, job_config, spawn_ranks
from tests.feature_shard_workers import N_LAYERS, run_feature_sharded_rank
from tests.test_distributed import _checkpoints, _train_single

CLT = {"architecture": "clt", "mlp_layer": None, "mlp_layers": "all", "d_sae": 96, "l1_coefficient": 1e-3, "normalize_activations": "none"}
JUMPRELU_CLT = {**CLT, "architecture": "jumprelu_clt", "l0_coefficient": 1e-3, "jumprelu_init_threshold": 0.05}
del JUMPRELU_CLT["l1_coefficient"]
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
