"""Checks of what users hand the runner and the commands, each naming the field or file and the fix.

A bad value found late costs a model load or a training run, and surfaces as a tensor error
far from its cause (or not at all: a negative L1 coefficient trains happily). These checks
run first: the model-free ones before the model is loaded, the others right after it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import numbers
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import datasets
from packaging.version import InvalidVersion, Version
from safetensors import SafetensorError, safe_open
from sae_lens.config import HfDataset, LanguageModelSAERunnerConfig
from sae_lens.constants import (
    DTYPE_MAP,
    RUNNER_CFG_FILENAME,
    SAE_CFG_FILENAME,
    SAE_WEIGHTS_FILENAME,
    SPARSITY_FILENAME,
)
from sae_lens.registry import SAE_CLASS_REGISTRY
from sae_lens.saes.transcoder import Transcoder
from transformer_lens import HookedTransformer

from sae_lens_transcoder._version import __version__
from sae_lens_transcoder.data import resolve_dataset_path
from sae_lens_transcoder.hooks import ensure_input_hooks, hook_layer, mlp_out_hook, probe_hooks
from sae_lens_transcoder.layer_spec import parse_mlp_layers
from sae_lens_transcoder.models import TINY_MODEL_NAME
from sae_lens_transcoder.models.transformers_source import TRANSFORMERS_MODEL_CLASS
from sae_lens_transcoder.export.circuit_tracer import CONFIG_FILE as CIRCUIT_TRACER_CONFIG
from sae_lens_transcoder.replacement import PerLayerTranscoders, ReplacementSet, Splice
from sae_lens_transcoder.replacement.saving import MANIFEST_FILE
from sae_lens_transcoder.saes.clt import CLT_TRAINER_NAME
from sae_lens_transcoder.saes.mixin import TranscoderConfigMixin
from sae_lens_transcoder.saes.transcoder import TRAINING_CLASSES
from sae_lens_transcoder.training.checkpoint_view import training_cfg_file

logger = logging.getLogger(__name__)

_DEFAULTS = LanguageModelSAERunnerConfig.__dataclass_fields__
SAE_LENS_DEFAULT_HOOK = _DEFAULTS["hook_name"].default
SAE_LENS_DEFAULT_N_BATCHES_IN_BUFFER = _DEFAULTS["n_batches_in_buffer"].default
# Recorded in cfg.json's metadata (SAELens keeps unknown metadata keys and loads them silently).
PLUGIN_VERSION_KEY = "sae_lens_transcoder_version"
# Exactly what the runner's final save writes: such a directory may be replaced by a new run.
FINAL_SAVE_FILES = frozenset({SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME, RUNNER_CFG_FILENAME})
DTYPES = ("float32", "float64", "float16", "bfloat16")
USER_ERRORS = (ValueError, TypeError, OSError, argparse.ArgumentError)


# ---------------------------------------------------------------------------- numbers


@dataclass(frozen=True)
class NumberField:
    """A numeric runner setting (``sae.`` prefix: inside the ``sae`` section) and its bounds."""

    name: str
    integer: bool
    minimum: float
    strict: bool = False  # the minimum itself is not allowed
    optional: bool = False  # None is allowed


NUMBER_FIELDS = (
    NumberField("context_size", True, 1),
    NumberField("training_tokens", True, 1),
    NumberField("train_batch_size_tokens", True, 1),
    NumberField("n_batches_in_buffer", True, 1),
    NumberField("store_batch_size_prompts", True, 1),
    NumberField("n_checkpoints", True, 0),
    NumberField("lr_warm_up_steps", True, 0),
    NumberField("lr_decay_steps", True, 0),
    NumberField("lr", False, 0, strict=True),
    NumberField("sae.d_in", True, 1),
    NumberField("sae.d_sae", True, 1),
    NumberField("sae.d_out", True, 1, optional=True),
    NumberField("sae.mlp_layer", True, 0, optional=True),
    NumberField("sae.l1_coefficient", False, 0),
    NumberField("sae.l1_warm_up_steps", True, 0),
    NumberField("sae.l0_coefficient", False, 0),
    NumberField("sae.l0_warm_up_steps", True, 0),
    NumberField("sae.jumprelu_init_threshold", False, 0),
    NumberField("sae.jumprelu_bandwidth", False, 0, strict=True),
    NumberField("sae.k", False, 0, strict=True),
    NumberField("sae.aux_loss_coefficient", False, 0),
    NumberField("sae.topk_threshold_lr", False, 0),
)


def _text_hint(value: object) -> str:
    """YAML 1.1 (PyYAML) reads ``1e-3`` as text; say so when a string looks like a number."""
    if not isinstance(value, str):
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    return " — text, not a number: write it unquoted, with a dot in YAML (1.0e-3; PyYAML reads 1e-3 as text)"


def check_number(
    name: str,
    value: object,
    *,
    integer: bool,
    minimum: float,
    strict: bool = False,
    optional: bool = False,
    hint: str = "",
) -> None:
    """``value`` is a finite int (or, unless ``integer``, float) >= ``minimum``; bool is no number."""
    if value is None and optional:
        return
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        what = "an integer" if integer else "a number"
        raise TypeError(f"{name} must be {what}; got {value!r} ({type(value).__name__}){_text_hint(value)}.")
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise ValueError(f"{name}={value!r} must be {bound}{hint}.")


def _lookup(source: Any, name: str) -> tuple[bool, Any]:
    """(present, value) of a dotted field in a config object or its dict form."""
    for part in name.split("."):
        present = part in source if isinstance(source, Mapping) else hasattr(source, part)
        if not present:
            return False, None
        source = source[part] if isinstance(source, Mapping) else getattr(source, part)
    return True, source


def check_number_fields(source: LanguageModelSAERunnerConfig[Any] | Mapping[str, Any]) -> None:
    """The numeric settings of a runner config, or of the dict a YAML/JSON file gave (before
    SAELens's ``__post_init__`` does arithmetic on them and fails with a bare TypeError)."""
    for field in NUMBER_FIELDS:
        present, value = _lookup(source, field.name)
        if present:
            check_number(
                field.name, value, integer=field.integer, minimum=field.minimum,
                strict=field.strict, optional=field.optional,
            )


def _check_k(sae: TranscoderConfigMixin) -> None:
    """TopK picks ``k`` of ``d_sae`` features per token: a whole number no larger than ``d_sae``."""
    k = getattr(sae, "k", None)
    if k is None:
        return
    if sae.architecture().startswith("topk") and int(k) != k:
        raise ValueError(f"sae.k={k!r} must be a whole number for {sae.architecture()} (BatchTopK takes a mean k).")
    if k > sae.d_sae:
        raise ValueError(f"sae.k={k!r} is more than sae.d_sae={sae.d_sae} features: lower k or raise d_sae.")


def check_dtype(name: str, value: object) -> None:
    if value not in DTYPE_MAP:
        raise ValueError(f"{name}={value!r} is not a dtype SAELens reads: use one of {', '.join(DTYPES)}.")


# ---------------------------------------------------------------------------- runner config


def validate_runner_config(
    cfg: LanguageModelSAERunnerConfig[Any], override_dataset: HfDataset | None = None
) -> None:
    """Checks that need no model: run them before anything slow happens.

    Also settles two defaults SAELens chose for other SAEs: a mixing buffer too small for
    one batch (SAELens's default ``n_batches_in_buffer``) is enlarged, and a local dataset
    is not loaded with ``trust_remote_code`` (datasets logs an error line for it).
    """
    if not isinstance(cfg.sae, TranscoderConfigMixin):
        raise ValueError(
            f"sae.architecture is {cfg.sae.architecture()!r}; TranscoderTrainingRunner trains the "
            f"transcoder architectures {', '.join(TRAINING_CLASSES)} (import sae_lens_transcoder first)."
        )
    check_number_fields(cfg)
    _check_k(cfg.sae)
    check_dtype("dtype", cfg.dtype)
    check_dtype("sae.dtype", cfg.sae.dtype)
    if cfg.training_tokens < cfg.train_batch_size_tokens:
        raise ValueError(
            f"training_tokens={cfg.training_tokens} is less than one batch "
            f"(train_batch_size_tokens={cfg.train_batch_size_tokens}), so no training step would run: "
            "raise training_tokens or lower train_batch_size_tokens."
        )
    if cfg.use_cached_activations:
        raise ValueError(
            "use_cached_activations=True is not supported for transcoders: SAELens caches "
            "one hook, a transcoder needs the MLP input and output of the same tokens. "
            "Set use_cached_activations: false."
        )
    if cfg.hook_head_index is not None:
        raise ValueError("hook_head_index must be None for an MLP transcoder.")
    if cfg.model_class_name not in ("HookedTransformer", TRANSFORMERS_MODEL_CLASS):
        raise ValueError(
            f"model_class_name={cfg.model_class_name!r}: transcoder training reads a TransformerLens "
            f"HookedTransformer's MLP hooks, made by it or by the same model in transformers. Set "
            f"model_class_name: HookedTransformer (or {TRANSFORMERS_MODEL_CLASS})."
        )
    if cfg.model_class_name == TRANSFORMERS_MODEL_CLASS and cfg.model_name == TINY_MODEL_NAME:
        raise ValueError(
            f"model_class_name={TRANSFORMERS_MODEL_CLASS!r}: model {TINY_MODEL_NAME!r} exists only as a "
            "HookedTransformer, with no transformers form. Set model_class_name: HookedTransformer."
        )
    _fit_mixing_buffer(cfg)
    _warn_if_dead_features_never_handled(cfg)
    _resolve_hooks(cfg)
    _check_dataset(cfg, override_dataset)
    for field in ("resume_from_checkpoint", "from_pretrained_path"):
        _check_saved_sae_for_training(cfg, field)


def _warn_if_dead_features_never_handled(cfg: LanguageModelSAERunnerConfig[Any]) -> None:
    """AuxK and the pre-activation loss act on latents dead for ``dead_feature_window`` steps;
    SAELens's default (1000) is longer than many runs, and then they never act."""
    acts_on_dead = getattr(cfg.sae, "aux_loss_coefficient", 0) or getattr(cfg.sae, "pre_act_loss_coefficient", None)
    steps = cfg.training_tokens // cfg.train_batch_size_tokens
    if acts_on_dead and cfg.dead_feature_window >= steps:
        logger.warning(
            "dead_feature_window=%d is not shorter than the run (%d steps): no latent is ever counted dead, so "
            "%s never runs. Set dead_feature_window to a fraction of the run (e.g. %d).",
            cfg.dead_feature_window, steps, "AuxK" if hasattr(cfg.sae, "aux_loss_coefficient") else "the pre-activation loss",
            max(1, steps // 8),
        )


def _fit_mixing_buffer(cfg: LanguageModelSAERunnerConfig[Any]) -> None:
    """The mixing buffer holds ``n_batches_in_buffer × context_size`` tokens and must hold a batch."""
    buffer_tokens = cfg.n_batches_in_buffer * cfg.context_size
    if buffer_tokens >= cfg.train_batch_size_tokens:
        return
    needed = -(-cfg.train_batch_size_tokens // cfg.context_size)
    if cfg.n_batches_in_buffer == SAE_LENS_DEFAULT_N_BATCHES_IN_BUFFER:
        logger.info(
            "n_batches_in_buffer: SAELens's default %d × context_size %d holds fewer tokens than one "
            "batch (train_batch_size_tokens=%d); using %d, the smallest that fits.",
            cfg.n_batches_in_buffer, cfg.context_size, cfg.train_batch_size_tokens, needed,
        )
        cfg.n_batches_in_buffer = needed
        return
    raise ValueError(
        f"n_batches_in_buffer × context_size = {buffer_tokens} tokens is smaller than "
        f"train_batch_size_tokens={cfg.train_batch_size_tokens}; raise n_batches_in_buffer "
        f"to at least {needed}."
    )


def _resolve_hooks(cfg: LanguageModelSAERunnerConfig[Any]) -> None:
    """``sae.mlp_layers`` (a set), ``sae.mlp_layer`` or ``hook_name`` picks the layers;
    ``sae.hook_name_out`` defaults to the MLP output of a single layer."""
    sae = cfg.sae
    if sae.mlp_layers is not None:
        parse_mlp_layers(sae.mlp_layers)  # the format; the model bounds it later
        given = [name for name, value in (("sae.mlp_layer", sae.mlp_layer), ("sae.hook_name_out", sae.hook_name_out))
                 if value is not None]
        if cfg.hook_name != SAE_LENS_DEFAULT_HOOK:
            given.insert(0, "hook_name")
        if given:
            raise ValueError(
                f"sae.mlp_layers={sae.mlp_layers!r} picks each layer's MLP input and output hooks; "
                f"{' and '.join(given)} cannot be given with it. Remove {' and '.join(given)}."
            )
        return
    if sae.mlp_layer is not None:
        if cfg.hook_name != SAE_LENS_DEFAULT_HOOK and hook_layer(cfg.hook_name) != sae.mlp_layer:
            raise ValueError(
                f"sae.mlp_layer={sae.mlp_layer} disagrees with hook_name={cfg.hook_name!r}; "
                "give one of them."
            )
        sae.hook_name_out = sae.hook_name_out or mlp_out_hook(sae.mlp_layer)
    elif cfg.hook_name == SAE_LENS_DEFAULT_HOOK:
        raise ValueError(
            f"hook_name is SAELens's default {SAE_LENS_DEFAULT_HOOK!r}, an MLP *output*. "
            "Set sae.mlp_layer (e.g. mlp_layer: 3) to pick the MLP's exact input and output "
            "hooks, or set hook_name to the MLP input (e.g. 'blocks.3.mlp.hook_in')."
        )
    else:
        sae.hook_name_out = sae.hook_name_out or mlp_out_hook(hook_layer(cfg.hook_name))
    # With mlp_layer, SAELens's default hook_name means "not given": it is resolved later.
    hook_name_given = cfg.hook_name != SAE_LENS_DEFAULT_HOOK
    if hook_name_given and sae.hook_name_out == cfg.hook_name:
        raise ValueError(
            f"hook_name and sae.hook_name_out are both {cfg.hook_name!r}; a transcoder "
            "reads the MLP input (hook_name) and predicts the MLP output (hook_name_out)."
        )


def _check_dataset(cfg: LanguageModelSAERunnerConfig[Any], override_dataset: HfDataset | None) -> None:
    """A dataset with no rows fails in SAELens's store as a bare StopIteration; find it here.
    Only local datasets are opened (Hub ones would need the network)."""
    if override_dataset is not None:
        if isinstance(override_dataset, datasets.Dataset) and len(override_dataset) == 0:
            raise ValueError("override_dataset has no rows: pass a dataset with text or token rows.")
        return
    if not cfg.dataset_path:
        raise ValueError(
            "dataset_path is empty: set dataset_path (a Hugging Face dataset, a local directory "
            "or 'embedded') or pass override_dataset."
        )
    local = Path(resolve_dataset_path(cfg.dataset_path)).expanduser()
    if not local.exists():
        return
    # No loading script to trust in a local directory; datasets>=4 logs an error for the flag.
    cfg.dataset_trust_remote_code = False
    if not local.is_dir():
        raise ValueError(
            f"dataset_path={cfg.dataset_path!r} is a file; datasets.load_dataset reads a directory "
            "(e.g. one holding train.jsonl) or a Hub dataset name: put the file in a directory and give that."
        )
    try:
        next(iter(datasets.load_dataset(str(local), split="train", streaming=True)))
    except StopIteration:
        raise ValueError(
            f"dataset_path={cfg.dataset_path!r} has no rows in its train split: add training text "
            "(e.g. train.jsonl with a 'text' column) or point dataset_path elsewhere."
        ) from None
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"dataset_path={cfg.dataset_path!r}: cannot read its train split ({e}).") from e


def _check_saved_sae_for_training(cfg: LanguageModelSAERunnerConfig[Any], field: str) -> None:
    """A checkpoint or pretrained SAE to continue from must be a transcoder of a plugin no newer than us."""
    value = getattr(cfg, field)
    if value is None:
        return
    path = Path(value)
    if not path.is_dir():
        raise FileNotFoundError(f"{field}={value!r} is not a directory: give the checkpoint directory to continue from.")
    for directory in _saved_sae_dirs(path, field):
        # A checkpoint's cfg.json is the inference transcoder; the trainer's config is beside it.
        saved = read_sae_cfg(directory, field, training_cfg_file(directory).name)
        architecture = saved.get("architecture")
        if architecture != cfg.sae.architecture():
            raise ValueError(
                f"{field}={value!r} holds a {architecture!r} SAE, but this run trains "
                f"sae.architecture={cfg.sae.architecture()!r}: continue from a transcoder run's "
                f"checkpoint, or remove {field}."
            )
        check_plugin_version(saved, directory / SAE_CFG_FILENAME)


def _saved_sae_dirs(path: Path, field: str) -> list[Path]:
    """A checkpoint holds one ``layer_<i>`` directory per transcoder (one ``clt`` directory for a
    cross-layer transcoder, or feature sharded one ``clt.features<r>-of-<N>`` per rank); a
    pretrained SAE is one."""
    if field != "resume_from_checkpoint":
        return [path]
    names = ("layer_", f"{CLT_TRAINER_NAME}.features")
    layers = sorted(p for p in path.iterdir() if p.is_dir() and (p.name.startswith(names) or p.name == CLT_TRAINER_NAME))
    if not layers:
        raise FileNotFoundError(
            f"{field}={str(path)!r} holds no layer_<i> (or {CLT_TRAINER_NAME}) directory: it is not a checkpoint written by "
            "this plugin's runner. Give a directory under the run's checkpoint_path."
        )
    return layers


# ---------------------------------------------------------------------------- the loaded model


def _configured_layers(cfg: LanguageModelSAERunnerConfig[Any]) -> Iterator[tuple[str, int]]:
    sae = cfg.sae
    if sae.mlp_layer is not None:
        yield "sae.mlp_layer", sae.mlp_layer
    if cfg.hook_name != SAE_LENS_DEFAULT_HOOK:
        yield f"hook_name={cfg.hook_name!r}", hook_layer(cfg.hook_name)
    if sae.hook_name_out is not None:
        yield f"sae.hook_name_out={sae.hook_name_out!r}", hook_layer(sae.hook_name_out, "sae.hook_name_out")


def validate_runner_model(cfg: LanguageModelSAERunnerConfig[Any], model: HookedTransformer) -> None:
    """Checks that need the model, run before its hooks are probed or any data is read."""
    n_layers = model.cfg.n_layers
    if cfg.sae.mlp_layers is not None:
        parse_mlp_layers(cfg.sae.mlp_layers, n_layers)
    for field, layer in _configured_layers(cfg):
        if not 0 <= layer < n_layers:
            raise ValueError(
                f"{field} is layer {layer}, but model {cfg.model_name!r} has {n_layers} layers "
                f"(0..{n_layers - 1}): pick one of those."
            )
    if cfg.context_size > model.cfg.n_ctx:
        raise ValueError(
            f"context_size={cfg.context_size} is longer than model {cfg.model_name!r}'s context "
            f"(n_ctx={model.cfg.n_ctx}): set context_size <= {model.cfg.n_ctx}."
        )


def check_splices_fit_model(
    model: HookedTransformer,
    splices: Sequence[Splice],
    model_name: str | None = None,
    labels: Sequence[str] | None = None,
) -> None:
    """Every transcoder's hooks exist in ``model`` with its widths (one short probe forward)."""
    if not splices:
        return
    ensure_input_hooks(model, [splice.hook_name for splice in splices])
    model_label = repr(model_name) if model_name else "the model"
    names = [labels[i] if labels else f"transcoder {i}" for i in range(len(splices))]

    def fail(name: str, splice: Splice, problem: str) -> NoReturn:
        hint = _trained_on_hint(splice.transcoder.cfg.metadata.model_name, model_name)
        raise ValueError(f"{name} {problem}{hint}.")

    for name, splice in zip(names, splices):
        for hook in (splice.hook_name, splice.hook_name_out):
            if hook not in model.hook_dict:
                fail(name, splice, f"reads or writes {hook!r}, which {model_label} ({model.cfg.n_layers} layers) does not have")
    acts = probe_hooks(model, sorted({h for s in splices for h in (s.hook_name, s.hook_name_out)}))
    for name, splice in zip(names, splices):
        cfg = splice.transcoder.cfg
        widths = ((splice.hook_name, "d_in", cfg.d_in), (splice.hook_name_out, "d_out", getattr(cfg, "d_out", cfg.d_in)))
        for hook, field, width in widths:
            if hook not in acts:
                fail(name, splice, f"reads or writes {hook!r}, which never fires in {model_label}")
            elif acts[hook].shape[-1] != width:
                fail(name, splice, f"has {field}={width}, but {hook!r} of {model_label} has width {acts[hook].shape[-1]}")


def check_replacement_fits_model(model: HookedTransformer, replacement: ReplacementSet) -> None:
    """``check_splices_fit_model`` for any replacement set: every layer's hooks exist in
    ``model``, fire, and have the set's widths."""
    if isinstance(replacement, PerLayerTranscoders):
        check_splices_fit_model(model, list(replacement.splices.values()))
        return
    ensure_input_hooks(model, [replacement.hook_in(layer) for layer in replacement.layers])
    widths = {}
    for layer in replacement.layers:
        widths[replacement.hook_in(layer)] = ("d_in", replacement.d_in(layer))
        widths[replacement.hook_out(layer)] = ("d_out", replacement.d_out(layer))
    missing = [hook for hook in widths if hook not in model.hook_dict]
    if missing:
        raise ValueError(f"the replacement set reads or writes {missing}, which the model ({model.cfg.n_layers} layers) does not have.")
    acts = probe_hooks(model, sorted(widths))
    for hook, (field, width) in widths.items():
        if hook not in acts:
            raise ValueError(f"the replacement set reads or writes {hook!r}, which never fires in the model.")
        if acts[hook].shape[-1] != width:
            raise ValueError(f"the replacement set has {field}={width}, but {hook!r} of the model has width {acts[hook].shape[-1]}.")


def _trained_on_hint(trained_on: str | None, model_name: str | None) -> str:
    if not trained_on or not model_name or trained_on == model_name:
        return ""
    return f"; it was trained on {trained_on!r} (metadata.model_name), not {model_name!r}: evaluate it on that model"


# ---------------------------------------------------------------------------- saved transcoders


def read_sae_cfg(directory: Path, what: str, file_name: str = SAE_CFG_FILENAME) -> dict[str, Any]:
    """A saved SAE's cfg.json (or ``file_name``) as a dict; a missing, non-JSON or non-mapping file is named."""
    file = directory / file_name
    if not file.is_file():
        raise FileNotFoundError(f"{what} {str(directory)!r} has no {SAE_CFG_FILENAME}: it is not a saved SAELens SAE.")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}); the directory does not hold a usable transcoder.") from e
    if not isinstance(data, dict):
        raise ValueError(f"{file} holds a JSON {type(data).__name__}, not an object with architecture, d_in, d_sae, ...")
    return data


