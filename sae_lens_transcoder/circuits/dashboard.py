"""Per-feature dashboards: where a feature fires on real text, and what its weights say.

The contexts come from encoding the model's own activations at the features' input hook over
a token set, keeping only a streaming top-k; everything else is input-invariant
(``weights.py``). Any replacement set works, so a cross-layer transcoder's feature gets a
dashboard too (it also lists the layers the feature writes into). The result is a plain dict
of JSON types, so the same object is saved as JSON and rendered as a standalone HTML file.
"""

import html
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer

from sae_lens_transcoder.circuits.weights import (
    Transcoders,
    at_layer,
    de_embedding,
    feature_connections,
    logit_lens,
    ov_norm_map,
    top_tokens,
    writes,
)
from sae_lens_transcoder.hooks import ensure_input_hooks, hook_layer
from sae_lens_transcoder.replacement import ReplacementSet

Dashboard = dict[str, Any]


@dataclass
class Context:
    """One of a feature's top activations and the token window around it.

    ``start`` is the window's first position in sequence ``sequence``; ``activations`` are
    the feature's activations on ``tokens``, for highlighting.
    """

    activation: float
    sequence: int
    position: int
    start: int
    tokens: list[str]
    activations: list[float]


@dataclass
class _TopK:
    """The ``k`` highest activations seen so far, each with its sequence's activations."""

    k: int
    values: torch.Tensor
    sequences: torch.Tensor
    positions: torch.Tensor
    rows: torch.Tensor  # [n, seq]: the feature's activations on each kept sequence

    @classmethod
    def empty(cls, k: int, n_pos: int) -> "_TopK":
        none = torch.empty(0, dtype=torch.long)
        return cls(k, torch.empty(0), none, none, torch.empty(0, n_pos))

    def update(self, acts: torch.Tensor, offset: int) -> None:
        """Merge a batch ``[b, seq]`` of activations whose first sequence is ``offset``."""
        acts = acts.float().cpu()
        values, flat = acts.flatten().topk(min(self.k, acts.numel()))
        rows = flat // acts.shape[1]
        self.values = torch.cat([self.values, values])
        self.sequences = torch.cat([self.sequences, rows + offset])
        self.positions = torch.cat([self.positions, flat % acts.shape[1]])
        self.rows = torch.cat([self.rows, acts[rows]])
        keep = self.values.topk(min(self.k, len(self.values))).indices
        self.values, self.sequences, self.positions, self.rows = (
            self.values[keep], self.sequences[keep], self.positions[keep], self.rows[keep]
        )


@torch.no_grad()
def _scan(
    model: HookedTransformer, replacement: ReplacementSet, layer: int, feature: int, tokens: torch.Tensor, k: int, batch_size: int
) -> tuple[_TopK, float]:
    """One batched pass over ``tokens``: the top ``k`` activations and the activation density.

    The features read the model's own activations at ``hook_in(layer)`` (splicing with the
    error term would leave them unchanged), so the model stops after that layer.
    """
    hook = replacement.hook_in(layer)
    ensure_input_hooks(model, [hook])
    top = _TopK.empty(k, tokens.shape[1])
    n_active = 0
    for offset in range(0, tokens.shape[0], batch_size):
        batch = tokens[offset : offset + batch_size].to(model.cfg.device)
        _, cache = model.run_with_cache(batch, names_filter=[hook], stop_at_layer=hook_layer(hook) + 1)
        acts = replacement.encode(layer, cache[hook])[..., feature]
        top.update(acts, offset)
        n_active += int((acts > 0).sum())
    return top, n_active / tokens.numel()


def _contexts(model: HookedTransformer, top: _TopK, tokens: torch.Tensor, window: tuple[int, int]) -> list[Context]:
    """Cut each top activation's window out of its sequence, clipped at the sequence's edges."""
    contexts = []
    for value, seq, pos, row in zip(top.values.tolist(), top.sequences.tolist(), top.positions.tolist(), top.rows):
        start, stop = max(0, pos - window[0]), min(tokens.shape[1], pos + window[1] + 1)
        strings = [str(t) for t in model.to_str_tokens(tokens[seq, start:stop])]
        contexts.append(Context(value, seq, pos, start, strings, row[start:stop].tolist()))
    return contexts


