"""Fold our extra node kinds into the four circuit-tracer knows, keeping the graph exact.

circuit-tracer's graphs have features, MLP reconstruction errors, token embeddings and
logits; ours also have attention heads, biases, skips, positional embeddings, MLPs without a
transcoder and the constants of targets. Folding keeps every number: each node's incoming
edges still sum to what they summed to, and so does the root's.

* An expanded head (one with inputs) is passed through: ``u -> head -> v`` becomes
  ``u -> v`` (``fold_attention_heads``), as circuit-tracer, whose attention is a linear
  path, would have drawn it.
* Every other extra node has no inputs (it is a term of the residual stream at one token),
  so it is merged into an accepted node at the same token that sits upstream of everything
  reading it (``accepted_home``): a positional embedding into that token's embedding; a
  whole MLP without a transcoder, a transcoder's skip or bias into that layer's error node
  (what the features do not explain); what enters at attention ``L`` (an unexpanded head,
  an attention bias, a target's constant read there) into the error node of MLP ``L - 1``,
  or the embedding for ``L = 0``. Merged influences and parallel edges add up.
"""

from collections import defaultdict

from sae_lens_transcoder.circuits.graph import AttributionGraph, Edge
from sae_lens_transcoder.circuits.nodes import Node

#: The node kinds circuit-tracer's graph files have (and its viewer draws as such).
ACCEPTED_KINDS = frozenset({"feature", "error", "embed", "target"})
_MLP_SITE = frozenset({"mlp", "skip", "transcoder_bias"})
_ATTENTION_SITE = frozenset({"head", "attn_bias", "target_bias"})


def fold_attention_heads(graph: AttributionGraph) -> AttributionGraph:
    """The same graph without expanded attention heads: each path ``u -> head -> v`` becomes
    an edge ``u -> v`` of weight ``w(u, head) * w(head, v) / influence(head)``.

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


def accepted_home(node: Node) -> Node:
    """The accepted node an input-less extra node is merged into (itself if accepted)."""
    if node.kind in ACCEPTED_KINDS:
        return node
    if node.kind == "pos_embed":
        return Node("embed", -1, node.pos)
    if node.kind in _MLP_SITE:
        return Node("error", node.layer, node.pos)
    if node.kind in _ATTENTION_SITE:
        return Node("error", node.layer - 1, node.pos) if node.layer > 0 else Node("embed", -1, node.pos)
    raise ValueError(f"node kind {node.kind!r} has no accepted home; add it to graph_fold.accepted_home")


def fold_extra_nodes(graph: AttributionGraph) -> AttributionGraph:
    """``graph`` with only circuit-tracer's node kinds (see the module docstring); the root
    stays whatever it is."""
    graph = fold_attention_heads(graph)

    def home(node: Node) -> Node:
        return node if node == graph.root else accepted_home(node)

    fed = {dst for _, dst in graph.edges}
    leftover = [n for n in fed if n != graph.root and n.kind not in ACCEPTED_KINDS]
    if leftover:
        raise ValueError(f"cannot fold {leftover[0]}: it has inputs but is not an attention head")
    influence: dict[Node, float] = defaultdict(float)
    for node, value in graph.influence.items():
        influence[home(node)] += value
    edges: dict[Edge, float] = defaultdict(float)
    for (src, dst), weight in graph.edges.items():
        edges[(home(src), home(dst))] += weight
    return AttributionGraph(
        graph.tokens,
        graph.token_ids,
        graph.root,
        graph.root_value,
        influence=dict(influence),
        activation=dict(graph.activation),
        edges=dict(edges),
        expanded={home(n) for n in graph.expanded},
    )
