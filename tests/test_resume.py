"""Stopping and resuming: exact to the bit, from any checkpoint, after a signal at any step."""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from sae_lens import LanguageModelSAERunnerConfig
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from sae_lens.util import temporary_seed
from safetensors.torch import load_file

from sae_lens_transcoder import TrainingTranscoder, TrainingTranscoderConfig, TranscoderTrainingRunner
from sae_lens_transcoder.llm_transcoder_training_runner import CHECKPOINT_COMPLETE_FILENAME
from sae_lens_transcoder.training.activations_store import NonFiniteActivationsError
from sae_lens_transcoder.training.checkpoint_view import TRAINING_WEIGHTS_FILENAME
from sae_lens_transcoder.training.trainer import NonFiniteLossError, TrainingInterrupted
from tests.conftest import D_MODEL, build_model

MakeConfig = Callable[..., LanguageModelSAERunnerConfig[TrainingTranscoderConfig]]
BATCH = 256
N_STEPS = 40
LAYER = "layer_1"  # the transcoder's directory in a checkpoint (conftest trains MLP 1)


def _config(make: MakeConfig, tmp_path: Path, name: str, **overrides: Any) -> LanguageModelSAERunnerConfig[Any]:
    settings: dict[str, Any] = dict(
        training_tokens=BATCH * N_STEPS,
        n_checkpoints=3,
        checkpoint_path=str(tmp_path / name / "ckpt"),
        output_path=str(tmp_path / name / "out"),
        feature_sampling_window=7,  # windows straddle checkpoints
        dead_feature_window=5,
        lr_warm_up_steps=4,
        lr_scheduler_name="cosineannealing",
    )
    settings["sae"] = {"l1_warm_up_steps": 10, **overrides.pop("sae", {})}
    settings.update(overrides)
    return make(**settings)


def _train(cfg: LanguageModelSAERunnerConfig[Any], dataset: Dataset, sae: Any = None) -> TranscoderTrainingRunner:
    runner = TranscoderTrainingRunner(cfg, override_model=build_model("gpt2"), override_dataset=dataset, override_sae=sae)
    runner.run()
    return runner


def _checkpoints(cfg: LanguageModelSAERunnerConfig[Any]) -> list[Path]:
    base = Path(cfg.checkpoint_path)  # type: ignore[arg-type]
    if not base.exists():
        return []
    return sorted((p for p in base.iterdir() if not p.name.startswith(".")), key=lambda p: int(p.name))


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), f"{name} differs by {(x - y).abs().max().item():.3g}"


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    ids = torch.randint(1, 300, (600, 32), generator=torch.Generator().manual_seed(1))
    return Dataset.from_dict({"input_ids": ids.tolist()})


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"prefetch_llm_batches": 2, "sae": {"normalize_activations": "expected_average_only_in"}},
    ],
    ids=["plain", "prefetch+scaled"],
)
def test_resume_from_every_checkpoint_ends_bit_identical(
    make_runner_config: MakeConfig, dataset: Dataset, tmp_path: Path, settings: dict[str, Any]
) -> None:
    # A kill -9 right after a checkpoint leaves exactly that checkpoint: resume from each.
    full = _train(_config(make_runner_config, tmp_path, "full", **settings), dataset)
    checkpoints = _checkpoints(full.cfg)
    assert len(checkpoints) == 3
    for checkpoint in checkpoints:
        name = f"from{checkpoint.name}"
        resumed = _train(_config(make_runner_config, tmp_path, name, resume_from_checkpoint=str(checkpoint), **settings), dataset)
        _assert_same_weights(resumed.sae, full.sae)
        assert resumed.trainer is not None and full.trainer is not None
        assert resumed.trainer.n_training_steps == full.trainer.n_training_steps == N_STEPS
        assert torch.equal(
            resumed.trainer.trainers[LAYER].n_forward_passes_since_fired, full.trainer.trainers[LAYER].n_forward_passes_since_fired
        )
        # Only the checkpoints still ahead are written, under the same names.
        later = [p.name for p in checkpoints if int(p.name) > int(checkpoint.name)]
        assert [p.name for p in _checkpoints(resumed.cfg)] == later
        for theirs in later:
            ours = Path(resumed.cfg.checkpoint_path) / theirs / LAYER  # type: ignore[arg-type]
            mine = load_file(ours / "sae_weights.safetensors")
            for key, value in load_file(Path(full.cfg.checkpoint_path) / theirs / LAYER / "sae_weights.safetensors").items():  # type: ignore[arg-type]
                assert torch.equal(mine[key], value)
            state = torch.load(ours / "trainer_state.pt")
            assert state["n_training_samples"] == int(theirs)
            assert (ours.parent / CHECKPOINT_COMPLETE_FILENAME).is_file()


