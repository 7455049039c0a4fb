"""``load_model`` dispatch, and local Hugging Face directories as HookedTransformers."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformer_lens import HookedTransformer
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from sae_lens_transcoder import models
from sae_lens_transcoder.models import (
    EMBEDDED_MODEL_NAMES,
    SMOLLM2_MODEL_NAME,
    TINY_MODEL_NAME,
    is_embedded_model_name,
    is_local_model_dir,
    load_local_hf_model,
    load_model,
)

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran"]


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _save(model: PreTrainedModel, path: Path) -> Path:
    torch.manual_seed(0)
    model.apply(model._init_weights)
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


def _tiny_llama(path: Path) -> Path:
    config = LlamaConfig(
        vocab_size=len(WORDS) + 3,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    return _save(LlamaForCausalLM(config), path)


def _tiny_gpt2(path: Path) -> Path:
    # Real GPT-2 config.json files carry n_ctx, which TransformerLens reads.
    config = GPT2Config(
        vocab_size=len(WORDS) + 3, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_ctx=64
    )
    return _save(GPT2LMHeadModel(config), path)


def _hf_logits(path: Path, token_ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path)(token_ids).logits


# "llama" in the path makes TransformerLens skip the config; the loader must not care.
@pytest.mark.parametrize("make, dirname", [(_tiny_llama, "my-llama-ckpt"), (_tiny_gpt2, "gpt")])
def test_local_dir_matches_transformers(
    make: Any, dirname: str, tmp_path: Path, offline: None
) -> None:
    path = make(tmp_path / dirname)
    model = load_model(str(path))
    tokens = model.to_tokens("the cat sat on a mat", prepend_bos=False)
    assert model.cfg.model_name == dirname and model.tokenizer is not None
    with torch.no_grad():
        logits = model(tokens)
    assert (logits - _hf_logits(path, tokens)).abs().max().item() < 1e-4


def test_local_llama_reads_rope_and_options(tmp_path: Path, offline: None) -> None:
    path = _tiny_llama(tmp_path / "ckpt")
    model = load_local_hf_model(path, dtype="bfloat16", first_n_layers=2, fold_ln=True)
    assert model.cfg.rotary_base == 50000 and model.cfg.eps == pytest.approx(1e-6)
    assert model.cfg.n_layers == len(model.blocks) == 2
    assert model.cfg.normalization_type == "RMSPre"
    assert model.W_E.dtype == torch.bfloat16


def test_embedded_names() -> None:
    assert set(EMBEDDED_MODEL_NAMES) == {SMOLLM2_MODEL_NAME, TINY_MODEL_NAME}
    assert all(is_embedded_model_name(name) for name in EMBEDDED_MODEL_NAMES)
    assert not is_embedded_model_name("gpt2")


def test_is_local_model_dir(tmp_path: Path) -> None:
    assert not is_local_model_dir(tmp_path)
    assert not is_local_model_dir("gpt2")
    (tmp_path / "config.json").write_text("{}")
    assert is_local_model_dir(tmp_path)


def test_unknown_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"{SMOLLM2_MODEL_NAME}.*{TINY_MODEL_NAME}"):
        load_model("gpt2")
    with pytest.raises(ValueError, match="no config.json"):
        load_model(str(tmp_path))


def _recorder(calls: list[dict[str, Any]]) -> Any:
    def load(*args: Any, **kwargs: Any) -> str:
        calls.append({"args": args, **kwargs})
        return "model"

    return load


def test_smollm2_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(models, "load_smollm2", _recorder(calls))
    assert load_model(SMOLLM2_MODEL_NAME, dtype="float32", cache_dir="/c") == "model"
    assert calls == [{"args": (), "device": "cpu", "dtype": "float32", "cache_dir": "/c"}]


def test_tiny_dispatch_imports_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    fake = types.ModuleType("sae_lens_transcoder.models.tiny")
    fake.load_tiny_model = _recorder(calls)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    assert load_model(TINY_MODEL_NAME, device="meta") == "model"
    assert calls == [{"args": (), "device": "meta", "dtype": torch.float32}]


def test_tiny_model_is_really_loaded() -> None:
    tiny = pytest.importorskip("sae_lens_transcoder.models.tiny")
    assert tiny.TINY_MODEL_NAME == TINY_MODEL_NAME
    if not (tiny.tiny_model_dir() / "model.safetensors").is_file():
        pytest.skip("tiny model weights not built yet")
    assert isinstance(load_model(TINY_MODEL_NAME), HookedTransformer)


def test_local_dir_dispatch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(models, "load_local_hf_model", _recorder(calls))
    assert load_model(str(tmp_path), n_ctx=16) == "model"
    assert calls == [{"args": (str(tmp_path),), "device": "cpu", "dtype": torch.float32, "n_ctx": 16}]
