"""Bad configs fail early with the field and the fix; good ones parse every way in."""

import logging
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from sae_lens import LanguageModelSAERunnerConfig
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
from sae_lens.registry import get_sae_class

from sae_lens_transcoder import TrainingTranscoder, TrainingTranscoderConfig, TranscoderTrainingRunner
from sae_lens_transcoder import registration


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("normalize_activations", "layer_norm", "normalize_activations='layer_norm'"),
        ("normalize_activations", "covariance_whitening", "normalize_activations='covariance_whitening'"),
        ("normalize_activations", "constant_norm_rescale", "normalize_activations='constant_norm_rescale'"),
        ("apply_b_dec_to_input", True, "apply_b_dec_to_input"),
        ("reshape_activations", "hook_z", "reshape_activations"),
    ],
)
def test_invalid_sae_options_name_the_field(field: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainingTranscoderConfig(d_in=64, d_sae=128, **{field: value})


def test_d_out_defaults_to_d_in_and_inference_class_is_sae_lens_transcoder() -> None:
    cfg = TrainingTranscoderConfig(d_in=64, d_sae=128)
    assert cfg.d_out == 64
    assert cfg.get_inference_config_class() is get_sae_class("transcoder")[1]
    inference = cfg.get_inference_sae_cfg_dict()
    assert inference["architecture"] == "transcoder" and inference["d_out"] == 64
    assert inference["apply_b_dec_to_input"] is False


def test_from_dict_resolves_the_transcoder_architecture() -> None:
    cfg = LanguageModelSAERunnerConfig.from_dict(
        {
            "sae": {"architecture": "transcoder", "d_in": 64, "d_sae": 256, "d_out": 64,
                    "hook_name_out": "blocks.1.hook_mlp_out", "l1_coefficient": 2.0},
            "logger": {"log_to_wandb": False},
            "hook_name": "blocks.1.mlp.hook_in",
        }
    )
    assert isinstance(cfg.sae, TrainingTranscoderConfig)
    assert cfg.sae.l1_coefficient == 2.0 and cfg.sae.hook_name_out == "blocks.1.hook_mlp_out"


def _fails_before_model_load(cfg: LanguageModelSAERunnerConfig[Any], match: str) -> None:
    def no_model() -> None:
        raise AssertionError("the model was loaded before the config was checked")

    runner_cls = type("Probe", (TranscoderTrainingRunner,), {"_load_model": lambda self: no_model()})
    with pytest.raises(ValueError, match=match):
        runner_cls(cfg)


def test_runner_config_errors_come_before_loading_the_model(
    make_runner_config: Callable[..., LanguageModelSAERunnerConfig[Any]],
) -> None:
    _fails_before_model_load(make_runner_config(use_cached_activations=True, cached_activations_path="x"), "use_cached_activations")
    _fails_before_model_load(make_runner_config(n_batches_in_buffer=2), "n_batches_in_buffer")
    _fails_before_model_load(make_runner_config(sae={"mlp_layer": None}), "sae.mlp_layer")
    _fails_before_model_load(
        make_runner_config(hook_name="blocks.1.hook_mlp_out", sae={"mlp_layer": None, "hook_name_out": "blocks.1.hook_mlp_out"}),
        "both",
    )
    _fails_before_model_load(make_runner_config(hook_name="blocks.0.mlp.hook_in"), "disagrees")


def test_width_errors_come_before_any_training(
    make_runner_config: Callable[..., LanguageModelSAERunnerConfig[Any]], gpt2_model: Any, token_dataset: Any
) -> None:
    with pytest.raises(ValueError, match="sae.d_in=32"):
        TranscoderTrainingRunner(make_runner_config(sae={"d_in": 32}), override_model=gpt2_model, override_dataset=token_dataset)
    with pytest.raises(ValueError, match="sae.d_out=16"):
        TranscoderTrainingRunner(make_runner_config(sae={"d_out": 16}), override_model=gpt2_model, override_dataset=token_dataset)


RELOAD_SCRIPT = """
import importlib
import sae_lens_transcoder
import sae_lens_transcoder
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
from sae_lens_transcoder import registration
from sae_lens_transcoder.saes import transcoder
importlib.reload(transcoder)
importlib.reload(registration)
importlib.reload(sae_lens_transcoder)
cls, _ = SAE_TRAINING_CLASS_REGISTRY["transcoder"]
assert cls is sae_lens_transcoder.TrainingTranscoder, cls
print("ok")
"""


def test_registration_survives_reimport_and_reload() -> None:
    # A subprocess, so the reloaded classes do not leak into other tests.
    result = subprocess.run([sys.executable, "-c", RELOAD_SCRIPT], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_a_foreign_registration_is_kept_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    saved = SAE_TRAINING_CLASS_REGISTRY["transcoder"]
    foreign = type("SaeLensOwnTrainingTranscoder", (TrainingTranscoder,), {})
    SAE_TRAINING_CLASS_REGISTRY["transcoder"] = (foreign, TrainingTranscoderConfig)
    try:
        with caplog.at_level(logging.WARNING):
            registration.register_training_transcoder()
        assert SAE_TRAINING_CLASS_REGISTRY["transcoder"][0] is foreign
        assert "keeping it" in caplog.text
    finally:
        SAE_TRAINING_CLASS_REGISTRY["transcoder"] = saved


def test_a_moved_sae_lens_private_fails_at_import_naming_the_version(monkeypatch: pytest.MonkeyPatch) -> None:
    import sae_lens
    from sae_lens.training.multi_sae_trainer import MultiSAETrainer

    from sae_lens_transcoder import _sae_lens_privates

    monkeypatch.delattr(MultiSAETrainer, "_update_pbar")
    with pytest.raises(ImportError, match=f"sae-lens {sae_lens.__version__} does not have: MultiSAETrainer._update_pbar"):
        _sae_lens_privates.check_sae_lens_privates()
