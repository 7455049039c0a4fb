"""Load what the commands are pointed at: transcoders by path or release, models by name."""

from pathlib import Path
from typing import Any

from sae_lens import SAE
from transformer_lens import HookedTransformer

from sae_lens_transcoder.llm_transcoder_training_runner import is_offline_model, load_offline_model


def load_transcoder(spec: str, device: str = "cpu") -> SAE[Any]:
    """A local SAELens-format directory, or ``release/sae_id`` for ``SAE.from_pretrained``."""
    if Path(spec).is_dir():
        return SAE.load_from_disk(spec, device=device)
    release, _, sae_id = spec.partition("/")
    if not sae_id:
        raise ValueError(f"{spec!r} is neither a directory nor 'release/sae_id'.")
    return SAE.from_pretrained(release, sae_id, device=device)


def load_model_for(name: str, metadata: Any, device: str) -> HookedTransformer:
    """The model a transcoder was trained on, loaded the way its metadata says (embedded
    models offline, anything else through TransformerLens without weight processing)."""
    kwargs = metadata.model_from_pretrained_kwargs or {}
    if is_offline_model(name):
        return load_offline_model(name, device, kwargs)
    return HookedTransformer.from_pretrained_no_processing(name, device=device, **kwargs)
