"""Input-dependent attribution: split a target's value into the direct contributions of every
upstream node of the frozen model, exactly.

A ``Target`` is an affine function ``direction · r[pos] + constant`` of the residual stream
that a ``Site`` reads. Each node writing into that residual contributes ``direction · write``;
together with the target's constant they sum to its value (completeness, up to float
rounding). Features and heads are themselves affine in earlier residual streams, so
``child_target`` turns either into a new target whose value is its contribution to the
parent: recursing keeps every number in the root's units.
"""

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace

import torch
from transformer_lens.utilities.activation_functions import softcap_enabled

from sae_lens_transcoder.circuits.nodes import Node
from sae_lens_transcoder.circuits.trace import Site, Trace

NodeFilter = Callable[[Node], bool]


@dataclass(frozen=True)
class Target:
    """``direction · r[pos] + constant`` at ``site``; ``node`` is what it measures."""

    node: Node
    site: Site
    pos: int
    direction: torch.Tensor
    constant: torch.Tensor

    def scaled(self, factor: float | torch.Tensor) -> "Target":
        return replace(self, direction=self.direction * factor, constant=self.constant * factor)


@torch.no_grad()
def target_value(trace: Trace, target: Target) -> float:
    return float(target.direction @ trace.residual(target.site)[target.pos] + target.constant)


def check_feature(d_sae_by_layer: Mapping[int, int], layer: int, feature: int) -> None:
    """Feature ``feature`` of the transcoder at ``layer`` exists (else an IndexError deep in the graph)."""
    if layer not in d_sae_by_layer:
        raise ValueError(f"layer={layer}: no transcoder replaces that MLP (have {sorted(d_sae_by_layer)}).")
    d_sae = d_sae_by_layer[layer]
    if not 0 <= feature < d_sae:
        raise ValueError(f"feature={feature} is not one of the {d_sae} features (0..{d_sae - 1}) of layer {layer}'s transcoder.")


@torch.no_grad()
def feature_target(trace: Trace, layer: int, feature: int, pos: int) -> Target:
    """The pre-activation of transcoder feature ``feature`` of MLP ``layer`` at token ``pos``."""
    check_feature(trace.d_sae_by_layer, layer, feature)
    norm = trace.input_norms[layer]
    direction, constant = norm.pull_back(trace.encoders[layer][:, feature], trace.scale(norm, pos))
    b_enc = trace.replacement.b_enc(layer)[feature].to(direction.dtype)
    return Target(Node("feature", layer, pos, feature), Site(layer, "mlp"), pos, direction, constant + b_enc)


@torch.no_grad()
def unembed_target(trace: Trace, pos: int, direction: torch.Tensor, constant: float | torch.Tensor = 0.0) -> Target:
    """``direction · ln_final(r[pos]) + constant``: e.g. ``W_U[:, a] − W_U[:, b]`` with the
    matching ``b_U`` difference for a logit difference."""
    norm = trace.final_norm()
    pulled, norm_constant = norm.pull_back(direction.to(trace.logits.dtype), trace.scale(norm, pos))
    node = Node("target", trace.n_layers, pos)
    return Target(node, Site(trace.n_layers, "final"), pos, pulled, norm_constant + torch.as_tensor(constant, dtype=pulled.dtype))


@torch.no_grad()
def logit_target(trace: Trace, pos: int, token: int, versus: int | None = None) -> Target:
    """The logit of ``token`` at ``pos``, or its difference to the logit of ``versus``.

    A final-logit soft-cap (Gemma 2/3: ``cap · tanh(logit / cap)``) is linearised at the
    prompt: the target's value there is the capped logit the model outputs, and each node's
    contribution is its share of the raw logit times the cap's slope ``1 − tanh²``.
    """
    target = _capped_logit(trace, pos, token)
    if versus is not None:
        other = _capped_logit(trace, pos, versus)
        target = replace(target, direction=target.direction - other.direction, constant=target.constant - other.constant)
    return replace(target, node=replace(target.node, index=token))


def _capped_logit(trace: Trace, pos: int, token: int) -> Target:
    raw = unembed_target(trace, pos, trace.model.W_U[:, token], trace.model.b_U[token])
    cap = trace.model.cfg.output_logits_soft_cap
    if not softcap_enabled(cap):
        return raw
    value = torch.as_tensor(target_value(trace, raw), dtype=raw.constant.dtype)
    capped = cap * torch.tanh(value / cap)
    slope = 1 - torch.tanh(value / cap) ** 2
    return Target(raw.node, raw.site, pos, raw.direction * slope, raw.constant * slope + capped - slope * value)


@torch.no_grad()
def residual_target(trace: Trace, site: Site, pos: int, direction: torch.Tensor) -> Target:
    """A raw direction in the residual stream ``site`` reads (no norm)."""
    direction = direction.to(trace.logits.dtype)
    return Target(Node("target", site.layer, pos), site, pos, direction, direction.new_zeros(()))


