"""Bad inputs to the CLI and the Python API: each gives a clear error early and changes nothing on disk.

``CASES`` is the matrix. A row names the input (``run``, after an optional ``setup`` that makes
files), the outcome (an exact exception type and phrases of its message; or ``raises=None`` with a
``check`` of the correct behaviour) and how far a run may get before it reports the problem:

- ``"config"``: no model may be loaded (nor transcoders' models, nor data read for training);
- ``"model"``: the model may be loaded, but no training or evaluation data may be read;
- ``"any"``: no limit (the final save, Python functions given a model).

The whole tree under ``tmp_path`` (the working directory of every row) is compared byte for byte
before and after ``run``, unless the row says ``changes_disk``. To add a case, add a row.
"""

from __future__ import annotations

import ast
import errno
import json
import logging
import os
import shlex
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
import yaml
from datasets import Dataset
from sae_lens import SAE, LanguageModelSAERunnerConfig
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from safetensors.torch import save_file
from transformer_lens import HookedTransformer

import sae_lens_transcoder.saes.transcoder  # noqa: F401  (registers the architecture)
from sae_lens_transcoder import TrainingTranscoder, TrainingTranscoderConfig, TranscoderTrainingRunner, __version__
from sae_lens_transcoder import cli, validation
from sae_lens_transcoder.circuits import command
from sae_lens_transcoder.circuits.attribution import feature_target
from sae_lens_transcoder.circuits.trace import trace_prompt
from sae_lens_transcoder.config_io import runner_config_from_args
from sae_lens_transcoder.evals import evaluate_spliced
from sae_lens_transcoder.llm_transcoder_training_runner import CHECKPOINT_COMPLETE_FILENAME
from sae_lens_transcoder.loading import load_transcoder
from sae_lens_transcoder.models import load_model
from sae_lens_transcoder.training.activations_store import TranscoderActivationsStore
from sae_lens_transcoder.validation import (
    PLUGIN_VERSION_KEY,
    SAE_LENS_DEFAULT_N_BATCHES_IN_BUFFER,
    check_output_path,
    validate_runner_config,
)
from tests.conftest import CONTEXT, D_MODEL, D_VOCAB, build_model, runner_config

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny-gpt2-layer1.yaml"
TINY_D_MODEL, TINY_LAYERS, TINY_N_CTX = 128, 2, 256
Stage = Literal["config", "model", "any"]


@dataclass
class Env:
    """What a row's functions get: its directory (also the working directory) and monkeypatch."""

    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    state: dict[str, Any] = field(default_factory=dict)

    def path(self, *parts: str) -> Path:
        return self.tmp.joinpath(*parts)


@dataclass(frozen=True)
class Case:
    id: str
    run: Callable[[Env], object]
    raises: type[BaseException] | None
    phrases: tuple[str, ...] = ()  # in the message; with raises=None, in the INFO+ log
    stage: Stage = "config"
    setup: Callable[[Env], None] | None = None
    check: Callable[[Env, Any], None] | None = None
    changes_disk: bool = False


def case(id: str, run: Callable[[Env], object], raises: type[BaseException] | None, *phrases: str, **kw: Any) -> Case:
    return Case(id, run, raises, phrases, **kw)


# ---------------------------------------------------------------------------- building blocks


def small_dataset(rows: int = 64) -> Dataset:
    ids = torch.randint(1, D_VOCAB, (rows, CONTEXT), generator=torch.Generator().manual_seed(1))
    return Dataset.from_dict({"input_ids": ids.tolist()})


def py_runner(
    *, model: Callable[[], HookedTransformer] | None = None, dataset: Any = "small", overwrite: bool = False,
    **overrides: Any,
) -> TranscoderTrainingRunner:
    """A runner on conftest's small config; ``model=None`` means "load cfg.model_name"."""
    return TranscoderTrainingRunner(
        runner_config(**overrides),
        override_model=None if model is None else model(),
        override_dataset=small_dataset() if dataset == "small" else dataset,
        overwrite_output=overwrite,
    )


def gpt2() -> HookedTransformer:
    return build_model("gpt2")


def nan_model() -> HookedTransformer:
    model = build_model("gpt2")
    with torch.no_grad():
        model.blocks[0].mlp.W_out.fill_(float("nan"))
    return model


TRAIN = ["train", "--architecture", "transcoder", "--model_name", "tiny-gpt2", "--dataset_path", "embedded",
         "--is_dataset_tokenized", "False", "--mlp_layer", "1", "--d_in", "128", "--d_sae", "64",
         "--training_tokens", "4096", "--train_batch_size_tokens", "512", "--context_size", "64",
         "--n_batches_in_buffer", "16", "--log_to_wandb", "False", "--checkpoint_path", "ck", "--output_path", "out"]


