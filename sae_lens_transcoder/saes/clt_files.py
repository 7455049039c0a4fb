"""Cross-layer transcoders on disk, in circuit-tracer's CLT layout plus our metadata.

``DIR/`` holds:

- ``config.yaml``: ``model_kind: cross_layer_transcoder``, ``feature_input_hook`` /
  ``feature_output_hook`` (relative to a block, as circuit-tracer names them), ``scan``, and
  ``activation`` / ``k`` (circuit-tracer reads ``relu`` and JumpReLU from the files; a TopK
  CLT is ours alone);
- ``W_enc_{i}.safetensors``: ``W_enc_{i} [d_sae, d_in]`` (transposed from ours), ``b_enc_{i}``,
  ``b_dec_{i}``, for JumpReLU (and BatchTopK, at its cut) ``threshold_{i}``, and with a skip
  ``W_skip_{i} [d_out, d_in]`` (ours: circuit-tracer's loader reads no CLT skip from files);
- ``W_dec_{i}.safetensors``: ``W_dec_{i} [d_sae, L - i, d_out]``;
- ``cfg.json``: the training config (SAELens's ``to_dict``) with the metadata, including the
  covered layers' hook pairs (``metadata.clt_hooks``), which :func:`load_clt` rebuilds from.

circuit-tracer numbers files by position from 0 and reads one CLT over every layer of the
model; a CLT over layers ``0..L-1`` is exactly that.
"""

import json
import logging
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from sae_lens.registry import get_sae_training_class

from sae_lens_transcoder.replacement.cross_layer import CLT_HOOKS_KEY, CrossLayerTranscoders, clt_replacement
from sae_lens_transcoder.saes.clt import TrainingCrossLayerTranscoder

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
CFG_FILE = "cfg.json"


def _relative(hook: str) -> str:
    """``blocks.3.mlp.hook_in`` -> ``mlp.hook_in``: circuit-tracer names hooks within a block."""
    parts = hook.split(".")
    return ".".join(parts[2:]) if parts[0] == "blocks" else hook


