"""Attribution graphs as the JSON that circuit-tracer's (and Neuronpedia's) graph viewer reads.

The file has four top-level keys (``graph_schema.json`` next to this module is the JSON
Schema): ``metadata`` (slug, scan, transcoder_list, prompt_tokens, prompt, node_threshold),
``qParams`` (the viewer's initial state: nothing pinned or grouped), ``nodes`` and ``links``
(``source``/``target`` node ids and ``weight``).

How our nodes map onto the viewer's. Every node carries ``layer`` as a string (``"E"`` for
embeddings), ``ctx_idx`` (token position) and an integer ``feature`` that is unique among
the nodes of the same layer and position, because the viewer keys nodes by
``layer_feature_ctx``. ``node_id`` is ``"{layer}_{feature}_{ctx_idx}"``, except embeddings,
which are ``"E_{token id}_{ctx_idx}"`` as in circuit-tracer.

==================  ==============================  ========================================
our kind            feature_type                    feature
==================  ==============================  ========================================
feature             cross layer transcoder          the feature id
error               mlp reconstruction error        -1
embed               embedding                       the position (circuit-tracer's choice)
target (the root)   logit                           the target token id, or -1
skip                transcoder skip                 -2
transcoder_bias     transcoder bias                 -3
mlp                 unreplaced mlp error            -4
attn_bias           attention bias                  -5
target_bias         target bias                     -6
pos_embed           positional embedding            -7 (layer "E")
head                attention head                  -(1000 + head * n_tokens + source pos)
==================  ==============================  ========================================

The viewer has no attention heads or biases; it draws any ``feature_type`` it does not
know as a plain circle with our ``clerp`` as its label, and counts every type containing
"error" as unexplained input, which is why an MLP without a transcoder is an "error". A
head sits at its destination token (its ``ctx_idx``) in its layer's row, and its input
links come from the source token. With ``fold_heads=True`` heads are removed instead and
their flow passed through (``fold_attention_heads``), which keeps the graph exact. The root is
always written as the "logit" node, even for a logit difference or a residual direction
(``target_label`` names it); its ``layer`` is one above every other node's, as the viewer
expects. A root that is a feature stays a feature.

Numbers. Link weights are our edge weights, in the root's units (how much of the root's
value flows along the edge), not circuit-tracer's unnormalised direct effects; the viewer
only compares them with each other. ``influence`` follows the viewer's meaning: nodes are
sorted by absolute influence on the root and each gets the cumulative share of the total up
to and including itself, so the viewer's pruning slider (keep ``influence <= x``) works; the
root has ``null``. ``activation`` is a feature's activation and ``null`` for other nodes.
"""

import hashlib
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sae_lens_transcoder.circuits.graph import AttributionGraph, Edge
from sae_lens_transcoder.circuits.nodes import Node
from sae_lens_transcoder.circuits.trace import Trace

SCHEMA_PATH = Path(__file__).with_name("graph_schema.json")
INDEX_NAME = "graph-metadata.json"

FEATURE_TYPES: dict[str, str] = {
    "feature": "cross layer transcoder",
    "error": "mlp reconstruction error",
    "embed": "embedding",
    "target": "logit",
    "skip": "transcoder skip",
    "transcoder_bias": "transcoder bias",
    "mlp": "unreplaced mlp error",
    "attn_bias": "attention bias",
    "target_bias": "target bias",
    "pos_embed": "positional embedding",
    "head": "attention head",
}
_CODES = {"error": -1, "skip": -2, "transcoder_bias": -3, "mlp": -4, "attn_bias": -5, "target_bias": -6, "pos_embed": -7}
_HEAD_BASE = 1000
_TOKEN_ESCAPES = str.maketrans({"\n": "⏎", "\t": "→", "\r": "↵"})


def display_token(token: str) -> str:
    """A token as one printable line (newlines and tabs as visible symbols)."""
    return token.translate(_TOKEN_ESCAPES)


def load_graph_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) that ``graph_to_json``'s output satisfies."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def fold_attention_heads(graph: AttributionGraph) -> AttributionGraph:
    """The same graph without attention-head nodes: each path ``u -> head -> v`` becomes an
    edge ``u -> v`` of weight ``w(u, head) * w(head, v) / influence(head)``.

    Edges are in the root's units and a head passes its inputs on in proportion to its
    outputs, so for an expanded head (whose inputs sum to its influence) every other node's
    incoming total, and the root's, is unchanged. Chains of heads fold in any order. Heads
    with no incoming edges (never expanded, or pruned away) have nothing to pass on and stay.
    """
    incoming: dict[Node, dict[Node, float]] = defaultdict(dict)
    outgoing: dict[Node, dict[Node, float]] = defaultdict(dict)
    for (src, dst), weight in graph.edges.items():
        incoming[dst][src] = weight
        outgoing[src][dst] = weight
    folded = set()
    for head in sorted(n for n in graph.influence if n.kind == "head" and n != graph.root):
        inputs = incoming.pop(head, {})
        if not inputs:
            continue
        outputs = outgoing.pop(head, {})
        for src in inputs:
            del outgoing[src][head]
        for dst in outputs:
            del incoming[dst][head]
        total = graph.influence[head]
        if total != 0.0:
            for src, w_in in inputs.items():
                for dst, w_out in outputs.items():
                    weight = incoming[dst].get(src, 0.0) + w_in * w_out / total
                    incoming[dst][src] = outgoing[src][dst] = weight
        folded.add(head)
    edges: dict[Edge, float] = {(src, dst): w for dst, row in incoming.items() for src, w in row.items()}
    return AttributionGraph(
        graph.tokens,
        graph.token_ids,
        graph.root,
        graph.root_value,
        influence={n: v for n, v in graph.influence.items() if n not in folded},
        activation=dict(graph.activation),
        edges=edges,
        expanded=graph.expanded - folded,
    )


