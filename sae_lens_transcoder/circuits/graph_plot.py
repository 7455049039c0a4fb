"""Pictures of attribution graphs (a standalone HTML file and a PNG) and paths as text.

Both pictures share one layout: prompt tokens left to right, and from the bottom up the
embeddings, then for every layer a row for attention (heads, attention bias, and the
constants of the targets read there) and a row for the MLP (features, error, skip,
transcoder bias, unreplaced MLPs), and the root on top. A head sits at its destination
token. Nodes of one cell stand side by side, most influential first; a column is as wide
as its fullest cell. Position-merged graphs get one extra column, "all", on the left.
Node colour is the kind, node size grows with absolute influence, edge width with absolute
weight, and edge colour is the sign (blue positive, red negative).

The HTML file needs nothing from the network: the SVG and a few lines of script (hover
shows a node's id, influence and activation and highlights its edges) are inline.
"""

import html
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sae_lens_transcoder.circuits.graph import AttributionGraph, Edge
from sae_lens_transcoder.circuits.graph_json import display_token
from sae_lens_transcoder.circuits.nodes import KINDS, Node
from sae_lens_transcoder.circuits.paths import Path as CircuitPath

KIND_COLOURS: dict[str, str] = {
    "embed": "#59a14f",
    "pos_embed": "#8cd17d",
    "head": "#f28e2b",
    "attn_bias": "#c9b9a8",
    "feature": "#4e79a7",
    "transcoder_bias": "#a0a0a0",
    "skip": "#76b7b2",
    "error": "#e15759",
    "mlp": "#b07aa1",
    "target_bias": "#7f7f7f",
    "target": "#edc948",
}
POSITIVE, NEGATIVE = "#2f6db5", "#d1495b"


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


@dataclass
class _Layout:
    """Positions in grid units: x in node slots from the left, y in rows from the bottom."""

    xy: dict[Node, tuple[float, float]]
    columns: list[tuple[float, float, str]]  # (start, width, label)
    rows: list[str]  # label of every row, bottom first

    @property
    def width(self) -> float:
        return self.columns[-1][0] + self.columns[-1][1] if self.columns else 1.0


def _row(node: Node, root: Node) -> int:
    if node.kind in ("embed", "pos_embed"):
        return 0
    if node == root and node.kind == "target":
        return 2 + 2 * node.layer
    if node.kind in ("head", "attn_bias", "target_bias"):
        return 1 + 2 * node.layer
    return 2 + 2 * node.layer


def _layout(graph: AttributionGraph) -> _Layout:
    cells: dict[tuple[int, int], list[Node]] = defaultdict(list)
    for node in graph.nodes:
        cells[(node.pos, _row(node, graph.root))].append(node)
    positions = ([-1] if any(pos < 0 for pos, _ in cells) else []) + list(range(len(graph.tokens)))
    widths = {pos: max([1] + [len(ns) for (p, _), ns in cells.items() if p == pos]) for pos in positions}
    columns, start = [], 0.0
    starts = {}
    for pos in positions:
        starts[pos] = start
        columns.append((start, float(widths[pos]), "all" if pos < 0 else display_token(graph.tokens[pos])))
        start += widths[pos]
    xy = {}
    for (pos, row), nodes in cells.items():
        nodes.sort(key=lambda n: (-abs(graph.influence.get(n, 0.0)), n))
        offset = starts[pos] + (widths[pos] - len(nodes)) / 2
        for i, node in enumerate(nodes):
            xy[node] = (offset + i + 0.5, float(row))
    top = max(int(y) for _, y in xy.values())
    rows = ["Emb"] + [f"L{(r - 1) // 2} {'attn' if r % 2 else 'MLP'}" for r in range(1, top + 1)]
    if graph.root.kind == "target":
        rows[_row(graph.root, graph.root)] = "Target"
        below = 1 + 2 * graph.root.layer
        if all(node.kind == "target_bias" for node, (_, y) in xy.items() if y == below):
            rows[below] = "Target const"
    return _Layout(xy, columns, rows)


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


