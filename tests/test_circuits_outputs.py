"""Attribution graphs written out: viewer JSON (against its schema), head folding, HTML, PNG, path text."""

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

from sae_lens_transcoder.circuits import Node, logit_target, trace_prompt
from sae_lens_transcoder.circuits.graph import AttributionGraph, build_graph, merge_positions, prune
from sae_lens_transcoder.circuits.graph_json import (
    fold_attention_heads,
    graph_to_json,
    json_node_ids,
    load_graph_schema,
    save_graph_json,
)
from sae_lens_transcoder.circuits.graph_plot import format_paths, save_graph_html, save_graph_png
from sae_lens_transcoder.circuits.paths import find_paths
from sae_lens_transcoder.circuits.trace import Trace
from tests.circuit_fixtures import random_transcoder
from tests.conftest import build_model
from tests.test_circuits_paths_graph import ANSWER, F0, F1, PROMPT, TOKEN_A, TOKEN_B, _known_circuit

_TYPES = {
    "object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
    "integer": int, "number": (int, float),
}


def _mini_validate(value: Any, schema: dict[str, Any], root: dict[str, Any], where: str = "$") -> None:
    """The subset of JSON Schema that graph_schema.json uses (jsonschema is not installed here)."""
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/$defs/")
        return _mini_validate(value, root["$defs"][name], root, where)
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        ok = any(isinstance(value, _TYPES[t]) and not (t in ("integer", "number") and isinstance(value, bool)) for t in types)
        assert ok, f"{where}: {value!r} is not of type {types}"
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        assert math.isfinite(value), f"{where}: {value!r} is not finite"
        assert value >= schema.get("minimum", -math.inf), f"{where}: {value} < minimum"
        assert value <= schema.get("maximum", math.inf), f"{where}: {value} > maximum"
    if isinstance(value, str):
        assert len(value) >= schema.get("minLength", 0), f"{where}: too short"
        if "pattern" in schema:
            assert re.search(schema["pattern"], value), f"{where}: {value!r} does not match {schema['pattern']}"
    if isinstance(value, dict):
        missing = set(schema.get("required", [])) - set(value)
        assert not missing, f"{where}: missing {missing}"
        properties = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(properties), f"{where}: unexpected {set(value) - set(properties)}"
        for key, item in value.items():
            if key in properties:
                _mini_validate(item, properties[key], root, f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _mini_validate(item, schema["items"], root, f"{where}[{i}]")


def validate(data: dict[str, Any]) -> None:
    schema = load_graph_schema()
    try:
        import jsonschema
    except ImportError:
        _mini_validate(data, schema, schema)
    else:
        jsonschema.Draft202012Validator(schema).validate(data)


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
    logits = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    assert all(re.fullmatch(r'Output "[^"]*" \(p=[0-9.]+\)', n["clerp"]) for n in logits)
    numeric = [int(n["layer"]) for n in data["nodes"] if n["layer"] != "E" and n["feature_type"] != "logit"]
    assert all(int(n["layer"]) > max(numeric, default=-1) for n in logits)


def links_of(data: dict[str, Any]) -> dict[tuple[str, str], float]:
    return {(link["source"], link["target"]): link["weight"] for link in data["links"]}


@pytest.fixture(scope="module")
def known() -> tuple[Trace, AttributionGraph]:
    model, transcoders = _known_circuit()
    trace = trace_prompt(model, transcoders, PROMPT)
    return trace, prune(build_graph(trace, logit_target(trace, 4, ANSWER)), node_threshold=0.99)


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
    data = graph_to_json(graph, "known", trace=trace, target_token=ANSWER, node_threshold=0.99)
    check_consistent(data)
    embed_a, embed_b = f"E_{TOKEN_A}_4", f"E_{TOKEN_B}_1"
    f0, f1, head, logit = f"0_{F0}_4", f"1_{F1}_4", "1_-1001_4", f"3_{ANSWER}_4"  # head 0 reading token 1 of 5
    assert links_of(data) == pytest.approx(
        {(embed_a, f0): 1.0, (f0, f1): 1.0, (f1, logit): 1.0, (embed_b, head): 0.4, (head, logit): 0.4}
    )
    nodes = {n["node_id"]: n for n in data["nodes"]}
    assert nodes[logit]["is_target_logit"] and nodes[logit]["feature_type"] == "logit"
    assert nodes[logit]["token_prob"] == pytest.approx(float(trace.logits[4].softmax(-1)[ANSWER]))
    assert nodes[logit]["influence"] is None and nodes[f1]["activation"] == pytest.approx(1.0)
    assert nodes[f0]["feature_type"] == "cross layer transcoder" and nodes[embed_a]["feature_type"] == "embedding"
    assert nodes[head]["feature_type"] == "attention head" and nodes[head]["activation"] is None
    assert max(n["influence"] for n in data["nodes"] if n["influence"] is not None) == pytest.approx(1.0)
    assert data["metadata"]["node_threshold"] == 0.99 and len(data["metadata"]["prompt_tokens"]) == 5
    for broken in ({**data["nodes"][1], "layer": 1}, {k: v for k, v in data["nodes"][1].items() if k != "clerp"}):
        with pytest.raises(Exception):  # the validator is not vacuous
            validate({**data, "nodes": [broken]})

    folded = graph_to_json(graph, "known", trace=trace, target_token=ANSWER, fold_heads=True)
    check_consistent(folded)
    assert all(n["feature_type"] != "attention head" for n in folded["nodes"])
    assert links_of(folded) == pytest.approx({(embed_a, f0): 1.0, (f0, f1): 1.0, (f1, logit): 1.0, (embed_b, logit): 0.4})


def test_random_graph_json_validates_and_round_trips_the_weights(
    random_graph: tuple[Trace, AttributionGraph], tmp_path: Path
) -> None:
    trace, graph = random_graph
    for g in (graph, prune(graph, node_threshold=0.8, edge_threshold=0.98)):
        path = save_graph_json(g, tmp_path, slug=f"g{len(g.nodes)}", trace=trace, target_token=5, target_label="5 − 7")
        data = json.loads(path.read_text(encoding="utf-8"))
        check_consistent(data)
        assert {n["feature_type"] for n in data["nodes"]} >= {"cross layer transcoder", "attention head", "embedding", "logit"}
        ids = json_node_ids(g, target_token=5)
        assert [n["node_id"] for n in data["nodes"]] == [ids[n] for n in g.nodes]
        assert links_of(data) == {(ids[s], ids[d]): w for (s, d), w in g.edges.items()}  # exactly
        shares = {n["node_id"]: n["influence"] for n in data["nodes"]}
        ranked = sorted((n for n in g.nodes if n != g.root), key=lambda n: abs(g.influence[n]))
        assert all(shares[ids[a]] >= shares[ids[b]] - 1e-12 for a, b in zip(ranked, ranked[1:]))
    listing = json.loads((tmp_path / "graph-metadata.json").read_text(encoding="utf-8"))
    assert len(listing["graphs"]) == 2 and all(g["prompt_tokens"] == trace.str_tokens() for g in listing["graphs"])
    custom = graph_to_json(graph, "custom", scan=["tc-layer-0", "tc-layer-1"])
    assert custom["metadata"]["scan"].startswith("custom-") and custom["metadata"]["transcoder_list"] == ["tc-layer-0", "tc-layer-1"]
    with pytest.raises(ValueError, match="merging positions"):
        graph_to_json(merge_positions(graph), "merged")


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
    check_consistent(graph_to_json(graph, "folded", fold_heads=True))


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_html_and_png_pictures(
    known: tuple[Trace, AttributionGraph], random_graph: tuple[Trace, AttributionGraph], tmp_path: Path
) -> None:
    for name, graph in (("known", known[1]), ("random", prune(random_graph[1], 0.8, 0.98))):
        html_path = save_graph_html(graph, tmp_path / f"{name}.html")
        text = html_path.read_text(encoding="utf-8")
        assert text.startswith("<!DOCTYPE html>") and text.count("<svg") == 1
        assert len(re.findall(r'<circle class="node', text)) == len(graph.nodes)
        assert len(re.findall(r'<path class="edge"', text)) == len(graph.edges)
        assert "http" not in text.lower() and "<script src" not in text
        assert 'class="node root"' in text and "influence: " in text
        width, height = _png_size(save_graph_png(graph, tmp_path / f"{name}.png"))
        assert width > 100 and height > 100 and (tmp_path / f"{name}.png").stat().st_size > 1000
    strongest = save_graph_html(known[1], tmp_path / "top2.html", max_edges=2).read_text(encoding="utf-8")
    assert len(re.findall(r'<path class="edge"', strongest)) == 2
    merged = merge_positions(random_graph[1])
    assert len(re.findall(r'<circle class="node', save_graph_html(merged, tmp_path / "m.html").read_text())) == len(merged.nodes)


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