def _feature_code(node: Node, n_tokens: int) -> int:
    if node.kind == "feature":
        return node.index
    if node.kind == "embed":
        return node.pos
    if node.kind == "head":
        return -(_HEAD_BASE + node.index * n_tokens + node.src)
    return _CODES[node.kind]


def _logit_layer(graph: AttributionGraph) -> int:
    others = [n.layer for n in graph.influence if n != graph.root and n.kind not in ("embed", "pos_embed")]
    return max([graph.root.layer, *others]) + 1


def _layer_name(node: Node, graph: AttributionGraph) -> str:
    if node.kind in ("embed", "pos_embed"):
        return "E"
    if node == graph.root and node.kind == "target":
        return str(_logit_layer(graph))
    return str(node.layer)


def _check_positions(graph: AttributionGraph) -> None:
    if any(n.pos < 0 for n in graph.influence):
        raise ValueError(
            "the graph has nodes without a token position (merge_positions): the viewer places every "
            "node at a token, so export the graph before merging positions."
        )


def json_node_ids(graph: AttributionGraph, target_token: int | None = None) -> dict[Node, str]:
    """The ``node_id`` every node of ``graph`` gets in ``graph_to_json``."""
    _check_positions(graph)
    n_tokens = len(graph.tokens)
    ids = {}
    for node in graph.influence:
        if node.kind == "embed":
            ids[node] = f"E_{graph.token_ids[node.pos]}_{node.pos}"
            continue
        code = (-1 if target_token is None else target_token) if node == graph.root and node.kind == "target" else _feature_code(node, n_tokens)
        ids[node] = f"{_layer_name(node, graph)}_{code}_{node.pos}"
    return ids


def _cumulative_influence(graph: AttributionGraph) -> dict[Node, float]:
    """Circuit-tracer's node ``influence``: the cumulative share of total absolute influence
    of the nodes at least as influential as this one."""
    ranked = sorted((n for n in graph.influence if n != graph.root), key=lambda n: -abs(graph.influence[n]))
    if not ranked:
        return {}
    weights = torch.tensor([abs(graph.influence[n]) for n in ranked], dtype=torch.float64)
    shares = (weights.cumsum(0) / weights.sum().clamp_min(1e-300)).clamp_max(1.0)
    return dict(zip(ranked, shares.tolist()))


def _clerp(node: Node, graph: AttributionGraph, labels: Mapping[tuple[int, int], str]) -> str:
    """The node's label in the viewer."""
    tokens = graph.tokens

    def tok(pos: int) -> str:
        return f"“{display_token(tokens[pos])}”"

    kind, layer = node.kind, node.layer
    if kind == "feature":
        return labels.get((layer, node.index), "")
    if kind == "head":
        return f"Head L{layer}.H{node.index}: {tok(node.src)} (t{node.src}) → {tok(node.pos)} (t{node.pos})"
    text = {
        "embed": f"Emb: {tok(node.pos)}",
        "pos_embed": f"Pos emb: t{node.pos} {tok(node.pos)}",
        "error": f"Err: mlp L{layer} {tok(node.pos)}",
        "mlp": f"MLP L{layer} (no transcoder) {tok(node.pos)}",
        "skip": f"Skip: transcoder L{layer} {tok(node.pos)}",
        "transcoder_bias": f"Bias: transcoder L{layer}",
        "attn_bias": f"Bias: attention L{layer}",
        "target_bias": f"Bias: constant of targets at L{layer} {tok(node.pos)}",
    }
    return text.get(kind, node.id)


def _scan_and_list(scan: str | Sequence[str] | None, trace: Trace | None) -> tuple[str, list[str]]:
    if scan is None:
        return (trace.model.cfg.model_name if trace is not None else "sae-lens-transcoder"), []
    if isinstance(scan, str):
        return scan, []
    transcoders = [str(s) for s in scan]
    digest = hashlib.sha1("-".join(transcoders).encode()).hexdigest()[:12]
    return f"custom-{digest}", transcoders


def _token_string(trace: Trace | None, token: int) -> str:
    if trace is None or trace.model.tokenizer is None:
        return f"<{token}>"
    return str(trace.model.tokenizer.decode([token]))