class _SignalAt(TrainingTranscoder):
    """Sends the process a signal in the middle of one training step, like a pre-emption."""

    at_step = 13
    signal_number = signal.SIGTERM

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        if step_input.n_training_steps == self.at_step:
            os.kill(os.getpid(), self.signal_number)
        return super().training_forward_pass(step_input)


# The scale estimate reads 20 batches that are then replayed for training: a stop at step 13
# falls inside the replay.
INSIDE_THE_REPLAYED_ESTIMATE = {"n_batches_for_norm_estimate": 20, "sae": {"normalize_activations": "expected_average_only_in"}}


@pytest.mark.parametrize(
    ("signal_number", "settings"),
    [(signal.SIGTERM, {}), (signal.SIGINT, {}), (signal.SIGTERM, INSIDE_THE_REPLAYED_ESTIMATE)],
    ids=["SIGTERM", "SIGINT", "SIGTERM-inside-replayed-estimate"],
)
def test_signal_mid_step_stops_after_it_and_resume_is_bit_identical(
    make_runner_config: MakeConfig, dataset: Dataset, tmp_path: Path, signal_number: int, settings: dict[str, Any]
) -> None:
    full = _train(_config(make_runner_config, tmp_path, "full", n_checkpoints=0, **settings), dataset)
    cfg = _config(make_runner_config, tmp_path, "stopped", n_checkpoints=0, **settings)
    with temporary_seed(cfg.seed + 1):  # the initial weights the runner draws for layer 1
        stopping = _SignalAt(cfg.sae)
    stopping.signal_number = signal_number
    with pytest.raises(TrainingInterrupted) as stopped:
        _train(cfg, dataset, sae=stopping)
    # The step that was running finished; the checkpoint holds 14 whole steps.
    assert stopped.value.signal_number == signal_number
    assert stopped.value.checkpoint == Path(cfg.checkpoint_path) / str(14 * BATCH)  # type: ignore[arg-type]
    assert "--resume_from_checkpoint" in str(stopped.value)
    assert (stopped.value.checkpoint / CHECKPOINT_COMPLETE_FILENAME).is_file()
    assert not Path(cfg.output_path).exists()  # type: ignore[arg-type]
    assert signal.getsignal(signal_number) is not None and signal.getsignal(signal_number) != stopping  # handlers restored
    resumed = _train(
        _config(make_runner_config, tmp_path, "resumed", n_checkpoints=0, resume_from_checkpoint=str(stopped.value.checkpoint), **settings),
        dataset,
    )
    _assert_same_weights(resumed.sae, full.sae)


class _RecordsBatches(TrainingTranscoder):
    """Keeps every packed batch it is trained on."""

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        self.__dict__.setdefault("seen", []).append(step_input.sae_in.detach().clone())
        return super().training_forward_pass(step_input)


def test_the_scale_estimate_batches_are_trained_on_not_dropped(
    make_runner_config: MakeConfig, dataset: Dataset, tmp_path: Path
) -> None:
    # SAELens draws the estimate's batches from the training stream and drops them; here a
    # scaled run trains on exactly the batches an unscaled one does, and computes no more.
    runs = {}
    for name, sae in [("unscaled", {}), ("scaled", {"normalize_activations": "expected_average_only_in"})]:
        cfg = _config(make_runner_config, tmp_path, name, n_checkpoints=0, n_batches_for_norm_estimate=5, sae=sae)
        recorder = _RecordsBatches(cfg.sae)
        runs[name] = (_train(cfg, dataset, sae=recorder), recorder.seen)
    (unscaled, plain), (scaled, seen) = runs["unscaled"], runs["scaled"]
    assert len(seen) == len(plain) == N_STEPS
    factor = float(seen[0].norm() / plain[0].norm())  # the scale, folded away once training ends
    assert abs(factor - 1) > 0.1
    for step, (batch, reference) in enumerate(zip(seen, plain, strict=True)):
        torch.testing.assert_close(batch / factor, reference, msg=lambda m, step=step: f"step {step}: {m}")
    assert scaled.activations_store.n_llm_batches_drawn == unscaled.activations_store.n_llm_batches_drawn


LOAD_CHECKPOINT_WITHOUT_PLUGIN = """
import sys, torch
from sae_lens import SAE, Transcoder
sae = SAE.load_from_disk(sys.argv[1])
assert "sae_lens_transcoder" not in sys.modules and type(sae) is Transcoder, type(sae)
torch.save(sae(torch.load(sys.argv[2])), sys.argv[3])
"""


