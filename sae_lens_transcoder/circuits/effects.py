"""Direct effects with attention folded in, as circuit-tracer defines them.

With patterns and norm scales frozen and MLPs replaced by their (frozen) transcoder terms,
the target is linear in every feature activation, error, bias and embedding at every
token: attention only moves information along fixed, linear paths. Walking the layers
down with one residual direction per token gives all those effects in one pass, exactly.
Use this to compare with circuit-tracer; use ``attribution.direct_contributions`` when
heads should be nodes of their own.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from sae_lens_transcoder.circuits.attribution import Target
from sae_lens_transcoder.circuits.trace import Trace


@dataclass
class Effects:
    """Effects on one target of every term at every token."""

    features: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [pos, d_sae]
    errors: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [pos] (whole MLP if not replaced)
    skips: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [pos]
    embed: torch.Tensor | None = None  # [pos], token + positional embedding
    bias: float = 0.0  # all constant terms: biases of attention, transcoders, norms, the target

    def total(self) -> float:
        terms = [*self.features.values(), *self.errors.values(), *self.skips.values()]
        embed = 0.0 if self.embed is None else float(self.embed.sum())
        return sum(float(t.sum()) for t in terms) + embed + self.bias


def total_effects(trace: Trace, target: Target) -> Effects:
    """Every term's effect on ``target`` through the residual stream and any attention paths."""
    return total_effects_batch(trace, [target]).effects(0)


# ------------------------------------------------------------------ many targets at once


def active_features(trace: Trace) -> torch.Tensor:
    """``[n, 3]`` (layer, pos, feature) of every non-zero feature activation, sorted."""
    rows = []
    for layer in sorted(trace.feature_acts):
        pos, feature = trace.feature_acts[layer].nonzero(as_tuple=True)
        rows.append(torch.stack([torch.full_like(pos, layer), pos, feature], dim=1))
    if not rows:
        return torch.zeros(0, 3, dtype=torch.long)
    return torch.cat(rows).cpu()


@dataclass
class BatchEffects:
    """Effects on ``len(targets)`` targets at once; features only where they are active.

    Row ``i`` holds exactly what ``total_effects(trace, targets[i])`` gives (``effects(i)``
    rebuilds that ``Effects``): ``features[i, j]`` is the effect of active feature
    ``active[j] = (layer, pos, feature)``; inactive features have no effect. Layers that do
    not write into a target's residual stream have zero effect on it.
    """

    trace: Trace
    targets: list[Target]
    active: torch.Tensor  # [n_active, 3] (layer, pos, feature), as active_features()
    features: torch.Tensor  # [n_targets, n_active]
    errors: dict[int, torch.Tensor]  # layer -> [n_targets, pos] (whole MLP if not replaced)
    skips: dict[int, torch.Tensor]  # layer -> [n_targets, pos]
    embed: torch.Tensor  # [n_targets, pos], token + positional embedding
    bias: torch.Tensor  # [n_targets]

    def __len__(self) -> int:
        return len(self.targets)

    def total(self) -> torch.Tensor:
        """``[n_targets]``: each target's value, like ``Effects.total``."""
        out = self.features.sum(1) + self.embed.sum(1) + self.bias
        for terms in (*self.errors.values(), *self.skips.values()):
            out = out + terms.sum(1)
        return out

    def effects(self, i: int) -> Effects:
        """Target ``i``'s effects in the dense form of ``total_effects``."""
        trace = self.trace
        result = Effects(bias=float(self.bias[i]), embed=self.embed[i].clone())
        site = self.targets[i].site
        _, mlp_layers = trace.writes_before(site)
        for layer in mlp_layers:
            result.errors[layer] = self.errors[layer][i].clone()
            if layer in trace.skips:
                result.skips[layer] = self.skips[layer][i].clone()
        for source, acts in trace.feature_acts.items():
            if not trace.outputs_read_by(source, site):
                continue
            dense = torch.zeros_like(acts)
            here = (self.active[:, 0] == source).nonzero().flatten()
            dense[self.active[here, 1], self.active[here, 2]] = self.features[i, here]
            result.features[source] = dense
        return result


def _operations(trace: Trace) -> list[tuple[int, str]]:
    """What walking the residual stream down meets: MLP L, then attention L, from the top."""
    return [(layer, kind) for layer in reversed(range(trace.n_layers)) for kind in ("mlp", "attn")]


