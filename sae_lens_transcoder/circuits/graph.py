"""Attribution graphs: expand the most influential nodes, keep every edge exact, prune.

Edges are in the root's units: the weight of ``u -> v`` is how much of the root's value
flows from ``u`` into ``v`` (``u``'s direct contribution to ``v``'s target scaled by ``v``'s
total influence on the root). Nodes are expanded from the last layer down, so a node's
influence is final (all its parents are done) when it is expanded, and the incoming edges
of every expanded node sum exactly to its influence.
"""

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from sae_lens_transcoder.circuits.attribution import Target, direct_contributions, feature_target, head_target_for, target_value
from sae_lens_transcoder.circuits.nodes import Node
from sae_lens_transcoder.circuits.trace import Trace

Edge = tuple[Node, Node]


@dataclass
class AttributionGraph:
    """Nodes with their influence on the root, and weighted edges ``(source, target)``."""

    tokens: list[str]
    token_ids: list[int]
    root: Node
    root_value: float
    influence: dict[Node, float] = field(default_factory=dict)
    activation: dict[Node, float] = field(default_factory=dict)
    edges: dict[Edge, float] = field(default_factory=dict)
    expanded: set[Node] = field(default_factory=set)

    @property
    def nodes(self) -> list[Node]:
        return [self.root, *sorted(n for n in self.influence if n != self.root)]

    def incoming(self, node: Node) -> dict[Node, float]:
        return {src: w for (src, dst), w in self.edges.items() if dst == node}


def _level(node: Node) -> tuple[int, int]:
    """Expansion order: a node only feeds nodes of higher level."""
    return (node.layer, 1 if node.kind == "feature" else 0)


def build_graph(
    trace: Trace,
    root: Target,
    max_expansions: int = 64,
    min_influence: float = 0.01,
) -> AttributionGraph:
    """Expand up to ``max_expansions`` features/heads whose influence on the root is at least
    ``min_influence`` of ``|root value|``, from the top layer down."""
    graph = AttributionGraph(trace.str_tokens(), trace.tokens.tolist(), root.node, target_value(trace, root))
    graph.influence[root.node] = graph.root_value
    # A feature's target is its pre-activation times the summed coefficient of its parents; a
    # head's is linear in the summed directions its parents read at its destination token.
    feature_scale: dict[Node, float] = {}
    head_direction: dict[Node, torch.Tensor] = {}
    threshold = min_influence * abs(graph.root_value)

    def expand(node: Node, target: Target) -> None:
        graph.expanded.add(node)
        for source, value in direct_contributions(trace, target).items():
            graph.edges[(source, node)] = value
            graph.influence[source] = graph.influence.get(source, 0.0) + value
            if source.kind == "feature":
                activation = float(trace.feature_acts[source.layer][source.pos, source.index])
                graph.activation[source] = activation
                feature_scale[source] = feature_scale.get(source, 0.0) + value / activation
            elif source.kind == "head":
                previous = head_direction.get(source)
                head_direction[source] = target.direction if previous is None else previous + target.direction

    def child(node: Node) -> Target:
        if node.kind == "feature":
            return feature_target(trace, node.layer, node.index, node.pos).scaled(feature_scale.pop(node))
        return head_target_for(trace, head_direction.pop(node), node.pos, node.layer, node.index, node.src)

    expand(root.node, root)
    while (feature_scale or head_direction) and len(graph.expanded) - 1 < max_expansions:
        pending = [*feature_scale, *head_direction]
        level = max(_level(n) for n in pending)
        for node in sorted((n for n in pending if _level(n) == level), key=lambda n: -abs(graph.influence[n])):
            if abs(graph.influence[node]) >= threshold and len(graph.expanded) - 1 < max_expansions:
                expand(node, child(node))
            else:
                feature_scale.pop(node, None)
                head_direction.pop(node, None)
    return graph


def prune(
    graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98, max_nodes: int | None = None
) -> AttributionGraph:
    """Keep the most influential nodes carrying ``node_threshold`` of the total absolute
    influence (at most ``max_nodes`` of them, when given), then the strongest edges among
    them carrying ``edge_threshold`` of the absolute edge weight; the root is always kept."""
    others = sorted((n for n in graph.influence if n != graph.root), key=lambda n: -abs(graph.influence[n]))
    weights = torch.tensor([abs(graph.influence[n]) for n in others], dtype=torch.float64)
    keep = {graph.root, *_head_carrying(others, weights, node_threshold)[:max_nodes]}
    candidate_edges = sorted(((e, w) for e, w in graph.edges.items() if e[0] in keep and e[1] in keep), key=lambda ew: -abs(ew[1]))
    edge_weights = torch.tensor([abs(w) for _, w in candidate_edges], dtype=torch.float64)
    kept_edges = dict(_head_carrying(candidate_edges, edge_weights, edge_threshold))
    linked = {n for edge in kept_edges for n in edge} | {graph.root}
    return AttributionGraph(
        graph.tokens,
        graph.token_ids,
        graph.root,
        graph.root_value,
        influence={n: v for n, v in graph.influence.items() if n in linked},
        activation={n: v for n, v in graph.activation.items() if n in linked},
        edges=kept_edges,
        expanded=graph.expanded & linked,
    )


def _head_carrying(items: list, weights: torch.Tensor, fraction: float) -> list:  # type: ignore[type-arg]
    """The shortest prefix of ``items`` (sorted by weight, descending) reaching ``fraction`` of the total."""
    if not items:
        return []
    cumulative = weights.cumsum(0) / weights.sum().clamp_min(1e-30)
    count = int((cumulative < fraction).sum()) + 1
    return items[: min(count, len(items))]


def merge_positions(graph: AttributionGraph) -> AttributionGraph:
    """One node per (kind, layer, feature/head) over all token positions; edges summed."""

    def merged(node: Node) -> Node:
        return node if node == graph.root else Node(node.kind, node.layer, -1, node.index, -1)

    influence: dict[Node, float] = defaultdict(float)
    activation: dict[Node, float] = defaultdict(float)
    edges: dict[Edge, float] = defaultdict(float)
    for node, value in graph.influence.items():
        influence[merged(node)] += value
    for node, value in graph.activation.items():
        activation[merged(node)] = max(activation[merged(node)], value)
    for (src, dst), value in graph.edges.items():
        edges[(merged(src), merged(dst))] += value
    return AttributionGraph(
        graph.tokens, graph.token_ids, graph.root, graph.root_value,
        dict(influence), dict(activation), dict(edges), {merged(n) for n in graph.expanded},
    )
