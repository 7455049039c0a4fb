"""Attribution graphs as the JSON circuit-tracer writes and its (and Neuronpedia's) viewer reads.

The file has four top-level keys (``graph_schema.json`` next to this module is the JSON
Schema; it also accepts circuit-tracer's own files): ``metadata`` (slug, scan,
transcoder_list, prompt_tokens, prompt, node_threshold, schema_version 1), ``qParams`` (the
viewer's initial state: nothing pinned or grouped), ``nodes`` and ``links``
(``source``/``target`` node ids and ``weight``). Every node has all thirteen fields of
circuit-tracer's pydantic ``Node``, so loading a file into its models and dumping it again
gives the same JSON (``benchmarks/check_graph_json_circuit_tracer.py``).

Nodes, as circuit-tracer forms them (``circuit_tracer/frontend/graph_models.py``):

==========================  ===========================  ====================  ==================  ===========
feature_type                node_id                      feature               layer               jsNodeId
==========================  ===========================  ====================  ==================  ===========
cross layer transcoder      ``{layer}_{index}_{pos}``    cantor(layer, index)  layer               ``{layer}_{index}-0``
mlp reconstruction error    ``{layer}_-1_{pos}``         -1                    layer               ``{layer}_-1-{pos}``
embedding                   ``E_{token id}_{pos}``       pos                   ``"E"``             ``E_{token id}-{pos}``
logit                       ``{n_layers+1}_{id}_{pos}``  id                    ``n_layers + 1``    ``L_{id}-{pos}``
==========================  ===========================  ====================  ==================  ===========

``cantor(l, i) = (l + i)(l + i + 1)/2 + i``; the viewer un-pairs it to find the feature. The
error ids are circuit-tracer's main branch; its 0.5.0 release on PyPI writes ``0_{layer}_{pos}``
(which can equal a layer-0 feature's id) and jsNodeId ``{layer}_{pos}-0``. A logit root for
one token has that token's id; any other logit-like root (a logit difference, a residual
direction) gets circuit-tracer's virtual index for a target that is a function of the
logits, ``d_vocab + 0``, and ``target_label`` names it. Every node's ``ctx_idx`` is its real
token position (a head's is its destination token). A root that is a feature stays a
feature node.

Our other node kinds are folded by default (``graph_fold.fold_extra_nodes``: heads passed
through, biases, skips, positional embeddings and MLPs without a transcoder merged into the
error or embedding node of their token), which keeps every edge total exact. With
``keep_extra_nodes=True`` they are written as nodes of their own, which circuit-tracer's
models and Neuronpedia's schema accept (``feature_type`` is any string there) and its viewer
draws as plain nodes with our ``clerp`` as label; it counts every type containing "error"
as unexplained input:

==================  ======================  =============================================
our kind            feature_type            feature (unique within layer and position)
==================  ======================  =============================================
skip                transcoder skip         -2
transcoder_bias     transcoder bias         -3
mlp                 unreplaced mlp error    -4
attn_bias           attention bias          -5
target_bias         target bias             -6
pos_embed           positional embedding    -7 (layer ``"E"``)
head                attention head          -(1000 + head * n_tokens + source position)
==================  ======================  =============================================

Numbers. ``graph_to_json`` takes the *unpruned* graph and prunes it itself, as
circuit-tracer's ``create_graph_files`` does. ``influence`` has circuit-tracer's meaning:
nodes of the unpruned graph are ranked by absolute influence on the root and each gets the
cumulative share of the total up to and including itself, so the viewer's pruning slider
(keep nodes with ``influence <= x``; it opens at ``metadata.node_threshold``) shows the
pruned graph at ``node_threshold`` (all but the one node that crosses it, as with
circuit-tracer's own files) and more or less of it elsewhere. The root, like
circuit-tracer's logits, has ``null``. The per-node score is ours (absolute influence in the
root's units, as ``graph.prune`` ranks), where circuit-tracer's is a row-normalised
multi-hop score; the ranking-to-share step is the same. Link weights are our edge weights,
in the root's units; the viewer only compares them with each other. ``activation`` is a
feature's activation, ``null`` elsewhere. ``prompt_tokens`` are the tokenizer's decoding of
each token id, unescaped, as circuit-tracer records them (the viewer shows newlines and tabs
as symbols itself).

Feature files. ``metadata.scan`` and ``transcoder_list`` hold portable ids
(``portable_ids.transcoder_id``: a SAELens ``release/sae_id``, a circuit-tracer set's
``scan``, or ``local/<folder name>``); one id for all layers is written as ``scan``, several
as circuit-tracer does (``scan = "custom-<hash>"``, ``transcoder_list[layer]`` the id of each
layer's transcoder, ``""`` for a layer without one). circuit-tracer's viewer
(``frontend/assets``) finds the page of a feature node by ``id = transcoder_list[layer]`` when
``scan`` starts with ``custom-``, else ``id = scan``, and the node's ``feature`` (the cantor
index), and then fetches, in order: ``{id}/{feature}.json`` relative to the page if ``id``
starts with ``./``; otherwise, if the Hugging Face repo ``id`` (read as
``repo[//subfolder][@revision]``) has ``features/index.json.gz``, byte ranges of the binary
files that index names; otherwise ``./features/{id}/{feature}.json`` (which its utility
rewrites to its CloudFront host). A graph folder therefore keeps a feature's page at
``features/{id}/{feature}.json`` (``features.paths.feature_file_path``, which the feature-file
writer and ``serve`` use), in circuit-tracer's feature format (``frontend/feature_models.py``).
"""