def test_scaled_checkpoints_load_in_plain_sae_lens_as_the_function_trained(
    make_runner_config: MakeConfig, dataset: Dataset, tmp_path: Path
) -> None:
    cfg = _config(make_runner_config, tmp_path, "scaled", sae={"normalize_activations": "expected_average_only_in"})
    _train(cfg, dataset)
    x = torch.randn(16, D_MODEL) * 3
    torch.save(x, tmp_path / "x.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for checkpoint in (p / LAYER for p in _checkpoints(cfg)):
        assert json.loads((checkpoint / "cfg.json").read_text())["normalize_activations"] == "none"
        scale = json.loads((checkpoint / "activation_scaler.json").read_text())["scaling_factor"]
        assert scale is not None and abs(scale - 1) > 0.05
        # The model as the trainer held it: unfolded weights fed scaled activations.
        trained = TrainingTranscoder(TrainingTranscoderConfig.from_dict({**cfg.sae.to_dict(), "normalize_activations": "none"}))
        trained.load_weights_from_checkpoint(checkpoint)
        assert (checkpoint / TRAINING_WEIGHTS_FILENAME).is_file()
        result = subprocess.run(
            [sys.executable, "-c", LOAD_CHECKPOINT_WITHOUT_PLUGIN, str(checkpoint), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
            capture_output=True, text=True, env=env, cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        assert "Warning" not in result.stderr, result.stderr
        with torch.no_grad():
            torch.testing.assert_close(torch.load(tmp_path / "y.pt"), trained(x * scale) / scale, rtol=1e-5, atol=1e-5)


class _NaNLossAt(TrainingTranscoder):
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        output = super().training_forward_pass(step_input)
        if step_input.n_training_steps == 25:
            output.loss = output.loss * float("nan")
        return output


def test_non_finite_loss_stops_training_naming_the_step_and_keeps_checkpoints(
    make_runner_config: MakeConfig, dataset: Dataset, tmp_path: Path
) -> None:
    cfg = _config(make_runner_config, tmp_path, "nan")
    with pytest.raises(NonFiniteLossError, match="training step 25: the loss is nan"):
        _train(cfg, dataset, sae=_NaNLossAt(cfg.sae))
    checkpoints = _checkpoints(cfg)
    # Two of the three checkpoints came before step 25; none was written after it.
    assert len(checkpoints) == 2 and all(int(p.name) <= 25 * BATCH for p in checkpoints)
    assert all((p / CHECKPOINT_COMPLETE_FILENAME).is_file() for p in checkpoints)
    assert not Path(cfg.output_path).exists()  # type: ignore[arg-type]


def test_non_finite_activations_stop_training_naming_the_hook(
    make_runner_config: MakeConfig, dataset: Dataset, tmp_path: Path
) -> None:
    cfg = _config(make_runner_config, tmp_path, "nanacts")
    model = build_model("gpt2")
    runner = TranscoderTrainingRunner(cfg, override_model=model, override_dataset=dataset)
    with torch.no_grad():
        model.blocks[0].mlp.W_out[0, 0] = float("inf")  # goes bad after the start-up checks
    with pytest.raises(NonFiniteActivationsError, match="blocks.1.mlp.hook_in"):
        runner.run()
    assert not Path(cfg.output_path).exists()  # type: ignore[arg-type]


def test_cli_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "sae-lens-transcoder"
    process = subprocess.Popen(
        [str(script), "train", "--architecture", "transcoder", "--model_name", "tiny-gpt2", "--dataset_path", "embedded",
         "--is_dataset_tokenized", "False", "--streaming", "False", "--mlp_layer", "1", "--d_in", "128", "--d_sae", "256",
         "--context_size", "64", "--train_batch_size_tokens", "256", "--n_batches_in_buffer", "8",
         "--training_tokens", "100000000", "--output_path", str(tmp_path / "out"),
         "--checkpoint_path", str(tmp_path / "ck"), "--log_to_wandb", "False"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert process.stderr is not None
    deadline = time.monotonic() + 120
    seen = ""
    while "Training" not in seen and time.monotonic() < deadline:  # tqdm's bar has started
        seen += process.stderr.read(64)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=120)
    stderr = seen + rest
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    assert "resume with --resume_from_checkpoint" in stderr
    (run_dir,) = (tmp_path / "ck").iterdir()
    (checkpoint,) = run_dir.iterdir()
    assert (checkpoint / CHECKPOINT_COMPLETE_FILENAME).is_file()
    assert str(checkpoint) in stderr
    assert not (tmp_path / "out").exists()
