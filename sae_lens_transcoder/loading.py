"""Load what the commands are pointed at: transcoders by path or release, models by name."""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sae_lens import SAE
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
from sae_lens.saes.transcoder import Transcoder
from transformer_lens import HookedTransformer

from sae_lens_transcoder.export.circuit_tracer import CONFIG_FILE, load_circuit_tracer_transcoders
from sae_lens_transcoder.llm_transcoder_training_runner import is_offline_model, load_offline_model
from sae_lens_transcoder.replacement import PerLayerTranscoders, ReplacementSet
from sae_lens_transcoder.saes.clt_files import is_clt_dir, load_clt
from sae_lens_transcoder.replacement.saving import MANIFEST_FILE
from sae_lens_transcoder.validation import check_transcoder_dir


def load_transcoder(spec: str, device: str = "cpu") -> SAE[Any]:
    """A local SAELens-format directory, or ``release/sae_id`` for ``SAE.from_pretrained``.

    A path that exists is read as a directory and checked first, so a bad file is named
    instead of surfacing as a JSON, safetensors or tensor-shape error from inside SAELens.
    """
    path = Path(spec).expanduser()
    if path.exists():
        check_transcoder_dir(path, spec)
        return SAE.load_from_disk(path, device=device)
    release, _, sae_id = spec.partition("/")
    if not sae_id or release not in get_pretrained_saes_directory():
        raise FileNotFoundError(
            f"{spec!r} does not exist, and is not 'release/sae_id' of a release in SAELens's "
            "pretrained SAEs directory: give a transcoder directory (cfg.json + sae_weights.safetensors, "
            "as train --output_path writes) or a SAELens release/sae_id."
        )
    sae = SAE.from_pretrained(release, sae_id, device=device)
    if not isinstance(sae, Transcoder):
        raise ValueError(f"{spec!r} is a {sae.cfg.architecture()!r} SAE, not a transcoder.")
    return sae


def load_transcoders(specs: Sequence[str], device: str = "cpu") -> list[tuple[str, SAE[Any]]]:
    """``(name, transcoder)`` for each spec; a set directory (our manifest, or a circuit-tracer
    set) stands for all its layers, so commands take sets where they take transcoders."""
    loaded: list[tuple[str, SAE[Any]]] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if is_clt_dir(path):
            raise ValueError(f"{spec} is a cross-layer transcoder: it is not a list of per-layer transcoders (use load_transcoder_set).")
        if (path / MANIFEST_FILE).is_file() or (path / CONFIG_FILE).is_file():
            replacement = load_transcoder_set(path, device)
            assert isinstance(replacement, PerLayerTranscoders)
            loaded += [(f"{spec} layer {layer}", replacement.transcoder(layer)) for layer in replacement.layers]
        else:
            loaded.append((spec, load_transcoder(spec, device)))
    return loaded


def load_model_for(name: str, metadata: Any, device: str) -> HookedTransformer:
    """The model a transcoder was trained on, loaded the way its metadata says (embedded
    models offline, anything else through TransformerLens without weight processing)."""
    kwargs = metadata.model_from_pretrained_kwargs or {}
    if is_offline_model(name):
        return load_offline_model(name, device, kwargs)
    return HookedTransformer.from_pretrained_no_processing(name, device=device, **kwargs)


def load_transcoder_set(path: str | Path, device: str = "cpu") -> ReplacementSet:
    """A replacement set from a directory ``save_transcoder_set`` wrote (its manifest names one
    SAELens transcoder directory per layer), a circuit-tracer transcoder set (``config.yaml`` +
    ``layer_{i}.safetensors``, as circuit-tracer or ``export_circuit_tracer`` write), or a
    cross-layer transcoder in circuit-tracer's CLT layout (ours or its own)."""
    root = Path(path).expanduser()
    if is_clt_dir(root):
        return load_clt(root, device)
    manifest = root / MANIFEST_FILE
    if manifest.is_file():
        entries = json.loads(manifest.read_text())["layers"]
        return PerLayerTranscoders([load_transcoder(str(root / entry["dir"]), device) for entry in entries])
    if (root / CONFIG_FILE).is_file():
        return PerLayerTranscoders(load_circuit_tracer_transcoders(root, device))
    raise FileNotFoundError(
        f"{root} is not a transcoder set: expected {MANIFEST_FILE} (save_transcoder_set) or {CONFIG_FILE} (circuit-tracer)."
    )
