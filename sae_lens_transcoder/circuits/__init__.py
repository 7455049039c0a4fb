"""Circuits read off transcoders: exact attributions on a prompt, weight-based views, paths, graphs."""

from sae_lens_transcoder.circuits.attribution import (
    Contributions,
    Target,
    child_target,
    direct_contributions,
    feature_target,
    head_target,
    logit_target,
    residual_target,
    target_value,
    unembed_target,
)
from sae_lens_transcoder.circuits.nodes import Node
from sae_lens_transcoder.circuits.trace import Site, Trace, trace_prompt

__all__ = [
    "Contributions",
    "Node",
    "Site",
    "Target",
    "Trace",
    "child_target",
    "direct_contributions",
    "feature_target",
    "head_target",
    "logit_target",
    "residual_target",
    "target_value",
    "trace_prompt",
    "unembed_target",
]
