"""``sae-lens-transcoder serve DIR``: browse a folder of graphs and feature files locally."""

import argparse
from collections.abc import Sequence

from sae_lens_transcoder.validation import exit_on_bad_input
from sae_lens_transcoder.viewer.server import ViewerServer, find_graphs


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae-lens-transcoder serve",
        description="Serve a folder of graph JSON files (circuit-tracer's format) and their feature files "
        "on 127.0.0.1, with this package's own offline viewer. Ctrl-C stops it.",
    )
    parser.add_argument("dir", help="folder holding *.json graphs and features/<scan>/<id>.json files")
    parser.add_argument("--port", type=int, default=0, help="TCP port (default: a free one, printed)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: local only)")
    return parser


def serve(argv: Sequence[str]) -> None:
    args = _parser().parse_args(argv)
    with exit_on_bad_input("serve"):
        server = ViewerServer(args.dir, host=args.host, port=args.port)
    n_graphs = sum(1 for _ in find_graphs(server.folder))
    print(f"serving {n_graphs} graphs from {server.folder} at {server.url} (Ctrl-C stops)", flush=True)
    server.start()
    try:
        server.thread.join()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.stop()
