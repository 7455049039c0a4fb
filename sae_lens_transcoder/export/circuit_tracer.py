"""Write SAELens transcoders as a circuit-tracer transcoder set, and read such a set back.

circuit-tracer (``pip install circuit-tracer``) builds attribution graphs from one
transcoder per layer. The layout below is what its loaders read in release 0.5.0
(``load_transcoders_from_cache`` -> ``load_transcoder_set`` -> ``load_relu_transcoder``,
and the same files in a Hugging Face repo through ``load_transcoder_from_hub``)::

    DIR/config.yaml             model_name, model_kind: transcoder_set,
                                feature_input_hook, feature_output_hook, scan
    DIR/layer_{i}.safetensors   one per layer i = 0 .. n-1, no gaps, nothing else

Each ``layer_{i}.safetensors`` holds exactly these tensors (an unknown key breaks its
strict ``load_state_dict``):

============================== ======================= =====================================
key                            shape                   meaning
============================== ======================= =====================================
``W_enc``                      ``[d_sae, d_model]``    pre = x @ W_enc.T + b_enc (SAELens
                                                       keeps ``W_enc`` as ``[d_in, d_sae]``)
``b_enc``                      ``[d_sae]``
``W_dec``                      ``[d_sae, d_model]``    same orientation as SAELens
``b_dec``                      ``[d_model]``
``W_skip`` (optional)          ``[d_model, d_model]``  adds x @ W_skip.T (SAELens's
                                                       ``[d_out, d_in]``)
``activation_function.         ``[d_sae]``             present: JumpReLU pre * (pre > t);
threshold`` (optional)                                 absent: ReLU
============================== ======================= =====================================

TopK sets (this package's ``TopKTranscoder``) add ``activation: topk`` and ``k`` to
``config.yaml``, as upstream circuit-tracer reads them (the PyPI 0.5.0 release has no
TopK). Upstream keeps the ``k`` largest pre-activations as they are; SAELens's ``TopK``
also applies ReLU to them, so the two differ only on tokens where one of the ``k`` largest
pre-activations is negative.

``d_model`` is read from ``b_dec``, ``d_sae`` from ``b_enc``; input and output widths are
one ``d_model``. The hooks are TransformerLens names relative to ``blocks.{layer}``
(e.g. ``ln2.hook_normalized``, ``mlp.hook_in`` - circuit-tracer wraps every MLP in a
module with ``hook_in``/``hook_out`` - and ``hook_mlp_out``), one pair for the whole set.
circuit-tracer asserts one transcoder for every layer ``0..max`` with one ``d_sae``,
decides "skip connection" from layer 0 alone, and runs the model with ``fold_ln=False``
and ``center_writing_weights=False``; its graphs cache MLP inputs of every model layer,
so a usable set covers all layers of the model.

To load an export with circuit-tracer itself (no network)::

    from circuit_tracer.utils.caching import load_transcoders_from_cache
    transcoders, config = load_transcoders_from_cache(DIR.name, cache_dir=DIR.parent)

or set ``CIRCUIT_TRACER_CACHE_DIR=DIR.parent`` and pass ``DIR.name`` as the transcoder
set (``ReplacementModel.from_pretrained``, ``circuit-tracer attribute --transcoder_set``);
uploaded as a Hugging Face repo, the directory loads by repo id.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sae_lens.saes.sae import SAE, SAEMetadata
from sae_lens.saes.transcoder import (
    JumpReLUSkipTranscoder,
    JumpReLUSkipTranscoderConfig,
    JumpReLUTranscoder,
    JumpReLUTranscoderConfig,
    SkipTranscoder,
    SkipTranscoderConfig,
    Transcoder,
    TranscoderConfig,
)

from sae_lens_transcoder.atomic import replace_dir_atomically
from sae_lens_transcoder.hooks import hook_layer
from sae_lens_transcoder.replacement import PerLayerTranscoders, Splice, as_splices
from sae_lens_transcoder.saes.topk_transcoder import (
    TopKSkipTranscoder,
    TopKSkipTranscoderConfig,
    TopKTranscoder,
    TopKTranscoderConfig,
)

__all__ = ["export_circuit_tracer", "load_circuit_tracer_transcoders"]

CONFIG_FILE = "config.yaml"
MODEL_KIND = "transcoder_set"
THRESHOLD = "activation_function.threshold"
REQUIRED_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")
OPTIONAL_KEYS = ("W_skip", THRESHOLD)
# circuit-tracer replaces the MLP's output; it calls both names "the MLP output".
OUTPUT_HOOKS = ("hook_mlp_out", "mlp.hook_out")
OUR_KEY = "sae_lens_transcoder"  # extra config block; circuit-tracer ignores it
LAYER_FILE = re.compile(r"^layer_(\d+)\.safetensors$")


def layer_file(layer: int) -> str:
    return f"layer_{layer}.safetensors"


@dataclass
class _Prepared:
    layer: int
    tensors: dict[str, torch.Tensor]
    input_hook: str
    output_hook: str
    d_sae: int
    d_model: int
    source: dict[str, Any]


def _relative_hook(hook_name: str, layer: int, field: str) -> str:
    prefix = f"blocks.{layer}."
    if not hook_name.startswith(prefix) or len(hook_name) == len(prefix):
        raise ValueError(
            f"{field}={hook_name!r} is not a hook inside blocks.{layer}: circuit-tracer "
            "names hooks relative to each block (e.g. 'blocks.3.hook_mlp_out' -> 'hook_mlp_out')."
        )
    return hook_name[len(prefix) :]


def _jsonable_metadata(metadata: SAEMetadata) -> dict[str, Any]:
    """The metadata entries that survive YAML (anything else is dropped)."""
    kept: dict[str, Any] = {}
    for key, value in metadata.to_dict().items():
        try:
            kept[key] = json.loads(json.dumps(value))
        except (TypeError, ValueError):
            continue
    return kept


def _prepare(sp: Splice, index: int, scale_known: bool) -> _Prepared:
    """Check that ``sp`` fits the format and describe it (tensors come from the set, later).

    ``scale_known`` is False for a bare SAE, whose training-time scaling factor is unknown.
    """
    tc = sp.transcoder
    where = f"transcoders[{index}]"
    if not isinstance(tc, Transcoder):
        arch = tc.cfg.architecture() if hasattr(tc.cfg, "architecture") else type(tc).__name__
        raise ValueError(
            f"{where}: architecture={arch!r} cannot be exported; circuit-tracer per-layer "
            "transcoders are SAELens Transcoder, SkipTranscoder, JumpReLUTranscoder or "
            "JumpReLUSkipTranscoder, or this package's TopK transcoders (ReLU, JumpReLU or "
            "TopK, optional skip)."
        )
    cfg = tc.cfg
    norm = cfg.normalize_activations
    if norm not in ("none", "expected_average_only_in"):
        raise ValueError(
            f"{where}: normalize_activations={norm!r} rescales each input by its own "
            "statistics, which circuit-tracer's transcoder cannot do; only 'none' and a "
            "folded 'expected_average_only_in' can be exported."
        )
    if norm == "expected_average_only_in" and not scale_known:
        raise ValueError(
            f"{where}: normalize_activations='expected_average_only_in' but the scaling "
            "factor is not part of the SAE. Pass Splice.from_sae(sae, input_scale=FACTOR), "
            "or call sae.fold_activation_norm_scaling_factor(FACTOR) first."
        )
    if getattr(cfg, "reshape_activations", "none") != "none":
        raise ValueError(f"{where}: reshape_activations={cfg.reshape_activations!r} cannot be exported (need 'none').")
    if sp.feature_mask is not None:
        raise ValueError(
            f"{where}: feature_mask is set; circuit-tracer has no per-feature mask "
            "(export the transcoder without keep_only_features)."
        )
    scale = float(sp.input_scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{where}: input_scale={scale!r} must be a positive finite number.")

    d_in, d_sae = tc.W_enc.shape
    d_out = tc.W_dec.shape[1]
    if d_in != d_out:
        raise ValueError(
            f"{where}: d_in={d_in} but d_out={d_out}; circuit-tracer transcoders read and "
            "write one residual width d_model."
        )

    layer = sp.layer
    in_layer = hook_layer(sp.hook_name, "hook_name")
    if in_layer != layer:
        raise ValueError(
            f"{where}: hook_name={sp.hook_name!r} is in layer {in_layer} but "
            f"hook_name_out={sp.hook_name_out!r} in layer {layer}; circuit-tracer "
            "transcoders read and write the same layer."
        )
    input_hook = _relative_hook(sp.hook_name, layer, "hook_name")
    output_hook = _relative_hook(sp.hook_name_out, layer, "hook_name_out")
    if output_hook not in OUTPUT_HOOKS:
        raise ValueError(
            f"{where}: hook_name_out={sp.hook_name_out!r} is not an MLP output; "
            f"circuit-tracer replaces the MLP output (blocks.{layer}.hook_mlp_out)."
        )
    model_kwargs = cfg.metadata.model_from_pretrained_kwargs or {}
    if model_kwargs.get("center_writing_weights"):
        raise ValueError(
            f"{where}: metadata.model_from_pretrained_kwargs.center_writing_weights=True "
            "changes the MLP outputs; circuit-tracer runs the model with "
            "center_writing_weights=False, so this transcoder's targets do not exist there."
        )
    if model_kwargs.get("fold_ln") and input_hook == "mlp.hook_in":
        # Folded, the MLP reads the bare normalised residual; circuit-tracer runs the model
        # unfolded, where that value is ln2.hook_normalized (taken before the norm's weight).
        input_hook = "ln2.hook_normalized"

    source = {
        "layer": layer,
        "architecture": cfg.architecture(),
        "hook_name": sp.hook_name,
        "hook_name_out": sp.hook_name_out,
        "folded_input_scale": scale,
        "metadata": _jsonable_metadata(cfg.metadata),
    }
    return _Prepared(layer, {}, input_hook, output_hook, d_sae, d_in, source)


def _layer_tensors(replacement: PerLayerTranscoders, layer: int, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The file's tensors: the set's transcoder in model units, in circuit-tracer's orientation."""
    tc = replacement.transcoder(layer)
    units = replacement.folded(layer)
    assert units.W_enc is not None  # a linear input normalisation, checked in _prepare
    tensors = {"W_enc": units.W_enc.T, "b_enc": units.b_enc, "W_dec": units.W_dec, "b_dec": units.b_dec}
    if isinstance(tc, SkipTranscoder) and units.W_skip is not None:
        tensors["W_skip"] = units.W_skip
    if isinstance(tc, JumpReLUTranscoder) and units.threshold is not None:
        # SAELens: relu(pre) * (pre > t); circuit-tracer: pre * (pre > t). They agree for
        # t >= 0, and a negative t behaves exactly like t = 0 in SAELens.
        tensors[THRESHOLD] = units.threshold.clamp(min=0)
    out_dtype = dtype or tc.dtype
    return {k: v.to(out_dtype).contiguous().cpu() for k, v in tensors.items()}


