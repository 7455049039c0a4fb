"""The local graph viewer: an HTTP server and its own static front end (no network needed)."""

from sae_lens_transcoder.viewer.server import ViewerServer, find_graphs

__all__ = ["ViewerServer", "find_graphs"]
