"""Models that load without the Hugging Face Hub, behind one ``load_model`` entry point.

The training runner hands SAELens an already-built model for these names;
any other name is left to SAELens, which fetches it from the Hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer

from .hf_local import load_local_hf_model
from .smollm2 import SMOLLM2_MODEL_NAME, load_smollm2, smollm2_gguf_path

# Spelled out rather than imported so that listing names never imports tiny.py.
TINY_MODEL_NAME = "tiny-gpt2"
EMBEDDED_MODEL_NAMES: tuple[str, ...] = (SMOLLM2_MODEL_NAME, TINY_MODEL_NAME)


def is_embedded_model_name(name: str) -> bool:
    """True for models this package ships or installs itself."""
    return name in EMBEDDED_MODEL_NAMES


def is_local_model_dir(name: str | Path) -> bool:
    """True for a local Hugging Face model directory (one with a config.json)."""
    return (Path(name).expanduser() / "config.json").is_file()


def load_model(
    name: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    **kwargs: Any,
) -> HookedTransformer:
    """Load an embedded model by name, or a local HF model directory by path.

    Raises ValueError for anything else, since that is SAELens's job (Hub names).
    """
    dtype = kwargs.pop("torch_dtype", dtype)  # the older spelling wins, as in TransformerLens
    if name == SMOLLM2_MODEL_NAME:
        return load_smollm2(device=device, dtype=dtype, **kwargs)
    if name == TINY_MODEL_NAME:
        from .tiny import load_tiny_model  # noqa: PLC0415 - only its users need it

        return load_tiny_model(device=device, dtype=dtype, **kwargs)
    if is_local_model_dir(name):
        return load_local_hf_model(name, device=device, dtype=dtype, **kwargs)
    hint = " (it exists but has no config.json)" if Path(name).expanduser().exists() else ""
    raise ValueError(
        f"Unknown model {str(name)!r}{hint}: expected one of {list(EMBEDDED_MODEL_NAMES)} "
        "or a local Hugging Face model directory; let SAELens load Hub models."
    )


__all__ = [
    "EMBEDDED_MODEL_NAMES",
    "SMOLLM2_MODEL_NAME",
    "TINY_MODEL_NAME",
    "is_embedded_model_name",
    "is_local_model_dir",
    "load_local_hf_model",
    "load_model",
    "load_smollm2",
    "smollm2_gguf_path",
]
