"""Pictures of attribution graphs (a standalone HTML file and a PNG) and paths as text.

A full graph has hundreds of nodes and thousands of edges, which no picture can show, so the
pictures draw the pruned graph by default: the nodes carrying ``node_threshold`` (0.8) of
the influence, at most ``max_nodes`` (60) of them, and the edges among them carrying
``edge_threshold`` of the weight (``graph.prune``); pass ``node_threshold=None`` to draw a
graph as it is.

Both pictures share one layout, 1,920 px wide: prompt tokens left to right, and from the
bottom up the embeddings, then for every layer that has nodes a row for attention (heads,
attention bias, the constants of targets read there) and a row for the MLP (features, error,
skip, transcoder bias, unreplaced MLP), and the root on top. A head sits at its destination
token. Nodes of one cell stand side by side, most influential first; a column is as wide as
its fullest cell. Position-merged graphs get one extra column, "all", on the left.

Every node is labelled under its marker: features ``L{layer}/{index}`` and, when given in
``labels`` (e.g. ``logit_lens_labels``: the top token of the feature's decoder row through
the unembedding), that label; heads ``L{layer}.H{head}`` and the token they read; errors,
MLPs, biases and embeddings by kind and layer. Kind is shape and colour (legend at the top),
size grows with absolute influence, edge width with absolute weight, edge colour is the sign
(blue positive, red negative). The HTML file needs nothing from the network: the SVG and a
few lines of script (hover shows a node's id, influence and activation and highlights its
edges) are inline.
"""

import html
import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sae_lens_transcoder.circuits.graph import AttributionGraph, Edge, prune
from sae_lens_transcoder.circuits.graph_json import display_token
from sae_lens_transcoder.circuits.nodes import KINDS, Node
from sae_lens_transcoder.circuits.paths import Path as CircuitPath
from sae_lens_transcoder.circuits.trace import Trace, final_norm

#: Colour and marker of each kind (markers as matplotlib names; the SVG draws the same shapes).
KIND_STYLES: dict[str, tuple[str, str]] = {
    "embed": ("#59a14f", "s"),
    "pos_embed": ("#8cd17d", "s"),
    "head": ("#f28e2b", "^"),
    "attn_bias": ("#b8a89a", "d"),
    "feature": ("#4e79a7", "o"),
    "transcoder_bias": ("#a0a0a0", "d"),
    "skip": ("#76b7b2", "p"),
    "error": ("#e15759", "s"),
    "mlp": ("#b07aa1", "h"),
    "target_bias": ("#7f7f7f", "d"),
    "target": ("#edc948", "*"),
}
KIND_NAMES = {
    "embed": "embedding", "pos_embed": "position embedding", "head": "attention head", "attn_bias": "attention bias",
    "feature": "transcoder feature", "transcoder_bias": "transcoder bias", "skip": "transcoder skip",
    "error": "transcoder error", "mlp": "MLP without transcoder", "target_bias": "target constant", "target": "target",
}
POSITIVE, NEGATIVE = "#2f6db5", "#d1495b"
WIDTH = 1920.0
_LEFT, _RIGHT, _TOP, _BOTTOM = 110.0, 20.0, 90.0, 60.0
_ROW = 74.0  # px per row: a marker and two lines of label
_MAX_SLOT = 150.0  # px per node at most, when there are few


def _token(tokens: Sequence[str], pos: int) -> str:
    if pos < 0:
        return "all"
    return json.dumps(display_token(tokens[pos]), ensure_ascii=False) if pos < len(tokens) else "?"


def describe_node(node: Node, tokens: Sequence[str]) -> str:
    """A short readable name: kind, layer, feature/head and the token(s) it sits at."""
    at = f"@{node.pos}{_token(tokens, node.pos)}" if node.pos >= 0 else "@all"
    if node.kind == "feature":
        return f"L{node.layer}.F{node.index} {at}"
    if node.kind == "head":
        source = f"{node.src}{_token(tokens, node.src)}" if node.src >= 0 else "all"
        return f"L{node.layer}.H{node.index} {at}<-{source}"
    if node.kind in ("embed", "pos_embed", "target"):
        name = {"embed": "emb", "pos_embed": "pos_emb", "target": "target"}[node.kind]
        return f"{name} {at}"
    name = {"error": "err", "skip": "skip", "mlp": "mlp", "transcoder_bias": "tc_bias", "attn_bias": "attn_bias"}
    if node.kind == "target_bias":
        return f"L{node.layer}.const {at}"
    return f"L{node.layer}.{name[node.kind]} {at}"


