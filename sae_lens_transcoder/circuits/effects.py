"""Direct effects with attention folded in, as circuit-tracer defines them.

With patterns and norm scales frozen and MLPs replaced by their (frozen) transcoder terms,
the target is linear in every feature activation, error, bias and embedding at every
token: attention only moves information along fixed, linear paths. Walking the layers
down with one residual direction per token gives all those effects in one pass, exactly.
Use this to compare with circuit-tracer; use ``attribution.direct_contributions`` when
heads should be nodes of their own.
"""

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


@torch.no_grad()
def total_effects(trace: Trace, target: Target) -> Effects:
    """Every term's effect on ``target`` through the residual stream and any attention paths."""
    directions = torch.zeros_like(trace.residual(target.site))  # one direction per token
    directions[target.pos] = target.direction
    effects = Effects(bias=float(target.constant))
    attn_layers, mlp_layers = trace.writes_before(target.site)
    for layer in reversed(range(max(attn_layers.stop, mlp_layers.stop))):
        # MLPs are frozen terms, so an MLP's write never passes a direction on to its input.
        if layer in mlp_layers:
            _mlp_effects(trace, layer, directions, effects)
        if layer in attn_layers:
            directions = directions + _attention_pullback(trace, layer, directions, effects)
    embed = (trace.get("hook_embed") * directions).sum(-1)
    if "hook_pos_embed" in trace.cache.cache_dict:
        embed = embed + (trace.get("hook_pos_embed") * directions).sum(-1)
    effects.embed = embed
    return effects


def _mlp_effects(trace: Trace, layer: int, directions: torch.Tensor, effects: Effects) -> None:
    if layer not in trace.splices:
        effects.errors[layer] = (trace.mlp_out(layer) * directions).sum(-1)
        return
    effects.features[layer] = trace.feature_acts[layer] * (directions @ trace.decoders[layer].T)
    effects.errors[layer] = (trace.errors[layer] * directions).sum(-1)
    effects.bias += float((directions @ trace.transcoder_bias[layer]).sum())
    if layer in trace.skips:
        effects.skips[layer] = (trace.skips[layer] * directions).sum(-1)


def _attention_pullback(trace: Trace, layer: int, directions: torch.Tensor, effects: Effects) -> torch.Tensor:
    """Directions that attention ``layer`` adds at its source tokens (frozen pattern, OV and ln1);
    its constant terms go to ``effects.bias``."""
    attn = trace.model.blocks[layer].attn
    norm = trace.attn_norm(layer)
    effects.bias += float((directions @ attn.b_O).sum())
    out_read = torch.einsum("hkd,td->thk", attn.W_O, directions)  # [dest, head, d_head]
    moved = torch.einsum("hts,thk->shk", trace.pattern(layer), out_read)  # [src, head, d_head]
    effects.bias += float(torch.einsum("shk,hk->", moved, attn.b_V))
    into_norm = torch.einsum("hdk,shk->sd", attn.W_V, moved)  # [src, d_model] on ln1's output
    scale = trace.get(norm.scale_hook) if norm.scale_hook else torch.ones(trace.n_pos, 1)
    pulled, constants = norm.pull_back(into_norm, scale)
    effects.bias += float(constants.sum())
    return pulled