def top_activating_contexts(
    model: HookedTransformer,
    transcoders: Transcoders,
    feature: int,
    tokens: torch.Tensor,
    k: int = 10,
    window: tuple[int, int] = (8, 4),
    batch_size: int = 32,
    layer: int | None = None,
) -> list[Context]:
    """The ``k`` highest activations of ``feature`` (of ``layer``, for a set covering several)
    over ``tokens`` ``[batch, seq]``, highest first, each with ``window`` = (tokens before,
    tokens after) of context."""
    replacement, layer = at_layer(transcoders, layer)
    top, _ = _scan(model, replacement, layer, feature, tokens, k, batch_size)
    return _contexts(model, top, tokens, window)


def _scored_tokens(model: HookedTransformer, scores: torch.Tensor, k: int) -> dict[str, list[dict[str, Any]]]:
    top, bottom = top_tokens(model, scores, k)
    return {name: [{"token": t, "score": s} for t, s in pairs] for name, pairs in (("top", top), ("bottom", bottom))}


def _head_section(model: HookedTransformer, replacement: ReplacementSet, layer: int, feature: int, k: int) -> dict[str, Any]:
    """Heads ranked by how strongly their OV circuit can write the feature's input direction,
    and what the best one would have to read at its source token."""
    norms = ov_norm_map(model, replacement, feature, layer)
    if norms.numel() == 0:  # no attention layer before this MLP
        return {"top_heads": [], "best_head_de_embedding": {"top": [], "bottom": []}}
    values, flat = norms.flatten().topk(min(k, norms.numel()))
    heads = [
        {"layer": int(i) // norms.shape[1], "head": int(i) % norms.shape[1], "norm": float(v)}
        for v, i in zip(values, flat)
    ]
    best = (heads[0]["layer"], heads[0]["head"])
    de_embed = de_embedding(model, replacement, feature, head=best, layer=layer)
    return {"top_heads": heads, "best_head_de_embedding": _scored_tokens(model, de_embed, k)}


Upstream = Transcoders | int


def _connections(
    model: HookedTransformer, upstream: Upstream, replacement: ReplacementSet, layer: int, feature: int, k: int
) -> dict[str, Any]:
    """The upstream features that excite and inhibit ``feature`` most, weights only; an ``int``
    upstream is that layer of the feature's own transcoders."""
    up_set, up_layer = at_layer(replacement, upstream) if isinstance(upstream, int) else at_layer(upstream)
    if up_layer >= layer:
        raise ValueError(f"upstream transcoder {up_set.hook_out(up_layer)!r} is not before layer {layer}.")
    scores = feature_connections(model, up_set, replacement, feature, up_layer, layer)
    top, bottom = scores.topk(min(k, len(scores))), (-scores).topk(min(k, len(scores)))
    return {
        "hook_name": up_set.hook_in(up_layer),
        "layer": up_layer,
        "top": [{"feature": int(i), "score": float(v)} for v, i in zip(top.values, top.indices)],
        "bottom": [{"feature": int(i), "score": -float(v)} for v, i in zip(bottom.values, bottom.indices)],
    }


def feature_dashboard(
    model: HookedTransformer,
    transcoders: Transcoders,
    feature: int,
    tokens: torch.Tensor,
    upstream: Sequence[Upstream] = (),
    k: int = 10,
    window: tuple[int, int] = (8, 4),
    batch_size: int = 32,
    layer: int | None = None,
) -> Dashboard:
    """Everything known about one feature, as JSON types: top contexts, density, the layers it
    writes into, logit lens, de-embedding, top heads by OV norm, and connections from each
    ``upstream`` transcoder (or, given as an int, each earlier layer of the same transcoders).

    ``transcoders`` is one transcoder, or a replacement set and ``layer`` the layer the
    feature reads — a cross-layer transcoder's feature writes into several layers, and its
    logit lens and connections are those of its summed writes.
    """
    replacement, layer = at_layer(transcoders, layer)
    top, density = _scan(model, replacement, layer, feature, tokens, k, batch_size)
    return {
        "feature": feature,
        "hook_name": replacement.hook_in(layer),
        "layer": layer,
        "n_tokens": tokens.numel(),
        "density": density,
        "writes": [{"layer": out, "norm": norm} for out, norm in writes(replacement, feature, layer)],
        "contexts": [asdict(c) for c in _contexts(model, top, tokens, window)],
        "logit_lens": _scored_tokens(model, logit_lens(model, replacement, feature, layer), k),
        "de_embedding": _scored_tokens(model, de_embedding(model, replacement, feature, layer=layer), k),
        **_head_section(model, replacement, layer, feature, k),
        "upstream": [_connections(model, up, replacement, layer, feature, k) for up in upstream],
    }


def save_dashboard_json(dashboard: Dashboard, path: str | Path) -> None:
    """The dashboard as JSON, for other viewers or for comparing features later."""
    Path(path).write_text(json.dumps(dashboard, indent=1))


NEWLINE = "\u21b5"  # shown for "\n" so that each context stays on one line
_CSS = """
body { font-family: sans-serif; margin: 2em; color: #222; }
.ctx { font-family: monospace; margin: 0.3em 0; }
.tok { white-space: pre; padding: 0 1px; }
.focus { outline: 1px solid #333; }
table { border-collapse: collapse; margin: 0.5em 2em 1em 0; display: inline-table; vertical-align: top; }
td, th { border: 1px solid #ccc; padding: 2px 6px; font-family: monospace; white-space: pre; }
"""


def _context_html(context: dict[str, Any], max_act: float) -> str:
    """One context as token spans whose orange background grows with the activation."""
    focus = context["position"] - context["start"]
    spans = []
    for i, (token, act) in enumerate(zip(context["tokens"], context["activations"])):
        alpha = max(act, 0.0) / max_act if max_act > 0 else 0.0
        cls = "tok focus" if i == focus else "tok"
        text = html.escape(token.replace("\n", NEWLINE))
        spans.append(f'<span class="{cls}" style="background-color: rgba(255, 140, 0, {alpha:.3f})" title="{act:.4g}">{text}</span>')
    return f'<div class="ctx">{context["activation"]:.3f} &nbsp; {"".join(spans)}</div>'


def _table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(f'{c:.4g}' if isinstance(c, float) else str(c))}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><caption>{html.escape(title)}</caption><tr>{head}</tr>{body}</table>"