def format_paths(paths: Sequence[CircuitPath], tokens: Sequence[str]) -> str:
    """One line per path from ``find_paths``: rank, value in root units, and its nodes from
    the root upstream with their tokens, e.g.
    ``  1. +1.0000  target @4"A" <- L1.F5 @4"A" <- L0.F2 @4"A" <- emb @4"A"``."""
    lines = []
    for rank, path in enumerate(paths, 1):
        chain = " <- ".join(describe_node(node, tokens) for node in path.nodes)
        lines.append(f"{rank:>3}. {path.value:+.4f}  {chain}")
    return "\n".join(lines)


def logit_lens_labels(trace: Trace, nodes: Sequence[Node] | AttributionGraph, chunk: int = 256) -> dict[Node, str]:
    """``→"token"`` for every feature node: the top token of its decoder row(s) through the
    final norm's weight and the unembedding (``weights.logit_lens``, here for many features at
    once: the decoder of each layer is built once), what the feature most directly promotes."""
    nodes = nodes.nodes if isinstance(nodes, AttributionGraph) else nodes
    wanted: dict[int, set[int]] = defaultdict(set)
    for node in nodes:
        if node.kind == "feature" and node.layer in trace.feature_acts:
            wanted[node.layer].add(node.index)
    if not wanted:
        return {}
    model = trace.model
    with torch.no_grad():
        readers = final_norm(model).read_direction(model.W_U.T)  # [d_vocab, d_model]
        names: dict[tuple[int, int], str] = {}
        for layer, indices in wanted.items():
            ordered = sorted(indices)
            # Everything the layer's features write (every later layer, for a cross-layer transcoder).
            decoder = sum(d for (source, _), d in trace.decoders.items() if source == layer)
            for start in range(0, len(ordered), chunk):
                part = ordered[start : start + chunk]
                for index, token in zip(part, (decoder[part] @ readers.T).argmax(-1).tolist()):
                    names[(layer, index)] = f"→{json.dumps(display_token(model.to_single_str_token(token)), ensure_ascii=False)}"
    return {node: names[(node.layer, node.index)] for node in nodes if (node.layer, node.index) in names and node.kind == "feature"}


def node_caption(node: Node, graph: AttributionGraph, labels: Mapping[Node, str] | None = None) -> tuple[str, str]:
    """The two lines written under a node: its short id, and a label (the given one, or
    the tokens it is about)."""
    given = (labels or {}).get(node, "")
    tokens = graph.tokens
    if node == graph.root:
        return ("target", given or f"{graph.root_value:+.3g}")
    if node.kind == "feature":
        return (f"L{node.layer}/{node.index}", given)
    if node.kind == "head":
        return (f"L{node.layer}.H{node.index}", given or (f"from {_token(tokens, node.src)}" if node.src >= 0 else ""))
    if node.kind in ("embed", "pos_embed"):
        return ("emb" if node.kind == "embed" else "pos", given or _token(tokens, node.pos))
    short = {"error": "err", "mlp": "MLP", "skip": "skip", "transcoder_bias": "bias", "attn_bias": "attn bias", "target_bias": "const"}
    return (f"{short[node.kind]} L{node.layer}", given)


@dataclass
class _Layout:
    """Pixel positions (y down) of every node, and the columns and rows to label."""

    xy: dict[Node, tuple[float, float]]
    columns: list[tuple[float, float, str, int]]  # (left px, width px, token, position; -1 for "all")
    rows: list[tuple[float, str]]  # (y px, label)
    slot: float  # px per node side by side
    height: float


def _row_key(node: Node, root: Node) -> tuple[int, int]:
    """Rows bottom-up: embeddings, then per layer attention before MLP, the root on top."""
    if node.kind in ("embed", "pos_embed"):
        return (-1, 0)
    if node == root:
        return (10**6, 0)
    return (node.layer, 0 if node.kind in ("head", "attn_bias", "target_bias") else 1)


def _row_label(key: tuple[int, int]) -> str:
    layer, part = key
    if layer < 0:
        return "Emb"
    if layer == 10**6:
        return "Target"
    return f"L{layer} {'attn' if part == 0 else 'MLP'}"


