"""Save a per-layer replacement set as one directory that three readers understand.

    DIR/transcoder_set.json        manifest: layers, their sub-directories, the batch layout
    DIR/layer_{i}_sae/             one plain SAELens transcoder per layer (``SAE.load_from_disk``)
    DIR/config.yaml, layer_{i}.safetensors
                                   the same set as a circuit-tracer transcoder set

Every transcoder is written in model units (its input scale folded, ``normalize_activations``
"none"), so all three readers get the same function without knowing any scale.
"""

import json
import shutil
from pathlib import Path

from sae_lens.saes.sae import SAE, TrainingSAE

from sae_lens_transcoder.atomic import replace_dir_atomically
from sae_lens_transcoder.export.circuit_tracer import export_circuit_tracer
from sae_lens_transcoder.replacement.per_layer import PerLayerTranscoders

MANIFEST_FILE = "transcoder_set.json"
FORMAT_VERSION = 1
_CIRCUIT_TRACER_TMP = ".circuit_tracer"


def layer_dir(layer: int) -> str:
    return f"layer_{layer}_sae"


def model_units_sae(replacement: PerLayerTranscoders, layer: int) -> SAE:  # type: ignore[type-arg]
    """Layer ``layer``'s transcoder as a SAELens inference SAE whose weights are ``folded(layer)``."""
    sae = replacement.transcoder(layer)
    cfg = sae.cfg.get_inference_sae_cfg_dict() if isinstance(sae, TrainingSAE) else sae.cfg.to_dict()
    cfg["normalize_activations"] = "none"
    cfg["metadata"] = {**(cfg.get("metadata") or {}), "hook_name": replacement.hook_in(layer), "hook_name_out": replacement.hook_out(layer)}
    out = SAE.from_dict(cfg)
    units = replacement.folded(layer)
    optional = {"threshold": units.threshold, "W_skip": units.W_skip}
    state = {"W_enc": replacement.encoder(layer), "b_enc": units.b_enc, "W_dec": units.W_dec, "b_dec": units.b_dec}
    state |= {key: value for key, value in optional.items() if value is not None}
    out.load_state_dict({key: value.detach().clone() for key, value in state.items()})
    return out


def save_transcoder_set(
    replacement: PerLayerTranscoders,
    out_dir: str | Path,
    model_name: str | None = None,
    *,
    circuit_tracer: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write ``replacement`` to ``out_dir`` (complete or not at all); read it with ``load_transcoder_set``.

    ``model_name`` defaults to the first transcoder's ``metadata.model_name``. With
    ``circuit_tracer`` the directory is also a circuit-tracer set, which needs one transcoder
    for every layer ``0..max`` with shared hooks (``export_circuit_tracer`` says what is wrong).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not overwrite)):
        raise FileExistsError(f"{out_dir} exists and is not an empty directory (pass overwrite=True).")
    replace_dir_atomically(
        out_dir, lambda tmp: write_transcoder_set(replacement, tmp, model_name, circuit_tracer=circuit_tracer, scan_name=out_dir.name)
    )
    return out_dir


def write_transcoder_set(
    replacement: PerLayerTranscoders,
    directory: Path,
    model_name: str | None = None,
    *,
    circuit_tracer: bool | None = None,
    scan_name: str | None = None,
    layer_dirs: bool = True,
) -> None:
    """The files of ``save_transcoder_set`` into the (new, empty) ``directory``.

    ``circuit_tracer=None`` writes circuit-tracer's files when the set covers layers
    ``0..max`` (circuit-tracer reads only complete sets). ``layer_dirs=False`` leaves the
    ``layer_dir`` directories to the caller (a training run writes them as SAELens does).
    """
    layers = sorted(replacement.layers)
    if circuit_tracer is None:
        circuit_tracer = layers == list(range(layers[-1] + 1))
    name = model_name or replacement.transcoder(layers[0]).cfg.metadata.model_name
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": "per_layer",
        "model_name": name,
        "layers": [{"layer": layer, "dir": layer_dir(layer)} for layer in layers],
        "batch_layout": [list(entry) for entry in replacement.batch_layout],
        "circuit_tracer": circuit_tracer,
    }
    for layer in layers if layer_dirs else ():
        model_units_sae(replacement, layer).save_model(directory / layer_dir(layer))
    if circuit_tracer:
        if not name:
            raise ValueError("model_name is needed for the circuit-tracer config (none in the metadata).")
        scan = f"{name.split('/')[-1]}/{scan_name or directory.name}"
        staged = export_circuit_tracer(replacement, directory / _CIRCUIT_TRACER_TMP, name, scan=scan)
        for file in staged.iterdir():
            file.rename(directory / file.name)
        shutil.rmtree(staged)
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
