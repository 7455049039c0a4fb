"""Exact attribution: completeness on real prompts and agreement with autograd on the frozen model."""

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from sae_lens_transcoder.circuits import (
    Node,
    Target,
    Trace,
    child_target,
    direct_contributions,
    feature_target,
    logit_target,
    target_value,
    trace_prompt,
)
from sae_lens_transcoder.models import load_model
from sae_lens_transcoder.splicing import Splice
from tests.circuit_fixtures import random_transcoder
from tests.conftest import D_VOCAB, build_model
from tests.family_models import FAMILIES, build_family_model

REL = 1e-4
SETUPS = [
    ("gpt2", "mlp.hook_in", "relu"),
    ("gpt2", "ln2.hook_normalized", "skip"),
    ("neox", "mlp.hook_in", "jumprelu_skip"),
    ("llama", "mlp.hook_in", "relu"),
    ("llama-gqa", "mlp.hook_in", "skip"),  # grouped-query attention, as in SmolLM2
    ("gpt2", "mlp.hook_in", "topk"),
    ("llama", "mlp.hook_in", "topk_skip"),
    ("tiny-trained", "ln2.hook_normalized", "relu"),  # the bundled trained GPT-2-style model
    # Families with released transcoders (tests/family_models.py), reading before and after the norm.
    ("gemma2", "hook_mlp_in", "jumprelu_skip"),
    ("gemma2", "ln2.hook_normalized", "topk"),
    ("gemma3", "hook_mlp_in", "jumprelu"),
    ("qwen3", "mlp.hook_in", "relu"),
]


