"""Mean input-dependent attribution over a data set (the paper's mean input-times-gradient).

For every token, an upstream feature's direct contribution to a downstream feature's
pre-activation is ``activation × connection / norm scale``; averaging it over the tokens
where the downstream feature fires shows which connections are used, not just possible.
"""

import torch
from transformer_lens import HookedTransformer

from sae_lens_transcoder.circuits.weights import feature_connections
from sae_lens_transcoder.circuits.trace import transcoder_input_norm
from sae_lens_transcoder.splicing import Splice, spliced


@torch.no_grad()
def mean_feature_attributions(
    model: HookedTransformer,
    upstream: Splice,
    downstream: Splice,
    feature: int,
    tokens: torch.Tensor,
    batch_size: int = 8,
    only_where_active: bool = True,
) -> tuple[torch.Tensor, int]:
    """``([d_sae_upstream] mean contributions, number of tokens averaged over)``.

    Only the same-token path through the residual stream counts (paths through attention
    vary with the context and are left to prompt-level attribution).
    """
    if upstream.layer >= downstream.layer:
        raise ValueError(f"upstream layer {upstream.layer} must be below downstream layer {downstream.layer}.")
    connection = feature_connections(model, upstream, downstream, feature)
    norm = transcoder_input_norm(model, downstream.hook_name, downstream.layer)
    total = torch.zeros_like(connection)
    count = 0
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start : start + batch_size].to(model.cfg.device)
        with spliced(model, [upstream, downstream], use_error_term=True):
            _, cache = model.run_with_cache(
                batch, names_filter=[norm.scale_hook] if norm.scale_hook else [], stop_at_layer=downstream.layer + 1
            )
        up_acts = upstream.last_feature_acts.flatten(0, -2)  # type: ignore[union-attr]
        down_acts = downstream.last_feature_acts[..., feature].flatten()  # type: ignore[index]
        scale = cache[norm.scale_hook].flatten() if norm.scale_hook else torch.ones_like(down_acts)
        keep = down_acts > 0 if only_where_active else torch.ones_like(down_acts, dtype=torch.bool)
        total += (up_acts[keep] / scale[keep, None]).sum(0) * connection
        count += int(keep.sum())
    return total / max(count, 1), count
