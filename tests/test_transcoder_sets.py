"""Transcoder sets: several MLPs trained from one forward pass, saved as a set, resumed exactly."""

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from sae_lens import LanguageModelSAERunnerConfig

from sae_lens_transcoder import TrainingTranscoderConfig, TranscoderTrainingRunner
from sae_lens_transcoder.cli import main
from sae_lens_transcoder.config_io import runner_config_from_args
from sae_lens_transcoder.evals import evaluate_spliced
from sae_lens_transcoder.export.circuit_tracer import load_circuit_tracer_transcoders
from sae_lens_transcoder.layer_spec import parse_mlp_layers
from sae_lens_transcoder.llm_transcoder_training_runner import CHECKPOINT_COMPLETE_FILENAME
from sae_lens_transcoder.loading import load_transcoder_set
from sae_lens_transcoder.replacement import PerLayerTranscoders
from sae_lens_transcoder.replacement.saving import MANIFEST_FILE, layer_dir
from sae_lens_transcoder.splicing import Splice
from tests.conftest import D_MODEL, build_model

MakeConfig = Callable[..., LanguageModelSAERunnerConfig[TrainingTranscoderConfig]]
LAYERS = [0, 1, 2]


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    ids = torch.randint(1, 300, (400, 32), generator=torch.Generator().manual_seed(3))
    return Dataset.from_dict({"input_ids": ids.tolist()})


def _set_config(make: MakeConfig, tmp_path: Path, name: str, **overrides: Any) -> LanguageModelSAERunnerConfig[Any]:
    sae = {"mlp_layer": None, "mlp_layers": "0-2", **overrides.pop("sae", {})}
    settings: dict[str, Any] = dict(
        training_tokens=256 * 24,
        checkpoint_path=str(tmp_path / name / "ckpt"),
        output_path=str(tmp_path / name / "out"),
        sae=sae,
    )
    return make(**{**settings, **overrides})


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_each_layer_of_a_set_ends_as_its_single_layer_run(
    make_runner_config: MakeConfig, dataset: Dataset, tmp_path: Path, arch: str
) -> None:
    cfg = _set_config(make_runner_config, tmp_path, "set", sae={"normalize_activations": "expected_average_only_in"})
    runner = TranscoderTrainingRunner(cfg, override_model=build_model(arch, n_layers=3), override_dataset=dataset)
    trained = runner.run()
    assert sorted(trained) == LAYERS
    out = Path(cfg.output_path)  # type: ignore[arg-type]
    for layer in LAYERS:
        single_cfg = make_runner_config(
            training_tokens=256 * 24, output_path=None, sae={"mlp_layer": layer, "normalize_activations": "expected_average_only_in"}
        )
        single = TranscoderTrainingRunner(single_cfg, override_model=build_model(arch, n_layers=3), override_dataset=dataset).run()
        for key, value in single.state_dict().items():
            torch.testing.assert_close(trained[layer].state_dict()[key], value, rtol=1e-5, atol=1e-5)
        assert (out / layer_dir(layer) / "sparsity.safetensors").is_file()
    # The output is a set directory: a manifest, a circuit-tracer set, and plain SAELens per layer.
    assert (out / MANIFEST_FILE).is_file() and (out / "config.yaml").is_file()
    assert f"scan: test-model/{out.name}\n" in (out / "config.yaml").read_text()  # not the temporary directory's name
    loaded = load_transcoder_set(out)
    as_circuit_tracer = PerLayerTranscoders(load_circuit_tracer_transcoders(out))
    assert loaded.layers == as_circuit_tracer.layers == LAYERS
    x = torch.randn(5, D_MODEL)
    with torch.no_grad():
        for layer in LAYERS:
            for read in (loaded, as_circuit_tracer):
                torch.testing.assert_close(read.encode(layer, x), trained[layer].encode(x), rtol=1e-5, atol=1e-5)


