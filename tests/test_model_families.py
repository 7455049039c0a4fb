"""Gemma 2, Gemma 3 and Qwen3: circuits, splicing and training on the families with released
transcoders (random-weight models of each family's real layout, tests/family_models.py).

Completeness and autograd agreement of every attribution run on these families in
``test_circuits_attribution.py`` (its ``SETUPS``); this file checks what is particular to them.
"""

from pathlib import Path

import pytest
import torch
from datasets import Dataset
from sae_lens.saes.sae import SAE
from transformer_lens import HookedTransformer

from sae_lens_transcoder import TranscoderTrainingRunner
from sae_lens_transcoder.circuits import Node, child_target, direct_contributions, feature_target, logit_target, target_value, trace_prompt
from sae_lens_transcoder.circuits.dashboard import feature_dashboard
from sae_lens_transcoder.circuits.graph import build_graph
from sae_lens_transcoder.circuits.mean import mean_feature_attributions
from sae_lens_transcoder.circuits.paths import find_paths
from sae_lens_transcoder.circuits.weights import de_embedding, logit_lens, ov_connections
from sae_lens_transcoder.evals import evaluate_spliced
from sae_lens_transcoder.splicing import Splice, as_splices, spliced
from tests.circuit_fixtures import random_transcoder
from tests.conftest import CONTEXT, D_VOCAB, build_model, runner_config  # D_VOCAB: ids every model has
from tests.family_models import FAMILIES, N_LAYERS, WINDOW, build_family_model, build_family_pair
from tests.release_fixtures import LocalHub, gemma_scope_2_transcoders, gemma_scope_2b_transcoders, local_hub, qwen3_transcoders  # noqa: F401

RELEASE_HOOKS = {"gemma2": "hook_mlp_in", "gemma3": "hook_mlp_in", "qwen3": "mlp.hook_in"}  # as released


def _prompt(n: int = 12, seed: int = 5) -> torch.Tensor:
    return torch.randint(1, D_VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def _transcoders(model: HookedTransformer, family: str, kind: str = "jumprelu_skip") -> list[SAE]:  # type: ignore[type-arg]
    return [random_transcoder(model, layer, hook=RELEASE_HOOKS[family], kind=kind) for layer in range(N_LAYERS)]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_models_compute_what_their_hugging_face_models_compute(family: str) -> None:
    """The fixtures are the real families: same logits as transformers' own classes (this is
    where Gemma's sqrt(d_model) embedding scale and its 1 + w norms are checked)."""
    hf_model, model = build_family_pair(family)
    tokens = _prompt()[None]
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf_model(tokens).logits, rtol=1e-4, atol=1e-5)
    cfg = model.cfg
    assert cfg.use_normalization_before_and_after == family.startswith("gemma")
    assert cfg.n_key_value_heads == 2 and (family == "qwen3" or cfg.use_local_attn and cfg.window_size == WINDOW)
    if family == "gemma3":
        assert cfg.attn_types == ["local", "local", "global"] and cfg.use_qk_norm
    if family == "gemma2":
        assert cfg.output_logits_soft_cap > 0 and cfg.attn_scores_soft_cap > 0


def test_the_final_soft_cap_is_linearised_at_the_prompt() -> None:
    """The logit target's value is the capped logit the model outputs; contributions are the
    raw logit's, times the cap's slope, plus the linearisation's constant."""
    model = build_family_model("gemma2")
    trace = trace_prompt(model, _transcoders(model, "gemma2"), _prompt())
    cap, pos = model.cfg.output_logits_soft_cap, 11
    token = int(trace.logits[pos].abs().argmax())
    target = logit_target(trace, pos, token)
    assert target_value(trace, target) == pytest.approx(float(trace.logits[pos, token]), rel=1e-5)
    with torch.no_grad():
        raw = float(model.W_U[:, token] @ model.ln_final(trace.get(f"blocks.{N_LAYERS - 1}.hook_resid_post")[pos]) + model.b_U[token])
    assert float(trace.logits[pos, token]) == pytest.approx(cap * torch.tanh(torch.tensor(raw / cap)).item(), rel=1e-5)
    slope = 1 - torch.tanh(torch.tensor(raw / cap)).item() ** 2
    assert slope < 0.95  # the cap really bends this logit
    features = direct_contributions(trace, target).features
    model.cfg.output_logits_soft_cap = -1.0  # the same residual read without the cap
    uncapped = direct_contributions(trace, logit_target(trace, pos, token)).features
    for layer in features:
        torch.testing.assert_close(features[layer], slope * uncapped[layer], rtol=1e-4, atol=1e-7)