def _node_radius(graph: AttributionGraph, node: Node, largest: float) -> float:
    return 4.0 + 5.0 * math.sqrt(abs(graph.influence.get(node, 0.0)) / largest) if largest > 0 else 5.0


def _node_info(graph: AttributionGraph, node: Node) -> str:
    activation = graph.activation.get(node)
    lines = [
        node.id,
        describe_node(node, graph.tokens),
        f"influence: {graph.influence.get(node, 0.0):+.4g}",
        f"activation: {'-' if activation is None else f'{activation:.4g}'}",
    ]
    if node == graph.root:
        lines.append(f"root value: {graph.root_value:+.4g}")
    return "\n".join(lines)


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
  document.querySelectorAll("circle.node").forEach(function (c) {
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
text { font: 11px sans-serif; fill: #333; }
circle.node { stroke: #333; stroke-width: 0.6; cursor: default; }
circle.root { stroke-width: 2; }
path.edge { stroke-linecap: round; }
"""


def save_graph_html(
    graph: AttributionGraph, path: str | Path, title: str | None = None, max_edges: int | None = None
) -> Path:
    """A standalone HTML file drawing ``graph`` (see the module docstring); ``max_edges``
    keeps only the strongest edges. Returns the path written."""
    layout = _layout(graph)
    sx, sy = 30.0, 56.0
    left, right, top, bottom = 90.0, 20.0, 30.0, 110.0
    n_rows = len(layout.rows)
    width, height = left + right + sx * layout.width, top + bottom + sy * (n_rows - 1)

    def px(node: Node) -> tuple[float, float]:
        x, y = layout.xy[node]
        return left + sx * x, top + sy * (n_rows - 1 - y)

    ids = {node: f"n{i}" for i, node in enumerate(graph.nodes)}
    largest_edge = max((abs(w) for w in graph.edges.values()), default=0.0)
    largest_node = max((abs(v) for n, v in graph.influence.items() if n != graph.root), default=0.0)
    parts = []
    for row, label in enumerate(layout.rows):
        y = top + sy * (n_rows - 1 - row)
        parts.append(f'<line x1="{left - 6}" y1="{y}" x2="{width - right}" y2="{y}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 10}" y="{y + 4}" text-anchor="end">{html.escape(label)}</text>')
    for start, span, label in layout.columns:
        x = left + sx * (start + span / 2)
        y = top + sy * (n_rows - 1) + 18
        parts.append(
            f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="end" transform="rotate(-45 {x:.1f} {y:.1f})">{html.escape(label)}</text>'
        )
        if start > 0:
            xs = left + sx * start
            parts.append(f'<line x1="{xs}" y1="{top - 10}" x2="{xs}" y2="{top + sy * (n_rows - 1) + 8}" stroke="#f3f3f3"/>')
    for (src, dst), weight in _drawn_edges(graph, max_edges):
        (x1, y1), (x2, y2) = px(src), px(dst)
        cx, cy = _bend((x1, y1), (x2, y2))
        stroke = 0.5 + 5.5 * abs(weight) / largest_edge if largest_edge > 0 else 1.0
        parts.append(
            f'<path class="edge" d="M{x1:.1f},{y1:.1f} Q{cx:.1f},{cy:.1f} {x2:.1f},{y2:.1f}" fill="none" '
            f'stroke="{POSITIVE if weight >= 0 else NEGATIVE}" stroke-width="{stroke:.2f}" stroke-opacity="0.55" '
            f'data-src="{ids[src]}" data-dst="{ids[dst]}" data-weight="{weight:.6g}"/>'
        )
    for node in graph.nodes:
        x, y = px(node)
        info = html.escape(_node_info(graph, node)).replace("\n", "&#10;")
        css = "node root" if node == graph.root else "node"
        radius = 10.0 if node == graph.root else _node_radius(graph, node, largest_node)
        parts.append(
            f'<circle class="{css}" cx="{x:.1f}" cy="{y:.1f}" r="{radius:.1f}" fill="{KIND_COLOURS[node.kind]}" '
            f'data-id="{ids[node]}" data-info="{info}"><title>{info}</title></circle>'
        )
    present = [k for k in KINDS if any(n.kind == k for n in graph.nodes)]
    legend = " ".join(
        f'<span style="display:inline-block;width:10px;height:10px;border-radius:5px;background:{KIND_COLOURS[k]}"></span> {k}'
        for k in present
    )
    legend += (
        f' &nbsp; <span style="color:{POSITIVE}">&#9644; positive</span>'
        f' <span style="color:{NEGATIVE}">&#9644; negative</span>'
    )
    heading = title or f"Attribution graph of {describe_node(graph.root, graph.tokens)} = {graph.root_value:+.4g}"
    document = (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(heading)}</title><style>{_STYLE}</style></head><body>"
        f"<h3>{html.escape(heading)}</h3><div>{legend}</div>"
        f'<svg width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}">'
        + "".join(parts)
        + f'</svg><div id="tip"></div><script>{_SCRIPT}</script></body></html>\n'
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document, encoding="utf-8")
    return path


def _curve_points(start: tuple[float, float], end: tuple[float, float], n: int = 12) -> list[tuple[float, float]]:
    """Points along the same curve ``save_graph_html`` draws (y grows upwards here)."""
    (x1, y1), (x2, y2) = start, end
    cx, cy = _bend((x1, -y1), (x2, -y2))
    cy = -cy
    points = []
    for i in range(n + 1):
        t = i / n
        a, b, c = (1 - t) ** 2, 2 * t * (1 - t), t**2
        points.append((a * x1 + b * cx + c * x2, a * y1 + b * cy + c * y2))
    return points


def save_graph_png(
    graph: AttributionGraph, path: str | Path, title: str | None = None, max_edges: int | None = None, dpi: int = 120
) -> Path:
    """``graph`` in the same layout as ``save_graph_html``, as a PNG (matplotlib, Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    layout = _layout(graph)
    n_rows = len(layout.rows)
    fig = Figure(figsize=(min(40.0, max(6.0, 0.4 * layout.width + 2)), min(30.0, max(3.5, 0.7 * n_rows + 1.5))))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    edges = _drawn_edges(graph, max_edges)
    largest_edge = max((abs(w) for _, w in edges), default=0.0)
    if edges:
        segments = [_curve_points(layout.xy[src], layout.xy[dst]) for (src, dst), _ in edges]
        widths = [0.3 + 3.5 * abs(w) / largest_edge if largest_edge > 0 else 1.0 for _, w in edges]
        colours = [POSITIVE if w >= 0 else NEGATIVE for _, w in edges]
        ax.add_collection(LineCollection(segments, linewidths=widths, colors=colours, alpha=0.55, zorder=1))
    largest_node = max((abs(v) for n, v in graph.influence.items() if n != graph.root), default=0.0)
    for kind in KINDS:
        nodes = [n for n in graph.nodes if n.kind == kind]
        if not nodes:
            continue
        sizes = [120.0 if n == graph.root else _node_radius(graph, n, largest_node) ** 2 for n in nodes]
        ax.scatter(
            [layout.xy[n][0] for n in nodes], [layout.xy[n][1] for n in nodes], s=sizes,
            c=KIND_COLOURS[kind], edgecolors="#333", linewidths=0.5, zorder=2, label=kind,
        )
    ax.set_xlim(0, layout.width)
    ax.set_ylim(-0.6, n_rows - 0.4)
    ax.set_yticks(range(n_rows), layout.rows)
    ax.set_xticks([s + w / 2 for s, w, _ in layout.columns], [label for _, _, label in layout.columns], rotation=45, ha="right")
    for start, _, _ in layout.columns[1:]:
        ax.axvline(start, color="#eee", linewidth=0.8, zorder=0)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    ax.set_title(title or f"{describe_node(graph.root, graph.tokens)} = {graph.root_value:+.4g}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