def _activation_config(replacement: PerLayerTranscoders, layers: list[int]) -> dict[str, Any]:
    """``activation: topk`` and ``k`` for a TopK set; nothing otherwise (ReLU or JumpReLU by file)."""
    ks = {layer: getattr(replacement.transcoder(layer).cfg, "k", None) for layer in layers}
    if all(k is None for k in ks.values()):
        return {}
    if len(set(ks.values())) != 1:
        raise ValueError(
            f"k per layer {ks}: circuit-tracer has one activation (and one k) for the whole set; "
            "export TopK transcoders with one k, and no ReLU/JumpReLU layers among them."
        )
    return {"activation": "topk", "k": int(next(iter(ks.values())))}


def _check_set(prepared: list[_Prepared], n_layers: int | None) -> None:
    by_layer: dict[int, _Prepared] = {}
    for p in prepared:
        if p.layer in by_layer:
            raise ValueError(
                f"two transcoders for layer {p.layer} (hook_name_out="
                f"{by_layer[p.layer].source['hook_name_out']!r} and {p.source['hook_name_out']!r}); "
                "circuit-tracer takes exactly one transcoder per layer."
            )
        by_layer[p.layer] = p
    top = max(by_layer) + 1 if n_layers is None else n_layers
    if n_layers is not None and max(by_layer) >= n_layers:
        raise ValueError(f"n_layers={n_layers} but a transcoder is for layer {max(by_layer)}.")
    missing = sorted(set(range(top)) - set(by_layer))
    if missing:
        raise ValueError(
            f"no transcoder for layers {missing}: circuit-tracer needs one for every layer "
            f"0..{top - 1} (hook_name_out blocks.L.hook_mlp_out for each L)."
        )
    first = prepared[0]
    for p in prepared[1:]:
        for attr, field in (("input_hook", "hook_name"), ("output_hook", "hook_name_out")):
            if getattr(p, attr) != getattr(first, attr):
                raise ValueError(
                    f"{field}: layer {first.layer} uses {getattr(first, attr)!r} and layer "
                    f"{p.layer} uses {getattr(p, attr)!r} (relative to blocks.L); circuit-tracer "
                    "has one feature_input_hook and one feature_output_hook for the whole set."
                )
        if p.d_sae != first.d_sae:
            raise ValueError(
                f"d_sae: layer {first.layer} has {first.d_sae} features and layer {p.layer} "
                f"{p.d_sae}; circuit-tracer needs one d_sae for the whole set."
            )
        if p.d_model != first.d_model:
            raise ValueError(f"d_in: layer {first.layer} has {first.d_model}, layer {p.layer} {p.d_model}.")


