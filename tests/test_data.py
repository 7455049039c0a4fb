"""The embedded corpus must load the way SAELens loads ``dataset_path``, with clean splits."""

from __future__ import annotations

from collections import Counter

import datasets
import pytest

from sae_lens_transcoder.data import (
    EMBEDDED_DATASET,
    embedded_dataset_dir,
    load_text_split,
    resolve_dataset_path,
)

SOURCES = {"python-docs", "shakespeare", "kjv-bible"}


@pytest.fixture(scope="module")
def splits() -> dict[str, datasets.Dataset]:
    return {split: load_text_split(split) for split in ("train", "test")}


def test_plain_load_dataset_on_directory(splits: dict[str, datasets.Dataset]) -> None:
    for split, expected in splits.items():
        dataset = datasets.load_dataset(str(embedded_dataset_dir()), split=split)
        assert dataset.column_names == ["text", "source"]
        assert len(dataset) == len(expected)


def test_streaming_load(splits: dict[str, datasets.Dataset]) -> None:
    for split, expected in splits.items():
        stream = datasets.load_dataset(str(embedded_dataset_dir()), split=split, streaming=True)
        assert next(iter(stream))["text"] == expected[0]["text"]


def test_splits_are_disjoint(splits: dict[str, datasets.Dataset]) -> None:
    assert not set(splits["train"]["text"]) & set(splits["test"]["text"])


def test_sizes_and_mix(splits: dict[str, datasets.Dataset]) -> None:
    chars = {split: sum(map(len, ds["text"])) for split, ds in splits.items()}
    assert 8_000_000 < chars["train"] < 15_000_000
    assert 0.01 < chars["test"] / (chars["train"] + chars["test"]) < 0.06
    for dataset in splits.values():
        assert set(Counter(dataset["source"])) == SOURCES
        assert max(map(len, dataset["text"])) <= 4000


def test_resolve_dataset_path() -> None:
    assert resolve_dataset_path(EMBEDDED_DATASET) == str(embedded_dataset_dir())
    assert resolve_dataset_path("NeelNanda/pile-10k") == "NeelNanda/pile-10k"
    assert (embedded_dataset_dir() / "train.jsonl.gz").is_file()