def _layout(graph: AttributionGraph) -> _Layout:
    cells: dict[tuple[int, tuple[int, int]], list[Node]] = defaultdict(list)
    for node in graph.nodes:
        cells[(node.pos, _row_key(node, graph.root))].append(node)
    positions = ([-1] if any(pos < 0 for pos, _ in cells) else []) + list(range(len(graph.tokens)))
    counts = {pos: max([1] + [len(ns) for (p, _), ns in cells.items() if p == pos]) for pos in positions}
    slot = min(_MAX_SLOT, (WIDTH - _LEFT - _RIGHT) / sum(counts.values()))
    row_keys = sorted({key for _, key in cells})
    height = _TOP + _BOTTOM + _ROW * max(len(row_keys) - 1, 0) + 40
    row_y = {key: height - _BOTTOM - 40 - _ROW * i for i, key in enumerate(row_keys)}
    columns, starts, x = [], {}, _LEFT
    for pos in positions:
        starts[pos] = x
        columns.append((x, slot * counts[pos], "all" if pos < 0 else display_token(graph.tokens[pos]), pos))
        x += slot * counts[pos]
    xy = {}
    for (pos, key), nodes in cells.items():
        nodes.sort(key=lambda n: (-abs(graph.influence.get(n, 0.0)), n))
        offset = starts[pos] + slot * (counts[pos] - len(nodes)) / 2
        for i, node in enumerate(nodes):
            xy[node] = (offset + slot * (i + 0.5), row_y[key])
    return _Layout(xy, columns, [(row_y[k], _row_label(k)) for k in row_keys], slot, height)


def _drawn(graph: AttributionGraph, node_threshold: float | None, max_nodes: int | None, edge_threshold: float) -> AttributionGraph:
    return graph if node_threshold is None else prune(graph, node_threshold, edge_threshold, max_nodes=max_nodes)


def _drawn_edges(graph: AttributionGraph, max_edges: int | None) -> list[tuple[Edge, float]]:
    """Edges weakest first (so the strong ones are drawn on top), the strongest ``max_edges``."""
    edges = sorted(graph.edges.items(), key=lambda ew: -abs(ew[1]))
    if max_edges is not None:
        edges = edges[:max_edges]
    return edges[::-1]


def _bend(start: tuple[float, float], end: tuple[float, float]) -> tuple[float, float]:
    """The control point of an edge's quadratic curve: edges bow to one side in proportion
    to their length, so edges stacked in one column stay apart."""
    (x1, y1), (x2, y2) = start, end
    return (x1 + x2) / 2 + 0.12 * (y2 - y1), (y1 + y2) / 2 - 0.12 * (x2 - x1)


def _curve_points(start: tuple[float, float], end: tuple[float, float], n: int = 16) -> list[tuple[float, float]]:
    """Points along the quadratic curve both pictures draw."""
    (x1, y1), (x2, y2) = start, end
    cx, cy = _bend(start, end)
    return [
        ((1 - t) ** 2 * x1 + 2 * t * (1 - t) * cx + t**2 * x2, (1 - t) ** 2 * y1 + 2 * t * (1 - t) * cy + t**2 * y2)
        for t in (i / n for i in range(n + 1))
    ]


def _edge_style(weight: float, largest: float) -> tuple[float, float]:
    """Width (px) and opacity of an edge: both grow with its share of the strongest, so the
    main path stands out of the many weak edges."""
    share = abs(weight) / largest if largest > 0 else 1.0
    return 0.6 + 6.4 * share, 0.25 + 0.6 * share


def _radius(graph: AttributionGraph, node: Node, largest: float) -> float:
    if node == graph.root:
        return 13.0
    return 5.0 + 6.0 * math.sqrt(abs(graph.influence.get(node, 0.0)) / largest) if largest > 0 else 7.0


def _node_info(graph: AttributionGraph, node: Node, labels: Mapping[Node, str]) -> str:
    activation = graph.activation.get(node)
    lines = [
        node.id,
        describe_node(node, graph.tokens),
        f"influence: {graph.influence.get(node, 0.0):+.4g}",
        f"activation: {'-' if activation is None else f'{activation:.4g}'}",
    ]
    if node in labels:
        lines.append(f"label: {labels[node]}")
    if node == graph.root:
        lines.append(f"root value: {graph.root_value:+.4g}")
    return "\n".join(lines)