def cli_main(*argv: str) -> Callable[[Env], object]:
    return lambda env: cli.main(list(argv))


def save_transcoder(
    path: Path, *, d_in: int = TINY_D_MODEL, d_sae: int = 16, layer: int = 1, model_name: str = "tiny-gpt2",
    final_save: bool = False,
) -> TrainingTranscoder:
    """A tiny untrained transcoder in SAELens's format; ``final_save`` adds the runner's other files."""
    torch.manual_seed(0)
    tc = TrainingTranscoder(TrainingTranscoderConfig(d_in=d_in, d_sae=d_sae))
    meta = tc.cfg.metadata
    meta.hook_name, meta.hook_name_out = f"blocks.{layer}.mlp.hook_in", f"blocks.{layer}.hook_mlp_out"
    meta.model_name, meta.dataset_path, meta.context_size = model_name, "embedded", 64
    tc.save_inference_model(path)
    if final_save:
        save_file({"sparsity": torch.zeros(d_sae)}, path / "sparsity.safetensors")
        (path / "runner_cfg.json").write_text("{}")
    return tc


def edit_cfg_json(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    cfg = json.loads((path / "cfg.json").read_text())
    edit(cfg)
    (path / "cfg.json").write_text(json.dumps(cfg))


def transcoder_with(edit: Callable[[dict[str, Any]], None]) -> Callable[[Env], None]:
    def setup(env: Env) -> None:
        save_transcoder(env.path("tc"))
        edit_cfg_json(env.path("tc"), edit)

    return setup


def write(name: str, content: str | bytes) -> Callable[[Env], None]:
    def setup(env: Env) -> None:
        target = env.path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content if isinstance(content, bytes) else content.encode())

    return setup


def both(*setups: Callable[[Env], None]) -> Callable[[Env], None]:
    def setup(env: Env) -> None:
        for step in setups:
            step(env)

    return setup


def tiny_config_with(**changes: Any) -> Callable[[Env], None]:
    """configs/tiny-gpt2-layer1.yaml with some values replaced by YAML text, as cfg.yaml."""
    def setup(env: Env) -> None:
        text = TINY_CONFIG.read_text()
        for key, value in changes.items():
            lines = [line for line in text.splitlines() if line.strip().startswith(f"{key}:")]
            assert len(lines) == 1, key
            indent = lines[0][: len(lines[0]) - len(lines[0].lstrip())]
            text = text.replace(lines[0], f"{indent}{key}: {value}")
        env.path("cfg.yaml").write_text(text)

    return setup


def truncate_weights(env: Env) -> None:
    save_transcoder(env.path("tc"))
    weights = env.path("tc", "sae_weights.safetensors")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def pickle_weights(env: Env) -> None:
    save_transcoder(env.path("tc"))
    torch.save({"W_enc": torch.zeros(2)}, env.path("tc", "sae_weights.safetensors"))


def runner_saving_to(name: str, *, previous: bool = False, appears: bool = False) -> Callable[[Env], None]:
    """A built runner (tiny config, in-memory model and data) whose output_path is ``name``."""
    def setup(env: Env) -> None:
        if previous:
            save_transcoder(env.path(name), d_in=D_MODEL, final_save=True)
        env.state["runner"] = py_runner(model=gpt2, output_path=str(env.path(name)))
        if appears:  # made after the runner's start-up check, as by another job during training
            write(f"{name}/theirs.txt", "not yours")(env)

    return setup


def final_save(env: Env) -> TranscoderTrainingRunner:
    """What ``run`` does at the end, without the training before it."""
    runner = env.state["runner"]
    runner.save_final_sae(runner.sae, runner.cfg.output_path, torch.zeros(runner.cfg.sae.d_sae))
    return runner


def save_instead_of_training(env: Env) -> None:
    """``run`` goes straight to its final save (the CLI's path to it, without the training)."""
    def run(runner: TranscoderTrainingRunner) -> None:
        env.state["runner"] = runner
        runner.save_final_sae(runner.sae, runner.cfg.output_path, torch.zeros(runner.cfg.sae.d_sae))

    env.monkeypatch.setattr(TranscoderTrainingRunner, "run", run)