@torch.no_grad()
def head_target(trace: Trace, parent: Target, layer: int, head: int, src: int) -> Target:
    """Head ``head`` of ``layer`` moving token ``src`` into ``parent``: its contribution to the
    parent as an affine function of the source token's residual (pattern frozen, OV pull-back)."""
    return head_target_for(trace, parent.direction, parent.pos, layer, head, src)


@torch.no_grad()
def head_target_for(trace: Trace, direction: torch.Tensor, dest: int, layer: int, head: int, src: int) -> Target:
    """``head_target`` for a parent reading ``direction`` at token ``dest``; linear in
    ``direction``, so one call serves the sum of several parents."""
    attn = trace.model.blocks[layer].attn
    weight = trace.pattern(layer)[head, dest, src]
    out_read = attn.W_O[head] @ trace.read_attn_output(layer, direction, dest)[0]  # [d_head]
    norm = trace.attn_norm(layer)
    pulled, constant = norm.pull_back(weight * (trace.value_weights[layer][head] @ out_read), trace.scale(norm, src))
    constant = constant + weight * (attn.b_V[head] @ out_read)
    return Target(Node("head", layer, dest, head, src), Site(layer, "attn"), src, pulled, constant)


@torch.no_grad()
def child_target(trace: Trace, parent: Target, node: Node) -> Target:
    """The target whose value is ``node``'s contribution to ``parent``."""
    if node.kind == "feature":
        outputs = trace.outputs_read_by(node.layer, parent.site)
        coefficient = sum(trace.decoders[node.layer, out][node.index] @ parent.direction for out in outputs)
        return feature_target(trace, node.layer, node.index, node.pos).scaled(coefficient)
    if node.kind == "head":
        return head_target(trace, parent, node.layer, node.index, node.src)
    raise ValueError(f"{node}: only features and heads can be expanded (it is a {node.kind!r} node).")


@dataclass
class Contributions:
    """Direct contributions to one target; features and heads as dense tensors per layer."""

    target: Target
    features: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [d_sae]
    heads: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [n_heads, n_src]
    others: dict[Node, float] = field(default_factory=dict)

    def items(self) -> Iterator[tuple[Node, float]]:
        """Every non-zero contribution."""
        pos = self.target.pos
        for layer, values in self.features.items():
            indices = values.nonzero().flatten()
            for index, value in zip(indices.tolist(), values[indices].tolist()):
                yield Node("feature", layer, pos, index), value
        for layer, values in self.heads.items():
            heads, sources = values.nonzero(as_tuple=True)
            for head, src, value in zip(heads.tolist(), sources.tolist(), values[heads, sources].tolist()):
                yield Node("head", layer, pos, head, src), value
        yield from ((node, value) for node, value in self.others.items() if value != 0.0)

    def total(self) -> float:
        return (
            sum(float(v.sum()) for v in self.features.values())
            + sum(float(v.sum()) for v in self.heads.values())
            + sum(self.others.values())
        )

    def top(self, k: int, keep: NodeFilter | None = None) -> list[tuple[Node, float]]:
        """The ``k`` largest by magnitude among nodes ``keep`` accepts."""
        ranked = sorted((item for item in self.items() if keep is None or keep(item[0])), key=lambda nv: -abs(nv[1]))
        return ranked[:k]


@torch.no_grad()
def direct_contributions(trace: Trace, target: Target) -> Contributions:
    """Every node's direct contribution to ``target``; they sum to ``target_value``."""
    g, pos = target.direction, target.pos
    result = Contributions(target)
    result.others[Node("target_bias", target.site.layer, pos)] = float(target.constant)
    result.others[Node("embed", -1, pos)] = float(trace.get("hook_embed")[pos] @ g)
    if "hook_pos_embed" in trace.cache.cache_dict:
        result.others[Node("pos_embed", -1, pos)] = float(trace.get("hook_pos_embed")[pos] @ g)
    attn_layers, mlp_layers = trace.writes_before(target.site)
    for layer in attn_layers:
        attn = trace.model.blocks[layer].attn
        read, norm_constant = trace.read_attn_output(layer, g, pos)
        out_read = attn.W_O @ read  # [n_heads, d_head]
        per_source = torch.einsum("shk,hk->hs", trace.values[layer], out_read)
        result.heads[layer] = trace.pattern(layer)[:, pos, :] * per_source
        result.others[Node("attn_bias", layer, pos)] = float(attn.b_O @ read + norm_constant)
    for source, acts in trace.feature_acts.items():
        outputs = trace.outputs_read_by(source, target.site)
        if outputs:
            result.features[source] = acts[pos] * sum(trace.decoders[source, out] @ g for out in outputs)
    for layer in mlp_layers:
        if layer not in trace.transcoder_bias:
            result.others[Node("mlp", layer, pos)] = float(trace.mlp_out(layer)[pos] @ g)
            continue
        result.others[Node("transcoder_bias", layer, pos)] = float(trace.transcoder_bias[layer] @ g)
        result.others[Node("error", layer, pos)] = float(trace.errors[layer][pos] @ g)
        if layer in trace.skips:
            result.others[Node("skip", layer, pos)] = float(trace.skips[layer][pos] @ g)
    return result
