"""``sae-lens-transcoder serve``: a local, offline viewer for a folder of graphs and feature files.

The folder holds graph JSON files in circuit-tracer's format (any ``*.json`` with
``metadata``, ``nodes`` and ``links``, outside ``features/``) and feature files where its
viewer looks for them (``features/paths.py``). The server is the standard library's
threaded HTTP server on 127.0.0.1 and answers only:

* ``/`` and ``/static/<file>``: our viewer (HTML, JS, CSS shipped in this package; no CDN);
* ``/api/graphs``: the graphs found, with their prompt and node count;
* ``/api/feature-files?graph=<file>``: for each feature node of a graph, the path of its
  feature file if it exists (so the page asks only for files that are there);
* ``/data/<path>``: a JSON file of the folder, read-only; nothing outside it is served.
"""

import json
import threading
from collections.abc import Iterator
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from sae_lens_transcoder.features.paths import FEATURES_DIR, feature_file_relpath, node_feature, scan_for_layer

STATIC = files("sae_lens_transcoder.viewer") / "static"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


def _load_graph(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(data, dict) and isinstance(data.get("metadata"), dict) and isinstance(data.get("nodes"), list) and "links" in data:
        return data
    return None


def find_graphs(folder: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(path relative to folder, graph)`` for each graph JSON in ``folder``, sorted by path."""
    for path in sorted(folder.rglob("*.json")):
        relative = path.relative_to(folder)
        if FEATURES_DIR in relative.parts[:-1]:
            continue
        graph = _load_graph(path)
        if graph is not None:
            yield relative.as_posix(), graph


def graph_summary(name: str, graph: dict[str, Any]) -> dict[str, Any]:
    meta = graph["metadata"]
    return {
        "file": name,
        "slug": meta.get("slug", Path(name).stem),
        "prompt": meta.get("prompt", ""),
        "scan": meta.get("scan"),
        "n_nodes": len(graph["nodes"]),
        "n_links": len(graph.get("links", [])),
    }


def feature_files_of(folder: Path, graph: dict[str, Any]) -> dict[str, str]:
    """``node_id -> feature file path`` (relative to ``folder``) for the nodes whose file exists."""
    found = {}
    for node in graph["nodes"]:
        feature = node_feature(node)
        if feature is None:
            continue
        try:
            relpath = feature_file_relpath(scan_for_layer(graph["metadata"], feature[0]), *feature)
        except ValueError:  # a graph whose scan is not a portable id has no files here
            continue
        if (folder / relpath).is_file():
            found[node["node_id"]] = relpath
    return found


class ViewerHandler(SimpleHTTPRequestHandler):
    """Routes of the module docstring; everything else is 404."""

    def __init__(self, *args: Any, folder: Path, **kwargs: Any) -> None:
        self.folder = folder
        super().__init__(*args, directory=str(folder), **kwargs)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
        """Quiet: a viewer's many requests would drown the printed address."""

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        url = urlsplit(self.path)
        route = unquote(url.path)
        if route in ("/", "/index.html"):
            self._send_bytes((STATIC / "index.html").read_bytes(), _TYPES[".html"])
        elif route.startswith("/static/"):
            self._send_static(route.removeprefix("/static/"))
        elif route == "/api/graphs":
            self._send_json({"graphs": [graph_summary(name, g) for name, g in find_graphs(self.folder)]})
        elif route == "/api/feature-files":
            self._send_feature_files(parse_qs(url.query).get("graph", [""])[0])
        elif route.startswith("/data/"):
            self._send_data(route.removeprefix("/data/"))
        else:
            self.send_error(HTTPStatus.NOT_FOUND, "not a viewer route")

    def _send_bytes(self, body: bytes, content_type: str) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, data: Any) -> None:
        self._send_bytes(json.dumps(data, ensure_ascii=False).encode("utf-8"), "application/json")

    def _send_static(self, name: str) -> None:
        resource = STATIC / name
        suffix = Path(name).suffix
        if "/" in name or suffix not in _TYPES or not resource.is_file():
            self.send_error(HTTPStatus.NOT_FOUND, "no such viewer asset")
            return
        self._send_bytes(resource.read_bytes(), _TYPES[suffix])

    def _inside(self, relpath: str) -> Path | None:
        path = (self.folder / relpath).resolve()
        return path if path.is_relative_to(self.folder) and path.is_file() and path.suffix == ".json" else None

    def _send_data(self, relpath: str) -> None:
        path = self._inside(relpath)
        if path is None:
            self.send_error(HTTPStatus.NOT_FOUND, "no such JSON file in the served folder")
            return
        self._send_bytes(path.read_bytes(), "application/json")

    def _send_feature_files(self, relpath: str) -> None:
        path = self._inside(relpath)
        graph = None if path is None else _load_graph(path)
        if graph is None:
            self.send_error(HTTPStatus.NOT_FOUND, "graph= must name a graph JSON file of the served folder")
            return
        self._send_json({"files": feature_files_of(self.folder, graph)})


class ViewerServer:
    """The viewer serving ``folder`` from a background thread; ``stop()`` (or ``with``) ends it."""

    def __init__(self, folder: str | Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.folder = Path(folder).resolve()
        if not self.folder.is_dir():
            raise ValueError(f"serve: {folder} is not a directory (give the folder holding graph JSON files).")
        if not 0 <= port <= 65535:
            raise ValueError(f"serve: --port {port} is not a TCP port (0..65535; 0 picks a free one).")
        self.httpd = ThreadingHTTPServer((host, port), partial(ViewerHandler, folder=self.folder))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="slt-viewer", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> "ViewerServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.thread.is_alive():  # shutdown() would wait forever for a loop that never started
            self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def __enter__(self) -> "ViewerServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
