"""Where a graph's viewer looks for a feature's file, following circuit-tracer's convention.

circuit-tracer's front end (``frontend/assets/attribution_graph/util-cg.js`` and
``feature_examples/init-feature-examples.js``, version 0.5.0) finds a feature node's file
from two things in the graph JSON:

* the *scan*: ``metadata.scan``, except that a scan starting with ``"custom-"`` (a set given
  as a list of transcoders) is replaced by ``metadata.transcoder_list[layer]`` for a node of
  layer ``layer``;
* the node's ``feature`` field, which circuit-tracer writes as ``cantor(layer, index)``
  (``(l + i)(l + i + 1) / 2 + i``; its viewer un-pairs it to show ``layer/index``).

It then fetches ``{scan}/{feature}.json`` when the scan starts with ``"./"`` (a folder next
to the page) and otherwise ``./features/{scan}/{feature}.json`` (or a hub index of binary
shards). So a folder of graphs carries its feature files at

    ``<folder>/features/<scan>/<cantor(layer, index)>.json``   (``<folder>/<scan>/...`` for a ``./`` scan)

which is what ``feature_file_path`` returns and what ``sae-lens-transcoder serve`` reads.
A scan is used as a relative path, so it must be a portable id (``"gpt2/relu-transcoders"``),
not a path on the machine that made the graph. (circuit-tracer's stock page rewrites
``./features/`` to its CDN, so offline it finds local files only through a ``./`` scan that
its server maps, e.g. ``"./graph_data/features/<id>"`` under ``local_server.serve(data_dir)``;
our ``serve`` reads the plain layout.)
"""

import math
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

FEATURES_DIR = "features"
FEATURE_TYPE = "cross layer transcoder"  # circuit-tracer's type for every transcoder feature


def cantor_pair(layer: int, index: int) -> int:
    """circuit-tracer's feature id of feature ``index`` of ``layer``."""
    return (layer + index) * (layer + index + 1) // 2 + index


def cantor_unpair(feature: int) -> tuple[int, int]:
    """``(layer, index)`` of a feature id made by ``cantor_pair``."""
    w = (math.isqrt(8 * feature + 1) - 1) // 2
    index = feature - w * (w + 1) // 2
    return w - index, index


def scan_for_layer(metadata: Mapping[str, Any], layer: int) -> str:
    """The scan the viewer uses for a feature of ``layer`` in a graph with ``metadata``."""
    scan = metadata.get("scan")
    if not isinstance(scan, str) or not scan:
        raise ValueError("graph metadata.scan is missing: the viewer cannot locate feature files without it.")
    if not scan.startswith("custom-"):
        return scan
    transcoders = metadata.get("transcoder_list") or []
    if layer >= len(transcoders):
        raise ValueError(
            f"graph metadata.scan={scan!r} names a custom set, but metadata.transcoder_list has {len(transcoders)} "
            f"entries and the viewer reads entry {layer} for layer {layer}: list one transcoder id per layer."
        )
    return str(transcoders[layer])


def _relative_scan(scan: str) -> PurePosixPath:
    local = scan.startswith("./")
    rest = scan[2:] if local else scan
    parts = rest.split("/")
    if not rest or "\\" in rest or ":" in parts[0] or any(part in ("", ".", "..") for part in parts):
        raise ValueError(
            f"scan {scan!r} is not a portable id (the viewer uses it as a relative folder name): give the graph "
            "a metadata.scan / transcoder_list of ids such as 'model/transcoder-set', not local paths."
        )
    return PurePosixPath(rest) if local else PurePosixPath(FEATURES_DIR, rest)


def feature_file_relpath(scan: str, layer: int, index: int) -> str:
    """The file of feature ``index`` of ``layer`` under scan ``scan``, relative to the graph folder."""
    return str(_relative_scan(scan) / f"{cantor_pair(layer, index)}.json")


def feature_file_path(folder: str | Path, scan: str, layer: int, index: int) -> Path:
    """``feature_file_relpath`` inside ``folder``."""
    return Path(folder) / feature_file_relpath(scan, layer, index)


def node_feature(node: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(layer, index)`` of a transcoder-feature node, else None.

    The index is read from ``node_id`` (``"{layer}_{index}_{pos}"`` in circuit-tracer and
    here), which holds the raw index whether ``feature`` is cantor-paired or not.
    """
    if node.get("feature_type") != FEATURE_TYPE:
        return None
    try:
        layer, index, _ = str(node["node_id"]).split("_")
        return int(layer), int(index)
    except (KeyError, ValueError):
        raise ValueError(
            f"feature node {node.get('node_id')!r}: node_id must be '<layer>_<index>_<position>' as circuit-tracer writes it."
        ) from None
