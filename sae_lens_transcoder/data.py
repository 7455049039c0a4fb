"""The embedded text corpus, so training and tests work offline on real text.

SAELens loads ``cfg.dataset_path`` with ``datasets.load_dataset(path, split=...)``; the
corpus directory is laid out (``train.jsonl.gz``, ``test.jsonl.gz``) so that a plain
directory path works there, streaming or not. ``resolve_dataset_path`` turns the short
name ``"embedded"`` into that directory.
"""

from __future__ import annotations

from pathlib import Path

import datasets

EMBEDDED_DATASET = "embedded"


def embedded_dataset_dir() -> Path:
    """Directory holding the bundled train/test splits (a ``text`` and a ``source`` column)."""
    return Path(__file__).resolve().parent / "assets" / "text"


def resolve_dataset_path(path: str) -> str:
    """Map ``"embedded"`` to the bundled corpus directory; pass any other path through."""
    return str(embedded_dataset_dir()) if path == EMBEDDED_DATASET else path


def load_text_split(split: str, path: str = EMBEDDED_DATASET) -> datasets.Dataset:
    """Load one split (``"train"`` or ``"test"``) of a text dataset, the embedded one by default."""
    dataset = datasets.load_dataset(resolve_dataset_path(path), split=split)
    assert isinstance(dataset, datasets.Dataset)
    return dataset
