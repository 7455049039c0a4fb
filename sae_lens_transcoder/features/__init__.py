"""Feature files: per-feature examples, density, histograms and weight views, for graph viewers."""

from sae_lens_transcoder.features.feature_files import (
    FeatureFileOptions,
    build_feature_files,
    graph_features,
    iter_feature_files,
    write_feature_files,
    write_graph_feature_files,
)
from sae_lens_transcoder.features.paths import cantor_pair, cantor_unpair, feature_file_relpath, scan_for_layer

__all__ = [
    "FeatureFileOptions",
    "build_feature_files",
    "cantor_pair",
    "cantor_unpair",
    "feature_file_relpath",
    "graph_features",
    "iter_feature_files",
    "scan_for_layer",
    "write_feature_files",
    "write_graph_feature_files",
]
