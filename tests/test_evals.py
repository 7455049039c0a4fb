"""Spliced evaluation and replacement contexts, checked against hand computations."""

import pytest
import torch
from sae_lens import SkipTranscoder, Transcoder
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.transcoder import SkipTranscoderConfig, TranscoderConfig
from transformer_lens import HookedTransformer

from sae_lens_transcoder.evals import evaluate_spliced
from sae_lens_transcoder.splicing import ablated, keep_only_features, spliced
from tests.conftest import CONTEXT, D_MODEL, D_VOCAB, build_model

D_MLP = 128


@pytest.fixture
def relu_model() -> HookedTransformer:
    return build_model("gpt2", act_fn="relu")


def _transcoder(layer: int, cls: type = Transcoder, cfg_cls: type = TranscoderConfig) -> Transcoder:
    cfg = cfg_cls(
        d_in=D_MODEL, d_sae=D_MLP, d_out=D_MODEL, apply_b_dec_to_input=False,
        metadata=SAEMetadata(hook_name=f"blocks.{layer}.mlp.hook_in", hook_name_out=f"blocks.{layer}.hook_mlp_out"),
    )
    return cls(cfg)


def _mlp_as_transcoder(model: HookedTransformer, layer: int) -> Transcoder:
    """A ReLU MLP *is* a transcoder with d_sae = d_mlp: the perfect one."""
    tc = _transcoder(layer)
    mlp = model.blocks[layer].mlp
    with torch.no_grad():
        tc.W_enc.copy_(mlp.W_in)
        tc.b_enc.copy_(mlp.b_in)
        tc.W_dec.copy_(mlp.W_out)
        tc.b_dec.copy_(mlp.b_out)
    return tc


def _tokens(n: int = 4) -> torch.Tensor:
    return torch.randint(0, D_VOCAB, (n, CONTEXT), generator=torch.Generator().manual_seed(3))


def test_perfect_transcoder_recovers_everything(relu_model: HookedTransformer) -> None:
    m = evaluate_spliced(relu_model, [_mlp_as_transcoder(relu_model, 1)], _tokens())
    assert m["ce_loss_spliced"] == pytest.approx(m["ce_loss_clean"], abs=1e-5)
    assert m["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert m["kl_div"] == pytest.approx(0.0, abs=1e-6)
    assert m["ce_loss_zero_ablation"] != pytest.approx(m["ce_loss_clean"], abs=1e-4)
    assert m["n_tokens"] == 4 * CONTEXT


def test_zero_transcoder_gives_the_zero_ablation_loss(relu_model: HookedTransformer) -> None:
    tc = _transcoder(1)
    with torch.no_grad():
        for p in tc.parameters():
            p.zero_()
    m = evaluate_spliced(relu_model, [tc], _tokens())
    assert m["ce_loss_spliced"] == pytest.approx(m["ce_loss_zero_ablation"], abs=1e-6)
    assert m["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert m["l0"] == 0 and m["dead_features"] == D_MLP


def test_ce_and_kl_match_a_hand_computation(relu_model: HookedTransformer) -> None:
    torch.manual_seed(0)
    tc = _mlp_as_transcoder(relu_model, 0)
    with torch.no_grad():
        tc.W_dec.mul_(0.5)  # an imperfect transcoder
    tokens = _tokens(2)[:, :6]
    m = evaluate_spliced(relu_model, [tc], tokens)
    with torch.no_grad():
        clean = relu_model(tokens)
        _, cache = relu_model.run_with_cache(tokens, names_filter="blocks.0.ln2.hook_normalized")
        ln2 = relu_model.blocks[0].ln2
        x = cache["blocks.0.ln2.hook_normalized"] * ln2.w + ln2.b
        with relu_model.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", lambda y, hook: tc(x))]):
            replaced = relu_model(tokens)
    ce_clean, ce_spliced, kl, n = 0.0, 0.0, 0.0, 0
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1] - 1):
            target = tokens[b, t + 1]
            p = torch.softmax(clean[b, t].double(), -1)
            q = torch.softmax(replaced[b, t].double(), -1)
            ce_clean -= torch.log(p[target]).item()
            ce_spliced -= torch.log(q[target]).item()
            kl += (p * (p.log() - q.log())).sum().item()
            n += 1
    assert m["ce_loss_clean"] == pytest.approx(ce_clean / n, rel=1e-5)
    assert m["ce_loss_spliced"] == pytest.approx(ce_spliced / n, rel=1e-5)
    assert m["kl_div"] == pytest.approx(kl / n, rel=1e-4, abs=1e-7)


