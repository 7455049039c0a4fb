"""Path search and attribution graphs: a hand-built model with a known circuit, and exactness."""

from collections import Counter

import pytest
import torch
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.transcoder import Transcoder, TranscoderConfig
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sae_lens_transcoder.circuits import Node, logit_target, trace_prompt
from sae_lens_transcoder.circuits.graph import build_graph, merge_positions, prune
from sae_lens_transcoder.circuits.paths import NodeSpec, avoids, ends_with, find_paths
from tests.circuit_fixtures import random_transcoder
from tests.conftest import build_model

TOKEN_A, TOKEN_B, ANSWER = 1, 2, 3
PROMPT = torch.tensor([0, TOKEN_B, 4, 5, TOKEN_A])  # token 0 plays BOS
F0, F1 = 2, 5  # the two features on the MLP path


def _known_circuit() -> tuple[HookedTransformer, list[Transcoder]]:
    """logit(ANSWER) at the last token = 1 via  embed(A) -> MLP0 feature F0 -> MLP1 feature F1,
    plus 0.4 via  embed(B) at token 1 -> layer-1 head 0 (uniform attention over 5 tokens, OV gain 2).
    The MLPs are ReLU MLPs equal to their transcoders, so error nodes are exactly zero."""
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, d_head=4, n_heads=1, d_mlp=8, n_ctx=8, d_vocab=8,
        act_fn="relu", normalization_type=None, positional_embedding_type="standard",
    )
    model = HookedTransformer(cfg)
    basis = torch.eye(16)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        model.W_E[:, :8] = torch.eye(8)
        model.blocks[0].mlp.W_in[:, F0] = basis[TOKEN_A]
        model.blocks[0].mlp.W_out[F0] = basis[10]
        model.blocks[1].mlp.W_in[:, F1] = basis[10]
        model.blocks[1].mlp.W_out[F1] = basis[12]
        model.blocks[1].attn.W_V[0, TOKEN_B, 0] = 1.0
        model.blocks[1].attn.W_O[0, 0] = 2 * basis[13]
        model.W_U[:, ANSWER] = basis[12] + basis[13]
    transcoders = []
    for layer in (0, 1):
        mlp = model.blocks[layer].mlp
        meta = SAEMetadata(hook_name=f"blocks.{layer}.mlp.hook_in", hook_name_out=f"blocks.{layer}.hook_mlp_out")
        tc = Transcoder(TranscoderConfig(d_in=16, d_sae=8, d_out=16, apply_b_dec_to_input=False, metadata=meta))
        tc.load_state_dict({"W_enc": mlp.W_in.detach(), "b_enc": mlp.b_in.detach(), "W_dec": mlp.W_out.detach(), "b_dec": mlp.b_out.detach()})
        transcoders.append(tc)
    return model, transcoders


def test_path_search_recovers_the_known_circuit() -> None:
    model, transcoders = _known_circuit()
    trace = trace_prompt(model, transcoders, PROMPT)
    root = logit_target(trace, 4, ANSWER)
    paths = find_paths(trace, root, num_iters=3, num_branches=3)
    chain = (root.node, Node("feature", 1, 4, F1), Node("feature", 0, 4, F0), Node("embed", -1, 4))
    assert paths[0].nodes == chain[:2] and paths[0].value == pytest.approx(1.0)
    full = [p for p in paths if p.nodes == chain]
    assert len(full) == 1 and full[0].value == pytest.approx(1.0)
    via_head = [p for p in paths if p.nodes == (root.node, Node("head", 1, 4, 0, 1), Node("embed", -1, 1))]
    assert len(via_head) == 1 and via_head[0].value == pytest.approx(0.4)
    # Attention to every other token carries nothing: those heads are never on a path.
    assert all(n.src in (-1, 1) for p in paths for n in p.nodes if n.kind == "head")


def test_path_filters_steer_the_search() -> None:
    model, transcoders = _known_circuit()
    trace = trace_prompt(model, transcoders, PROMPT)
    root = logit_target(trace, 4, ANSWER)
    no_heads = find_paths(trace, root, 3, 3, exclude=NodeSpec(kinds={"head"}))
    assert all(n.kind != "head" for p in no_heads for n in p.nodes)
    to_embeddings = find_paths(trace, root, 3, 3, path_filter=ends_with(NodeSpec(kinds={"embed"})))
    assert {p.nodes[-1].pos for p in to_embeddings} == {1, 4}
    skipping_f0 = find_paths(trace, root, 3, 3, path_filter=avoids(NodeSpec(kinds={"feature"}, layers={0})))
    assert Node("feature", 0, 4, F0) not in {n for p in skipping_f0 for n in p.nodes}
    only_layer_one = find_paths(trace, root, 3, 3, include=NodeSpec(kinds={"feature"}, layers={1}))
    assert [p.nodes for p in only_layer_one] == [(root.node, Node("feature", 1, 4, F1))]
    with pytest.raises(ValueError, match="num_branches=0"):
        find_paths(trace, root, 3, 0)