def graph_to_json(
    graph: AttributionGraph,
    slug: str,
    scan: str | Sequence[str] | None = None,
    *,
    trace: Trace | None = None,
    target_token: int | None = None,
    target_label: str | None = None,
    token_prob: float | None = None,
    prompt: str | None = None,
    node_threshold: float | None = None,
    clerps: Mapping[tuple[int, int], str] | None = None,
    fold_heads: bool = False,
) -> dict[str, Any]:
    """``graph`` as the viewer's JSON (a dict of JSON types; see the module docstring).

    ``scan`` names the transcoder set (default: the trace's model name); a list of one
    transcoder id per layer is written as circuit-tracer does (``scan="custom-<hash>"`` and
    ``transcoder_list``). For a logit root pass ``target_token`` (and ``trace``, to decode
    it and read its probability); ``target_label`` and ``token_prob`` override both, e.g.
    ``target_label="Paris − London"`` for a logit difference. ``clerps`` labels features by
    ``(layer, feature id)``. ``node_threshold`` is recorded as given (the ``prune`` value).
    ``fold_heads`` removes attention heads first (``fold_attention_heads``).
    """
    if fold_heads:
        graph = fold_attention_heads(graph)
    ids = json_node_ids(graph, target_token)
    shares = _cumulative_influence(graph)
    labels = clerps or {}
    n_tokens = len(graph.tokens)
    if token_prob is None:
        token_prob = 0.0
        if trace is not None and target_token is not None:
            token_prob = float(torch.softmax(trace.logits[graph.root.pos].double(), -1)[target_token])
    if target_label is None:
        target_label = _token_string(trace, target_token) if target_token is not None else "target"

    nodes = []
    for node in graph.nodes:
        is_logit = node == graph.root and node.kind == "target"
        feature = (-1 if target_token is None else target_token) if is_logit else _feature_code(node, n_tokens)
        layer = _layer_name(node, graph)
        if node.kind == "feature":
            js_id = f"{layer}_{node.index}-0"
        elif node.kind == "error":
            js_id = f"{layer}_{node.pos}-0"
        elif node.kind == "embed":
            js_id = f"E_{graph.token_ids[node.pos]}-{node.pos}"
        elif is_logit:
            js_id = f"L_{feature}-{node.pos}"
        else:
            js_id = ids[node]
        activation = graph.activation.get(node)
        nodes.append({
            "node_id": ids[node],
            "feature": feature,
            "layer": layer,
            "ctx_idx": node.pos,
            "feature_type": FEATURE_TYPES[node.kind],
            "token_prob": token_prob if is_logit else 0.0,
            "is_target_logit": is_logit,
            "run_idx": 0,
            "reverse_ctx_idx": 0,
            "jsNodeId": js_id,
            "clerp": (
                f'Output "{display_token(target_label)}" (p={token_prob:.3f})' if is_logit else _clerp(node, graph, labels)
            ),
            "influence": shares.get(node),
            "activation": None if activation is None else float(activation),
        })
    links = [
        {"source": ids[src], "target": ids[dst], "weight": float(weight)}
        for (src, dst), weight in sorted(graph.edges.items(), key=lambda ew: -abs(ew[1]))
    ]
    scan_name, transcoder_list = _scan_and_list(scan, trace)
    metadata = {
        "slug": slug,
        "scan": scan_name,
        "transcoder_list": transcoder_list,
        "prompt_tokens": [display_token(t) for t in graph.tokens],
        "prompt": "".join(graph.tokens) if prompt is None else prompt,
        "node_threshold": None if node_threshold is None else float(node_threshold),
    }
    q_params = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": q_params, "nodes": nodes, "links": links}


def save_graph_json(
    graph: AttributionGraph, path: str | Path, slug: str | None = None, index: bool = True, **kwargs: Any
) -> Path:
    """Write ``graph_to_json`` to ``path`` (a ``.json`` file, or a folder that gets
    ``{slug}.json``) and return the file written. ``slug`` defaults to the file name's stem.

    With ``index`` the graph's metadata is also added to (or replaced in) the folder's
    ``graph-metadata.json``, the list of graphs the viewer offers; circuit-tracer's
    ``circuit_tracer.frontend.local_server.serve(data_dir=folder)`` then shows it.
    """
    path = Path(path)
    if path.suffix != ".json":
        if slug is None:
            raise ValueError(f"path={str(path)!r} is a folder: pass slug= to name the graph file.")
        path = path / f"{slug}.json"
    slug = path.stem if slug is None else slug
    data = graph_to_json(graph, slug, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, allow_nan=False, ensure_ascii=False), encoding="utf-8")
    if index:
        index_path = path.parent / INDEX_NAME
        listing = json.loads(index_path.read_text(encoding="utf-8")) if index_path.exists() else {"graphs": []}
        listing["graphs"] = [g for g in listing.get("graphs", []) if g.get("slug") != slug] + [data["metadata"]]
        index_path.write_text(json.dumps(listing, indent=1, ensure_ascii=False), encoding="utf-8")
    return path
