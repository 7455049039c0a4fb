"""The bundled tiny model must load without network and behave like a trained LM."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import torch
from transformer_lens import HookedTransformer

from sae_lens_transcoder.data import load_text_split
from sae_lens_transcoder.models.tiny import load_tiny_model


@pytest.fixture(scope="module")
def model() -> Iterator[HookedTransformer]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")

        def no_network(*args: object, **kwargs: object) -> None:
            raise OSError("network access attempted while loading the tiny model")

        mp.setattr(socket.socket, "connect", no_network)
        yield load_tiny_model()


def test_architecture(model: HookedTransformer) -> None:
    assert model.cfg.n_layers == 2
    assert model.cfg.d_mlp == 512
    assert model.blocks[0].mlp.W_in.shape == (128, 512)
    assert model.W_E.dtype == torch.float32


def test_to_tokens_handles_bos(model: HookedTransformer) -> None:
    assert model.tokenizer is not None
    bos = model.tokenizer.bos_token_id
    assert bos is not None
    assert model.to_tokens("To be, or not to be")[0, 0].item() == bos
    assert model.to_tokens("To be, or not to be", prepend_bos=False)[0, 0].item() != bos


@torch.no_grad()
def test_held_out_loss_beats_unigram(model: HookedTransformer) -> None:
    n_ctx = model.cfg.n_ctx
    windows = [model.to_tokens(text)[:, :n_ctx] for text in load_text_split("test")["text"][:40]]
    tokens = torch.cat([w for w in windows if w.shape[1] == n_ctx][:32])
    # About 4.2 for the committed model; a unigram model scores about 6.7 nats/token on
    # this split and an untrained one about 8.3.
    assert model(tokens, return_type="loss").item() < 4.5


def test_greedy_generation(model: HookedTransformer) -> None:
    prompt = "And God said,"
    text = model.generate(prompt, max_new_tokens=12, do_sample=False, verbose=False)
    assert isinstance(text, str)
    assert text.startswith(prompt) and len(text.strip()) > len(prompt) + 5