import hashlib
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sae_lens_transcoder.circuits.graph import AttributionGraph, prune
from sae_lens_transcoder.circuits.graph_fold import ACCEPTED_KINDS, accepted_home, fold_extra_nodes
from sae_lens_transcoder.circuits.nodes import Node
from sae_lens_transcoder.circuits.portable_ids import transcoder_id
from sae_lens_transcoder.circuits.trace import Trace
from sae_lens_transcoder.features.paths import cantor_pair

SCHEMA_PATH = Path(__file__).with_name("graph_schema.json")
INDEX_NAME = "graph-metadata.json"
SCHEMA_VERSION = 1
CUSTOM_SCAN_PREFIX = "custom-"

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
_CODES = {"skip": -2, "transcoder_bias": -3, "mlp": -4, "attn_bias": -5, "target_bias": -6, "pos_embed": -7}
_HEAD_BASE = 1000
_TOKEN_ESCAPES = str.maketrans({"\n": "⏎", "\t": "→", "\r": "↵"})
_FOLDED_NAMES = {
    "pos_embed": "position", "mlp": "MLP without transcoder", "skip": "skip", "transcoder_bias": "transcoder bias",
    "head": "unexpanded heads", "attn_bias": "attention bias", "target_bias": "target constant",
}


def display_token(token: str) -> str:
    """A token as one printable line (newlines and tabs as visible symbols)."""
    return token.translate(_TOKEN_ESCAPES)


def load_graph_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) that ``graph_to_json``'s output satisfies."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def _check_positions(graph: AttributionGraph) -> None:
    if any(n.pos < 0 for n in graph.influence):
        raise ValueError(
            "the graph has nodes without a token position (merge_positions): the viewer places every "
            "node at a token, so export the graph before merging positions."
        )


def _feature_code(node: Node, n_tokens: int) -> int:
    if node.kind == "feature":
        return cantor_pair(node.layer, node.index)
    if node.kind == "error":
        return -1
    if node.kind == "embed":
        return node.pos
    if node.kind == "head":
        return -(_HEAD_BASE + node.index * n_tokens + node.src)
    return _CODES[node.kind]


def _is_logit(node: Node, graph: AttributionGraph) -> bool:
    return node == graph.root and node.kind == "target"


def _layer_name(node: Node, graph: AttributionGraph) -> str:
    if node.kind in ("embed", "pos_embed"):
        return "E"
    if _is_logit(node, graph):
        return str(node.layer + 1)  # the unembedding's n_layers, plus one as circuit-tracer writes
    return str(node.layer)


def _ids(node: Node, graph: AttributionGraph, logit_id: int) -> tuple[str, str]:
    """``(node_id, jsNodeId)``."""
    layer, pos = _layer_name(node, graph), node.pos
    if _is_logit(node, graph):
        return f"{layer}_{logit_id}_{pos}", f"L_{logit_id}-{pos}"
    if node.kind == "feature":
        return f"{layer}_{node.index}_{pos}", f"{layer}_{node.index}-0"
    if node.kind == "error":
        return f"{layer}_-1_{pos}", f"{layer}_-1-{pos}"
    if node.kind == "embed":
        token = graph.token_ids[pos]
        return f"E_{token}_{pos}", f"E_{token}-{pos}"
    node_id = f"{layer}_{_feature_code(node, len(graph.tokens))}_{pos}"
    return node_id, node_id


