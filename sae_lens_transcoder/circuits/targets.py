"""Turn a command-line description of what to explain into a ``Target``."""

from collections.abc import Mapping

from sae_lens_transcoder.circuits.attribution import Target, check_feature, feature_target, logit_target
from sae_lens_transcoder.circuits.trace import Trace


def _token_id(trace: Trace, token: str, flag: str) -> int:
    try:
        return int(trace.model.to_single_token(token))
    except AssertionError as e:
        raise ValueError(f"{flag}={token!r} is not a single token of {trace.model.cfg.model_name}; quote a leading space if needed.") from e


def check_feature_flags(kind: str, layer: int | None, feature: int | None, d_sae_by_layer: Mapping[int, int]) -> None:
    """What a feature target needs, checkable from the transcoders alone (before any model loads)."""
    if kind != "feature":
        return
    if layer is None or feature is None:
        raise ValueError("a feature target needs layer and feature (--layer L --feature I).")
    check_feature(d_sae_by_layer, layer, feature)


def resolve_target(
    trace: Trace,
    kind: str = "logit",
    pos: int = -1,
    token: str | None = None,
    versus: str | None = None,
    layer: int | None = None,
    feature: int | None = None,
) -> tuple[Target, str]:
    """``kind="logit"``: the logit of ``token`` (default: the top prediction) minus that of
    ``versus`` (default: the runner-up when ``token`` is not given); ``kind="feature"``: the
    pre-activation of ``feature`` of the transcoder at ``layer``. ``pos`` counts from the end
    when negative. Also returns a label for plots and the graph viewer."""
    if not -trace.n_pos <= pos < trace.n_pos:
        raise ValueError(f"pos={pos} is outside the prompt's {trace.n_pos} tokens.")
    pos %= trace.n_pos
    if kind == "feature":
        check_feature_flags(kind, layer, feature, trace.d_sae_by_layer)
        assert layer is not None and feature is not None
        return feature_target(trace, layer, feature, pos), f"L{layer} feature {feature}"
    if kind != "logit":
        raise ValueError(f"target kind={kind!r}: use 'logit' or 'feature'.")
    ranked = trace.logits[pos].topk(2).indices.tolist()
    token_id = _token_id(trace, token, "token") if token is not None else ranked[0]
    if versus is not None:
        versus_id: int | None = _token_id(trace, versus, "versus")
    else:
        versus_id = ranked[1] if token is None else None
    label = trace.model.to_single_str_token(token_id)
    if versus_id is not None:
        label += " − " + trace.model.to_single_str_token(versus_id)
    return logit_target(trace, pos, token_id, versus=versus_id), label