def _token_tables(title: str, section: dict[str, list[dict[str, Any]]]) -> str:
    return "".join(
        _table(f"{title}: {side}", ("token", "score"), [(t["token"], t["score"]) for t in section[side]])
        for side in ("top", "bottom")
    )


def save_dashboard_html(dashboard: Dashboard, path: str | Path) -> None:
    """A standalone page (inline CSS, no scripts or network) for one feature's dashboard."""
    max_act = max((c["activation"] for c in dashboard["contexts"]), default=0.0)
    title = f"Feature {dashboard['feature']} of {dashboard['hook_name']}"
    heads = [(h["layer"], h["head"], h["norm"]) for h in dashboard["top_heads"]]
    best = f"L{heads[0][0]}H{heads[0][1]}" if heads else "-"
    upstream = "".join(
        _table(f"from {up['hook_name']}: {side}", ("feature", "score"), [(c["feature"], c["score"]) for c in up[side]])
        for up in dashboard["upstream"]
        for side in ("top", "bottom")
    )
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>density {dashboard['density']:.3%} of {dashboard['n_tokens']} tokens</p>",
        _table("writes into", ("layer", "decoder norm"), [(w["layer"], w["norm"]) for w in dashboard["writes"]]),
        "<h2>Top activating contexts</h2>",
        *(_context_html(c, max_act) for c in dashboard["contexts"]),
        "<h2>Logit lens</h2>",
        _token_tables("logit lens", dashboard["logit_lens"]),
        "<h2>De-embedding (direct)</h2>",
        _token_tables("de-embedding", dashboard["de_embedding"]),
        "<h2>Heads by OV norm</h2>",
        _table("top heads", ("layer", "head", "norm"), heads),
        _token_tables(f"de-embedding through {best}", dashboard["best_head_de_embedding"]),
        "<h2>Upstream connections</h2>" + upstream if upstream else "",
    ]
    page = (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    Path(path).write_text(page, encoding="utf-8")