def _polygon(marker: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    """The SVG outline of a matplotlib marker (y down), about as large as a circle of radius ``r``."""

    def regular(n: int, start: float, radius: float) -> list[tuple[float, float]]:
        return [(x + radius * math.cos(start + 2 * math.pi * k / n), y - radius * math.sin(start + 2 * math.pi * k / n)) for k in range(n)]

    if marker == "s":
        return regular(4, math.pi / 4, r * 1.25)
    if marker == "^":
        return regular(3, math.pi / 2, r * 1.35)
    if marker == "d":
        return [(x, y - r * 1.2), (x + r * 0.8, y), (x, y + r * 1.2), (x - r * 0.8, y)]
    if marker == "p":
        return regular(5, math.pi / 2, r * 1.2)
    if marker == "h":
        return regular(6, math.pi / 2, r * 1.15)
    if marker == "*":
        outer, inner = regular(5, math.pi / 2, r * 1.3), regular(5, math.pi / 2 + math.pi / 5, r * 0.55)
        return [p for pair in zip(outer, inner) for p in pair]
    raise ValueError(f"marker {marker!r} has no SVG outline")


def _caption_y(is_root: bool, y: float, radius: float) -> tuple[float, float]:
    """Centre lines of a node's two caption lines: below it, or above it for the root (whose
    incoming edges arrive from below)."""
    if is_root:
        return y - radius - 20, y - radius - 8
    return y + radius + 9, y + radius + 21


def _fit(text: str, px: float, font: float) -> str:
    """``text`` cut to about ``px`` pixels of ``font``-px type."""
    limit = max(3, int(px / (0.56 * font)))
    return text if len(text) <= limit else text[: limit - 1] + "…"


_SCRIPT = """
(function () {
  var tip = document.getElementById("tip");
  var edges = Array.prototype.slice.call(document.querySelectorAll("path.edge"));
  function highlight(id) {
    edges.forEach(function (e) {
      var on = id === null || e.getAttribute("data-src") === id || e.getAttribute("data-dst") === id;
      e.style.opacity = id === null ? "" : (on ? "1" : "0.05");
    });
  }
  document.querySelectorAll(".node").forEach(function (c) {
    c.addEventListener("mouseenter", function () {
      tip.textContent = c.getAttribute("data-info");
      tip.style.display = "block";
      highlight(c.getAttribute("data-id"));
    });
    c.addEventListener("mousemove", function (ev) {
      tip.style.left = (ev.pageX + 14) + "px";
      tip.style.top = (ev.pageY + 14) + "px";
    });
    c.addEventListener("mouseleave", function () {
      tip.style.display = "none";
      highlight(null);
    });
  });
})();
"""

_STYLE = """
body { font-family: sans-serif; margin: 1em; color: #222; }
#tip { position: absolute; display: none; white-space: pre; background: #fff; border: 1px solid #999;
       padding: 4px 6px; font: 12px monospace; pointer-events: none; }
text { font: 12px sans-serif; fill: #333; }
text.caption { font-size: 11px; paint-order: stroke; stroke: #fff; stroke-width: 3px; }
text.label { font-size: 10px; fill: #555; paint-order: stroke; stroke: #fff; stroke-width: 3px; }
.node { stroke: #333; stroke-width: 0.8; cursor: default; }
.root { stroke-width: 2; }
path.edge { stroke-linecap: round; fill: none; }
"""


def _svg_shape(marker: str, x: float, y: float, r: float, attrs: str) -> str:
    if marker == "o":
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}" {attrs}/>'
    points = " ".join(f"{px:.1f},{py:.1f}" for px, py in _polygon(marker, x, y, r))
    return f'<polygon points="{points}" {attrs}/>'


