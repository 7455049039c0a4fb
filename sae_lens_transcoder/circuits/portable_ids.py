"""Portable transcoder ids: how graph files name transcoders, never by a path on this machine.

A graph's ``metadata.scan`` / ``transcoder_list`` is where viewers look for feature files
(see ``graph_json``), so it must mean the same on any machine:

* a SAELens ``release/sae_id`` stays as it is;
* a circuit-tracer transcoder set (a folder with ``config.yaml``) is named by the ``scan`` its
  config declares (what circuit-tracer itself would write), unless that is a local path;
* any other local folder (a SAELens transcoder directory, a ``save_transcoder_set`` set) is
  ``local/<folder name>``.
"""

import os
from pathlib import Path

import yaml

LOCAL_PREFIX = "local/"


def _is_local_path(text: str) -> bool:
    return os.path.isabs(text) or text.startswith(("./", "../", "~"))


def transcoder_id(spec: str) -> str:
    """The portable id of what ``spec`` (a path or ``release/sae_id``) loads; ``""`` stays ``""``."""
    if not spec:
        return spec
    path = Path(spec).expanduser()
    if not path.exists():
        return spec
    config = path / "config.yaml"
    if config.is_file():
        scan = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("scan")
        if isinstance(scan, str) and scan and not _is_local_path(scan):
            return scan
    return LOCAL_PREFIX + Path(os.path.abspath(path)).name  # the name given, not a symlink's target