def _first_operation(trace: Trace, target: Target) -> int:
    """Index in ``_operations`` of the first write upstream of ``target`` (as ``writes_before``)."""
    site, top = target.site, trace.n_layers - 1
    if site.kind == "final":
        return 0
    if site.kind == "mlp" and not trace.parallel:  # attention L writes before MLP L reads
        return 2 * (top - site.layer) + 1
    return 2 * (top - site.layer) + 2


@dataclass
class _LayerFeatures:
    """The active features of one source layer writing into one MLP output, grouped by token:
    for each position with any, ``(pos, their indices [n], their activations [n])``, and the
    (source, output) decoder, whose rows are gathered per batch of targets rather than held as
    copies (a cross-layer transcoder's active rows for every output layer would be a second
    copy of much of it); their effects add to the columns ``columns`` of
    ``BatchEffects.features``, position by position."""

    columns: slice
    decoder: torch.Tensor
    blocks: list[tuple[int, torch.Tensor, torch.Tensor]]


def _layer_features(trace: Trace, active: torch.Tensor) -> dict[int, list[_LayerFeatures]]:
    """By MLP output layer: the active features of every source that writes into it."""
    out: dict[int, list[_LayerFeatures]] = {}
    for (source, layer), decoders in sorted(trace.decoders.items()):
        rows = (active[:, 0] == source).nonzero().flatten()
        if len(rows) == 0:
            continue
        pos, feature = active[rows, 1], active[rows, 2]
        acts = trace.feature_acts[source]
        blocks = []
        for p in pos.unique().tolist():
            features = feature[pos == p].to(decoders.device)
            blocks.append((p, features, acts[p, features]))
        out.setdefault(layer, []).append(_LayerFeatures(slice(int(rows[0]), int(rows[-1]) + 1), decoders, blocks))
    return out


@torch.no_grad()
def total_effects_batch(trace: Trace, targets: Sequence[Target], batch_size: int = 64) -> BatchEffects:
    """Effects on many targets, walking the layers down once per ``batch_size`` of them.

    MLPs are frozen terms, so an MLP's write never passes a direction on to its input;
    attention adds directions at its source tokens.

    A batch's residual directions are one ``[batch, pos, d_model]`` tensor; each target joins
    the walk where its own site reads the residual stream, so logits and features of any
    layers can share a batch (targets are sorted by site, so that a batch starts its walk at
    its highest target's site, not at the top). Feature effects are computed only for active features, which is
    what keeps wide transcoders cheap. Row ``i`` of the result is ``targets[i]``.
    """
    targets = list(targets)
    active = active_features(trace)
    layer_features = _layer_features(trace, active)
    dtype, device = trace.logits.dtype, trace.logits.device
    n, n_pos, d_model = len(targets), trace.n_pos, trace.model.cfg.d_model
    out = BatchEffects(
        trace=trace,
        targets=targets,
        active=active,
        features=torch.zeros(n, len(active), dtype=dtype, device=device),
        errors={layer: torch.zeros(n, n_pos, dtype=dtype, device=device) for layer in range(trace.n_layers)},
        skips={layer: torch.zeros(n, n_pos, dtype=dtype, device=device) for layer in trace.skips},
        embed=torch.zeros(n, n_pos, dtype=dtype, device=device),
        bias=torch.tensor([float(t.constant) for t in targets], dtype=dtype, device=device),
    )
    if n == 0:
        return out
    operations = _operations(trace)
    joins = torch.tensor([_first_operation(trace, t) for t in targets], dtype=torch.long)
    positions = torch.tensor([t.pos for t in targets], dtype=torch.long, device=device)
    target_directions = torch.stack([t.direction.to(dtype) for t in targets])  # [n, d_model]
    order = torch.argsort(joins, stable=True)
    has_pos_embed = "hook_pos_embed" in trace.cache.cache_dict
    for first in range(0, n, batch_size):
        rows = order[first : first + batch_size].to(device)
        batch_joins = joins[rows.cpu()]
        directions = torch.zeros(len(rows), n_pos, d_model, dtype=dtype, device=device)
        bias = torch.zeros(len(rows), dtype=dtype, device=device)
        local = torch.arange(len(rows), device=device)
        for step in range(int(batch_joins.min()), len(operations) + 1):
            joining = (batch_joins == step).nonzero().flatten().to(device)
            if len(joining):
                directions.index_put_(
                    (local[joining], positions[rows[joining]]), target_directions[rows[joining]], accumulate=True
                )
            if step == len(operations):
                break
            layer, kind = operations[step]
            if kind == "mlp":
                _batch_mlp_effects(trace, layer, directions, out, rows, bias, layer_features.get(layer, []))
            else:
                directions = directions + _batch_attention_pullback(trace, layer, directions, bias)
        embed = trace.get("hook_embed")
        if has_pos_embed:
            embed = embed + trace.get("hook_pos_embed")
        out.embed[rows] = _per_token_dot(directions, embed)
        out.bias[rows] += bias
    return out