def save_graph_html(
    graph: AttributionGraph,
    path: str | Path,
    title: str | None = None,
    max_edges: int | None = None,
    *,
    labels: Mapping[Node, str] | None = None,
    node_threshold: float | None = 0.8,
    max_nodes: int | None = 60,
    edge_threshold: float = 0.98,
) -> Path:
    """A standalone HTML file drawing ``graph`` pruned to the node budget (see the module
    docstring); ``max_edges`` keeps only the strongest edges drawn. Returns the path written."""
    graph = _drawn(graph, node_threshold, max_nodes, edge_threshold)
    labels = labels or {}
    layout = _layout(graph)
    ids = {node: f"n{i}" for i, node in enumerate(graph.nodes)}
    largest_edge = max((abs(w) for w in graph.edges.values()), default=0.0)
    largest_node = max((abs(v) for n, v in graph.influence.items() if n != graph.root), default=0.0)
    parts = []
    bottom = layout.height - _BOTTOM
    for y, label in layout.rows:
        parts.append(f'<line x1="{_LEFT - 6}" y1="{y}" x2="{WIDTH - _RIGHT}" y2="{y}" stroke="#eee"/>')
        parts.append(f'<text x="{_LEFT - 12}" y="{y + 4}" text-anchor="end">{html.escape(label)}</text>')
    for i, (x, span, label, pos) in enumerate(layout.columns):
        parts.append(
            f'<text x="{x + span / 2:.1f}" y="{bottom + 18:.1f}" text-anchor="middle" font-weight="bold">'
            f"{html.escape(_fit(label, span, 12))}</text>"
        )
        if pos >= 0:
            parts.append(f'<text x="{x + span / 2:.1f}" y="{bottom + 34:.1f}" text-anchor="middle" class="label">t{pos}</text>')
        if i > 0:
            parts.append(f'<line x1="{x:.1f}" y1="{_TOP - 20}" x2="{x:.1f}" y2="{bottom}" stroke="#f0f0f0"/>')
    for (src, dst), weight in _drawn_edges(graph, max_edges):
        (x1, y1), (x2, y2) = layout.xy[src], layout.xy[dst]
        cx, cy = _bend((x1, y1), (x2, y2))
        stroke, opacity = _edge_style(weight, largest_edge)
        parts.append(
            f'<path class="edge" d="M{x1:.1f},{y1:.1f} Q{cx:.1f},{cy:.1f} {x2:.1f},{y2:.1f}" '
            f'stroke="{POSITIVE if weight >= 0 else NEGATIVE}" stroke-width="{stroke:.2f}" stroke-opacity="{opacity:.2f}" '
            f'data-src="{ids[src]}" data-dst="{ids[dst]}" data-weight="{weight:.6g}"/>'
        )
    for node in graph.nodes:
        x, y = layout.xy[node]
        colour, marker = KIND_STYLES[node.kind]
        info = html.escape(_node_info(graph, node, labels)).replace("\n", "&#10;")
        css = "node root" if node == graph.root else "node"
        radius = _radius(graph, node, largest_node)
        parts.append(_svg_shape(marker, x, y, radius, f'class="{css}" fill="{colour}" data-id="{ids[node]}" data-info="{info}"'))
        first, second = node_caption(node, graph, labels)
        y1, y2 = _caption_y(node == graph.root, y, radius)
        parts.append(f'<text x="{x:.1f}" y="{y1 + 4:.1f}" text-anchor="middle" class="caption">{html.escape(_fit(first, layout.slot, 11))}</text>')
        if second:
            parts.append(f'<text x="{x:.1f}" y="{y2 + 4:.1f}" text-anchor="middle" class="label">{html.escape(_fit(second, layout.slot, 10))}</text>')
    present = [k for k in KINDS if any(n.kind == k for n in graph.nodes)]
    legend, lx = [], _LEFT
    for kind in present:
        colour, marker = KIND_STYLES[kind]
        legend.append(_svg_shape(marker, lx + 7, 24, 6, f'fill="{colour}" stroke="#333" stroke-width="0.8"'))
        legend.append(f'<text x="{lx + 18}" y="28">{KIND_NAMES[kind]}</text>')
        lx += 30 + 7.2 * len(KIND_NAMES[kind])
    legend.append(f'<line x1="{lx}" y1="24" x2="{lx + 22}" y2="24" stroke="{POSITIVE}" stroke-width="3"/><text x="{lx + 27}" y="28">positive</text>')
    legend.append(f'<line x1="{lx + 90}" y1="24" x2="{lx + 112}" y2="24" stroke="{NEGATIVE}" stroke-width="3"/><text x="{lx + 117}" y="28">negative</text>')
    heading = title or f"Attribution graph of {describe_node(graph.root, graph.tokens)} = {graph.root_value:+.4g}"
    document = (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(heading)}</title><style>{_STYLE}</style></head><body>"
        f"<h3>{html.escape(heading)}</h3>"
        f'<svg width="{WIDTH:.0f}" height="{layout.height:.0f}" viewBox="0 0 {WIDTH:.0f} {layout.height:.0f}">'
        + "".join(legend + parts)
        + f'</svg><div id="tip"></div><script>{_SCRIPT}</script></body></html>\n'
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document, encoding="utf-8")
    return path