def check_plugin_version(saved_cfg: Mapping[str, Any], file: Path) -> None:
    """Refuse files from a newer plugin: they may mean something this version cannot read."""
    metadata = saved_cfg.get("metadata")
    written = metadata.get(PLUGIN_VERSION_KEY) if isinstance(metadata, Mapping) else None
    if written is None:
        return
    try:
        newer = Version(str(written)) > Version(__version__)
    except InvalidVersion as e:
        raise ValueError(f"{file}: metadata.{PLUGIN_VERSION_KEY}={written!r} is not a version number.") from e
    if newer:
        raise ValueError(
            f"{file} was written by sae-lens-transcoder {written}, newer than the installed "
            f"{__version__}: upgrade (pip install -U sae-lens-transcoder) to read it."
        )


def transcoder_architectures() -> set[str]:
    """The registered inference architectures that are transcoders (SAELens's and any plugin's)."""
    return {name for name, (cls, _) in SAE_CLASS_REGISTRY.items() if issubclass(cls, Transcoder)}


def check_transcoder_dir(path: Path, spec: str) -> None:
    """What ``SAE.load_from_disk`` would fail on with no file name, or load wrongly, checked first."""
    if not path.is_dir():
        raise ValueError(
            f"{spec!r} is a file, not a transcoder directory: give the directory holding {SAE_CFG_FILENAME} "
            f"and {SAE_WEIGHTS_FILENAME} (what train --output_path writes); weights saved by other tools "
            "(.pt, .pth, ...) must be converted to that format first."
        )
    saved = read_sae_cfg(path, "transcoder directory")
    file = path / SAE_CFG_FILENAME
    check_plugin_version(saved, file)
    architecture = saved.get("architecture")
    known = sorted(transcoder_architectures())
    if architecture not in known:
        raise ValueError(f"{file}: architecture={architecture!r} is not a transcoder (expected one of {', '.join(known)}).")
    for key in ("d_in", "d_sae", "d_out"):
        value = saved.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{file}: {key}={value!r}; a transcoder's cfg.json needs {key} as a positive integer.")
    metadata = saved.get("metadata")
    if not isinstance(metadata, Mapping) or not isinstance(metadata.get("hook_name"), str):
        raise ValueError(f"{file}: metadata.hook_name (the MLP input hook, e.g. 'blocks.1.mlp.hook_in') is missing.")
    d_in, d_sae, d_out = saved["d_in"], saved["d_sae"], saved["d_out"]
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
    check_weights_file(path / SAE_WEIGHTS_FILENAME, shapes)