LOAD_LAYERS_WITHOUT_PLUGIN = """
import sys
from sae_lens import SAE, Transcoder
for path in sys.argv[1:]:
    sae = SAE.load_from_disk(path)
    assert type(sae) is Transcoder and sae.cfg.metadata.hook_name_out.endswith("hook_mlp_out"), path
assert "sae_lens_transcoder" not in sys.modules
"""


def test_set_layers_load_in_plain_sae_lens_and_the_all_replaced_evaluation_is_logged(
    make_runner_config: MakeConfig, dataset: Dataset, tmp_path: Path
) -> None:
    cfg = _set_config(make_runner_config, tmp_path, "plain")
    model = build_model("gpt2", n_layers=3)
    runner = TranscoderTrainingRunner(cfg, override_model=model, override_dataset=dataset)
    trained = runner.run()
    out = Path(cfg.output_path)  # type: ignore[arg-type]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", LOAD_LAYERS_WITHOUT_PLUGIN, *(str(out / layer_dir(layer)) for layer in LAYERS)],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    # The in-training evaluator scores each layer alone and all three together.
    assert runner.trainer is not None
    scalers = {name: t.activation_scaler for name, t in runner.trainer.trainers.items()}
    metrics = runner.evaluator(runner.trainer.saes, iter(()), scalers, {})
    tokens = runner.evaluator.tokens
    together = evaluate_spliced(model, [Splice.from_sae(trained[layer]) for layer in LAYERS], tokens)
    assert metrics["all/eval/ce_loss_spliced"] == pytest.approx(together["ce_loss_spliced"], rel=1e-5)
    alone = evaluate_spliced(model, [trained[1]], tokens)
    assert metrics["layer_1/eval/explained_variance"] == pytest.approx(alone["explained_variance"], rel=1e-5)


def test_a_stopped_set_run_resumes_bit_identical(make_runner_config: MakeConfig, dataset: Dataset, tmp_path: Path) -> None:
    full_cfg = _set_config(make_runner_config, tmp_path, "full", n_checkpoints=2, prefetch_llm_batches=True)
    full = TranscoderTrainingRunner(full_cfg, override_model=build_model("llama", n_layers=3), override_dataset=dataset)
    full.run()
    (first, _) = sorted(Path(full_cfg.checkpoint_path).iterdir(), key=lambda p: int(p.name))  # type: ignore[arg-type]
    assert (first / CHECKPOINT_COMPLETE_FILENAME).is_file()
    assert sorted(p.name for p in first.iterdir() if p.is_dir()) == [f"layer_{layer}" for layer in LAYERS]
    cfg = _set_config(make_runner_config, tmp_path, "resumed", n_checkpoints=2, prefetch_llm_batches=True,
                      resume_from_checkpoint=str(first))
    resumed = TranscoderTrainingRunner(cfg, override_model=build_model("llama", n_layers=3), override_dataset=dataset)
    resumed.run()
    for layer in LAYERS:
        for key, value in full.transcoders[layer].state_dict().items():
            assert torch.equal(resumed.transcoders[layer].state_dict()[key], value), (layer, key)


def test_mlp_layers_from_the_command_line_and_yaml(tmp_path: Path) -> None:
    cfg = runner_config_from_args(["--architecture", "transcoder", "--d_in", "64", "--mlp_layers", "0-2,5"])
    assert parse_mlp_layers(cfg.sae.mlp_layers, 8) == [0, 1, 2, 5]
    config = tmp_path / "set.yaml"
    config.write_text("model_name: tiny-gpt2\nsae:\n  architecture: transcoder\n  d_in: 128\n  d_sae: 256\n  mlp_layers: [0, 1]\n")
    assert parse_mlp_layers(runner_config_from_args([], config_file=config).sae.mlp_layers, 2) == [0, 1]
    assert parse_mlp_layers("all", 3) == [0, 1, 2]
    for bad, phrase in (("0-x", "not a layer"), ("3-1", "empty"), ("0-4", "has 2 layers"), ("", "no layer")):
        with pytest.raises(ValueError, match=phrase):
            parse_mlp_layers(bad, 2)


