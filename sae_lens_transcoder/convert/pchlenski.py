"""The paper's released GPT-2 transcoders (``pchlenski/gpt2-transcoders``) as SAELens transcoders.

Each release file (``final_sparse_autoencoder_gpt2-small_blocks.{L}.ln2.hook_normalized_24576.pt``)
is ``torch.save({"cfg": <sae_training.config.LanguageModelSAERunnerConfig>, "state_dict": ...})``
from the paper's code (``jacobdunefsky/transcoder_circuits``), whose forward pass is
``ReLU((x - b_dec) @ W_enc + b_enc) @ W_dec + b_dec_out``: ``b_dec`` is an input pre-bias of size
``d_in`` and ``b_dec_out`` the output bias. SAELens's ``Transcoder`` has no input bias
(``apply_b_dec_to_input`` must be False), so the pre-bias is folded into the encoder bias,
``b_enc' = b_enc - b_dec @ W_enc``, which gives the same pre-activations for every input.
SAELens ships no loader for this release; the file is read by :mod:`.safe_pickle`, which never
imports or runs the config class.
"""

import re
from pathlib import Path
from typing import Any

import torch
from sae_lens.saes.transcoder import Transcoder, TranscoderConfig
from transformer_lens.loading_from_pretrained import get_official_model_name

from sae_lens_transcoder.atomic import replace_dir_atomically
from sae_lens_transcoder.convert.safe_pickle import PickledObject, UnsafePickleError, load_tensors_only

__all__ = ["UnsafePickleError", "convert_pchlenski_transcoder", "load_pchlenski_transcoder"]

STATE_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec", "b_dec_out")

# The paper loads GPT-2 with HookedTransformer.from_pretrained's defaults, so its hook_mlp_out
# targets come from centred writing weights; SAELens's load_model would otherwise load the model
# unprocessed (from_pretrained_no_processing), whose MLP outputs differ by their mean.
PAPER_MODEL_KWARGS = {"fold_ln": True, "center_writing_weights": True, "center_unembed": True, "fold_value_biases": True}


def _config_fields(cfg: Any, path: Path) -> dict[str, Any]:
    """The pickled config's values: an inert placeholder's state, or a plain dict."""
    if isinstance(cfg, PickledObject):
        return dict(vars(cfg))
    if isinstance(cfg, dict):
        return dict(cfg)
    raise ValueError(f"{path}: 'cfg' is a {type(cfg).__name__}, expected the training config object or a dict.")