def disk_full(env: Env) -> None:
    def no_space(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    env.monkeypatch.setattr("sae_lens.saes.sae.save_file", no_space)


def unwritable(name: str) -> Callable[[Env], None]:
    """``os.access`` says no for one directory (tests run as root, where chmod would not stop writes)."""
    def patch(env: Env) -> None:
        denied = env.path(name)
        access = os.access
        env.monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p).resolve() != denied.resolve() and access(p, mode, **kw))

    return patch


def then(*steps: Callable[[Env], object]) -> Callable[[Env], object]:
    def run(env: Env) -> object:
        result: object = None
        for step in steps:
            result = step(env)
        return result

    return run


def tiny_model() -> HookedTransformer:
    return load_model("tiny-gpt2")


def checkpoint_dir(env: Env, cfg_json: dict[str, Any]) -> None:
    path = env.path("ck", "4096", "layer_1")  # a checkpoint holds one directory per transcoder
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps(cfg_json))
    env.path("ck", "4096", CHECKPOINT_COMPLETE_FILENAME).write_text("{}")


def standard_checkpoint(env: Env) -> None:
    StandardTrainingSAE(StandardTrainingSAEConfig(d_in=D_MODEL, d_sae=128)).save_model(env.path("ck", "4096", "layer_1"))
    env.path("ck", "4096", CHECKPOINT_COMPLETE_FILENAME).write_text("{}")


def validated(cfg: LanguageModelSAERunnerConfig[Any], dataset: Dataset | None = None) -> LanguageModelSAERunnerConfig[Any]:
    validate_runner_config(cfg, dataset)
    return cfg


def readme_train_command() -> list[str]:
    """The flags of the README's first ``sae-lens-transcoder train`` command (continuation lines joined)."""
    text = (REPO / "README.md").read_text()
    start = text.index("sae-lens-transcoder train", text.index("## Command line"))
    lines = []
    for line in text[start:].splitlines():
        lines.append(line.rstrip("\\").strip())
        if not line.endswith("\\"):
            break
    words = shlex.split(" ".join(lines))
    assert words[:2] == ["sae-lens-transcoder", "train"]
    return words[2:]


