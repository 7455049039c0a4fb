"""Attribution graphs written out: viewer JSON (against its schema), head folding, HTML, PNG, path text."""

import html
import json
import re
import tempfile
import struct
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from sae_lens_transcoder.circuits import Node, logit_target, trace_prompt
from sae_lens_transcoder.circuits.graph import AttributionGraph, build_graph, merge_positions, prune
from sae_lens_transcoder.circuits.graph_fold import fold_attention_heads, fold_extra_nodes
from sae_lens_transcoder.circuits.graph_json import display_token, graph_to_json, load_graph_schema, save_graph_json
from sae_lens_transcoder.circuits.graph_plot import KIND_NAMES, _layout, format_paths, logit_lens_labels, save_graph_html, save_graph_png
from sae_lens_transcoder.circuits.paths import find_paths
from sae_lens_transcoder.circuits.trace import Trace
from sae_lens_transcoder.features.paths import cantor_pair
from sae_lens_transcoder.models import load_model
from tests.circuit_fixtures import random_transcoder
from tests.conftest import build_model
from tests.test_circuits_paths_graph import ANSWER, F0, F1, PROMPT, TOKEN_A, TOKEN_B, _known_circuit

def validate(data: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(load_graph_schema()).validate(data)


def check_consistent(data: dict[str, Any]) -> None:
    """Schema, unique ids, links between nodes, and the keys the viewer builds from nodes."""
    validate(data)
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(set(ids)) == len(ids)
    assert all(link["source"] in ids and link["target"] in ids for link in data["links"])
    assert len({(l["source"], l["target"]) for l in data["links"]}) == len(data["links"])
    viewer_keys = [(n["layer"], n["feature"], n["ctx_idx"]) for n in data["nodes"]]
    assert len(set(viewer_keys)) == len(viewer_keys)
    assert all(n["ctx_idx"] < len(data["metadata"]["prompt_tokens"]) for n in data["nodes"])
    for n in data["nodes"]:
        if n["feature_type"] == "cross layer transcoder":
            layer, index, pos = map(int, n["node_id"].split("_"))
            assert (n["feature"], n["layer"], n["ctx_idx"]) == (cantor_pair(layer, index), str(layer), pos)
            assert n["jsNodeId"] == f"{layer}_{index}-0"
        elif n["feature_type"] == "mlp reconstruction error":
            assert n["node_id"] == f"{n['layer']}_-1_{n['ctx_idx']}" and n["feature"] == -1 and n["activation"] is None
    logits = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    assert all(re.fullmatch(r'Output "[^"]*" \(p=[0-9.]+\)', n["clerp"]) for n in logits)
    numeric = [int(n["layer"]) for n in data["nodes"] if n["layer"] != "E" and n["feature_type"] != "logit"]
    assert all(int(n["layer"]) > max(numeric, default=-1) for n in logits)


def links_of(data: dict[str, Any]) -> dict[tuple[str, str], float]:
    return {(link["source"], link["target"]): link["weight"] for link in data["links"]}


@pytest.fixture(scope="module")
def known() -> tuple[Trace, AttributionGraph]:
    """The hand-built circuit's unpruned graph."""
    model, transcoders = _known_circuit()
    trace = trace_prompt(model, transcoders, PROMPT)
    return trace, build_graph(trace, logit_target(trace, 4, ANSWER))


@pytest.fixture(scope="module")
def random_graph() -> tuple[Trace, AttributionGraph]:
    model = build_model("gpt2")
    torch.manual_seed(0)
    trace = trace_prompt(model, [random_transcoder(model, layer) for layer in (0, 1)], torch.randint(1, 300, (6,)))
    graph = build_graph(trace, logit_target(trace, 5, 5, versus=7), max_expansions=80, min_influence=0.02)
    assert any(n.kind == "head" for n in graph.expanded)
    return trace, graph


def test_known_circuit_json_has_its_edges_with_their_weights(known: tuple[Trace, AttributionGraph]) -> None:
    trace, graph = known
    embed_a, embed_b = f"E_{TOKEN_A}_4", f"E_{TOKEN_B}_1"
    f0, f1, logit = f"0_{F0}_4", f"1_{F1}_4", f"3_{ANSWER}_4"  # logits sit at layer n_layers + 1
    head = "1_-1001_4"  # head 0 of layer 1 reading token 1 of 5
    kept = graph_to_json(graph, "known", trace=trace, target_token=ANSWER, node_threshold=0.99, keep_extra_nodes=True)
    check_consistent(kept)
    assert links_of(kept) == pytest.approx(
        {(embed_a, f0): 1.0, (f0, f1): 1.0, (f1, logit): 1.0, (embed_b, head): 0.4, (head, logit): 0.4}
    )
    nodes = {n["node_id"]: n for n in kept["nodes"]}
    assert nodes[logit]["is_target_logit"] and nodes[logit]["feature_type"] == "logit" and nodes[logit]["feature"] == ANSWER
    assert nodes[logit]["jsNodeId"] == f"L_{ANSWER}-4" and nodes[logit]["layer"] == "3"
    assert nodes[logit]["token_prob"] == pytest.approx(float(trace.logits[4].softmax(-1)[ANSWER]))
    assert nodes[logit]["influence"] is None and nodes[f1]["activation"] == pytest.approx(1.0)
    assert nodes[f0]["feature"] == cantor_pair(0, F0) and nodes[f1]["feature"] == cantor_pair(1, F1)
    assert nodes[embed_a]["feature_type"] == "embedding" and nodes[embed_a]["feature"] == 4
    assert nodes[embed_a]["jsNodeId"] == f"E_{TOKEN_A}-4"
    assert nodes[head]["feature_type"] == "attention head" and nodes[head]["activation"] is None
    assert nodes[head]["ctx_idx"] == 4 and nodes[embed_b]["ctx_idx"] == 1
    assert {n["ctx_idx"] for n in kept["nodes"]} == set(range(5))  # every token's embedding is written
    assert kept["metadata"]["node_threshold"] == 0.99 and kept["metadata"]["schema_version"] == 1
    assert len(kept["metadata"]["prompt_tokens"]) == 5
    for broken in ({**kept["nodes"][1], "layer": 1}, {k: v for k, v in kept["nodes"][1].items() if k != "clerp"}):
        with pytest.raises(jsonschema.ValidationError):  # the validator is not vacuous
            validate({**kept, "nodes": [broken]})

    folded = graph_to_json(graph, "known", trace=trace, target_token=ANSWER, node_threshold=0.99)
    check_consistent(folded)
    assert {n["feature_type"] for n in folded["nodes"]} == {"embedding", "cross layer transcoder", "logit"}
    assert links_of(folded) == pytest.approx({(embed_a, f0): 1.0, (f0, f1): 1.0, (f1, logit): 1.0, (embed_b, logit): 0.4})


def test_random_graph_json_validates_and_keeps_the_pruned_weights(
    random_graph: tuple[Trace, AttributionGraph], tmp_path: Path
) -> None:
    trace, graph = random_graph
    for keep in (True, False):
        for threshold in (None, 0.8):
            slug = f"g-{keep}-{threshold}"
            path = save_graph_json(graph, tmp_path, slug=slug, trace=trace, target_label="5 − 7", node_threshold=threshold,
                                   keep_extra_nodes=keep)
            data = json.loads(path.read_text(encoding="utf-8"))
            check_consistent(data)
            types = {n["feature_type"] for n in data["nodes"]}
            assert types >= {"cross layer transcoder", "embedding", "logit"} and (("attention head" in types) == keep)
            logit = next(n for n in data["nodes"] if n["feature_type"] == "logit")
            assert logit["feature"] == trace.model.cfg.d_vocab  # circuit-tracer's virtual id of a logit function
            assert logit["clerp"].startswith('Output "5 − 7" (p=')
            written = fold_extra_nodes(graph) if not keep else graph
            expected = written if threshold is None else prune(written, threshold, 0.98)
            assert len(data["links"]) == len(expected.edges)
            assert sorted(link["weight"] for link in data["links"]) == pytest.approx(sorted(expected.edges.values()), rel=1e-12)
    listing = json.loads((tmp_path / "graph-metadata.json").read_text(encoding="utf-8"))
    assert len(listing["graphs"]) == 4
    assert all(g["prompt_tokens"] == trace.str_tokens() for g in listing["graphs"])  # no tokenizer: the trace's strings
    custom = graph_to_json(graph, "custom", scan=["tc-layer-0", "tc-layer-1"], trace=trace)
    assert custom["metadata"]["scan"].startswith("custom-") and custom["metadata"]["transcoder_list"] == ["tc-layer-0", "tc-layer-1"]
    one_set = graph_to_json(graph, "one", scan={0: "my-set", 1: "my-set"}, trace=trace)
    assert one_set["metadata"]["scan"] == "my-set" and one_set["metadata"]["transcoder_list"] == []
    with pytest.raises(ValueError, match="merging positions"):
        graph_to_json(merge_positions(graph), "merged", trace=trace)
    with pytest.raises(ValueError, match="target_token"):
        graph_to_json(graph, "no-vocab")


def test_folding_heads_keeps_every_incoming_total(random_graph: tuple[Trace, AttributionGraph]) -> None:
    _, graph = random_graph
    folded = fold_attention_heads(graph)
    assert sum(folded.incoming(folded.root).values()) == pytest.approx(sum(graph.incoming(graph.root).values()), rel=1e-5)
    for node in folded.expanded:
        assert sum(folded.incoming(node).values()) == pytest.approx(sum(graph.incoming(node).values()), rel=1e-4, abs=1e-6)
    heads = [n for n in folded.nodes if n.kind == "head"]
    assert len(heads) < sum(n.kind == "head" for n in graph.nodes)
    assert all(not graph.incoming(n) for n in heads)  # only heads with nothing to pass on stay
    assert all(s in folded.influence and d in folded.influence and d.kind != "head" for s, d in folded.edges)
    assert all(folded.influence[n] == graph.influence[n] for n in folded.influence)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _drawn_nodes(text: str) -> list[str]:
    return re.findall(r'class="node[ "]', text)


def test_html_and_png_pictures_draw_the_pruned_graph_labelled(
    known: tuple[Trace, AttributionGraph], random_graph: tuple[Trace, AttributionGraph], tmp_path: Path
) -> None:
    full = random_graph[1]
    drawn = prune(full, 0.8, 0.98, max_nodes=60)
    assert len(full.nodes) > 100 and len(drawn.nodes) <= 61
    for name, graph, expected in (("known", known[1], prune(known[1], 0.8, 0.98)), ("random", full, drawn)):
        text = save_graph_html(graph, tmp_path / f"{name}.html").read_text(encoding="utf-8")
        assert text.startswith("<!DOCTYPE html>") and text.count("<svg") == 1 and 'width="1920"' in text
        assert len(_drawn_nodes(text)) == len(expected.nodes)  # the pruned graph within the node budget
        assert len(re.findall(r'<path class="edge"', text)) == len(expected.edges)
        assert "http" not in text.lower() and "<script src" not in text
        assert 'class="node root"' in text and "influence: " in text
        captions = re.findall(r'class="caption">([^<]*)<', text)
        assert len(captions) == len(expected.nodes)  # every node labelled
        for node in expected.nodes:
            if node.kind == "feature":
                assert f"L{node.layer}/{node.index}" in captions
            elif node.kind == "head":
                assert f"L{node.layer}.H{node.index}" in captions
        for kind in {n.kind for n in expected.nodes}:  # a legend entry per kind drawn
            assert f">{KIND_NAMES[kind]}</text>" in text
        width, height = _png_size(save_graph_png(graph, tmp_path / f"{name}.png"))
        assert width == 1920 and height > 200 and (tmp_path / f"{name}.png").stat().st_size > 1000
    # A head sits in its destination token's column, whatever token it reads.
    layout = _layout(drawn)
    for node in drawn.nodes:
        left, span, _, pos = next(c for c in layout.columns if c[3] == node.pos)
        assert left < layout.xy[node][0] < left + span
    assert any(n.kind == "head" and n.src != n.pos for n in drawn.nodes)
    everything = save_graph_html(full, tmp_path / "all.html", node_threshold=None).read_text(encoding="utf-8")
    assert len(_drawn_nodes(everything)) == len(full.nodes)
    strongest = save_graph_html(known[1], tmp_path / "top2.html", max_edges=2).read_text(encoding="utf-8")
    assert len(re.findall(r'<path class="edge"', strongest)) == 2
    merged = merge_positions(prune(full, 0.8, 0.98))
    text = save_graph_html(merged, tmp_path / "m.html", node_threshold=None).read_text()
    assert len(_drawn_nodes(text)) == len(merged.nodes) and ">all</text>" in text


def test_logit_lens_labels_name_the_top_token_of_each_feature() -> None:
    model = load_model("tiny-gpt2")
    transcoders = [random_transcoder(model, layer) for layer in range(model.cfg.n_layers)]
    trace = trace_prompt(model, transcoders, "To be, or not to be")
    graph = prune(build_graph(trace, logit_target(trace, trace.n_pos - 1, 11), max_expansions=8), 0.8, 0.98, max_nodes=20)
    labels = logit_lens_labels(trace, graph)
    features = [n for n in graph.nodes if n.kind == "feature"]
    assert features and set(labels) == set(features)
    for node in features:
        decoder = transcoders[node.layer].W_dec[node.index].detach()
        centred = decoder - decoder.mean()  # what the final LayerNorm reads of it: centred, times its weight
        scores = (centred * model.ln_final.w.detach()) @ model.W_U.detach()
        assert labels[node] == "→" + json.dumps(display_token(model.to_single_str_token(int(scores.argmax()))), ensure_ascii=False)
    text = save_graph_html(graph, Path(tempfile.mkdtemp()) / "g.html", labels=labels, node_threshold=None).read_text(encoding="utf-8")
    drawn = [html.unescape(t) for t in re.findall(r'class="label">([^<]*)<', text)]
    for label in labels.values():  # under each feature, whole or cut to its slot
        assert any(t == label or (t.endswith("…") and label.startswith(t[:-1])) for t in drawn), label


def test_format_paths_names_nodes_with_their_tokens(known: tuple[Trace, AttributionGraph]) -> None:
    trace, _ = known
    paths = find_paths(trace, logit_target(trace, 4, ANSWER), num_iters=3, num_branches=3)
    lines = format_paths(paths, trace.str_tokens()).splitlines()
    assert len(lines) == len(paths)
    assert lines[0].startswith("  1. +1.0000  target @4\"<1>\" <- L1.F5 @4\"<1>\"")
    assert any(line.endswith("L1.F5 @4\"<1>\" <- L0.F2 @4\"<1>\" <- emb @4\"<1>\"") for line in lines)
    assert any("+0.4000" in line and "L1.H0 @4\"<1>\"<-1\"<2>\" <- emb @1\"<2>\"" in line for line in lines)
    assert format_paths([], trace.str_tokens()) == ""
    assert Node("head", 1, 4, 0, 1) in {n for p in paths for n in p.nodes}