def _write_atomically(out_dir: Path, fill: Any, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory.")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True / --overwrite).")
    replace_dir_atomically(out_dir, fill)


def export_circuit_tracer(
    transcoders: PerLayerTranscoders | Sequence[SAE | Splice],  # type: ignore[type-arg]
    out_dir: str | Path,
    model_name: str,
    *,
    scan: str | None = None,
    n_layers: int | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``transcoders`` (one per layer) as a circuit-tracer transcoder set in ``out_dir``.

    Accepts SAELens ``Transcoder``, ``SkipTranscoder``, ``JumpReLUTranscoder``,
    ``JumpReLUSkipTranscoder`` (and this package's TopK and training transcoders), bare or as a
    :class:`Splice`, whose ``input_scale`` is folded into the weights, or a
    :class:`PerLayerTranscoders` set (which knows its scales). Outputs equal
    ``Splice(x)`` of the input. When some layers have a skip connection and others not,
    the others get a zero ``W_skip`` (circuit-tracer decides from layer 0 for all).

    ``model_name`` is the TransformerLens model name written to ``config.yaml``;
    ``scan`` the feature-set id circuit-tracer puts in its graphs (default
    ``{model}/{out_dir name}``); ``n_layers``, when given, requires exactly layers
    ``0..n_layers-1`` (circuit-tracer needs every layer of the model); ``dtype`` the
    tensors' dtype (default: each transcoder's own). The directory appears complete
    or not at all. Raises ``ValueError`` naming the field for anything the format
    cannot hold.
    """
    given_set = isinstance(transcoders, PerLayerTranscoders)
    splices = list(transcoders.splices.values()) if given_set else as_splices(transcoders)
    if not splices:
        raise ValueError("transcoders is empty: give one transcoder per layer.")
    if not model_name:
        raise ValueError("model_name is empty: circuit-tracer's config.yaml needs the model's name.")
    scale_known = [True] * len(splices) if given_set else [isinstance(t, Splice) for t in transcoders]
    prepared = sorted((_prepare(sp, i, known) for i, (sp, known) in enumerate(zip(splices, scale_known))), key=lambda p: p.layer)
    _check_set(prepared, n_layers)
    replacement = transcoders if given_set else PerLayerTranscoders(splices)
    for p in prepared:
        p.tensors = _layer_tensors(replacement, p.layer, dtype)
    if any("W_skip" in p.tensors for p in prepared):
        for p in prepared:
            if "W_skip" not in p.tensors:
                p.tensors["W_skip"] = torch.zeros(p.d_model, p.d_model, dtype=p.tensors["b_dec"].dtype)

    out_dir = Path(out_dir)
    config = {
        "model_name": model_name,
        "model_kind": MODEL_KIND,
        "feature_input_hook": prepared[0].input_hook,
        "feature_output_hook": prepared[0].output_hook,
        "scan": scan or f"{model_name.split('/')[-1]}/{out_dir.name}",
        **_activation_config(replacement, [p.layer for p in prepared]),
        OUR_KEY: {"format_version": 1, "layers": [p.source for p in prepared]},
    }

    def fill(tmp: Path) -> None:
        for p in prepared:
            save_file(p.tensors, str(tmp / layer_file(p.layer)), metadata={"format": "pt"})
        # config.yaml last: circuit-tracer's cache treats its presence as "complete".
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))

    _write_atomically(out_dir, fill, overwrite)
    return out_dir


# ---------------------------------------------------------------------------- reading


def _layer_paths(config: dict[str, Any], root: Path) -> list[Path]:
    listed = config.get("transcoders")
    if listed is not None:
        if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
            raise ValueError(
                "config.yaml transcoders: expected a list of file paths, one per layer in "
                "order (older circuit-tracer releases used {id, layer, filepath} entries)."
            )
        paths = []
        for p in listed:
            if p.startswith("hf://"):
                raise ValueError(f"config.yaml transcoders: {p!r} is a Hub URI; download the files first.")
            paths.append(Path(p) if Path(p).is_absolute() else root / p)
        return paths
    found: dict[int, Path] = {}
    for f in root.iterdir():
        m = LAYER_FILE.match(f.name)
        if m:
            found[int(m.group(1))] = f
    if not found:
        raise FileNotFoundError(f"no layer_<i>.safetensors files in {root}.")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise FileNotFoundError(
            f"{root}: missing {', '.join(layer_file(i) for i in missing)} (circuit-tracer "
            "needs layers 0..max without gaps)."
        )
    return [found[i] for i in range(len(found))]


def _check_shape(tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], path: Path) -> None:
    if tuple(tensors[key].shape) != shape:
        raise ValueError(f"{path.name}: {key} has shape {tuple(tensors[key].shape)}, expected {shape}.")


def _read_layer(path: Path, layer: int, device: str, k: int | None) -> SAE:  # type: ignore[type-arg]
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors transcoders can be read (npz/Gemma Scope files cannot).")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    if "log_thresholds" in keys:
        raise ValueError(f"{path.name}: log_thresholds is not part of the format (circuit-tracer refuses it too).")
    unknown = keys - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS)
    missing = [k for k in REQUIRED_KEYS if k not in keys]
    if missing or unknown:
        raise ValueError(
            f"{path.name}: missing tensors {missing} / unexpected tensors {sorted(unknown)}; "
            f"expected {list(REQUIRED_KEYS)} plus optionally {list(OPTIONAL_KEYS)}."
        )
    t = load_file(str(path))
    d_sae, d_model = t["b_enc"].shape[0], t["b_dec"].shape[0]
    for key, shape in (("b_enc", (d_sae,)), ("b_dec", (d_model,)), ("W_enc", (d_sae, d_model)), ("W_dec", (d_sae, d_model))):
        _check_shape(t, key, shape, path)
    state = {"W_enc": t["W_enc"].T.contiguous(), "b_enc": t["b_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    skip = "W_skip" in t
    if skip:
        _check_shape(t, "W_skip", (d_model, d_model), path)
        state["W_skip"] = t["W_skip"]
    jump = THRESHOLD in t
    if jump:
        threshold = t[THRESHOLD]
        if threshold.ndim == 0:
            threshold = threshold.expand(d_sae).clone()
        _check_shape({THRESHOLD: threshold}, THRESHOLD, (d_sae,), path)
        if (threshold < 0).any():
            raise ValueError(
                f"{path.name}: {THRESHOLD} has negative entries; circuit-tracer's JumpReLU then "
                "passes negative activations, which SAELens's JumpReLU (ReLU first) cannot."
            )
        state["threshold"] = threshold
    classes = {
        (False, False): (Transcoder, TranscoderConfig),
        (True, False): (SkipTranscoder, SkipTranscoderConfig),
        (False, True): (JumpReLUTranscoder, JumpReLUTranscoderConfig),
        (True, True): (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig),
    }
    if k is not None:
        if jump:
            raise ValueError(f"{path.name}: {THRESHOLD} in a set with activation: topk.")
        classes = {(False, False): (TopKTranscoder, TopKTranscoderConfig), (True, False): (TopKSkipTranscoder, TopKSkipTranscoderConfig)}
    sae_cls, cfg_cls = classes[(skip, jump)]
    dtype = str(t["b_enc"].dtype).removeprefix("torch.")
    cfg = cfg_cls(
        d_in=d_model, d_sae=d_sae, d_out=d_model, dtype=dtype, device=device,
        apply_b_dec_to_input=False, normalize_activations="none", **({} if k is None else {"k": k}),
    )
    sae = sae_cls(cfg)
    sae.load_state_dict({k: v.to(device) for k, v in state.items()})
    return sae


def _topk_k(config: dict[str, Any]) -> int | None:
    activation = config.get("activation", "relu")
    if activation == "relu":
        return None
    if activation != "topk":
        raise ValueError(f"config.yaml activation={activation!r}: expected relu or topk.")
    k = config.get("k")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"config.yaml k={k!r}: activation: topk needs a positive integer k.")
    return k


def load_circuit_tracer_transcoders(path: str | Path, device: str = "cpu") -> list[Splice]:
    """Read a circuit-tracer transcoder set (a directory with ``config.yaml``, or that file).

    Returns one :class:`Splice` per layer, in layer order, wrapping the SAELens class
    that computes the same function (``Transcoder``, ``SkipTranscoder``,
    ``JumpReLUTranscoder`` or ``JumpReLUSkipTranscoder``), with ``metadata.hook_name`` /
    ``hook_name_out`` set to ``blocks.{layer}.{feature_*_hook}`` and ``model_name`` from the
    config. ``mlp.hook_out`` becomes ``hook_mlp_out``, the same values except in models
    with a norm after the MLP (Gemma 2/3). Works for sets written by
    :func:`export_circuit_tracer` and for circuit-tracer's own cache directories.
    """
    path = Path(path)
    config_path = path / CONFIG_FILE if path.is_dir() else path
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist (expected a circuit-tracer transcoder set).")
    config = yaml.safe_load(config_path.read_text()) or {}
    kind = config.get("model_kind")
    if kind != MODEL_KIND:
        raise ValueError(
            f"config.yaml model_kind={kind!r}: only per-layer sets (model_kind: {MODEL_KIND}) "
            "can be read as SAELens transcoders."
        )
    hooks = {}
    for field in ("feature_input_hook", "feature_output_hook"):
        value = config.get(field)
        if not isinstance(value, str) or not value:
            raise ValueError(f"config.yaml {field} is missing or empty.")
        hooks[field] = value
    output_hook = "hook_mlp_out" if hooks["feature_output_hook"] == "mlp.hook_out" else hooks["feature_output_hook"]
    k = _topk_k(config)
    ours = {s.get("layer"): s for s in (config.get(OUR_KEY) or {}).get("layers", [])}
    splices = []
    for layer, file in enumerate(_layer_paths(config, config_path.parent)):
        sae = _read_layer(file, layer, device, k)
        hook_name = f"blocks.{layer}.{hooks['feature_input_hook']}"
        hook_name_out = f"blocks.{layer}.{output_hook}"
        meta = dict((ours.get(layer) or {}).get("metadata") or {})
        meta.update(model_name=config.get("model_name"), hook_name=hook_name, hook_name_out=hook_name_out)
        sae.cfg.metadata = SAEMetadata(**meta)
        splices.append(Splice(sae, hook_name, hook_name_out))
    return splices
