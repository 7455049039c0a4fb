"""``total_effects_batch``: many targets sharing one walk give what each gives alone, and each is complete."""

import pytest
import torch

from sae_lens_transcoder.circuits import Site, Trace, feature_target, logit_target, trace_prompt, unembed_target
from sae_lens_transcoder.circuits.attribution import Target, head_target, residual_target, target_value
from sae_lens_transcoder.circuits.effects import Effects, active_features, total_effects, total_effects_batch
from tests.circuit_fixtures import random_transcoder
from tests.conftest import D_VOCAB, build_model

SETUPS = [
    ("gpt2", "mlp.hook_in", "relu", (0, 1)),
    ("gpt2", "ln2.hook_normalized", "skip", (0, 1)),
    ("neox", "mlp.hook_in", "jumprelu_skip", (0, 1)),  # parallel attention and MLP
    ("llama", "mlp.hook_in", "relu", (0, 1)),
    ("llama-gqa", "mlp.hook_in", "skip", (0, 1)),
    ("llama", "mlp.hook_in", "relu", (1,)),  # MLP 0 not replaced: a whole-MLP error term
]


def _traced(arch: str, hook: str, kind: str, layers: tuple[int, ...]) -> Trace:
    model = build_model("llama", n_key_value_heads=2) if arch == "llama-gqa" else build_model(arch)
    with torch.no_grad():  # non-zero attention biases, so a lost constant shows
        for block in model.blocks:
            block.attn.b_O.add_(0.1 * torch.randn_like(block.attn.b_O))
            block.attn.b_V.add_(0.1 * torch.randn_like(block.attn.b_V))
    transcoders = [random_transcoder(model, layer, hook=hook, kind=kind) for layer in layers]
    tokens = torch.randint(1, D_VOCAB, (12,), generator=torch.Generator().manual_seed(5))
    return trace_prompt(model, transcoders, tokens)


def _targets(trace: Trace) -> list[Target]:
    """Targets at every kind of site: logits (raw, de-meaned, differences), features, heads, raw residuals."""
    W_U = trace.model.W_U
    targets = [logit_target(trace, 11, 5), logit_target(trace, 4, 3, versus=9)]
    targets.append(unembed_target(trace, 7, W_U[:, 2] - W_U.mean(1)))
    for layer in sorted(trace.splices):
        for pos in (0, 6, 11):
            targets.append(feature_target(trace, layer, int(trace.feature_acts[layer][pos].argmax()), pos))
    targets.append(head_target(trace, targets[0], 1, 2, 3))
    targets.append(residual_target(trace, Site(1, "attn"), 9, torch.randn(trace.model.cfg.d_model)))
    targets.append(residual_target(trace, Site(0, "attn"), 9, torch.randn(trace.model.cfg.d_model)))
    return targets


def _assert_same(batched: Effects, single: Effects) -> None:
    """Equal up to float32 rounding of sums taken in another order: 1e-5 of the largest effect."""
    assert single.embed is not None and batched.embed is not None
    terms = [*single.features.values(), *single.errors.values(), *single.skips.values(), single.embed]
    atol = 1e-5 * max(float(t.abs().max()) for t in terms)
    for name in ("features", "errors", "skips"):
        got, want = getattr(batched, name), getattr(single, name)
        assert sorted(got) == sorted(want), name
        for layer in want:
            torch.testing.assert_close(got[layer], want[layer], rtol=1e-5, atol=atol)
    torch.testing.assert_close(batched.embed, single.embed, rtol=1e-5, atol=atol)
    assert batched.bias == pytest.approx(single.bias, rel=1e-5, abs=1e-5)
    assert batched.total() == pytest.approx(single.total(), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize(("arch", "hook", "kind", "layers"), SETUPS)
@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_batched_effects_equal_one_target_at_a_time(arch: str, hook: str, kind: str, layers: tuple[int, ...], batch_size: int) -> None:
    trace = _traced(arch, hook, kind, layers)
    targets = _targets(trace)
    batch = total_effects_batch(trace, targets, batch_size=batch_size)
    assert len(batch) == len(targets)
    totals = batch.total()
    for i, target in enumerate(targets):
        single = total_effects(trace, target)
        _assert_same(batch.effects(i), single)
        assert float(totals[i]) == pytest.approx(single.total(), rel=1e-5, abs=1e-5)
        assert single.total() == pytest.approx(target_value(trace, target), rel=1e-4, abs=1e-5)


def test_active_features_are_the_non_zero_activations_in_order() -> None:
    trace = _traced("gpt2", "mlp.hook_in", "relu", (0, 1))
    active = active_features(trace)
    assert len(active) == sum(int((acts != 0).sum()) for acts in trace.feature_acts.values()) > 0
    assert all(float(trace.feature_acts[int(l)][int(p), int(f)]) != 0 for l, p, f in active.tolist())
    keys = [tuple(row) for row in active.tolist()]
    assert keys == sorted(keys)


def test_no_targets_give_empty_effects() -> None:
    trace = _traced("gpt2", "mlp.hook_in", "relu", (0, 1))
    batch = total_effects_batch(trace, [])
    assert len(batch) == 0 and batch.features.shape == (0, len(batch.active))
