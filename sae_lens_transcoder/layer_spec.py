"""``sae.mlp_layers``: which MLPs a transcoder set replaces, as users write it.

Accepted: a list of layers (``[0, 1, 2]`` in Python, YAML or JSON), or a string of
comma-separated layers and inclusive ranges (``"0-29"``, ``"0,2,5-7"``, as ``--mlp_layers``
takes it), or ``"all"``.
"""

from collections.abc import Sequence

ALL = "all"


def _bad(spec: object, why: str) -> ValueError:
    return ValueError(
        f"sae.mlp_layers={spec!r}: {why}. Give layers like [0, 1, 2], '0-29', '0,2,5-7' or 'all'."
    )


def parse_mlp_layers(spec: str | Sequence[int], n_layers: int | None = None) -> list[int]:
    """The sorted, distinct layers of ``spec``; ``n_layers`` (the model's) resolves ``all`` and
    bounds the rest. Without it only the format is checked (``all`` gives ``[]``)."""
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == ALL:
            return list(range(n_layers)) if n_layers is not None else []
        layers: list[int] = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            first, dash, last = part.partition("-")
            if not (first.isdigit() and (not dash or last.isdigit())):
                raise _bad(spec, f"{part!r} is not a layer or a range")
            start, stop = int(first), int(last) if dash else int(first)
            if stop < start:
                raise _bad(spec, f"the range {part!r} is empty")
            layers += range(start, stop + 1)
    elif isinstance(spec, Sequence) and all(isinstance(x, int) and not isinstance(x, bool) for x in spec):
        layers = list(spec)
    else:
        raise _bad(spec, "it is neither a list of integers nor a string")
    if not layers and not (isinstance(spec, str) and spec.strip().lower() == ALL):
        raise _bad(spec, "no layer given")
    if any(layer < 0 for layer in layers):
        raise _bad(spec, "layers are counted from 0")
    if n_layers is not None and max(layers) >= n_layers:
        raise _bad(spec, f"the model has {n_layers} layers (0-{n_layers - 1})")
    return sorted(set(layers))