def readme_python_config() -> dict[str, Any]:
    """The dict the README's Python example hands ``LanguageModelSAERunnerConfig.from_dict``."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Use from Python"):]
    code = section[section.index("```python") + len("```python"):]
    code = code[: code.index("```")]
    calls = [n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "from_dict"]
    assert len(calls) == 1
    return ast.literal_eval(calls[0].args[0])


# ---------------------------------------------------------------------------- checks of correct behaviour


def replaced_by_new_transcoder(env: Env, runner: TranscoderTrainingRunner) -> None:
    out = Path(runner.cfg.output_path)
    saved = json.loads((out / "cfg.json").read_text())
    assert saved["d_sae"] == runner.cfg.sae.d_sae and sorted(p.name for p in out.iterdir()) == sorted(validation.FINAL_SAVE_FILES)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no partial or old copy beside it


def version_recorded_and_plain_load_is_silent(env: Env, runner: TranscoderTrainingRunner) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = SAE.load_from_disk(runner.cfg.output_path)
    assert loaded.cfg.metadata[PLUGIN_VERSION_KEY] == __version__


def buffer_raised_to(n: int) -> Callable[[Env, Any], None]:
    def check(env: Env, cfg: LanguageModelSAERunnerConfig[Any]) -> None:
        assert cfg.n_batches_in_buffer == n

    return check


def readme_cli_example_loads(env: Env, runner: TranscoderTrainingRunner) -> None:
    cfg = runner.cfg
    assert (cfg.model_name, cfg.sae.d_sae, cfg.training_tokens) == ("tiny-gpt2", 1024, 262144)
    assert cfg.n_batches_in_buffer == -(-cfg.train_batch_size_tokens // cfg.context_size)
    assert runner.model.cfg.d_model == cfg.sae.d_in


def no_trust_remote_code_error(env: Env, runner: TranscoderTrainingRunner) -> None:
    assert runner.cfg.dataset_trust_remote_code is False
    assert "trust_remote_code" not in env.state["log"]()


def readme_python_config_passes(env: Env, cfg: LanguageModelSAERunnerConfig[Any]) -> None:
    assert cfg.sae.hook_name_out == "blocks.8.hook_mlp_out" and cfg.n_batches_in_buffer * cfg.context_size >= 4096


# ---------------------------------------------------------------------------- the matrix

LONG_PROMPT = "word " * (TINY_N_CTX + 20)
ATTRIBUTE = ("attribute", "--transcoders", "tc1", "--prompt", "To be, or not to be", "--out", "graph")
NEWER = "99.0.0"


def _py_cfg(**overrides: Any) -> Callable[[Env], object]:
    return lambda env: py_runner(**overrides)


CASES: list[Case] = [
    # 1. output paths: nothing is deleted or replaced unless asked
    case("out-is-file", lambda env: py_runner(output_path="out.txt"), FileExistsError, "output_path='out.txt' is a file",
         setup=write("out.txt", "keep me")),
    case("out-is-file-cli", cli_main(*TRAIN, "--output_path", "out.txt"), SystemExit, "is a file", setup=write("out.txt", "keep me")),
    case("out-foreign-files", lambda env: py_runner(output_path="results"), FileExistsError, "notes.md", "overwrite_output=True",
         setup=write("results/notes.md", "mine")),
    case("out-foreign-files-cli", cli_main(*TRAIN, "--output_path", "results"), SystemExit, "--overwrite",
         setup=write("results/notes.md", "mine")),
    case("out-transcoder-plus-extra-file", lambda env: py_runner(output_path="prev"), FileExistsError, "notes.md",
         setup=both(lambda env: save_transcoder(env.path("prev"), final_save=True), write("prev/notes.md", "mine"))),
    case("out-standard-sae-output", lambda env: py_runner(output_path="prev"), FileExistsError, "not a previous transcoder output",
         setup=both(lambda env: save_transcoder(env.path("prev"), final_save=True),
                    lambda env: edit_cfg_json(env.path("prev"), lambda c: c.update(architecture="standard")))),
    case("out-parent-is-file", lambda env: py_runner(output_path="f/out"), FileExistsError, "is a file, not a directory",
         setup=write("f", "a file")),
    case("out-parent-not-writable", then(unwritable("ro"), lambda env: py_runner(output_path="ro/out")), PermissionError,
         "is not writable", setup=lambda env: env.path("ro").mkdir()),
    case("out-dir-appears-during-training", final_save, FileExistsError, "theirs.txt", stage="any",
         setup=runner_saving_to("later", appears=True)),
    case("out-disk-full-keeps-previous", then(disk_full, final_save), OSError, "No space left on device", "nothing there was changed",
         stage="any", setup=runner_saving_to("prev", previous=True)),
    case("out-disk-full-cli", then(disk_full, save_instead_of_training, cli_main(*TRAIN)), SystemExit, "No space left on device", stage="any",
         setup=lambda env: save_transcoder(env.path("out"), final_save=True)),
    case("out-previous-transcoder-replaced", final_save, None, "holds a previous transcoder output", stage="any",
         setup=runner_saving_to("prev", previous=True), check=replaced_by_new_transcoder, changes_disk=True),
    case("out-overwrite-replaces-foreign", then(lambda env: env.state.update(
             runner=py_runner(model=gpt2, output_path=str(env.path("results")), overwrite=True)), final_save),
         None, "as overwrite was asked", stage="any", setup=write("results/notes.md", "mine"),
         check=replaced_by_new_transcoder, changes_disk=True),
    case("out-overwrite-cli", then(save_instead_of_training, cli_main(*TRAIN, "--output_path", "results", "--overwrite",
         "--eval-tokens", "0")), None, "as overwrite was asked", stage="any", setup=write("results/notes.md", "mine"),
         check=lambda env, _: replaced_by_new_transcoder(env, env.state["runner"]), changes_disk=True),
    case("export-out-not-empty-cli", cli_main("export", "circuit-tracer", "tc1", "--out", "ct"), SystemExit,
         "exists and is not empty (pass overwrite=True / --overwrite)",
         setup=both(lambda env: save_transcoder(env.path("tc1"), layer=0), write("ct/notes.md", "mine"))),
    case("out-empty-dir-accepted", lambda env: check_output_path("empty"), None, setup=lambda env: env.path("empty").mkdir()),
    case("out-version-recorded", final_save, None, stage="any", setup=runner_saving_to("out"),
         check=version_recorded_and_plain_load_is_silent, changes_disk=True),
    # 2. values that were silently accepted, or failed deep inside
    case("model-class-mamba", _py_cfg(model_class_name="HookedMamba"), ValueError, "model_class_name='HookedMamba'",
         "Set model_class_name: HookedTransformer"),
    case("model-class-transformers-tiny", _py_cfg(model_class_name="AutoModelForCausalLM", model_name="tiny-gpt2"), ValueError,
         "'tiny-gpt2' exists only as a HookedTransformer", "Set model_class_name: HookedTransformer"),
    case("l1-negative", _py_cfg(sae={"l1_coefficient": -1.0}), ValueError, "sae.l1_coefficient=-1.0 must be >= 0"),
    case("l1-string", _py_cfg(sae={"l1_coefficient": "0.1"}), TypeError, "sae.l1_coefficient must be a number; got '0.1'"),
    case("l1-yaml-1e-3", cli_main("train", "--config", "cfg.yaml"), SystemExit, "sae.l1_coefficient must be a number", "1.0e-3",
         setup=tiny_config_with(l1_coefficient="1e-3")),
    case("lr-zero", _py_cfg(lr=0.0), ValueError, "lr=0.0 must be > 0"),
    case("lr-negative-cli", cli_main(*TRAIN, "--lr", "-1"), SystemExit, "lr=-1.0 must be > 0"),
    case("lr-bool", _py_cfg(lr=True), TypeError, "lr must be a number; got True"),
    case("lr-yaml-text", cli_main("train", "--config", "cfg.yaml"), SystemExit, "lr must be a number",
         setup=tiny_config_with(lr='"fast"')),
    case("training-tokens-below-one-batch", _py_cfg(training_tokens=100), ValueError, "training_tokens=100 is less than one batch"),
    case("training-tokens-yaml-text", cli_main("train", "--config", "cfg.yaml"), SystemExit, "training_tokens must be an integer",
         setup=tiny_config_with(training_tokens="lots")),
    case("d-sae-zero", _py_cfg(sae={"d_sae": 0}), ValueError, "d_sae=0"),
    case("d-sae-zero-cli", cli_main(*TRAIN, "--d_sae", "0"), SystemExit, "d_sae=0"),
    case("d-sae-yaml-text", cli_main("train", "--config", "cfg.yaml"), SystemExit, "sae.d_sae must be an integer",
         setup=tiny_config_with(d_sae='"1024"')),
    case("context-size-zero", _py_cfg(context_size=0), ValueError, "context_size"),  # SAELens's own check, first
    case("context-size-zero-yaml", cli_main("train", "--config", "cfg.yaml"), SystemExit, "context_size=0 must be >= 1",
         setup=tiny_config_with(context_size="0")),
    case("dtype-unknown", _py_cfg(dtype="float13"), ValueError, "dtype='float13' is not a dtype"),
    case("dtype-unknown-cli", cli_main(*TRAIN, "--dtype", "float13"), SystemExit, "dtype='float13'"),
    case("sae-dtype-unknown", _py_cfg(sae={"dtype": "float13"}), ValueError, "sae.dtype='float13'"),
    case("n-checkpoints-negative", _py_cfg(n_checkpoints=-1), ValueError, "n_checkpoints=-1 must be >= 0"),
    case("l1-warm-up-negative", _py_cfg(sae={"l1_warm_up_steps": -5}), ValueError, "sae.l1_warm_up_steps=-5 must be >= 0"),
    case("mlp-layer-negative", _py_cfg(sae={"mlp_layer": -1}), ValueError, "sae.mlp_layer=-1 must be >= 0"),
    case("buffer-explicitly-too-small", _py_cfg(n_batches_in_buffer=2), ValueError, "raise n_batches_in_buffer to at least 8"),
    case("eval-tokens-negative-cli", cli_main(*TRAIN, "--eval-tokens", "-5"), SystemExit, "--eval-tokens=-5 must be >= 0"),
    case("evaluate-n-tokens-zero", cli_main("evaluate", "tc", "--n-tokens", "0"), SystemExit, "--n-tokens=0 must be >= 1",
         setup=lambda env: save_transcoder(env.path("tc"))),
    case("evaluate-n-tokens-negative", cli_main("evaluate", "tc", "--n-tokens", "-3"), SystemExit, "--n-tokens=-3",
         setup=lambda env: save_transcoder(env.path("tc"))),
    case("evaluate-context-size-zero", cli_main("evaluate", "tc", "--context-size", "0"), SystemExit, "--context-size=0",
         setup=lambda env: save_transcoder(env.path("tc"))),
    # 3. SAELens's default buffer is enlarged to fit a batch; the README's examples pass as printed
    case("buffer-default-enlarged", lambda env: validated(runner_config(
             n_batches_in_buffer=SAE_LENS_DEFAULT_N_BATCHES_IN_BUFFER, train_batch_size_tokens=4096), small_dataset()),
         None, "using 128, the smallest that fits", check=buffer_raised_to(4096 // CONTEXT)),
    case("readme-cli-example", lambda env: TranscoderTrainingRunner(runner_config_from_args(readme_train_command())),
         None, "the smallest that fits", stage="any", check=readme_cli_example_loads),
    case("readme-python-example", lambda env: validated(LanguageModelSAERunnerConfig.from_dict(readme_python_config())),
         None, check=readme_python_config_passes),
    # 4. errors that were raw tracebacks, or unclear
    case("mlp-layer-beyond-model", _py_cfg(model=gpt2, sae={"mlp_layer": 7}), ValueError, "is layer 7", "has 2 layers",
         stage="model"),
    case("mlp-layer-beyond-model-cli", cli_main(*TRAIN, "--mlp_layer", "7"), SystemExit, "model 'tiny-gpt2' has 2 layers",
         stage="model"),
    case("hook-beyond-model", _py_cfg(model=gpt2, hook_name="blocks.7.mlp.hook_in", sae={"mlp_layer": None}), ValueError,
         "hook_name='blocks.7.mlp.hook_in' is layer 7", stage="model"),
    case("context-beyond-n-ctx", _py_cfg(model=gpt2, context_size=2 * CONTEXT), ValueError, f"n_ctx={CONTEXT}", stage="model"),
    case("context-beyond-n-ctx-cli", cli_main(*TRAIN, "--context_size", "512"), SystemExit, f"n_ctx={TINY_N_CTX}", stage="model"),
    case("d-in-not-the-hook-width", _py_cfg(model=gpt2, sae={"d_in": 32}), ValueError, "sae.d_in=32", stage="model"),
    case("hook-never-fires", _py_cfg(model=gpt2, hook_name="blocks.1.hook_q_input", sae={"mlp_layer": None}), ValueError,
         "never fires", stage="model"),
    case("dataset-dir-without-rows", _py_cfg(dataset=None, dataset_path="empty_ds"), ValueError, "has no rows",
         setup=write("empty_ds/train.jsonl", "")),
    case("dataset-dir-without-rows-cli", cli_main(*TRAIN, "--dataset_path", "empty_ds"), SystemExit, "has no rows",
         setup=write("empty_ds/train.jsonl", "")),
    case("dataset-override-without-rows", _py_cfg(dataset=Dataset.from_dict({"input_ids": []})), ValueError,
         "override_dataset has no rows"),
    case("dataset-path-is-a-file", _py_cfg(dataset=None, dataset_path="one.jsonl"), ValueError, "is a file",
         setup=write("one.jsonl", '{"text": "hello"}\n')),
    case("dataset-path-empty", _py_cfg(dataset=None), ValueError, "dataset_path is empty"),
    case("embedded-dataset-no-trust-remote-code-error", lambda env: py_runner(model=tiny_model, dataset=None,
         dataset_path="embedded", is_dataset_tokenized=False, sae={"d_in": TINY_D_MODEL}),
         None, stage="any", check=no_trust_remote_code_error),
    case("transcoder-missing", lambda env: load_transcoder("no/such/dir"), FileNotFoundError, "'no/such/dir' does not exist"),
    case("transcoder-missing-evaluate-cli", cli_main("evaluate", "nowhere"), SystemExit, "'nowhere' does not exist"),
    case("transcoder-missing-export-cli", cli_main("export", "circuit-tracer", "nowhere", "--out", "ct"), SystemExit,
         "does not exist"),
    case("transcoder-pt-file", lambda env: load_transcoder("weights.pt"), ValueError, "is a file, not a transcoder directory",
         setup=lambda env: torch.save({"W_enc": torch.zeros(2)}, env.path("weights.pt"))),
    case("transcoder-cfg-not-json", lambda env: load_transcoder("tc"), ValueError, "cfg.json is not valid JSON",
         setup=both(lambda env: save_transcoder(env.path("tc")), write("tc/cfg.json", "{not json"))),
    case("transcoder-cfg-a-list", lambda env: load_transcoder("tc"), ValueError, "holds a JSON list",
         setup=both(lambda env: save_transcoder(env.path("tc")), write("tc/cfg.json", "[1, 2]"))),
    case("transcoder-cfg-no-architecture", lambda env: load_transcoder("tc"), ValueError, "architecture=None is not a transcoder",
         setup=transcoder_with(lambda c: c.pop("architecture"))),
    case("transcoder-cfg-no-d-sae", lambda env: load_transcoder("tc"), ValueError, "d_sae=None",
         setup=transcoder_with(lambda c: c.pop("d_sae"))),
    case("transcoder-cfg-standard-sae", lambda env: load_transcoder("tc"), ValueError, "architecture='standard' is not a transcoder",
         setup=transcoder_with(lambda c: c.update(architecture="standard"))),
    case("transcoder-cfg-no-hook-name", lambda env: load_transcoder("tc"), ValueError, "metadata.hook_name",
         setup=transcoder_with(lambda c: c["metadata"].pop("hook_name"))),
    case("transcoder-no-cfg", lambda env: load_transcoder("tc"), FileNotFoundError, "has no cfg.json",
         setup=both(lambda env: save_transcoder(env.path("tc")), lambda env: env.path("tc", "cfg.json").unlink())),
    case("transcoder-weights-a-pickle", lambda env: load_transcoder("tc"), ValueError, "not a readable safetensors file",
         setup=pickle_weights),
    case("transcoder-weights-truncated", lambda env: load_transcoder("tc"), ValueError, "truncated", setup=truncate_weights),
    case("transcoder-weights-missing", lambda env: load_transcoder("tc"), FileNotFoundError, "sae_weights.safetensors is missing",
         setup=both(lambda env: save_transcoder(env.path("tc")), lambda env: env.path("tc", "sae_weights.safetensors").unlink())),
    case("transcoder-weights-other-shape", lambda env: load_transcoder("tc"), ValueError, "W_enc has shape [128, 16]",
         setup=transcoder_with(lambda c: c.update(d_sae=32))),
    case("transcoder-newer-plugin", lambda env: load_transcoder("tc"), ValueError, f"sae-lens-transcoder {NEWER}",
         f"newer than the installed {__version__}", setup=transcoder_with(lambda c: c["metadata"].update({PLUGIN_VERSION_KEY: NEWER}))),
    case("evaluate-on-a-model-of-other-width", cli_main("evaluate", "tc", "--model", "tiny-gpt2", "--dataset", "embedded"),
         SystemExit, "has d_in=64", "trained on 'test-model' (metadata.model_name), not 'tiny-gpt2'", stage="model",
         setup=lambda env: save_transcoder(env.path("tc"), d_in=64, model_name="test-model")),
    case("evaluate-hooks-missing-in-model", cli_main("evaluate", "tc", "--dataset", "embedded"), SystemExit,
         "'blocks.5.mlp.hook_in', which 'tiny-gpt2' (2 layers) does not have", stage="model",
         setup=lambda env: save_transcoder(env.path("tc"), layer=5)),
    case("evaluate-spliced-wrong-model", lambda env: evaluate_spliced(tiny_model(), [load_transcoder("tc")], torch.ones(1, 8, dtype=torch.long)),
         ValueError, "has d_in=64", stage="any", setup=lambda env: save_transcoder(env.path("tc"), d_in=64)),
    case("attribute-feature-beyond-d-sae", cli_main(*ATTRIBUTE, "--target", "feature", "--layer", "1", "--feature", "99999"),
         SystemExit, "feature=99999 is not one of the 16 features", setup=lambda env: save_transcoder(env.path("tc1"))),
    case("attribute-layer-without-transcoder", cli_main(*ATTRIBUTE, "--target", "feature", "--layer", "0", "--feature", "3"),
         SystemExit, "layer=0: no transcoder replaces that MLP (have [1])", setup=lambda env: save_transcoder(env.path("tc1"))),
    case("attribute-prompt-beyond-n-ctx", cli_main(*ATTRIBUTE[:4], LONG_PROMPT, *ATTRIBUTE[5:]), SystemExit,
         f"longer than the model's context (n_ctx={TINY_N_CTX})", stage="model", setup=lambda env: save_transcoder(env.path("tc1"))),
    case("trace-prompt-beyond-n-ctx", lambda env: trace_prompt(tiny_model(), [load_transcoder("tc1")], LONG_PROMPT), ValueError,
         f"n_ctx={TINY_N_CTX}", stage="any", setup=lambda env: save_transcoder(env.path("tc1"))),
    case("feature-target-beyond-d-sae", lambda env: feature_target(trace_prompt(tiny_model(), [load_transcoder("tc1")], "To be"),
         1, 16, 0), ValueError, "feature=16 is not one of the 16 features", stage="any",
         setup=lambda env: save_transcoder(env.path("tc1"))),
    case("config-file-missing", cli_main("train", "--config", "nope.yaml"), SystemExit, "--config nope.yaml: no such file"),
    case("config-file-not-a-mapping", cli_main("train", "--config", "list.yaml"), SystemExit, "expected a mapping",
         setup=write("list.yaml", "- a\n- b\n")),
    case("config-file-bad-yaml", cli_main("train", "--config", "bad.yaml"), SystemExit, "not valid YAML",
         setup=write("bad.yaml", "sae: [unclosed\n")),
    case("resume-from-newer-plugin", _py_cfg(resume_from_checkpoint="ck/4096"), ValueError, f"sae-lens-transcoder {NEWER}",
         __version__, setup=lambda env: checkpoint_dir(env, {"architecture": "transcoder", "metadata": {PLUGIN_VERSION_KEY: NEWER}})),
    case("resume-from-standard-sae", _py_cfg(resume_from_checkpoint="ck/4096"), ValueError, "holds a 'standard' SAE",
         "sae.architecture='transcoder'", setup=standard_checkpoint),
    case("resume-from-missing-dir", _py_cfg(resume_from_checkpoint="ck/4096"), FileNotFoundError, "is not a directory"),
    case("resume-from-a-transcoder-not-a-checkpoint", _py_cfg(resume_from_checkpoint="tc1"), FileNotFoundError,
         "holds no layer_<i> (or clt) directory", setup=lambda env: save_transcoder(env.path("tc1"))),
    # 6. non-finite activations and transcoder sets
    case("model-with-nan-weights", _py_cfg(model=nan_model), ValueError, "not finite (NaN/inf)", "blocks.1", stage="model"),
    case("set-with-hook-name", _py_cfg(model=gpt2, hook_name="blocks.1.mlp.hook_in", sae={"mlp_layer": None, "mlp_layers": "0-1"}),
         ValueError, "hook_name cannot be given with it"),
    case("set-with-mlp-layer", _py_cfg(model=gpt2, sae={"mlp_layers": "0-1"}), ValueError, "sae.mlp_layer cannot be given"),
    case("set-layers-not-parsable", _py_cfg(model=gpt2, sae={"mlp_layer": None, "mlp_layers": "0-one"}), ValueError,
         "'0-one' is not a layer or a range"),
    case("set-layers-beyond-model", _py_cfg(model=gpt2, sae={"mlp_layer": None, "mlp_layers": "0-9"}), ValueError,
         "the model has 2 layers", stage="model"),
    case("set-layers-beyond-model-cli", cli_main(*[a for a in TRAIN if a not in ("--mlp_layer", "1")], "--mlp_layers", "0-5"),
         SystemExit, "the model has 2 layers", stage="model"),
]


FORBIDDEN: dict[Stage, list[tuple[Any, str, str]]] = {
    "config": [
        (TranscoderTrainingRunner, "_load_model", "the model was loaded"),
        (cli, "load_model_for", "the model was loaded"),
        (command, "load_model_for", "the model was loaded"),
    ],
    "model": [
        (TranscoderActivationsStore, "from_runner_config", "training data was read"),
        (cli, "load_heldout_split", "evaluation data was read"),
        (cli, "evaluate_spliced", "the evaluation ran"),
        (command, "build_graph", "the attribution ran"),
        (command, "find_paths", "the attribution ran"),
    ],
    "any": [],
}


def forbid(monkeypatch: pytest.MonkeyPatch, stage: Stage) -> None:
    """Make every step past ``stage`` fail loudly, so a check that comes too late fails its row."""
    later = FORBIDDEN["model"] if stage == "config" else []
    for owner, name, what in FORBIDDEN[stage] + later:
        def refuse(*args: Any, _what: str = what, **kwargs: Any) -> None:
            raise AssertionError(f"{_what} before the bad input was reported")

        monkeypatch.setattr(owner, name, refuse)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every directory (None) under ``root``, hidden ones included."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def test_ids_are_unique() -> None:
    assert len({c.id for c in CASES}) == len(CASES) >= 40


@pytest.mark.parametrize("row", CASES, ids=[c.id for c in CASES])
def test_bad_input(row: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    env = Env(tmp_path, monkeypatch)
    env.state["log"] = lambda: caplog.text
    if row.setup is not None:
        row.setup(env)
    before = snapshot(tmp_path)
    forbid(monkeypatch, row.stage)
    caplog.set_level(logging.INFO)
    if row.raises is None:
        result = row.run(env)
        for phrase in row.phrases:
            assert phrase in caplog.text
        if row.check is not None:
            row.check(env, result)
    else:
        with pytest.raises(BaseException) as info:
            row.run(env)
        assert type(info.value) is row.raises, info.value
        message = str(info.value)
        if row.raises is SystemExit:
            assert isinstance(info.value.code, str) and "\n" not in message
            assert message.startswith("sae-lens-transcoder ")
        for phrase in row.phrases:
            assert phrase in message
    if not row.changes_disk:
        assert snapshot(tmp_path) == before
