"""Shared fixtures: small real HookedTransformers of the three MLP layouts we support."""

import socket
from dataclasses import fields
from collections.abc import Callable
from typing import Any

import huggingface_hub.constants
import pytest
import torch
from datasets import Dataset
from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig
from transformer_lens import HookedTransformer, HookedTransformerConfig

import sae_lens_transcoder  # noqa: F401  (registers the architecture)
from sae_lens_transcoder import TrainingTranscoderConfig
from sae_lens_transcoder.saes.clt import CLT_CLASSES
from sae_lens_transcoder.saes.transcoder import TRAINING_CLASSES

D_MODEL = 64
D_VOCAB = 300
CONTEXT = 32

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "gpt2": dict(normalization_type="LN", act_fn="gelu_new", positional_embedding_type="standard"),
    "neox": dict(
        normalization_type="LN",
        act_fn="gelu",
        positional_embedding_type="rotary",
        parallel_attn_mlp=True,
        rotary_dim=8,
    ),
    "llama": dict(
        normalization_type="RMS",
        act_fn="silu",
        gated_mlp=True,
        positional_embedding_type="rotary",
        rotary_dim=16,
        final_rms=True,
    ),
}


def build_model(arch: str, seed: int = 0, n_layers: int = 2, **overrides: Any) -> HookedTransformer:
    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=D_MODEL,
        d_head=16,
        n_heads=4,
        d_mlp=128,
        n_ctx=CONTEXT,
        d_vocab=D_VOCAB,
        **{**ARCHITECTURES[arch], **overrides},
    )
    model = HookedTransformer(cfg)
    # Fresh norms are the identity (w=1, b=0), which would hide hook mix-ups.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".ln" in name or name.startswith("ln_final"):
                param.add_(0.2 * torch.randn_like(param))
    model.eval()
    return model


@pytest.fixture
def gpt2_model() -> HookedTransformer:
    return build_model("gpt2")


@pytest.fixture
def token_dataset() -> Dataset:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, D_VOCAB, (600, CONTEXT), generator=generator)
    return Dataset.from_dict({"input_ids": ids.tolist()})


def runner_config(**overrides: Any) -> LanguageModelSAERunnerConfig[TrainingTranscoderConfig]:
    """A tiny run's config; ``sae={"architecture": "topk_transcoder", "k": 8, ...}`` picks the architecture."""
    sae_overrides = dict(overrides.pop("sae", {}))
    config_class = {**TRAINING_CLASSES, **CLT_CLASSES}[sae_overrides.pop("architecture", "transcoder")][1]
    defaults: dict[str, Any] = {"d_in": D_MODEL, "d_sae": 256, "mlp_layer": 1}
    if "l1_coefficient" in {f.name for f in fields(config_class)}:
        defaults["l1_coefficient"] = 1e-3
    sae = config_class(**{**defaults, **sae_overrides})
    settings: dict[str, Any] = dict(
        sae=sae,
        model_name="test-model",
        dataset_path="",
        context_size=CONTEXT,
        training_tokens=CONTEXT * 480,
        train_batch_size_tokens=256,
        n_batches_in_buffer=16,
        store_batch_size_prompts=4,
        is_dataset_tokenized=True,
        prepend_bos=False,
        lr=3e-3,
        checkpoint_path=None,
        output_path=None,
        n_eval_batches=2,
        n_batches_for_norm_estimate=3,  # SAELens's 1000 would dominate these tiny runs
        eval_batch_size_prompts=4,
        logger=LoggingConfig(log_to_wandb=False),
        verbose=False,
    )
    settings.update(overrides)
    return LanguageModelSAERunnerConfig(**settings)


@pytest.fixture
def make_runner_config() -> Callable[..., LanguageModelSAERunnerConfig[TrainingTranscoderConfig]]:
    return runner_config


def go_offline(mp: pytest.MonkeyPatch) -> None:
    """Set HF_HUB_OFFLINE (also where huggingface_hub cached it) and refuse sockets."""
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    connect = socket.socket.connect

    def no_network(sock: socket.socket, address: object) -> None:
        if sock.family != socket.AF_UNIX:
            raise OSError(f"network access attempted: {address!r}")
        connect(sock, address)

    mp.setattr(socket.socket, "connect", no_network)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    go_offline(monkeypatch)
