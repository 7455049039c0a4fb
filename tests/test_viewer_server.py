"""The viewer's HTTP server without a browser: routes, offline assets, and the folder boundary;
plus the ``serve`` and ``features`` commands."""

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import pytest

from sae_lens_transcoder.cli import main
from sae_lens_transcoder.features.paths import node_feature
from sae_lens_transcoder.models import load_model
from sae_lens_transcoder.viewer import ViewerServer
from sae_lens_transcoder.viewer.server import STATIC
from tests.circuit_fixtures import random_transcoder
from tests.test_feature_files import build_viewer_folder, tiny_setup


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("served")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # graphs written before cantor ids warn
        build_viewer_folder(folder, tiny_setup())
    (folder / "notes.json").write_text(json.dumps({"not": "a graph"}))
    (folder.parent / "secret.json").write_text("{}")
    return folder


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, b""


def _json(url: str) -> Any:
    status, body = _get(url)
    assert status == 200, url
    return json.loads(body)


def test_server_lists_graphs_and_serves_their_files(served: Path) -> None:
    graph = json.loads((served / "to-be.json").read_text())
    with ViewerServer(served) as server:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", server.url) and not server.url.endswith(":0/")
        listing = _json(server.url + "api/graphs")["graphs"]
        assert [g["file"] for g in listing] == ["to-be.json"]  # not notes.json, graph-metadata.json or feature files
        assert listing[0]["n_nodes"] == len(graph["nodes"]) and listing[0]["prompt"] == graph["metadata"]["prompt"]
        assert _json(server.url + "data/to-be.json") == graph
        files = _json(server.url + "api/feature-files?graph=to-be.json")["files"]
        feature_nodes = [n["node_id"] for n in graph["nodes"] if node_feature(n) is not None]
        assert sorted(files) == sorted(feature_nodes)
        some = files[feature_nodes[0]]
        assert _json(server.url + "data/" + some) == json.loads((served / some).read_text())
        status, page = _get(server.url)
        assert status == 200 and b"/static/viewer.js" in page
        for bad in ("data/../secret.json", "data/%2e%2e/secret.json", "data/missing.json", "static/../server.py", "nothing"):
            assert _get(server.url + bad)[0] == 404, bad
        assert _get(server.url + "api/feature-files?graph=notes.json")[0] == 404
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.url, timeout=2)


def test_viewer_assets_fetch_nothing_from_the_network() -> None:
    for asset in ("index.html", "viewer.js", "viewer.css"):
        text = (STATIC / asset).read_text(encoding="utf-8")
        urls = [u for u in re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s'\"`)]*", text) if "www.w3.org/2000/svg" not in u]
        assert not urls, f"{asset} refers to {urls}: the viewer must work offline"


def test_server_refuses_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        ViewerServer(tmp_path / "absent")


def test_serve_command_prints_its_address(served: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "sae_lens_transcoder.cli", "serve", str(served)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"serving 1 graphs from .* at (http://127\.0\.0\.1:\d+/)", line)
        assert match, line + (process.stderr.read() if process.poll() is not None and process.stderr else "")
        assert _json(match.group(1) + "api/graphs")["graphs"][0]["file"] == "to-be.json"
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_features_command_writes_every_feature(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = load_model("tiny-gpt2")
    paths = []
    for layer in range(model.cfg.n_layers):
        tc = random_transcoder(model, layer, hook="ln2.hook_normalized")
        tc.cfg.metadata.model_name = "tiny-gpt2"
        tc.cfg.metadata.dataset_path = "embedded"
        tc.cfg.metadata.context_size = 32
        tc.save_model(tmp_path / f"layer{layer}")
        paths.append(str(tmp_path / f"layer{layer}"))
    out = tmp_path / "served"
    main(["features", "--transcoders", *paths, "--scan", "tiny/random", "--out", str(out), "--n-tokens", "256"])
    written = sorted((out / "features" / "tiny" / "random").glob("*.json"))
    d_sae = random_transcoder(model, 0).cfg.d_sae
    assert len(written) == model.cfg.n_layers * d_sae
    assert f"wrote {len(written)} feature files from 256 tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="give --out"):
        main(["features", "--transcoders", *paths, "--scan", "tiny/random"])