def save_graph_png(
    graph: AttributionGraph,
    path: str | Path,
    title: str | None = None,
    max_edges: int | None = None,
    *,
    labels: Mapping[Node, str] | None = None,
    node_threshold: float | None = 0.8,
    max_nodes: int | None = 60,
    edge_threshold: float = 0.98,
    dpi: int = 100,
) -> Path:
    """``graph`` in the same layout as ``save_graph_html``, as a PNG (matplotlib, Agg) 1,920 px
    wide at the default ``dpi`` (which scales the whole picture)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patheffects import withStroke

    graph = _drawn(graph, node_threshold, max_nodes, edge_threshold)
    labels = labels or {}
    layout = _layout(graph)
    layout_dpi = 100  # the layout is in pixels at this resolution
    heading = 40.0
    fig = Figure(figsize=(WIDTH / layout_dpi, (layout.height + heading) / layout_dpi), dpi=layout_dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, layout.height / (layout.height + heading)))
    ax.set_xlim(0, WIDTH)
    ax.set_ylim(layout.height, 0)  # pixel coordinates, y down, as the SVG
    ax.axis("off")
    px = 72.0 / layout_dpi  # points per pixel, for font sizes and marker sizes
    halo = [withStroke(linewidth=3 * px, foreground="white")]  # captions stay readable over edges
    bottom = layout.height - _BOTTOM
    for y, label in layout.rows:
        ax.plot([_LEFT - 6, WIDTH - _RIGHT], [y, y], color="#eee", linewidth=0.8, zorder=0)
        ax.text(_LEFT - 12, y, label, ha="right", va="center", fontsize=12 * px)
    for i, (x, span, label, pos) in enumerate(layout.columns):
        ax.text(x + span / 2, bottom + 14, _fit(label, span, 12), ha="center", va="center", fontsize=12 * px, fontweight="bold")
        if pos >= 0:
            ax.text(x + span / 2, bottom + 30, f"t{pos}", ha="center", va="center", fontsize=10 * px, color="#555")
        if i > 0:
            ax.plot([x, x], [_TOP - 20, bottom], color="#f0f0f0", linewidth=0.8, zorder=0)
    edges = _drawn_edges(graph, max_edges)
    largest_edge = max((abs(w) for _, w in edges), default=0.0)
    if edges:
        segments = [_curve_points(layout.xy[src], layout.xy[dst]) for (src, dst), _ in edges]
        styles = [_edge_style(w, largest_edge) for _, w in edges]
        widths = [width * px for width, _ in styles]
        colours = [to_rgba(POSITIVE if w >= 0 else NEGATIVE, alpha) for (_, w), (_, alpha) in zip(edges, styles)]
        ax.add_collection(LineCollection(segments, linewidths=widths, colors=colours, zorder=1))
    largest_node = max((abs(v) for n, v in graph.influence.items() if n != graph.root), default=0.0)
    for node in graph.nodes:
        x, y = layout.xy[node]
        colour, marker = KIND_STYLES[node.kind]
        radius = _radius(graph, node, largest_node)
        ax.scatter([x], [y], s=(2.2 * radius * px) ** 2, c=colour, marker=marker, edgecolors="#333",
                   linewidths=(2.0 if node == graph.root else 0.8) * px, zorder=2)
        first, second = node_caption(node, graph, labels)
        y1, y2 = _caption_y(node == graph.root, y, radius)
        ax.text(x, y1, _fit(first, layout.slot, 11), ha="center", va="center", fontsize=11 * px, zorder=3, path_effects=halo)
        if second:
            ax.text(x, y2, _fit(second, layout.slot, 10), ha="center", va="center", fontsize=10 * px, color="#555", zorder=3, path_effects=halo)
    present = [k for k in KINDS if any(n.kind == k for n in graph.nodes)]
    handles = [
        Line2D([], [], linestyle="", marker=KIND_STYLES[k][1], markerfacecolor=KIND_STYLES[k][0], markeredgecolor="#333",
               markersize=12 * px, label=KIND_NAMES[k])
        for k in present
    ]
    handles += [Line2D([], [], color=POSITIVE, linewidth=3 * px, label="positive"), Line2D([], [], color=NEGATIVE, linewidth=3 * px, label="negative")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(_LEFT / WIDTH, 1.0), ncol=len(handles), frameon=False,
              fontsize=12 * px, handletextpad=0.3, columnspacing=1.2)
    fig.suptitle(title or f"{describe_node(graph.root, graph.tokens)} = {graph.root_value:+.4g}", fontsize=14 * px, y=1 - 8 / (layout.height + heading))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
