"""Nodes of an attribution: every term the frozen model's residual stream is a sum of."""

from dataclasses import dataclass

#: Nodes whose own value is again a linear function of earlier residual streams, so
#: attribution can recurse through them.
EXPANDABLE = frozenset({"feature", "head"})

#: Every kind of node, in the order graphs list them.
KINDS = (
    "embed",
    "pos_embed",
    "head",
    "attn_bias",
    "feature",
    "transcoder_bias",
    "skip",
    "error",
    "mlp",
    "target_bias",
    "target",
)


@dataclass(frozen=True, order=True)
class Node:
    """One term of the decomposition.

    ``layer`` is -1 for embeddings and ``n_layers`` for logit targets; ``index`` is the
    feature id or head id (-1 otherwise); ``src`` is a head's source token (-1 otherwise).
    ``kind`` "mlp" is a whole MLP that no transcoder replaces; "error" is MLP out minus
    transcoder out; "target_bias" is the constant part of the node being decomposed.
    """

    kind: str
    layer: int
    pos: int
    index: int = -1
    src: int = -1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Node kind {self.kind!r} is not one of {KINDS}")

    @property
    def expandable(self) -> bool:
        return self.kind in EXPANDABLE

    @property
    def id(self) -> str:
        parts = [self.kind, f"L{self.layer}", f"t{self.pos}"]
        if self.kind == "feature":
            parts.append(f"f{self.index}")
        elif self.kind == "head":
            parts += [f"h{self.index}", f"s{self.src}"]
        elif self.index >= 0:
            parts.append(f"i{self.index}")
        return "/".join(parts)

    def __str__(self) -> str:
        return self.id
