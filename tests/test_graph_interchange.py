"""Our graph JSON next to circuit-tracer's own: same fields, ids, token strings and influence meaning.

``fixtures/circuit_tracer_graph.json`` is a graph circuit-tracer 0.5.0 itself wrote
(``attribute`` + ``create_graph_files``, through ``benchmarks/check_graph_json_circuit_tracer.py
--reference``) for the bundled tiny model, random transcoders and ``FIXTURE_PROMPT``; the
tests here trace the same model and prompt with our code.
"""

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from sae_lens_transcoder.circuits import logit_target, trace_prompt
from sae_lens_transcoder.circuits.command import attribute
from sae_lens_transcoder.circuits.graph import AttributionGraph, build_graph, prune
from sae_lens_transcoder.circuits.graph_fold import ACCEPTED_KINDS, fold_extra_nodes
from sae_lens_transcoder.circuits.graph_json import graph_to_json
from sae_lens_transcoder.circuits.nodes import Node
from sae_lens_transcoder.circuits.portable_ids import transcoder_id
from sae_lens_transcoder.circuits.trace import Trace
from sae_lens_transcoder.export.circuit_tracer import export_circuit_tracer
from sae_lens_transcoder.features.paths import cantor_pair
from sae_lens_transcoder.features.paths import feature_file_relpath, scan_for_layer
from sae_lens_transcoder.models import load_model
from tests.circuit_fixtures import random_transcoder, save_random_transcoders
from tests.test_circuits_outputs import check_consistent, validate

FIXTURE = Path(__file__).with_name("fixtures") / "circuit_tracer_graph.json"
FIXTURE_PROMPT = "The cat sat on the mat because it was warm and the dog was"
VIEWER_ALWAYS = ("embedding", "logit")


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tiny_trace() -> tuple[Trace, AttributionGraph]:
    model = load_model("tiny-gpt2")
    transcoders = [random_transcoder(model, layer, kind="skip") for layer in range(model.cfg.n_layers)]
    trace = trace_prompt(model, transcoders, FIXTURE_PROMPT)
    token = int(trace.logits[-1].argmax())
    return trace, build_graph(trace, logit_target(trace, trace.n_pos - 1, token), max_expansions=200, min_influence=0.0)


def _shown_by_viewer(data: dict[str, Any], threshold: float) -> set[str]:
    """The nodes circuit-tracer's viewer keeps with its pruning slider at ``threshold``."""
    return {
        n["node_id"] for n in data["nodes"]
        if n["feature_type"] in VIEWER_ALWAYS or n["influence"] is None or n["influence"] <= threshold
    }


def _incoming_totals(graph: AttributionGraph) -> dict[Node, float]:
    totals: dict[Node, float] = defaultdict(float)
    for (_, dst), weight in graph.edges.items():
        totals[dst] += weight
    return totals


def test_our_schema_accepts_circuit_tracers_own_graph(reference: dict[str, Any]) -> None:
    validate(reference)
    check_ids = {n["node_id"] for n in reference["nodes"]}
    assert all(link["source"] in check_ids and link["target"] in check_ids for link in reference["links"])
    with pytest.raises(jsonschema.ValidationError):
        validate({**reference, "nodes": [{**reference["nodes"][0], "ctx_idx": "3"}]})