def test_graph_of_the_known_circuit_keeps_it_after_pruning() -> None:
    model, transcoders = _known_circuit()
    trace = trace_prompt(model, transcoders, PROMPT)
    graph = prune(build_graph(trace, logit_target(trace, 4, ANSWER)), node_threshold=0.99)
    f1, f0, head = Node("feature", 1, 4, F1), Node("feature", 0, 4, F0), Node("head", 1, 4, 0, 1)
    assert graph.edges[(f1, graph.root)] == pytest.approx(1.0)
    assert graph.edges[(f0, f1)] == pytest.approx(1.0)
    assert graph.edges[(Node("embed", -1, 4), f0)] == pytest.approx(1.0)
    assert graph.edges[(head, graph.root)] == pytest.approx(0.4)
    assert graph.edges[(Node("embed", -1, 1), head)] == pytest.approx(0.4)
    assert graph.root_value == pytest.approx(1.4)


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_graph_edges_into_every_expanded_node_sum_to_its_influence(arch: str) -> None:
    model = build_model(arch)
    trace = trace_prompt(model, [random_transcoder(model, layer) for layer in (0, 1)], torch.randint(1, 300, (10,)))
    graph = build_graph(trace, logit_target(trace, 9, 5, versus=7), max_expansions=400, min_influence=0.0)
    assert len(graph.expanded) == 401
    # Layer-0 features reached through several parents: their targets must sum all of them.
    parents = Counter(src for src, _ in graph.edges)
    assert any(n.kind == "feature" and n.layer == 0 and parents[n] > 1 for n in graph.expanded)
    for node in graph.expanded:
        assert sum(graph.incoming(node).values()) == pytest.approx(graph.influence[node], rel=1e-4, abs=1e-5)
    merged = merge_positions(graph)
    assert sum(merged.edges.values()) == pytest.approx(sum(graph.edges.values()), rel=1e-6)
    assert all(n.pos == -1 for n in merged.nodes if n != merged.root)
    pruned = prune(graph, node_threshold=0.5, edge_threshold=0.9)
    assert graph.root in pruned.nodes and len(pruned.nodes) < len(graph.nodes)
    assert all(src in pruned.influence and dst in pruned.influence for src, dst in pruned.edges)


def test_ablating_the_path_features_removes_exactly_their_contribution() -> None:
    from sae_lens_transcoder.splicing import ablated_features

    model, transcoders = _known_circuit()
    with torch.no_grad():
        clean = model(PROMPT[None])[0, 4, ANSWER]
        with ablated_features(model, transcoders, [(1, 4, F1)]):
            without_f1 = model(PROMPT[None])[0, 4, ANSWER]
        with ablated_features(model, transcoders, [(0, 4, F0)]):
            without_f0 = model(PROMPT[None])[0, 4, ANSWER]  # F1 loses its input, so the path goes too
        with ablated_features(model, transcoders, [(0, 3, F0)]):
            elsewhere = model(PROMPT[None])[0, 4, ANSWER]
    assert float(clean) == pytest.approx(1.4)
    assert float(without_f1) == pytest.approx(0.4) and float(without_f0) == pytest.approx(0.4)
    assert float(elsewhere) == pytest.approx(1.4)
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())
    with pytest.raises(ValueError, match="no transcoder given for layer 1"):
        with ablated_features(model, transcoders[:1], [(1, 4, F1)]):
            pass


def test_prune_keeps_at_most_max_nodes_of_the_most_influential() -> None:
    model = build_model("gpt2")
    trace = trace_prompt(model, [random_transcoder(model, layer) for layer in (0, 1)], torch.randint(1, 300, (8,)))
    graph = build_graph(trace, logit_target(trace, 7, 5), max_expansions=60, min_influence=0.0)
    unbounded = prune(graph, node_threshold=0.95, edge_threshold=1.0)
    bounded = prune(graph, node_threshold=0.95, edge_threshold=1.0, max_nodes=10)
    assert len(unbounded.nodes) > 11 and 1 < len(bounded.nodes) <= 11  # the root and up to 10 more
    ranked = sorted((n for n in graph.influence if n != graph.root), key=lambda n: -abs(graph.influence[n]))
    assert set(bounded.nodes) - {graph.root} <= set(ranked[:10])