def _cumulative_influence(graph: AttributionGraph) -> dict[Node, float]:
    """circuit-tracer's node ``influence``: the cumulative share of total absolute influence
    of the nodes at least as influential as this one."""
    ranked = sorted((n for n in graph.influence if n != graph.root), key=lambda n: -abs(graph.influence[n]))  # as prune ranks
    if not ranked:
        return {}
    weights = torch.tensor([abs(graph.influence[n]) for n in ranked], dtype=torch.float64)
    shares = (weights.cumsum(0) / weights.sum().clamp_min(1e-300)).clamp_max(1.0)
    return dict(zip(ranked, shares.tolist()))


def _clerp(node: Node, graph: AttributionGraph, labels: Mapping[tuple[int, int], str], folded: Mapping[Node, set[str]]) -> str:
    """The node's label in the viewer."""

    def tok(pos: int) -> str:
        return f"“{display_token(graph.tokens[pos])}”"

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
    }[kind]
    if folded.get(node):
        text += " + " + ", ".join(sorted(_FOLDED_NAMES[k] for k in folded[node]))
    return text


def _scan_and_list(scan: str | Sequence[str] | Mapping[int, str] | None, trace: Trace | None) -> tuple[str, list[str]]:
    if scan is None:
        return (trace.model.cfg.model_name if trace is not None else "sae-lens-transcoder"), []
    if isinstance(scan, str):
        return transcoder_id(scan), []
    by_layer = dict(scan) if isinstance(scan, Mapping) else dict(enumerate(scan))
    if any(layer < 0 for layer in by_layer):
        raise ValueError(f"scan: layers {sorted(by_layer)} must be >= 0 (one transcoder id per layer).")
    ids = {layer: transcoder_id(str(spec)) for layer, spec in by_layer.items()}
    if len(set(ids.values())) == 1:
        return next(iter(ids.values())), []
    transcoders = [ids.get(layer, "") for layer in range(max(ids, default=-1) + 1)]
    digest = hashlib.sha1("-".join(transcoders).encode()).hexdigest()[:12]
    return f"{CUSTOM_SCAN_PREFIX}{digest}", transcoders


def _prompt_tokens(graph: AttributionGraph, trace: Trace | None) -> list[str]:
    tokenizer = None if trace is None else trace.model.tokenizer
    if tokenizer is None:
        return list(graph.tokens)
    return [str(tokenizer.decode([token])) for token in graph.token_ids]


def _absorbed_kinds(graph: AttributionGraph) -> dict[Node, set[str]]:
    """The kinds ``fold_extra_nodes`` merges into each accepted node (for its label)."""
    passed_through = {dst for _, dst in graph.edges if dst.kind == "head"}
    absorbed: dict[Node, set[str]] = defaultdict(set)
    for node in graph.influence:
        if node != graph.root and node.kind not in ACCEPTED_KINDS and node not in passed_through:
            absorbed[accepted_home(node)].add(node.kind)
    return absorbed


def _logit_id(graph: AttributionGraph, trace: Trace | None, target_token: int | None) -> int:
    """The logit node's vocabulary id: the token, or circuit-tracer's virtual id ``d_vocab + 0``."""
    if graph.root.kind != "target":
        return -1
    if target_token is not None:
        return int(target_token)
    if trace is None:
        raise ValueError("target_token: give the root's token id, or trace= for a logit-difference root's virtual id.")
    return int(trace.model.cfg.d_vocab)


def _token_string(trace: Trace | None, token: int) -> str:
    if trace is None or trace.model.tokenizer is None:
        return f"<{token}>"
    return str(trace.model.tokenizer.decode([token]))


