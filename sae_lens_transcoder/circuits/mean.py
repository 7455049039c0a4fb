"""Mean input-dependent attribution over a data set (the paper's mean input-times-gradient).

For every token, an upstream feature's direct contribution to a downstream feature's
pre-activation is ``activation × connection / norm scale``; averaging it over the tokens
where the downstream feature fires shows which connections are used, not just possible.
Features are read from the model's own activations at their input hooks, so any replacement
set works: a cross-layer transcoder's upstream features connect through everything they
write below the downstream feature's layer.
"""

import torch
from transformer_lens import HookedTransformer

from sae_lens_transcoder.circuits.trace import transcoder_input_norm
from sae_lens_transcoder.circuits.weights import Transcoders, at_layer, feature_connections
from sae_lens_transcoder.hooks import ensure_input_hooks


@torch.no_grad()
def mean_feature_attributions(
    model: HookedTransformer,
    upstream: Transcoders,
    downstream: Transcoders,
    feature: int,
    tokens: torch.Tensor,
    batch_size: int = 8,
    only_where_active: bool = True,
    upstream_layer: int | None = None,
    downstream_layer: int | None = None,
) -> tuple[torch.Tensor, int]:
    """``([d_sae_upstream] mean contributions, number of tokens averaged over)``.

    ``upstream`` and ``downstream`` are transcoders or replacement sets (the same CLT twice,
    with ``upstream_layer`` and ``downstream_layer``). Only the same-token path through the
    residual stream counts (paths through attention vary with the context and are left to
    prompt-level attribution).
    """
    up_set, up = at_layer(upstream, upstream_layer)
    down_set, down = at_layer(downstream, downstream_layer)
    if up >= down:
        raise ValueError(f"upstream layer {up} must be below downstream layer {down}.")
    connection = feature_connections(model, up_set, down_set, feature, up, down)
    norm = transcoder_input_norm(model, down_set.hook_in(down), down)
    inputs = [up_set.hook_in(up), down_set.hook_in(down)]
    ensure_input_hooks(model, inputs)
    names = inputs + ([norm.scale_hook] if norm.scale_hook else [])
    total = torch.zeros_like(connection)
    count = 0
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start : start + batch_size].to(model.cfg.device)
        _, cache = model.run_with_cache(batch, names_filter=names, stop_at_layer=down + 1)
        up_acts = up_set.encode(up, cache[inputs[0]]).flatten(0, -2)
        down_acts = down_set.encode(down, cache[inputs[1]])[..., feature].flatten()
        scale = cache[norm.scale_hook].flatten() if norm.scale_hook else torch.ones_like(down_acts)
        keep = down_acts > 0 if only_where_active else torch.ones_like(down_acts, dtype=torch.bool)
        total += (up_acts[keep] / scale[keep, None]).sum(0) * connection
        count += int(keep.sum())
    return total / max(count, 1), count