def test_cli_trains_a_set_then_evaluates_and_attributes_the_set_directory(tmp_path: Path) -> None:
    out = tmp_path / "set"
    main(["train", "--architecture", "transcoder", "--model_name", "tiny-gpt2", "--dataset_path", "embedded",
          "--is_dataset_tokenized", "False", "--mlp_layers", "0-1", "--d_in", "128", "--d_sae", "128",
          "--training_tokens", "4096", "--train_batch_size_tokens", "512", "--context_size", "64",
          "--n_batches_in_buffer", "16", "--log_to_wandb", "False", "--output_path", str(out),
          "--checkpoint_path", str(tmp_path / "ck"), "--eval-tokens", "0"])
    assert (out / MANIFEST_FILE).is_file() and (out / "config.yaml").is_file()
    report = tmp_path / "eval.json"
    main(["evaluate", str(out), "--n-tokens", "512", "--json", str(report)])
    rows = json.loads(report.read_text())["rows"]
    assert [row["name"] for row in rows] == [f"{out} layer 0", f"{out} layer 1", "all replaced"]
    assert all(row["ce_loss_zero_ablation"] > row["ce_loss_clean"] for row in rows)
    graph = tmp_path / "graph"
    main(["attribute", "--transcoders", str(out), "--prompt", "To be, or not to be", "--out", str(graph), "--max-expansions", "8"])
    assert json.loads((graph / "summary.json").read_text())["root_value"] != 0


def test_resuming_a_set_checkpoint_with_other_layers_is_refused(
    make_runner_config: MakeConfig, dataset: Dataset, tmp_path: Path
) -> None:
    cfg = _set_config(make_runner_config, tmp_path, "three", n_checkpoints=1, sae={"mlp_layers": "1-2"})
    TranscoderTrainingRunner(cfg, override_model=build_model("gpt2", n_layers=3), override_dataset=dataset).run()
    (checkpoint,) = Path(cfg.checkpoint_path).iterdir()  # type: ignore[arg-type]
    other = _set_config(make_runner_config, tmp_path, "other", resume_from_checkpoint=str(checkpoint), sae={"mlp_layers": "0-1"})
    runner = TranscoderTrainingRunner(other, override_model=build_model("gpt2", n_layers=3), override_dataset=dataset)
    with pytest.raises(ValueError, match="Resume with the same sae.mlp_layers"):
        runner.run()
    assert not Path(other.output_path).exists()  # type: ignore[arg-type]


def test_a_previous_set_output_is_replaced_but_one_with_other_files_is_kept(
    make_runner_config: MakeConfig, dataset: Dataset, tmp_path: Path
) -> None:
    cfg = _set_config(make_runner_config, tmp_path, "again", training_tokens=256 * 4, checkpoint_path=None)
    TranscoderTrainingRunner(cfg, override_model=build_model("gpt2", n_layers=3), override_dataset=dataset).run()
    out = Path(cfg.output_path)  # type: ignore[arg-type]
    first = (out / layer_dir(0) / "sae_weights.safetensors").read_bytes()
    again = _set_config(make_runner_config, tmp_path, "again", training_tokens=256 * 4, checkpoint_path=None, seed=7)
    TranscoderTrainingRunner(again, override_model=build_model("gpt2", n_layers=3), override_dataset=dataset).run()
    assert (out / layer_dir(0) / "sae_weights.safetensors").read_bytes() != first  # replaced by the new set
    (out / "notes.md").write_text("mine")
    with pytest.raises(FileExistsError, match="not a previous transcoder output"):
        TranscoderTrainingRunner(again, override_model=build_model("gpt2", n_layers=3), override_dataset=dataset)
    assert (out / "notes.md").read_text() == "mine"