def check_weights_file(file: Path, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """The weights open as safetensors and hold the tensors cfg.json describes."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: a transcoder directory holds its weights there.")
    try:
        with safe_open(str(file), framework="pt") as handle:
            found = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(
            f"{file} is not a readable safetensors file ({e}): it is truncated or in another format "
            "(e.g. a torch.save pickle). Save it again with SAE.save_inference_model, or train again."
        ) from e
    for name, shape in shapes.items():
        if name not in found:
            raise ValueError(f"{file} has no {name!r} tensor (it has {sorted(found)}): these are not a transcoder's weights.")
        if found[name] != shape:
            raise ValueError(f"{file}: {name} has shape {list(found[name])}, but cfg.json (d_in, d_sae, d_out) says {list(shape)}.")


# ---------------------------------------------------------------------------- output paths


def is_previous_transcoder_output(path: Path) -> bool:
    """Exactly the files a final save writes, with a transcoder's cfg.json (or a set of such
    directories with its manifest and circuit-tracer's files): a new run may replace it."""
    if (path / MANIFEST_FILE).is_file():
        return _is_previous_set_output(path)
    if {p.name for p in path.iterdir()} != FINAL_SAVE_FILES:
        return False
    if not all((path / name).is_file() for name in FINAL_SAVE_FILES):
        return False
    try:
        saved = json.loads((path / SAE_CFG_FILENAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and saved.get("architecture") in transcoder_architectures()


def _is_previous_set_output(path: Path) -> bool:
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        layers = {entry["layer"]: entry["dir"] for entry in manifest["layers"]}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    expected = {MANIFEST_FILE, *layers.values()}
    if manifest.get("circuit_tracer"):
        expected |= {CIRCUIT_TRACER_CONFIG, *(f"layer_{layer}.safetensors" for layer in layers)}
    return {p.name for p in path.iterdir()} == expected and all(
        (path / name).is_dir() and is_previous_transcoder_output(path / name) for name in layers.values()
    )


def check_output_path(output_path: str | None, overwrite: bool = False) -> None:
    """Nothing on disk is replaced unless it is a previous transcoder output or ``overwrite``.

    The final save builds the new directory beside ``output_path`` and renames it into place,
    so the parent must be writable too.
    """
    if output_path is None:
        return
    path = Path(output_path).expanduser()
    if path.exists() and not path.is_dir():
        raise FileExistsError(
            f"output_path={output_path!r} is a file; the transcoder is saved as a directory there. "
            "Choose another output_path (the file is left alone)."
        )
    _check_parent_writable(path, "output_path")
    if not path.is_dir():
        return
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return
    if is_previous_transcoder_output(path):
        logger.info("output_path=%r holds a previous transcoder output of this plugin: the new one replaces it.", output_path)
        return
    if overwrite:
        logger.info("output_path=%r is not empty: the new transcoder replaces it, as overwrite was asked.", output_path)
        return
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    raise FileExistsError(
        f"output_path={output_path!r} already holds files ({shown}) that are not a previous transcoder "
        "output of this plugin: choose another output_path, or pass --overwrite "
        "(Python: overwrite_output=True) to replace them."
    )


def _check_parent_writable(path: Path, field: str) -> None:
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise FileExistsError(f"{field}={str(path)!r} cannot be created: {ancestor} is a file, not a directory.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(
            f"{field}={str(path)!r} cannot be written: {ancestor} is not writable. Choose a writable location."
        )


# ---------------------------------------------------------------------------- commands


@contextmanager
def exit_on_bad_input(command: str) -> Iterator[None]:
    """A command given bad input ends with one line naming the fix, not a traceback."""
    try:
        yield
    except USER_ERRORS as e:
        message = " ".join(str(e).split())
        raise SystemExit(f"sae-lens-transcoder {command}: {message}") from e