def _batch_mlp_effects(
    trace: Trace,
    layer: int,
    directions: torch.Tensor,
    out: BatchEffects,
    rows: torch.Tensor,
    bias: torch.Tensor,
    features: list[_LayerFeatures],
) -> None:
    if layer not in trace.transcoder_bias:
        out.errors[layer][rows] = _per_token_dot(directions, trace.mlp_out(layer))
        return
    for source in features:  # each active feature reads the direction at its own token
        reads = [(directions[:, pos] @ source.decoder[features].T) * acts for pos, features, acts in source.blocks]
        out.features[rows, source.columns] += torch.cat(reads, dim=1)
    out.errors[layer][rows] = _per_token_dot(directions, trace.errors[layer])
    bias += (directions @ trace.transcoder_bias[layer]).sum(-1)
    if layer in trace.skips:
        out.skips[layer][rows] = _per_token_dot(directions, trace.skips[layer])


def _per_token_dot(directions: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``[batch, pos]``: each direction set read against one vector per token ``[pos, d_model]``."""
    return torch.bmm(directions.transpose(0, 1), vectors[:, :, None])[:, :, 0].T


def _value_weights(attn: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``W_V`` and ``b_V`` per value head (fewer than query heads with grouped-query
    attention) and how many query heads share each."""
    if hasattr(attn, "_W_V") and hasattr(attn, "repeat_kv_heads"):
        return attn._W_V, attn._b_V, int(attn.repeat_kv_heads)
    return attn.W_V, attn.b_V, 1


def _batch_attention_pullback(trace: Trace, layer: int, directions: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Directions that attention ``layer`` adds at its source tokens (frozen pattern, OV and ln1),
    for a batch of direction sets ``[batch, pos, d_model]``; its constant terms go to ``bias``."""
    attn = trace.model.blocks[layer].attn
    norm = trace.attn_norm(layer)
    batch, n_pos, d_model = directions.shape
    W_O = attn.W_O  # [head, d_head, d_model]
    n_heads, d_head = W_O.shape[0], W_O.shape[1]
    directions, norm_constants = trace.read_attn_output(layer, directions, slice(None))
    bias += (directions @ attn.b_O).sum(-1) + norm_constants.reshape(batch, -1).sum(-1)
    out_read = directions @ W_O.reshape(n_heads * d_head, d_model).T  # [batch, dest, head * d_head]
    by_head = out_read.reshape(batch, n_pos, n_heads, d_head).permute(2, 1, 0, 3).reshape(n_heads, n_pos, batch * d_head)
    moved = torch.bmm(trace.pattern(layer).transpose(1, 2), by_head)  # [head, src, batch * d_head]
    moved = moved.reshape(n_heads, n_pos, batch, d_head).permute(2, 1, 0, 3)  # [batch, src, head, d_head]
    W_V, b_V, shared = _value_weights(attn)
    if shared > 1:  # query heads reading one value head: add their moves first
        moved = moved.reshape(batch, n_pos, n_heads // shared, shared, d_head).sum(3)
    moved = moved.reshape(batch, n_pos, -1)  # [batch, src, value head * d_head]
    bias += moved.sum(1) @ b_V.reshape(-1)
    into_norm = moved @ W_V.permute(0, 2, 1).reshape(-1, d_model)  # [batch, src, d_model] on ln1's output
    if norm.scale_hook:
        scale = trace.get(norm.scale_hook)
    else:
        scale = torch.ones(n_pos, 1, dtype=directions.dtype, device=directions.device)
    pulled, constants = norm.pull_back(into_norm, scale)
    if constants.dim() > 0:  # a norm without bias gives a zero scalar
        bias += constants.sum(-1)
    return pulled