def graph_to_json(
    graph: AttributionGraph,
    slug: str,
    scan: str | Sequence[str] | Mapping[int, str] | None = None,
    *,
    trace: Trace | None = None,
    target_token: int | None = None,
    target_label: str | None = None,
    token_prob: float | None = None,
    prompt: str | None = None,
    node_threshold: float | None = 0.8,
    edge_threshold: float = 0.98,
    clerps: Mapping[tuple[int, int], str] | None = None,
    keep_extra_nodes: bool = False,
) -> dict[str, Any]:
    """The *unpruned* ``graph`` as circuit-tracer's graph JSON (a dict of JSON types; see the
    module docstring), pruned with ``graph.prune(node_threshold, edge_threshold)``
    (``node_threshold=None``: not pruned, and the viewer shows no pruning slider).

    ``scan`` names the transcoders: one spec for all layers, or one per layer (a sequence
    from layer 0, or ``{layer: spec}``); specs are paths or ``release/sae_id`` and become
    portable ids (default: the trace's model name). For a root that is the logit of one
    token pass ``target_token`` (with ``trace``, its probability is read); for any other
    logit-like root leave it ``None`` (needs ``trace`` for the vocabulary size) and name it
    with ``target_label``, e.g. ``"Paris − London"``; ``token_prob`` overrides the
    probability. ``clerps`` labels features by ``(layer, feature id)``.
    ``keep_extra_nodes`` writes heads, biases and the like as nodes of their own instead of
    folding them.
    """
    _check_positions(graph)
    folded: dict[Node, set[str]] = defaultdict(set)
    if not keep_extra_nodes:
        folded = _absorbed_kinds(graph)
        graph = fold_extra_nodes(graph)
    shares = _cumulative_influence(graph)
    pruned = graph if node_threshold is None else prune(graph, node_threshold, edge_threshold)
    labels = clerps or {}
    n_tokens = len(graph.tokens)
    logit_id = _logit_id(graph, trace, target_token)
    if token_prob is None:
        token_prob = 0.0
        if trace is not None and target_token is not None:
            token_prob = float(torch.softmax(trace.logits[graph.root.pos].double(), -1)[target_token])
    if target_label is None:
        target_label = "target" if target_token is None else _token_string(trace, target_token)

    # circuit-tracer writes every token's embedding, linked or not; one that influences
    # nothing ranks last, where the cumulative share is 1
    embeddings = [Node("embed", -1, pos) for pos in range(n_tokens)]
    written = [*pruned.nodes, *(n for n in embeddings if n not in pruned.influence)]
    shares = {**{n: 1.0 for n in embeddings}, **shares}
    ids = {node: _ids(node, pruned, logit_id) for node in written}
    nodes = []
    for node in written:
        is_logit = _is_logit(node, pruned)
        activation = pruned.activation.get(node)
        node_id, js_id = ids[node]
        nodes.append({
            "node_id": node_id,
            "feature": logit_id if is_logit else _feature_code(node, n_tokens),
            "layer": _layer_name(node, pruned),
            "ctx_idx": node.pos,
            "feature_type": FEATURE_TYPES[node.kind],
            "token_prob": float(token_prob) if is_logit else 0.0,
            "is_target_logit": is_logit,
            "run_idx": 0,
            "reverse_ctx_idx": 0,
            "jsNodeId": js_id,
            "clerp": f'Output "{target_label}" (p={token_prob:.3f})' if is_logit else _clerp(node, pruned, labels, folded),
            "influence": shares.get(node),
            "activation": None if activation is None else float(activation),
        })
    links = [
        {"source": ids[src][0], "target": ids[dst][0], "weight": float(weight)}
        for (src, dst), weight in sorted(pruned.edges.items(), key=lambda ew: -abs(ew[1]))
    ]
    scan_name, transcoder_list = _scan_and_list(scan, trace)
    metadata = {
        "slug": slug,
        "scan": scan_name,
        "transcoder_list": transcoder_list,
        "prompt_tokens": _prompt_tokens(graph, trace),
        "prompt": "".join(graph.tokens) if prompt is None else prompt,
        "node_threshold": None if node_threshold is None else float(node_threshold),
        "schema_version": SCHEMA_VERSION,
    }
    q_params = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": q_params, "nodes": nodes, "links": links}


def save_graph_json(
    graph: AttributionGraph, path: str | Path, slug: str | None = None, index: bool = True, **kwargs: Any
) -> Path:
    """Write ``graph_to_json`` of the unpruned ``graph`` to ``path`` (a ``.json`` file, or a
    folder that gets ``{slug}.json``) and return the file written. ``slug`` defaults to the
    file name's stem.

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
