"""The bundled tiny GPT-2-style model: a real language model for fast, offline tests.

Built by ``scripts/train_tiny_model.py``; weights, config and tokenizer live in
``sae_lens_transcoder/assets/tiny-gpt2``. Loading reads only that directory, never the hub.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import AutoTokenizer

TINY_MODEL_NAME = "tiny-gpt2"


def tiny_model_dir() -> Path:
    """Directory holding ``model.safetensors``, ``config.json`` and the tokenizer files."""
    return Path(__file__).resolve().parents[1] / "assets" / TINY_MODEL_NAME


def load_tiny_model(
    device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32
) -> HookedTransformer:
    """Rebuild the tiny model with its tokenizer (BOS-prepending, as TransformerLens expects)."""
    if isinstance(dtype, str):  # config files spell dtypes as "float32", "bfloat16", ...
        dtype = getattr(torch, dtype.removeprefix("torch."))
        assert isinstance(dtype, torch.dtype)
    model_dir = tiny_model_dir()
    cfg_kwargs = json.loads((model_dir / "config.json").read_text())
    cfg = HookedTransformerConfig(**cfg_kwargs, device=str(device), dtype=dtype)
    # Loaded from the directory (not built in memory) because TransformerLens re-opens
    # the tokenizer from its name_or_path to switch on add_bos_token.
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = HookedTransformer(cfg, tokenizer)
    stored = load_file(model_dir / "model.safetensors")  # float16 on disk
    weights = {key: value.to(torch.float32) for key, value in stored.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Only the attention masks (rebuilt from the config) are absent from the file.
    params = dict(model.named_parameters())
    if unexpected or any(key in params for key in missing):
        raise RuntimeError(f"tiny model weights mismatch: {missing=}, {unexpected=}")
    return model.eval()