def test_skip_transcoder_is_evaluated_with_its_skip_connection(relu_model: HookedTransformer) -> None:
    perfect = _mlp_as_transcoder(relu_model, 1)
    skip = _transcoder(1, SkipTranscoder, SkipTranscoderConfig)
    skip.load_state_dict({**perfect.state_dict(), "W_skip": torch.zeros(D_MODEL, D_MODEL)})
    with torch.no_grad():
        skip.W_dec.mul_(0.0)
        skip.W_skip.copy_(0.3 * torch.randn(D_MODEL, D_MODEL))
    with_skip = evaluate_spliced(relu_model, [skip], _tokens())
    tokens = _tokens()
    with torch.no_grad():
        _, cache = relu_model.run_with_cache(tokens, names_filter=["blocks.1.ln2.hook_normalized"])
        ln2 = relu_model.blocks[1].ln2
        x = cache["blocks.1.ln2.hook_normalized"] * ln2.w + ln2.b
        expected = x @ skip.W_skip.T + skip.b_dec  # decode(encode(x)) would be b_dec alone
        with relu_model.hooks(fwd_hooks=[("blocks.1.hook_mlp_out", lambda y, hook: expected)]):
            ce = torch.nn.functional.cross_entropy(relu_model(tokens)[:, :-1].reshape(-1, D_VOCAB), tokens[:, 1:].reshape(-1))
    assert with_skip["ce_loss_spliced"] == pytest.approx(ce.item(), rel=1e-5)


def test_contexts_restore_the_model_after_an_exception(relu_model: HookedTransformer) -> None:
    tokens = _tokens(2)
    with torch.no_grad():
        before = relu_model(tokens)
    tc = _transcoder(1)
    for context in (
        lambda: spliced(relu_model, [tc]),
        lambda: spliced(relu_model, [tc], use_error_term=True),
        lambda: ablated(relu_model, ["blocks.1.hook_mlp_out"]),
        lambda: keep_only_features(relu_model, tc, [0, 1]),
    ):
        with pytest.raises(RuntimeError, match="boom"), context():
            raise RuntimeError("boom")
        assert all(not hp.fwd_hooks for hp in relu_model.hook_dict.values())
        with torch.no_grad():
            torch.testing.assert_close(relu_model(tokens), before, rtol=0, atol=0)


def test_error_term_keeps_outputs_exact(relu_model: HookedTransformer) -> None:
    tokens = _tokens(2)
    with torch.no_grad():
        before = relu_model(tokens)
        with spliced(relu_model, [_transcoder(1)], use_error_term=True):
            after = relu_model(tokens)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_several_transcoders_equal_their_sequential_composition(relu_model: HookedTransformer) -> None:
    tcs = [_mlp_as_transcoder(relu_model, layer) for layer in (0, 1)]
    with torch.no_grad():
        for tc in tcs:
            tc.W_dec.mul_(0.7)
    tokens = _tokens(2)
    with torch.no_grad():
        with spliced(relu_model, tcs):
            together = relu_model(tokens)
        with spliced(relu_model, tcs[:1]), spliced(relu_model, tcs[1:]):
            nested = relu_model(tokens)
    torch.testing.assert_close(together, nested, rtol=0, atol=0)
    both = evaluate_spliced(relu_model, tcs, tokens)
    first = evaluate_spliced(relu_model, tcs[:1], tokens)
    assert len(both["per_transcoder"]) == 2
    assert both["per_transcoder"][0]["explained_variance"] == pytest.approx(first["explained_variance"])
    assert both["ce_loss_spliced"] != pytest.approx(first["ce_loss_spliced"])


def test_keeping_all_features_equals_the_full_splice(relu_model: HookedTransformer) -> None:
    tc = _mlp_as_transcoder(relu_model, 1)
    tokens = _tokens(2)
    with torch.no_grad():
        with spliced(relu_model, [tc]):
            full = relu_model(tokens)
        with keep_only_features(relu_model, tc, range(D_MLP)):
            kept = relu_model(tokens)
        with keep_only_features(relu_model, tc, []) as splice:
            relu_model(tokens)
            assert splice.last_feature_acts is not None and splice.last_feature_acts.count_nonzero() == 0
    torch.testing.assert_close(full, kept)


def test_excluded_special_tokens_are_left_out(relu_model: HookedTransformer) -> None:
    tokens = _tokens(2)
    tokens[:, 0] = 0
    m = evaluate_spliced(relu_model, [_mlp_as_transcoder(relu_model, 1)], tokens, exclude_special_tokens=[0])
    assert m["n_tokens"] == int((tokens != 0).sum())
