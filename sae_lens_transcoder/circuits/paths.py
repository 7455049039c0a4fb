"""Greedy beam search for the paths that carry most of a target's value (the paper's method).

Each step extends every open path by its node's direct contributors, and keeps the
``num_branches`` extensions with the largest contribution. Because children are scaled
into the root's units, a path's value is simply its last node's contribution.
"""

from collections.abc import Callable, Collection
from dataclasses import dataclass

from sae_lens_transcoder.circuits.attribution import Target, child_target, direct_contributions
from sae_lens_transcoder.circuits.nodes import Node
from sae_lens_transcoder.circuits.trace import Trace


@dataclass(frozen=True)
class NodeSpec:
    """Which nodes match; ``None`` fields match anything. ``pos`` of a head is its source token."""

    kinds: Collection[str] | None = None
    layers: Collection[int] | None = None
    positions: Collection[int] | None = None
    indices: Collection[int] | None = None  # feature ids or head ids

    def __call__(self, node: Node) -> bool:
        pos = node.src if node.kind == "head" else node.pos
        return (
            (self.kinds is None or node.kind in self.kinds)
            and (self.layers is None or node.layer in self.layers)
            and (self.positions is None or pos in self.positions)
            and (self.indices is None or node.index in self.indices)
        )


@dataclass(frozen=True)
class Path:
    """Nodes from the root upstream; ``value`` is the last node's contribution in root units."""

    nodes: tuple[Node, ...]
    value: float
    target: Target | None  # the last node's target, to extend from

    def __str__(self) -> str:
        return " <- ".join(str(n) for n in self.nodes) + f"  ({self.value:+.4f})"


PathFilter = Callable[[Path], bool]


def ends_with(spec: NodeSpec) -> PathFilter:
    return lambda path: spec(path.nodes[-1])


def passes_through(spec: NodeSpec) -> PathFilter:
    return lambda path: any(spec(n) for n in path.nodes[1:])


def avoids(spec: NodeSpec) -> PathFilter:
    return lambda path: not any(spec(n) for n in path.nodes[1:])


def _touches_bos(node: Node) -> bool:
    return (node.src if node.kind == "head" else node.pos) == 0


def find_paths(
    trace: Trace,
    root: Target,
    num_iters: int = 3,
    num_branches: int = 10,
    include: Callable[[Node], bool] | None = None,
    exclude: Callable[[Node], bool] | None = None,
    path_filter: PathFilter | None = None,
    exclude_bos: bool = True,
) -> list[Path]:
    """Every path found in ``num_iters`` rounds, strongest first.

    ``include``/``exclude`` decide which nodes a path may step to; ``path_filter`` selects
    among the finished paths (see ``ends_with``, ``passes_through``, ``avoids``). With
    ``exclude_bos`` nodes at (or reading from) token 0 are skipped, as attention sinks
    there dominate otherwise.
    """
    if num_iters < 1 or num_branches < 1:
        raise ValueError(f"num_iters={num_iters} and num_branches={num_branches} must both be at least 1.")

    def allowed(node: Node) -> bool:
        return (
            (include is None or include(node))
            and not (exclude is not None and exclude(node))
            and not (exclude_bos and _touches_bos(node))
        )

    frontier = [Path((root.node,), 0.0, root)]
    found: list[Path] = []
    for _ in range(num_iters):
        extensions: list[Path] = []
        for path in frontier:
            assert path.target is not None
            for node, value in direct_contributions(trace, path.target).top(num_branches, keep=allowed):
                child = child_target(trace, path.target, node) if node.expandable else None
                extensions.append(Path((*path.nodes, node), value, child))
        extensions.sort(key=lambda p: -abs(p.value))
        kept = extensions[:num_branches]
        found += kept
        frontier = [p for p in kept if p.target is not None]
        if not frontier:
            break
    found.sort(key=lambda p: -abs(p.value))
    return [p for p in found if path_filter is None or path_filter(p)]