def _state_dict(raw: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(raw, dict) or "state_dict" not in raw:
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{path}: expected a dict with 'cfg' and 'state_dict' (the paper's release layout), found {found}.")
    state = raw["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: 'state_dict' is a {type(state).__name__}, expected a dict of tensors.")
    missing = [key for key in STATE_KEYS if key not in state]
    if missing == ["b_dec_out"]:
        raise ValueError(f"{path}: state_dict has no 'b_dec_out': this is an SAE, not a transcoder (is_transcoder False).")
    unknown = sorted(set(state) - set(STATE_KEYS))
    if missing or unknown:
        raise ValueError(f"{path}: state_dict is missing {missing} / has unexpected {unknown}; expected exactly {list(STATE_KEYS)}.")
    for key in STATE_KEYS:
        if not isinstance(state[key], torch.Tensor):
            raise ValueError(f"{path}: state_dict[{key!r}] is a {type(state[key]).__name__}, not a tensor.")
    return {key: state[key] for key in STATE_KEYS}


def _check_shapes(state: dict[str, torch.Tensor], fields: dict[str, Any], path: Path) -> tuple[int, int, int]:
    if state["W_enc"].ndim != 2 or state["W_dec"].ndim != 2:
        raise ValueError(f"{path}: W_enc and W_dec must be matrices, found {tuple(state['W_enc'].shape)} and {tuple(state['W_dec'].shape)}.")
    d_in, d_sae = state["W_enc"].shape
    d_out = state["W_dec"].shape[1]
    expected = {"W_dec": (d_sae, d_out), "b_enc": (d_sae,), "b_dec": (d_in,), "b_dec_out": (d_out,)}
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{path}: state_dict[{key!r}] has shape {tuple(state[key].shape)}, expected {shape} (from W_enc [d_in, d_sae] and W_dec [d_sae, d_out]).")
    for field, size in (("d_in", d_in), ("d_sae", d_sae), ("d_out", d_out)):
        if fields.get(field) is not None and fields[field] != size:
            raise ValueError(f"{path}: cfg.{field} is {fields[field]} but the weights have {field} {size}.")
    return d_in, d_sae, d_out


def _hook_names(fields: dict[str, Any], path: Path) -> tuple[str, str]:
    hook_in = fields.get("hook_point")
    if not isinstance(hook_in, str) or not hook_in:
        raise ValueError(f"{path}: cfg.hook_point is {hook_in!r}; the converter needs the input hook name (e.g. 'blocks.8.ln2.hook_normalized').")
    if fields.get("is_transcoder") is False:
        raise ValueError(f"{path}: cfg.is_transcoder is False: this is an SAE on {hook_in}, not a transcoder.")
    hook_out = fields.get("out_hook_point")
    if hook_out is None:
        layer = re.fullmatch(r"blocks\.(\d+)\..+", hook_in)
        if layer is None:
            raise ValueError(f"{path}: cfg.out_hook_point is missing and cannot be derived from cfg.hook_point {hook_in!r}.")
        hook_out = f"blocks.{layer.group(1)}.hook_mlp_out"
    if not isinstance(hook_out, str):
        raise ValueError(f"{path}: cfg.out_hook_point is {hook_out!r}, expected a hook name such as 'blocks.8.hook_mlp_out'.")
    return hook_in, hook_out


def _model_name(fields: dict[str, Any]) -> str:
    """TransformerLens's official name ("gpt2-small" in the release files is an alias of "gpt2")."""
    name = str(fields.get("model_name") or "gpt2")
    try:
        return get_official_model_name(name)
    except ValueError:
        return name


def load_pchlenski_transcoder(path: str | Path, device: str = "cpu") -> Transcoder:
    """One release file as a SAELens ``Transcoder`` with the pre-bias folded into ``b_enc``."""
    path = Path(path)
    raw = load_tensors_only(path)
    state = _state_dict(raw, path)
    fields = _config_fields(raw["cfg"], path) if "cfg" in raw else {}
    d_in, d_sae, d_out = _check_shapes(state, fields, path)
    hook_in, hook_out = _hook_names(fields, path)
    dtype = state["W_enc"].dtype
    with torch.no_grad():
        b_enc = state["b_enc"].double() - state["b_dec"].double() @ state["W_enc"].double()
    metadata: dict[str, Any] = {
        "model_name": _model_name(fields),
        "hook_name": hook_in,
        "hook_name_out": hook_out,
        "hook_head_index": None,
        "model_from_pretrained_kwargs": PAPER_MODEL_KWARGS,
        "prepend_bos": True,
    }
    for field in ("dataset_path", "context_size"):
        if fields.get(field) is not None:
            metadata[field] = fields[field]
    cfg = TranscoderConfig.from_dict({
        "d_in": d_in, "d_sae": d_sae, "d_out": d_out, "dtype": str(dtype).removeprefix("torch."), "device": device,
        "apply_b_dec_to_input": False, "normalize_activations": "none", "metadata": metadata,
    })
    transcoder = Transcoder(cfg)
    transcoder.load_state_dict({
        "W_enc": state["W_enc"], "b_enc": b_enc.to(dtype), "W_dec": state["W_dec"], "b_dec": state["b_dec_out"],
    })
    return transcoder.to(device)


def convert_pchlenski_transcoder(path: str | Path, out_dir: str | Path) -> Path:
    """Write a release file as a SAELens transcoder directory that ``SAE.load_from_disk`` reads.

    Written with SAELens's own ``save_model`` (``cfg.json`` + ``sae_weights.safetensors``), built
    beside ``out_dir`` and renamed into place, so a failed conversion leaves no partial directory.
    """
    out = Path(out_dir)
    transcoder = load_pchlenski_transcoder(path)
    replace_dir_atomically(out, lambda tmp: transcoder.save_model(tmp))
    return out