@torch.no_grad()
def save_clt(clt: TrainingCrossLayerTranscoder, directory: str | Path, input_scale: float = 1.0, scan: str | None = None) -> Path:
    """Write ``clt`` (its training-time ``input_scale`` folded in) to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    replacement = clt_replacement(clt, input_scale)
    hooks = [(replacement.hook_in(layer), replacement.hook_out(layer)) for layer in replacement.layers]
    for i, layer in enumerate(replacement.layers):
        tensors = {
            f"W_enc_{i}": replacement.encoder(layer).T.contiguous().cpu(),
            f"b_enc_{i}": replacement.b_enc(layer).contiguous().cpu(),
            f"b_dec_{i}": replacement.b_dec(layer).contiguous().cpu(),
        }
        if clt.cfg.activation in ("jumprelu", "batchtopk"):  # BatchTopK infers as JumpReLU at its cut
            tensors[f"threshold_{i}"] = clt.threshold[i].contiguous().cpu()
        if clt.cfg.skip_connection:  # ours: circuit-tracer's CLT loader reads no skip from files
            tensors[f"W_skip_{i}"] = clt.W_skip[i].contiguous().cpu()
        save_file(tensors, directory / f"W_enc_{i}.safetensors")
        decoder = torch.stack([replacement.decoder(layer, out) for out in replacement.layers[i:]], dim=1)
        save_file({f"W_dec_{i}": decoder.contiguous().cpu()}, directory / f"W_dec_{i}.safetensors")
    ins, outs = {_relative(a) for a, _ in hooks}, {_relative(b) for _, b in hooks}
    config: dict[str, Any] = {
        "model_kind": "cross_layer_transcoder",
        "feature_input_hook": ins.pop() if len(ins) == 1 else sorted(ins),
        "feature_output_hook": outs.pop() if len(outs) == 1 else sorted(outs),
        "scan": scan or directory.name,
        "activation": {"relu": "relu", "jumprelu": "jump_relu", "batchtopk": "jump_relu", "topk": "topk"}[clt.cfg.activation],
    }
    if clt.cfg.activation == "topk":
        config["k"] = int(clt.cfg.k)  # type: ignore[attr-defined]
        logger.warning(
            "%s: a TopK CLT is ours alone; circuit-tracer 0.5.0 ignores 'activation: topk' and would run it as ReLU.",
            directory,
        )
    (directory / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
    cfg = clt.cfg.to_dict()
    cfg["normalize_activations"] = "none"  # the scale is folded into the files
    (directory / CFG_FILE).write_text(json.dumps(cfg, indent=2, default=str))
    return directory


def is_clt_dir(directory: str | Path) -> bool:
    """A directory in circuit-tracer's CLT layout (ours or circuit-tracer's own)."""
    config = Path(directory) / CONFIG_FILE
    return config.is_file() and (yaml.safe_load(config.read_text()) or {}).get("model_kind") == "cross_layer_transcoder"


def _cfg_from_circuit_tracer_files(directory: Path) -> dict[str, Any]:
    """What our ``cfg.json`` would say, for a CLT circuit-tracer wrote (its files and config.yaml)."""
    config = yaml.safe_load((directory / CONFIG_FILE).read_text())
    n_layers = len(list(directory.glob("W_enc_*.safetensors")))
    if n_layers == 0:
        raise FileNotFoundError(f"{directory} has {CONFIG_FILE} but no W_enc_<i>.safetensors files.")
    first = load_file(directory / "W_enc_0.safetensors")
    d_sae, d_in = first["W_enc_0"].shape
    hook_in, hook_out = config.get("feature_input_hook", "hook_resid_mid"), config.get("feature_output_hook", "hook_mlp_out")
    if not isinstance(hook_in, str) or not isinstance(hook_out, str):
        raise ValueError(f"{directory / CONFIG_FILE}: feature_input_hook/feature_output_hook must each name one hook.")
    architecture = {"relu": "clt", "jump_relu": "jumprelu_clt", "topk": "topk_clt"}[
        config.get("activation", "jump_relu" if "threshold_0" in first else "relu")
    ]
    saved: dict[str, Any] = {
        "architecture": architecture, "d_in": int(d_in), "d_sae": int(d_sae), "d_out": int(first["b_dec_0"].shape[0]),
        "n_layers": n_layers,
        "metadata": {CLT_HOOKS_KEY: [[f"blocks.{i}.{hook_in}", f"blocks.{i}.{hook_out}"] for i in range(n_layers)]},
    }
    if "k" in config:
        saved["k"] = int(config["k"])
    return saved


def load_clt(directory: str | Path, device: str = "cpu") -> CrossLayerTranscoders:
    """A CLT in circuit-tracer's layout, as a replacement set: one :func:`save_clt` wrote (its
    ``cfg.json`` has the hooks and training config), or circuit-tracer's own (hooks from its
    ``config.yaml``, relative to each layer's block)."""
    directory = Path(directory)
    cfg_path = directory / CFG_FILE
    if cfg_path.is_file():
        saved = json.loads(cfg_path.read_text())
    elif is_clt_dir(directory):
        saved = _cfg_from_circuit_tracer_files(directory)
    else:
        raise FileNotFoundError(f"{directory} is not a cross-layer transcoder: no {CFG_FILE} and no {CONFIG_FILE} with model_kind: cross_layer_transcoder.")
    cls, config_class = get_sae_training_class(saved["architecture"])
    if not issubclass(cls, TrainingCrossLayerTranscoder):
        raise ValueError(f"{cfg_path} holds a {saved['architecture']!r} SAE, not a cross-layer transcoder.")
    cfg = config_class.from_dict({**saved, "device": device})
    clt = cls(cfg)
    state: dict[str, torch.Tensor] = {}
    for i in range(cfg.n_layers):
        encoder = load_file(directory / f"W_enc_{i}.safetensors", device=device)
        state[f"W_enc.{i}"] = encoder[f"W_enc_{i}"].T
        state[f"b_enc.{i}"] = encoder[f"b_enc_{i}"]
        state[f"b_dec.{i}"] = encoder[f"b_dec_{i}"]
        if f"threshold_{i}" in encoder:
            state[f"threshold.{i}"] = encoder[f"threshold_{i}"]
        if f"W_skip_{i}" in encoder:
            state[f"W_skip.{i}"] = encoder[f"W_skip_{i}"]
        state[f"W_dec.{i}"] = load_file(directory / f"W_dec_{i}.safetensors", device=device)[f"W_dec_{i}"]
    stacked = {
        name: torch.stack([state.pop(f"{name}.{i}") for i in range(cfg.n_layers)])
        for name in ("W_enc", "b_enc", "b_dec", "threshold", "W_skip")
        if f"{name}.0" in state
    }
    if cfg.activation == "jumprelu":
        stacked["log_threshold"] = stacked.pop("threshold").log()
    elif cfg.activation == "batchtopk":
        stacked["topk_threshold"] = stacked.pop("threshold")[:, 0]
    # assign=True keeps the decoders safetensors loaded (on CPU, zero-copy maps of the files)
    # instead of copying them into the freshly initialised ones: one copy in memory, not two.
    clt.load_state_dict({**stacked, **state}, assign=True)
    clt._data_init_pending = False
    return clt_replacement(clt.eval())