def test_qk_norms_change_nothing_once_patterns_are_frozen() -> None:
    """Qwen3's q/k norms only shape attention patterns: with the patterns frozen at the prompt,
    rescaling them leaves the frozen model's output and every attribution as they were."""
    model = build_family_model("qwen3")
    transcoders = _transcoders(model, "qwen3", kind="relu")
    trace = trace_prompt(model, transcoders, _prompt())
    before = direct_contributions(trace, logit_target(trace, 11, 5, versus=7))
    with torch.no_grad():
        for block in model.blocks:
            block.attn.q_norm.w.mul_(3.0)
            block.attn.k_norm.w.mul_(0.5)
    changed = trace_prompt(model, transcoders, _prompt())
    assert not torch.allclose(changed.pattern(1), trace.pattern(1), atol=1e-3)  # the norms do matter...
    frozen = [(f"blocks.{layer}.attn.hook_pattern", lambda x, hook, layer=layer: trace.pattern(layer)[None]) for layer in range(N_LAYERS)]
    with torch.no_grad(), model.hooks(fwd_hooks=frozen):  # type: ignore[arg-type]
        torch.testing.assert_close(model(trace.tokens[None])[0], trace.logits, rtol=1e-5, atol=1e-6)
    after = direct_contributions(trace, logit_target(trace, 11, 5, versus=7))  # ...only through the patterns
    for layer in before.heads:
        torch.testing.assert_close(after.heads[layer], before.heads[layer], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(after.features[layer], before.features[layer], rtol=1e-5, atol=1e-6)


def test_ov_weights_read_through_gemmas_post_attention_norm() -> None:
    """The weight-only OV connection is the path through the head divided by its per-token
    constants: the pattern, ln1's scale at the source and both the post-attention norm's and
    ln2's scales at the destination (the norm weights stay in the weights)."""
    model = build_family_model("gemma2")
    transcoders = [random_transcoder(model, layer, hook="ln2.hook_normalized") for layer in range(N_LAYERS)]
    trace = trace_prompt(model, transcoders, _prompt())
    pos, head, src = 11, 2, 9  # src inside the local window of 4
    feature = int(trace.feature_acts[1][pos].argmax())
    root = feature_target(trace, 1, feature, pos)
    through_head = direct_contributions(trace, child_target(trace, root, Node("head", 1, pos, head, src))).features[0]
    connection = ov_connections(model, trace.splices[0], trace.splices[1], feature, layer=1, head=head)
    scales = trace.get("blocks.1.ln1.hook_scale")[src, 0] * trace.get("blocks.1.ln1_post.hook_scale")[pos, 0] * trace.get("blocks.1.ln2.hook_scale")[pos, 0]
    constants = trace.pattern(1)[head, pos, src] / scales
    active = trace.feature_acts[0][src] > 0
    assert active.any()
    torch.testing.assert_close(through_head[active], trace.feature_acts[0][src][active] * connection[active] * constants, rtol=1e-4, atol=1e-6)


def test_local_attention_layers_move_nothing_beyond_their_window() -> None:
    model = build_family_model("gemma3")
    trace = trace_prompt(model, _transcoders(model, "gemma3"), _prompt())
    contributions = direct_contributions(trace, logit_target(trace, 11, 5, versus=7))
    local, global_ = contributions.heads[0], contributions.heads[2]
    assert local[:, : 11 - WINDOW + 1].abs().max() == 0 and local[:, 11 - WINDOW + 1 :].abs().max() > 0
    assert global_[:, : 11 - WINDOW + 1].abs().max() > 0


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_paths_and_graphs_are_exact_on_gemma(family: str) -> None:
    model = build_family_model(family)
    trace = trace_prompt(model, _transcoders(model, family), _prompt())
    root = logit_target(trace, 11, 5, versus=7)
    graph = build_graph(trace, root, max_expansions=16)
    assert graph.root_value == pytest.approx(float(trace.logits[11, 5] - trace.logits[11, 7]), rel=1e-4)
    assert sum(graph.incoming(graph.root).values()) == pytest.approx(graph.root_value, rel=1e-4, abs=1e-6)
    for node in graph.expanded - {graph.root}:  # a node's inputs add up to what it passes on
        assert sum(graph.incoming(node).values()) == pytest.approx(graph.influence[node], rel=1e-3, abs=1e-6)
    paths = find_paths(trace, root, num_iters=2, num_branches=4)
    for path in paths:
        if path.target is not None:
            assert target_value(trace, path.target) == pytest.approx(path.value, rel=1e-4, abs=1e-6)


def test_dashboards_and_mean_attribution_on_gemma() -> None:
    model = build_family_model("gemma3")
    splices = [Splice.from_sae(tc) for tc in _transcoders(model, "gemma3")]
    tokens = torch.randint(1, D_VOCAB, (4, 10), generator=torch.Generator().manual_seed(2))
    feature = 3
    dashboard = feature_dashboard(model, splices[1], feature, tokens, upstream=[splices[0]], k=4)
    assert dashboard["hook_name"] == "blocks.1.hook_mlp_in"
    assert dashboard["logit_lens"]["top"][0]["score"] == pytest.approx(float(logit_lens(model, splices[1], feature).max()), rel=1e-5)
    assert dashboard["de_embedding"]["top"][0]["score"] == pytest.approx(float(de_embedding(model, splices[1], feature).max()), rel=1e-5)
    mean, count = mean_feature_attributions(model, splices[0], splices[1], feature, tokens, batch_size=2)
    expected, seen = torch.zeros_like(mean), 0
    for row in tokens:
        trace = trace_prompt(model, splices, row)
        for pos in range(row.shape[0]):
            if trace.feature_acts[1][pos, feature] > 0:
                # the same-token path: feature 0 -> residual -> feature 1 (not through attention)
                direct = direct_contributions(trace, feature_target(trace, 1, feature, pos)).features[0]
                expected += direct
                seen += 1
    assert count == seen > 0
    torch.testing.assert_close(mean, expected / seen, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_splicing_replaces_the_mlp_output_the_release_writes(family: str) -> None:
    """hook_mlp_out is after Gemma's post-MLP norm, where Gemma Scope 2's transcoders write:
    spliced, that output is the transcoder's reconstruction of its (hook_mlp_in) input, and
    with the error term the model is unchanged."""
    model = build_family_model(family)
    transcoders = _transcoders(model, family)
    tokens = torch.randint(1, D_VOCAB, (2, CONTEXT), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        clean = model(tokens)
        with spliced(model, transcoders, use_error_term=True):
            torch.testing.assert_close(model(tokens), clean, rtol=1e-4, atol=1e-5)
        with spliced(model, transcoders):
            _, cache = model.run_with_cache(tokens)
        for layer, tc in enumerate(transcoders):
            x = cache[f"blocks.{layer}.{RELEASE_HOOKS[family]}"]
            torch.testing.assert_close(cache[f"blocks.{layer}.hook_mlp_out"], tc(x), rtol=1e-4, atol=1e-5)
    metrics = evaluate_spliced(model, transcoders, tokens)
    assert [t["hook_name"] for t in metrics["per_transcoder"]] == [f"blocks.{layer}.{RELEASE_HOOKS[family]}" for layer in range(N_LAYERS)]
    assert metrics["kl_div"] > 0 and torch.isfinite(torch.tensor(metrics["ce_loss_spliced"]))


@pytest.mark.parametrize(("family", "mlp_input_hook", "hook"), [("gemma3", "hook_mlp_in", "hook_mlp_in"), ("qwen3", "exact", "mlp.hook_in")])
def test_training_a_set_on_each_family(family: str, mlp_input_hook: str, hook: str, tmp_path: Path) -> None:
    """``mlp_input_hook: hook_mlp_in`` trains on the residual before the norm; ``exact`` on the MLP's own input."""
    model = build_family_model(family)
    ids = torch.randint(1, D_VOCAB, (300, CONTEXT), generator=torch.Generator().manual_seed(1))
    cfg = runner_config(
        sae={"mlp_layers": "0-1", "mlp_layer": None, "mlp_input_hook": mlp_input_hook, "d_sae": 128},
        training_tokens=CONTEXT * 160, output_path=str(tmp_path / "out"),
    )
    tokens = torch.randint(1, D_VOCAB, (4, CONTEXT), generator=torch.Generator().manual_seed(7))
    runner = TranscoderTrainingRunner(cfg, override_model=model, override_dataset=Dataset.from_dict({"input_ids": ids.tolist()}))
    trained = runner.run()
    loaded = [SAE.load_from_disk(tmp_path / "out" / f"layer_{layer}_sae") for layer in (0, 1)]
    assert [sae.cfg.metadata.hook_name for sae in loaded] == [f"blocks.{layer}.{hook}" for layer in (0, 1)]
    untrained = [random_transcoder(model, layer, hook=hook) for layer in (0, 1)]
    before, after = evaluate_spliced(model, untrained, tokens), evaluate_spliced(model, loaded, tokens)
    # Better than predicting the mean (EV 0) after 160 steps, and than untrained weights.
    assert after["explained_variance"] > max(0.1, before["explained_variance"])
    assert evaluate_spliced(model, list(trained.values()), tokens)["mse"] == pytest.approx(after["mse"], rel=1e-4)


def test_post_norm_blocks_are_refused_by_name() -> None:
    model = build_model("llama")
    model.cfg.original_architecture = "Olmo2ForCausalLM"
    with pytest.raises(ValueError, match="post-norm block.*pre-norm blocks"):
        trace_prompt(model, [random_transcoder(model, layer) for layer in (0, 1)], _prompt())


# ---------------------------------------------------------------- transcoders as released


def _assert_traces_exactly(model: HookedTransformer, transcoders: list[SAE]) -> None:  # type: ignore[type-arg]
    trace = trace_prompt(model, transcoders, _prompt())
    target = logit_target(trace, 11, 5, versus=7)
    expected = float(trace.logits[11, 5] - trace.logits[11, 7])
    assert direct_contributions(trace, target).total() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert any(acts.count_nonzero() > 0 for acts in trace.feature_acts.values())
    feature = int(trace.feature_acts[1][11].argmax())
    pre = feature_target(trace, 1, feature, 11)
    assert direct_contributions(trace, pre).total() == pytest.approx(target_value(trace, pre), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("affine", [False, True])
def test_gemma_scope_2_transcoders_as_released_read_the_mlps_normed_input(local_hub: LocalHub, affine: bool) -> None:
    """Their config reads ``pre_feedforward_layernorm.output``: SAELens names that hook_mlp_in
    (the residual before the norm); the splice reads mlp.hook_in, the tensor they were trained
    on, and circuits and splicing are exact through the JumpReLU thresholds and affine skip."""
    model = build_family_model("gemma3")
    released = gemma_scope_2_transcoders(local_hub, d_model=model.cfg.d_model, d_sae=48, n_layers=N_LAYERS, affine=affine)
    assert [tc.cfg.metadata.hook_name for tc in released.transcoders] == [f"blocks.{layer}.hook_mlp_in" for layer in range(N_LAYERS)]
    splices = as_splices(released.transcoders)
    assert [s.hook_name for s in splices] == [f"blocks.{layer}.mlp.hook_in" for layer in range(N_LAYERS)]
    _assert_traces_exactly(model, released.transcoders)
    tokens = torch.randint(1, D_VOCAB, (2, CONTEXT), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), spliced(model, released.transcoders):
        _, cache = model.run_with_cache(tokens)
    x = cache["blocks.1.mlp.hook_in"]
    torch.testing.assert_close(cache["blocks.1.hook_mlp_out"], released.transcoders[1](x), rtol=1e-4, atol=1e-5)


def test_qwen3_transcoders_as_released(local_hub: LocalHub) -> None:
    model = build_family_model("qwen3")
    released = qwen3_transcoders(local_hub, d_model=model.cfg.d_model, d_sae=48, n_layers=N_LAYERS)
    assert [s.hook_name for s in as_splices(released.transcoders)] == [f"blocks.{layer}.mlp.hook_in" for layer in range(N_LAYERS)]
    _assert_traces_exactly(model, released.transcoders)


def test_gemma_scope_gemma_2_transcoders_as_released(local_hub: LocalHub) -> None:
    model = build_family_model("gemma2")
    released = gemma_scope_2b_transcoders(local_hub, d_model=model.cfg.d_model, d_sae=48, n_layers=N_LAYERS)
    assert [s.hook_name for s in as_splices(released.transcoders)] == [f"blocks.{layer}.ln2.hook_normalized" for layer in range(N_LAYERS)]
    _assert_traces_exactly(model, released.transcoders)


@pytest.mark.parametrize("family", FAMILIES)
def test_default_hooks_are_the_mlps_input_and_the_post_normed_output(family: str) -> None:
    """mlp.hook_in feeds the MLP exactly; hook_mlp_out is what the block adds to the residual
    (on Gemma the post-MLP norm of the MLP's output); ln2.hook_normalized, before Gemma's and
    Qwen3's norm weight, is refused with the right hook named."""
    from sae_lens_transcoder.hooks import default_input_hook, validate_transcoder_hooks

    model = build_family_model(family)
    hook = default_input_hook(model, 1)
    assert hook == "blocks.1.mlp.hook_in"
    validate_transcoder_hooks(model, hook, "blocks.1.hook_mlp_out", model.cfg.d_model, model.cfg.d_model)
    _, cache = model.run_with_cache(_prompt()[None])
    block = model.blocks[1]
    with torch.no_grad():
        y = block.mlp(cache[hook])
        if family.startswith("gemma"):
            y = block.ln2_post(y)
    torch.testing.assert_close(y, cache["blocks.1.hook_mlp_out"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"Use hook_name='blocks\.1\.mlp\.hook_in'"):
        validate_transcoder_hooks(model, "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out", model.cfg.d_model, model.cfg.d_model)


@pytest.mark.parametrize("family", FAMILIES)
def test_local_checkpoints_load_offline_and_attribute_end_to_end(family: str, tmp_path: Path) -> None:
    """A Hugging Face directory of each family loads through ``models.load_model`` (Gemma from
    its family's official layout with the checkpoint's sizes) computing what transformers
    computes, and the attribute command's root is the loaded model's own logit gap."""
    import json

    from sae_lens_transcoder.cli import main
    from sae_lens_transcoder.models import load_model
    from tests.family_models import TOKENIZER

    hf_model, model = build_family_pair(family)
    checkpoint = tmp_path / f"tiny-{family}"
    hf_model.save_pretrained(checkpoint)
    TOKENIZER.save_pretrained(checkpoint)
    loaded = load_model(checkpoint)
    tokens = _prompt()[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), hf_model(tokens).logits, rtol=1e-4, atol=1e-5)
    assert loaded.cfg.use_normalization_before_and_after == model.cfg.use_normalization_before_and_after
    assert loaded.cfg.attn_types == model.cfg.attn_types and loaded.cfg.output_logits_soft_cap == model.cfg.output_logits_soft_cap
    paths = []
    for tc in _transcoders(model, family, kind="relu"):
        tc.cfg.metadata.model_name = str(checkpoint)
        tc.save_model(tmp_path / f"tc{len(paths)}")
        paths.append(str(tmp_path / f"tc{len(paths)}"))
    out = tmp_path / "graph"
    main(["attribute", "--transcoders", *paths, "--prompt", "To be, or not to be", "--out", str(out), "--max-expansions", "8"])
    with torch.no_grad():
        top2 = loaded(loaded.to_tokens("To be, or not to be"))[0, -1].topk(2).values
    assert json.loads((out / "summary.json").read_text())["root_value"] == pytest.approx(float(top2[0] - top2[1]), rel=1e-4)
