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
from sae_lens_transcoder.circuits.effects import Effects, total_effects
from sae_lens_transcoder.circuits.graph import AttributionGraph, build_graph, merge_positions, prune
from sae_lens_transcoder.circuits.nodes import Node
from sae_lens_transcoder.circuits.paths import NodeSpec, Path, find_paths
from sae_lens_transcoder.circuits.trace import Site, Trace, trace_prompt

__all__ = [
    "AttributionGraph",
    "Contributions",
    "Effects",
    "Node",
    "NodeSpec",
    "Path",
    "Site",
    "Target",
    "Trace",
    "child_target",
    "build_graph",
    "direct_contributions",
    "feature_target",
    "find_paths",
    "head_target",
    "logit_target",
    "merge_positions",
    "prune",
    "residual_target",
    "target_value",
    "total_effects",
    "trace_prompt",
    "unembed_target",
]
