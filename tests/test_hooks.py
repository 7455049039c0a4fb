"""The transcoder's input must be exactly what the MLP reads, on every MLP layout."""

import logging

import pytest
import torch
from transformer_lens import HookedTransformer

from sae_lens_transcoder.hooks import (
    default_input_hook,
    ensure_mlp_hook_in,
    mlp_out_hook,
    validate_transcoder_hooks,
)
from tests.conftest import ARCHITECTURES, D_MODEL, D_VOCAB, build_model


def _folded_model(arch: str) -> HookedTransformer:
    model = build_model(arch)
    model.process_weights_(fold_ln=True, center_writing_weights=False, center_unembed=False)
    return model


def _mlp_roundtrip_error(model: HookedTransformer, layer: int) -> float:
    ensure_mlp_hook_in(model)
    hook_in = default_input_hook(model, layer)
    tokens = torch.randint(0, D_VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache(tokens, names_filter=[hook_in, mlp_out_hook(layer)])
    x, y = cache[hook_in], cache[mlp_out_hook(layer)]
    with torch.no_grad():
        return (model.blocks[layer].mlp(x) - y).abs().max().item()


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("layer", [0, 1])
def test_default_hooks_feed_the_mlp_exactly(arch: str, layer: int) -> None:
    model = build_model(arch)
    assert default_input_hook(model, layer) == f"blocks.{layer}.mlp.hook_in"
    assert _mlp_roundtrip_error(model, layer) < 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_folded_norm_uses_ln2_hook_normalized(arch: str) -> None:
    model = _folded_model(arch)
    assert default_input_hook(model, 1) == "blocks.1.ln2.hook_normalized"
    assert _mlp_roundtrip_error(model, 1) < 1e-5
    validate_transcoder_hooks(model, "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out", D_MODEL, D_MODEL)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_unfolded_ln2_hook_normalized_is_rejected_with_the_right_hook(arch: str) -> None:
    model = build_model(arch)
    with pytest.raises(ValueError, match=r"Use hook_name='blocks\.1\.mlp\.hook_in'"):
        validate_transcoder_hooks(model, "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out", D_MODEL, D_MODEL)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_hook_mlp_in_is_accepted_as_the_residual_before_the_norm(arch: str, caplog: pytest.LogCaptureFixture) -> None:
    """The residual before the MLP's norm is not the MLP's input, but SAELens gives it to Gemma
    Scope 2 (the transcoder learns the norm too): accepted without the opt-in, saying so; the hook,
    which TransformerLens only runs with use_hook_mlp_in, is turned on."""
    model = build_model(arch)
    assert not model.cfg.use_hook_mlp_in
    with caplog.at_level(logging.INFO, logger="sae_lens_transcoder.hooks"):
        validate_transcoder_hooks(model, "blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out", D_MODEL, D_MODEL)
    assert model.cfg.use_hook_mlp_in
    assert "before MLP 1's norm" in caplog.text and "norm's job" in caplog.text


def test_other_residual_hooks_still_need_the_opt_in() -> None:
    model = build_model("gpt2")
    with pytest.raises(ValueError, match=r"Use hook_name='blocks\.1\.mlp\.hook_in'"):
        validate_transcoder_hooks(model, "blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out", D_MODEL, D_MODEL)


def test_opting_into_resid_mid_logs_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    model = build_model("gpt2")
    with caplog.at_level(logging.WARNING):
        validate_transcoder_hooks(
            model, "blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out", D_MODEL, D_MODEL,
            allow_inexact_mlp_input=True,
        )
    assert "NOT the exact input" in caplog.text


def test_width_mismatches_name_the_field() -> None:
    model = build_model("gpt2")
    with pytest.raises(ValueError, match=r"sae\.d_in=32.*set sae\.d_in: 64"):
        validate_transcoder_hooks(model, "blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out", 32, D_MODEL)
    with pytest.raises(ValueError, match=r"sae\.d_out=48.*set sae\.d_out: 64"):
        validate_transcoder_hooks(model, "blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out", D_MODEL, 48)