def _prompt(n: int = 12, seed: int = 5) -> torch.Tensor:
    return torch.randint(1, D_VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def _traced(arch: str, hook: str, kind: str) -> Trace:
    if arch == "tiny-trained":
        model = load_model("tiny-gpt2")
    elif arch in FAMILIES:
        model = build_family_model(arch)
    else:
        model = build_model("llama", n_key_value_heads=2) if arch == "llama-gqa" else build_model(arch)
    if arch != "tiny-trained":
        with torch.no_grad():  # fresh attention biases are zero, which would hide a missing bias term
            for name, param in model.named_parameters():
                if name.endswith(("attn.b_O", "attn.b_V", "attn._b_V")):  # _b_V: grouped-query values
                    param.add_(0.1 * torch.randn_like(param))
    transcoders = [random_transcoder(model, layer, hook=hook, kind=kind) for layer in range(model.cfg.n_layers)]
    return trace_prompt(model, transcoders, _prompt())


def _true_pre_activation(trace: Trace, layer: int, feature: int, pos: int) -> float:
    """The pre-activation as SAELens's own ``encode`` computes it on the model's real MLP input."""
    splice = trace.splices[layer]
    captured: list[torch.Tensor] = []
    with torch.no_grad(), splice.transcoder.hooks(fwd_hooks=[("hook_sae_acts_pre", lambda a, hook: captured.append(a))]):
        splice.transcoder.encode(trace.get(splice.hook_name)[pos : pos + 1] * splice.input_scale)
    return float(captured[0][0, feature])


def _most_active(trace: Trace, layer: int, pos: int) -> int:
    return int(trace.feature_acts[layer][pos].argmax())


def _assert_complete(trace: Trace, target: Target, actual: float) -> None:
    assert target_value(trace, target) == pytest.approx(actual, rel=REL, abs=1e-6)
    assert direct_contributions(trace, target).total() == pytest.approx(actual, rel=REL, abs=1e-6)


@pytest.mark.parametrize(("arch", "hook", "kind"), SETUPS)
def test_contributions_sum_to_the_feature_pre_activation(arch: str, hook: str, kind: str) -> None:
    trace = _traced(arch, hook, kind)
    for pos in (3, 11):
        feature = _most_active(trace, 1, pos)
        _assert_complete(trace, feature_target(trace, 1, feature, pos), _true_pre_activation(trace, 1, feature, pos))


@pytest.mark.parametrize(("arch", "hook", "kind"), SETUPS)
def test_contributions_sum_to_the_logit_difference(arch: str, hook: str, kind: str) -> None:
    trace = _traced(arch, hook, kind)
    target = logit_target(trace, 11, 5, versus=7)
    _assert_complete(trace, target, float(trace.logits[11, 5] - trace.logits[11, 7]))
    contributions = direct_contributions(trace, target)
    assert {n.kind for n, _ in contributions.items()} >= {"embed", "head", "feature", "error", "attn_bias", "transcoder_bias"}


@pytest.mark.parametrize(("arch", "hook", "kind"), SETUPS)
def test_every_child_is_complete_and_equals_its_contribution(arch: str, hook: str, kind: str) -> None:
    trace = _traced(arch, hook, kind)
    root = logit_target(trace, 11, 5, versus=7)
    contributions = direct_contributions(trace, root)
    for node, value in contributions.top(6, keep=lambda n: n.expandable):
        child = child_target(trace, root, node)
        assert target_value(trace, child) == pytest.approx(value, rel=REL, abs=1e-6)
        assert direct_contributions(trace, child).total() == pytest.approx(value, rel=REL, abs=1e-6)


@contextmanager
def _frozen_model_leaves(trace: Trace, detach_values: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """The frozen model as autograd sees it: patterns and norm scales fixed at the prompt,
    MLPs replaced by leaf feature activations plus constant bias/skip/error, embeddings as
    leaves. With ``detach_values`` heads are nodes (no gradient through their values)."""
    model = trace.model
    leaves: dict[str, torch.Tensor] = {"embed": trace.get("hook_embed").clone().requires_grad_()}
    hooks: list[tuple[str, object]] = [("hook_embed", lambda x, hook: leaves["embed"][None])]
    if "hook_pos_embed" in trace.cache.cache_dict:
        leaves["pos_embed"] = trace.get("hook_pos_embed").clone().requires_grad_()
        hooks.append(("hook_pos_embed", lambda x, hook: leaves["pos_embed"][None]))
    for layer in range(trace.n_layers):
        leaves[f"pattern{layer}"] = trace.pattern(layer).clone().requires_grad_()
        hooks.append((f"blocks.{layer}.attn.hook_pattern", lambda x, hook, layer=layer: leaves[f"pattern{layer}"][None]))
        if detach_values:
            hooks.append((f"blocks.{layer}.attn.hook_v", lambda x, hook: x.detach()))
        if layer in trace.splices:
            leaves[f"acts{layer}"] = trace.feature_acts[layer].clone().requires_grad_()
            constant = trace.transcoder_bias[layer] + trace.errors[layer] + trace.skips.get(layer, 0.0)

            def mlp_out(x: torch.Tensor, hook: HookPoint, layer: int = layer, constant: torch.Tensor = constant) -> torch.Tensor:
                return (leaves[f"acts{layer}"] @ trace.decoders[layer, layer] + constant)[None]

            hooks.append((f"blocks.{layer}.hook_mlp_out", mlp_out))
    for name in trace.cache.cache_dict:  # every norm scale, the post-attention/MLP norms' too
        if name.endswith(".hook_scale"):
            hooks.append((name, lambda x, hook, name=name: trace.get(name)[None]))
    with model.hooks(fwd_hooks=hooks):  # type: ignore[arg-type]
        yield leaves


@pytest.mark.parametrize(("arch", "hook", "kind"), SETUPS)
def test_attributions_equal_gradient_times_input_on_the_frozen_model(arch: str, hook: str, kind: str) -> None:
    trace = _traced(arch, hook, kind)
    pos, target = 11, None
    with _frozen_model_leaves(trace) as leaves:
        logits = trace.model(trace.tokens[None])[0]
        (logits[pos, 5] - logits[pos, 7]).backward()
    target = logit_target(trace, pos, 5, versus=7)
    contributions = direct_contributions(trace, target)
    for layer in range(trace.n_layers):
        leaf = leaves[f"pattern{layer}"]
        torch.testing.assert_close(contributions.heads[layer], (leaf.grad * leaf)[:, pos, :].detach(), rtol=1e-4, atol=1e-5)
        acts = leaves[f"acts{layer}"]
        torch.testing.assert_close(contributions.features[layer], (acts.grad * acts)[pos].detach(), rtol=1e-4, atol=1e-5)
    embed = leaves["embed"]
    assert contributions.others[Node("embed", -1, pos)] == pytest.approx(float(embed.grad[pos] @ embed[pos].detach()), rel=1e-4, abs=1e-6)
    # Only the target token's own residual is reached directly: other tokens come in through heads.
    assert embed.grad[:pos].abs().max() == 0


def test_feature_connection_equals_attribution_divided_by_activation_and_norm_scale() -> None:
    from sae_lens_transcoder.circuits.weights import feature_connections

    trace = _traced("gpt2", "ln2.hook_normalized", "relu")
    pos = 11
    feature = _most_active(trace, 1, pos)
    target = feature_target(trace, 1, feature, pos)
    attribution = direct_contributions(trace, target).features[0]
    connection = feature_connections(trace.model, trace.splices[0], trace.splices[1], feature)
    scale = trace.get("blocks.1.ln2.hook_scale")[pos, 0]
    active = trace.feature_acts[0][pos] > 0
    torch.testing.assert_close(attribution[active] / trace.feature_acts[0][pos][active], connection[active] / scale, rtol=1e-4, atol=1e-6)


def test_completeness_on_the_tiny_trained_model() -> None:
    model = load_model("tiny-gpt2")
    transcoders = [Splice.from_sae(random_transcoder(model, layer, hook="ln2.hook_normalized")) for layer in range(model.cfg.n_layers)]
    trace = trace_prompt(model, transcoders, "To be, or not to be, that is the question:")
    pos = trace.n_pos - 1
    top = int(trace.logits[pos].argmax())
    second = int(trace.logits[pos].topk(2).indices[1])
    _assert_complete(trace, logit_target(trace, pos, top, versus=second), float(trace.logits[pos, top] - trace.logits[pos, second]))
    feature = _most_active(trace, 1, pos)
    _assert_complete(trace, feature_target(trace, 1, feature, pos), _true_pre_activation(trace, 1, feature, pos))


def test_unsupported_transcoder_hook_is_named() -> None:
    model = build_model("gpt2")
    tc = random_transcoder(model, 1, hook="hook_resid_pre")
    with pytest.raises(ValueError, match="hook_name='blocks.1.hook_resid_pre'"):
        trace_prompt(model, [tc], _prompt())


def test_two_transcoders_for_one_layer_are_refused(gpt2_model: HookedTransformer) -> None:
    tcs = [random_transcoder(gpt2_model, 1), random_transcoder(gpt2_model, 1, seed=3)]
    with pytest.raises(ValueError, match="two transcoders replace MLP 1"):
        trace_prompt(gpt2_model, tcs, _prompt())


def test_ov_connection_equals_the_path_through_the_head_divided_by_its_constants() -> None:
    from sae_lens_transcoder.circuits.weights import ov_connections

    trace = _traced("gpt2", "mlp.hook_in", "relu")
    pos, head = 11, 2
    feature = _most_active(trace, 1, pos)
    root = feature_target(trace, 1, feature, pos)
    through_head = direct_contributions(trace, child_target(trace, root, Node("head", 1, pos, head, 4))).features[0]
    connection = ov_connections(trace.model, trace.splices[0], trace.splices[1], feature, layer=1, head=head)
    constants = trace.pattern(1)[head, pos, 4] / (trace.get("blocks.1.ln1.hook_scale")[4, 0] * trace.get("blocks.1.ln2.hook_scale")[pos, 0])
    active = trace.feature_acts[0][4] > 0
    torch.testing.assert_close(through_head[active], trace.feature_acts[0][4][active] * connection[active] * constants, rtol=1e-4, atol=1e-6)


def test_de_embedding_and_logit_lens_are_the_embedding_and_unembedding_reads() -> None:
    from sae_lens_transcoder.circuits.weights import de_embedding, logit_lens, top_tokens

    model = load_model("tiny-gpt2")
    splice = Splice.from_sae(random_transcoder(model, 1, hook="ln2.hook_normalized"))
    trace = trace_prompt(model, [splice], "The king said")
    pos = trace.n_pos - 1
    feature = _most_active(trace, 1, pos)
    # Direct path from this token's embedding: the de-embedding entry of the token, per unit scale.
    embed_part = direct_contributions(trace, feature_target(trace, 1, feature, pos)).others[Node("embed", -1, pos)]
    scale = trace.get("blocks.1.ln2.hook_scale")[pos, 0]
    assert embed_part == pytest.approx(float(de_embedding(model, splice, feature)[trace.tokens[pos]] / scale), rel=1e-4)
    lens = logit_lens(model, splice, feature)
    assert lens.shape == (model.cfg.d_vocab,)
    top, bottom = top_tokens(model, lens, k=3)
    assert [v for _, v in top] == sorted((v for _, v in top), reverse=True) and top[0][1] == pytest.approx(float(lens.max()))
    assert bottom[0][1] == pytest.approx(float(lens.min()))


def test_mean_attribution_is_the_average_of_prompt_attributions() -> None:
    from sae_lens_transcoder.circuits.mean import mean_feature_attributions

    model = build_model("gpt2")
    splices = [Splice.from_sae(random_transcoder(model, layer, hook="ln2.hook_normalized")) for layer in (0, 1)]
    tokens = torch.randint(1, D_VOCAB, (3, 10), generator=torch.Generator().manual_seed(2))
    feature = 4
    mean, count = mean_feature_attributions(model, splices[0], splices[1], feature, tokens, batch_size=2)
    expected, seen = torch.zeros_like(mean), 0
    for row in tokens:
        trace = trace_prompt(model, splices, row)
        for pos in range(row.shape[0]):
            if trace.feature_acts[1][pos, feature] > 0:
                expected += direct_contributions(trace, feature_target(trace, 1, feature, pos)).features[0]
                seen += 1
    assert count == seen > 0
    torch.testing.assert_close(mean, expected / seen, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("arch", "hook", "kind"), SETUPS)
def test_total_effects_are_complete_and_equal_gradient_times_input_through_attention(arch: str, hook: str, kind: str) -> None:
    """circuit-tracer's notion: attention is a linear path (pattern frozen), MLPs are frozen terms."""
    from sae_lens_transcoder.circuits.effects import total_effects

    trace = _traced(arch, hook, kind)
    pos = 11
    target = logit_target(trace, pos, 5, versus=7)
    effects = total_effects(trace, target)
    assert effects.total() == pytest.approx(float(trace.logits[pos, 5] - trace.logits[pos, 7]), rel=REL, abs=1e-6)
    with _frozen_model_leaves(trace, detach_values=False) as leaves:
        logits = trace.model(trace.tokens[None])[0]
        (logits[pos, 5] - logits[pos, 7]).backward()
    for layer in range(trace.n_layers):
        acts = leaves[f"acts{layer}"]
        torch.testing.assert_close(effects.features[layer], (acts.grad * acts).detach(), rtol=1e-4, atol=1e-5)
    expected_embed = sum((leaf.grad * leaf).sum(-1).detach() for name, leaf in leaves.items() if "embed" in name)
    assert effects.embed is not None and effects.embed[: pos + 1].abs().min() > 0  # every earlier token is reached
    torch.testing.assert_close(effects.embed, expected_embed, rtol=1e-4, atol=1e-5)


def test_ov_norm_map_covers_exactly_the_attention_layers_upstream() -> None:
    from sae_lens_transcoder.circuits.weights import ov_norm_map

    for arch, expected_layers in (("gpt2", 2), ("neox", 1)):  # a parallel block's MLP does not read its own attention
        model = build_model(arch)
        norms = ov_norm_map(model, Splice.from_sae(random_transcoder(model, 1)), feature=3)
        assert norms.shape == (expected_layers, model.cfg.n_heads) and (norms > 0).all()
    model = build_model("neox")
    assert ov_norm_map(model, Splice.from_sae(random_transcoder(model, 0)), feature=3).shape == (0, model.cfg.n_heads)


def test_input_scale_is_folded_into_features_and_decoders() -> None:
    model = build_model("llama")
    splices = [Splice.from_sae(random_transcoder(model, layer), input_scale=2.5) for layer in (0, 1)]
    trace = trace_prompt(model, splices, _prompt())
    feature = _most_active(trace, 1, 11)
    _assert_complete(trace, feature_target(trace, 1, feature, 11), _true_pre_activation(trace, 1, feature, 11))
    _assert_complete(trace, logit_target(trace, 11, 5, versus=7), float(trace.logits[11, 5] - trace.logits[11, 7]))