def test_our_file_has_circuit_tracers_fields_ids_and_tokens(
    reference: dict[str, Any], tiny_trace: tuple[Trace, AttributionGraph]
) -> None:
    trace, graph = tiny_trace
    ours = graph_to_json(graph, "ours", trace=trace, target_token=graph.root.index, prompt=FIXTURE_PROMPT)
    check_consistent(ours)
    assert ours.keys() == reference.keys() and ours["qParams"] == reference["qParams"]
    assert ours["metadata"].keys() == reference["metadata"].keys()
    assert ours["metadata"]["prompt_tokens"] == reference["metadata"]["prompt_tokens"]  # decoded as circuit-tracer does
    assert ours["metadata"]["prompt"] == reference["metadata"]["prompt"]
    assert ours["metadata"]["schema_version"] == reference["metadata"]["schema_version"] == 1

    def by_type(data: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for n in data["nodes"]:
            out.setdefault(n["feature_type"], []).append(n)
        return out

    theirs, mine = by_type(reference), by_type(ours)
    assert mine.keys() == theirs.keys() == {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}
    for kind, nodes in theirs.items():  # the same fields with the same JSON types, kind by kind
        shape = {(k, type(v).__name__) for k, v in nodes[0].items() if v is not None}
        assert all({(k, type(v).__name__) for k, v in n.items() if v is not None} == shape for n in mine[kind]), kind
    # Token nodes: circuit-tracer writes every token's, with the same ids for the same prompt.
    assert {n["node_id"] for n in mine["embedding"]} == {n["node_id"] for n in theirs["embedding"]}
    assert {(n["jsNodeId"], n["feature"]) for n in mine["embedding"]} == {(n["jsNodeId"], n["feature"]) for n in theirs["embedding"]}
    # Logits one layer above n_layers, at the last token, circuit-tracer's ids and label.
    (logit,) = mine["logit"]
    top = next(n for n in theirs["logit"] if n["is_target_logit"])
    assert (logit["layer"], logit["ctx_idx"], logit["influence"]) == (top["layer"], top["ctx_idx"], top["influence"])
    assert logit["node_id"] == f"{logit['layer']}_{logit['feature']}_{logit['ctx_idx']}" and logit["jsNodeId"] == f"L_{logit['feature']}-{logit['ctx_idx']}"
    assert re.fullmatch(r'Output ".*" \(p=\d\.\d{3}\)', logit["clerp"], re.DOTALL)  # the raw token, as circuit-tracer
    assert logit["feature"] == top["feature"] and logit["token_prob"] == pytest.approx(top["token_prob"], rel=1e-4)
    for n in theirs["cross layer transcoder"] + mine["cross layer transcoder"]:
        layer, index, pos = map(int, n["node_id"].split("_"))
        assert n["feature"] == cantor_pair(layer, index) and n["jsNodeId"] == f"{layer}_{index}-0" and n["ctx_idx"] == pos
    assert {n["ctx_idx"] for n in mine["cross layer transcoder"]} >= {trace.n_pos - 1}
    positions = {n["ctx_idx"] for n in ours["nodes"] if n["feature_type"] != "embedding"}
    assert len(positions) > 1, "nodes upstream of heads sit at their own tokens"


def test_influence_is_ranked_over_the_unpruned_graph(tiny_trace: tuple[Trace, AttributionGraph]) -> None:
    trace, graph = tiny_trace
    folded = fold_extra_nodes(graph)
    for threshold in (0.8, 0.5):
        data = graph_to_json(graph, "g", trace=trace, target_token=graph.root.index, node_threshold=threshold)
        pruned = prune(folded, threshold, 0.98)
        non_embedding = {n["node_id"] for n in data["nodes"] if n["feature_type"] != "embedding"}
        assert len(non_embedding) == len(pruned.nodes) - sum(n.kind == "embed" for n in pruned.nodes)
        # The viewer opens at node_threshold and then shows the pruned graph: all of it but the
        # node whose share crosses the threshold (as with circuit-tracer's own files).
        hidden = non_embedding - _shown_by_viewer(data, threshold)
        assert len(hidden) <= 1
        # Shares are cumulative over the unpruned graph, recomputed here from its influences.
        ranked = sorted((n for n in folded.influence if n != folded.root), key=lambda n: -abs(folded.influence[n]))
        total = sum(abs(folded.influence[n]) for n in ranked)
        running, expected = 0.0, {}
        for node in ranked:
            running += abs(folded.influence[node])
            expected[node] = running / total
        shares = {n["node_id"]: n["influence"] for n in data["nodes"]}
        feature_shares = {n: expected[n] for n in pruned.nodes if n.kind == "feature"}
        for node, share in feature_shares.items():
            assert shares[f"{node.layer}_{node.index}_{node.pos}"] == pytest.approx(share, rel=1e-9)
        assert feature_shares and max(feature_shares.values()) >= threshold - 0.05  # not a share of the pruned graph


def test_folding_leaves_only_circuit_tracer_kinds_and_every_total(tiny_trace: tuple[Trace, AttributionGraph]) -> None:
    _, graph = tiny_trace
    kinds = {n.kind for n in graph.influence}
    assert {"head", "skip", "transcoder_bias", "pos_embed", "attn_bias", "target_bias"} <= kinds
    folded = fold_extra_nodes(graph)
    assert {n.kind for n in folded.influence} <= ACCEPTED_KINDS
    before, after = _incoming_totals(graph), _incoming_totals(folded)
    assert folded.expanded and all(after[n] == pytest.approx(before[n], rel=1e-4, abs=1e-6) for n in folded.expanded)
    assert after[folded.root] == pytest.approx(graph.root_value, rel=1e-4)
    errors = [n for n in folded.influence if n.kind == "error"]
    assert all(0 <= n.layer < 2 and 0 <= n.pos < len(graph.tokens) for n in errors)
    labels = {n["clerp"] for n in graph_to_json(graph, "g", target_token=graph.root.index, node_threshold=None)["nodes"]}
    assert any("skip" in label and label.startswith("Err: mlp") for label in labels)  # what an error node absorbed


def test_portable_ids_never_name_a_local_path(tmp_path: Path) -> None:
    model = load_model("tiny-gpt2")
    dirs = save_random_transcoders(model, tmp_path, range(model.cfg.n_layers))
    assert transcoder_id(dirs[0]) == "local/layer0" and transcoder_id("gemma-scope-2b-pt-transcoders/layer_3") == "gemma-scope-2b-pt-transcoders/layer_3"
    ct_set = export_circuit_tracer([random_transcoder(model, layer) for layer in range(2)], tmp_path / "ct", "tiny-gpt2", scan="tiny/my-set")
    assert transcoder_id(str(ct_set)) == "tiny/my-set"
    summary = attribute(["--transcoders", *dirs, "--prompt", "To be, or not to be", "--out", str(tmp_path / "g"), "--max-expansions", "8"])
    data = json.loads(Path(summary["graph_json"]).read_text(encoding="utf-8"))
    check_consistent(data)
    assert data["metadata"]["transcoder_list"] == ["local/layer0", "local/layer1"] and data["metadata"]["scan"].startswith("custom-")
    assert str(tmp_path) not in json.dumps(data["metadata"]) + (tmp_path / "g" / "graph-metadata.json").read_text()
    assert {n["feature_type"] for n in data["nodes"]} <= {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}
    kept = attribute(["--transcoders", str(ct_set), "--prompt", "To be, or not to be", "--out", str(tmp_path / "k"),
                      "--max-expansions", "8", "--keep-extra-nodes", "--model", "tiny-gpt2"])
    kept_data = json.loads(Path(kept["graph_json"]).read_text(encoding="utf-8"))
    assert kept_data["metadata"]["scan"] == "tiny/my-set" and kept_data["metadata"]["transcoder_list"] == []
    assert "attention head" in {n["feature_type"] for n in kept_data["nodes"]}
    feature = next(n for n in kept_data["nodes"] if n["feature_type"] == "cross layer transcoder")
    layer, index, _ = map(int, feature["node_id"].split("_"))
    # The viewer's feature files live under these ids (the feature-file writer's layout).
    assert feature_file_relpath(scan_for_layer(kept_data["metadata"], layer), layer, index) == f"features/tiny/my-set/{feature['feature']}.json"
    assert feature_file_relpath(scan_for_layer(data["metadata"], 1), 1, 7) == f"features/local/layer1/{cantor_pair(1, 7)}.json"
