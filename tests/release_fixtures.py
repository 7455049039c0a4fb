"""Released transcoders as SAELens loads them, offline, at a tiny model's size.

Each writer puts random-weight files with the release's own file names, tensor names, shapes
(scaled down), dtypes and config files into a local Hugging Face cache laid out as the hub's
(``models--{org}--{name}/{blobs,snapshots/{commit}}`` + ``refs/main``), then loads every layer
through SAELens's public ``SAE.from_pretrained(release, sae_id)`` with the release's real name
and ids, so SAELens's own conversion code (``gemma_3``, ``mwhanna_transcoder``,
``gemma_2_transcoder``) builds the objects. ``HF_HUB_OFFLINE=1`` makes ``hf_hub_download``
resolve files from that cache. Two things the cache alone cannot give:

- SAELens's ``gemma_3`` config reader fetches each ``params.safetensors`` header with HTTP range
  requests (``get_safetensors_tensor_shapes``, plain ``requests``, not ``hf_hub_download``), so
  :func:`local_hub` also serves the same snapshot on 127.0.0.1 and points ``HF_ENDPOINT`` at it.
  It refuses every other connection itself, so do not add ``tests.conftest.offline`` (which
  refuses loopback too).
- SAELens's ``gemma_2_transcoder`` config reader hard-codes the real widths (d_sae from
  ``width_16k`` in the id, d_model 2304 from the repo id). :func:`gemma_scope_2b_transcoders`
  passes its loader, unchanged, as ``from_pretrained``'s ``converter`` with the tiny shapes added
  to the config overrides; everything else is the loader's own.

huggingface_hub reads ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT`` once, at import,
into ``huggingface_hub.constants``: :func:`local_hub` sets each environment variable and that copy
with ``monkeypatch`` (as ``tests.conftest.go_offline`` does), and nothing in SAELens is patched.
"""

import hashlib
import io
import json
import os
import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import huggingface_hub.constants
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save
from sae_lens import SAE
from sae_lens.loading.pretrained_sae_loaders import gemma_2_transcoder_huggingface_loader
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

COMMIT = "5f3c2a1e9b8d7c6f5e4d3c2b1a0f9e8d7c6b5a49"
"""The snapshot every fixture repo is at (``refs/main`` points to it)."""

GEMMA_SCOPE_2_RELEASE = "gemma-scope-2-{size}-pt-transcoders-all"
QWEN3_RELEASE = "mwhanna-qwen3-0.6b-transcoders-lowl0"
GEMMA_SCOPE_2B_RELEASE = "gemma-scope-2b-pt-transcoders"


@dataclass
class LocalHub:
    """A Hugging Face cache directory (what ``HF_HUB_CACHE`` names) that fixtures write repos into."""

    cache_dir: Path
    endpoint: str = ""
    served: list[str] = field(default_factory=list)
    """Each HTTP request the endpoint answered, as ``"{path} {range}"``."""

    def repo_dir(self, repo_id: str) -> Path:
        return self.cache_dir / ("models--" + repo_id.replace("/", "--"))

    def snapshot(self, repo_id: str, commit: str = COMMIT) -> Path:
        return self.repo_dir(repo_id) / "snapshots" / commit

    def write(self, repo_id: str, filename: str, data: bytes, commit: str = COMMIT) -> Path:
        """Store ``data`` as the hub's cache does: a content-named blob, linked from the snapshot
        of ``commit`` (``refs/main`` names :data:`COMMIT`; other commits are revisions)."""
        repo = self.repo_dir(repo_id)
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        pointer = self.snapshot(repo_id, commit) / filename
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.unlink(missing_ok=True)
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(COMMIT)
        return pointer


class _ResolveHandler(BaseHTTPRequestHandler):
    """``GET /{org}/{name}/resolve/{revision}/{path}`` from the cache, with ``Range: bytes=a-b``."""

    hub: LocalHub

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.hub.served.append(f"{self.path} {self.headers.get('Range', '')}".strip())
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path)
        file = self.hub.snapshot(match.group(1)) / unquote(match.group(3)) if match else None
        if file is None or ".." in file.parts or not file.is_file():
            self.send_error(404, "Entry not found")
            return
        data = file.read_bytes()
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if ranged:
            start, end = int(ranged.group(1)), int(ranged.group(2) or len(data) - 1)
            data = data[start : end + 1]
        self.send_response(206 if ranged else 200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        """Quiet: pytest output should not carry one line per range request."""


def _only_this_server(monkeypatch: pytest.MonkeyPatch, port: int) -> None:
    """Refuse sockets to anything but the local hub, as ``tests.conftest.go_offline`` does to all."""
    connect = socket.socket.connect

    def local_only(sock: socket.socket, address: Any) -> None:
        if sock.family != socket.AF_UNIX and tuple(address[:2]) != ("127.0.0.1", port):
            raise OSError(f"network access attempted: {address!r} (only the local hub on 127.0.0.1:{port} is allowed)")
        connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)


@pytest.fixture
def local_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalHub]:
    """An empty local hub: a tmp cache resolved offline, served on 127.0.0.1 for range requests."""
    hub = LocalHub(tmp_path / "hf_home" / "hub")
    hub.cache_dir.mkdir(parents=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_ResolveHandler,), {"hub": hub}))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub.endpoint = f"http://127.0.0.1:{server.server_port}"
    for name, value in {
        "HF_HOME": str(hub.cache_dir.parent), "HF_HUB_CACHE": str(hub.cache_dir), "HF_HUB_OFFLINE": "1",
        "HF_ENDPOINT": hub.endpoint, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub.cache_dir))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(
        huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    _only_this_server(monkeypatch, server.server_port)
    yield hub
    server.shutdown()
    server.server_close()
    thread.join()


@dataclass(frozen=True)
class ReleaseTranscoders:
    """One release's transcoders for layers ``0..n_layers-1``, as SAELens loaded them."""

    release: str
    repo_id: str
    sae_ids: list[str]
    """The release's own id for each layer (``SAE.from_pretrained(release, sae_ids[layer])``)."""
    transcoders: list[SAE[Any]]
    """Index = layer; SAELens's classes (``JumpReLUTranscoder``, ``JumpReLUSkipTranscoder``, ``Transcoder``)."""
    raw: list[dict[str, torch.Tensor]]
    """The tensors written for each layer, under the file's names, shapes and dtypes."""


def _release_entry(release: str, sae_ids: list[str]) -> tuple[str, list[str]]:
    """The release's repo and each id's path in it, from SAELens's own registry."""
    entry = get_pretrained_saes_directory()[release]
    unknown = [sae_id for sae_id in sae_ids if sae_id not in entry.saes_map]
    if unknown:
        raise ValueError(f"{release} has no ids {unknown}: ask for at most as many layers as the release covers.")
    return entry.repo_id, [entry.saes_map[sae_id] for sae_id in sae_ids]


def _generator(seed: int, layer: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 * seed + layer)


def _encoder_and_decoder(g: torch.Generator, d_model: int, d_sae: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``W_enc [d_model, d_sae]``, ``W_dec [d_sae, d_model]``: pre-activations of unit scale for unit inputs."""
    return torch.randn(d_model, d_sae, generator=g) / d_model**0.5, torch.randn(d_sae, d_model, generator=g) / d_sae**0.5


def _thresholds(g: torch.Generator, d_sae: int) -> torch.Tensor:
    """Positive, as released; about a third of the features pass for unit-scale inputs."""
    return 0.1 + 0.5 * torch.rand(d_sae, generator=g)


def _load(release: str, sae_ids: list[str], **kwargs: Any) -> list[SAE[Any]]:
    return [SAE.from_pretrained(release, sae_id, **kwargs) for sae_id in sae_ids]


def gemma_scope_2_transcoders(
    hub: LocalHub, *, d_model: int, d_sae: int, n_layers: int, affine: bool, l0: str = "small", size: str = "270m", seed: int = 0
) -> ReleaseTranscoders:
    """Gemma Scope 2 transcoders (``gemma-scope-2-{size}-pt-transcoders-all``), JumpReLU, optionally with the affine skip.

    Per layer, ``transcoder_all/layer_{L}_width_16k_l0_{l0}[_affine]/`` holds ``params.safetensors``
    (float32 ``w_enc [d_model, d_sae]``, ``w_dec [d_sae, d_model]``, ``b_enc``, ``b_dec``,
    ``threshold``, and with ``affine`` ``affine_skip_connection [d_model, d_model]``, applied as
    ``x @ affine_skip_connection``) and the release's ``config.json``. SAELens's ``gemma_3`` loader
    reads the shapes from the file header, so any tiny size loads under the real ids. It maps the
    layer to ``blocks.L.hook_mlp_in`` → ``blocks.L.hook_mlp_out`` (the config's HF points are
    ``pre_feedforward_layernorm.output`` → ``post_feedforward_layernorm.output``; kept as
    ``metadata.hf_hook_name``/``hf_hook_name_out``).
    """
    release = GEMMA_SCOPE_2_RELEASE.format(size=size)
    sae_ids = [f"layer_{layer}_width_16k_l0_{l0}" + ("_affine" if affine else "") for layer in range(n_layers)]
    repo_id, paths = _release_entry(release, sae_ids)
    raw = []
    for layer, path in enumerate(paths):
        g = _generator(seed, layer)
        w_enc, w_dec = _encoder_and_decoder(g, d_model, d_sae)
        tensors = {"w_enc": w_enc, "w_dec": w_dec, "b_enc": 0.1 * torch.randn(d_sae, generator=g),
                   "b_dec": 0.1 * torch.randn(d_model, generator=g), "threshold": _thresholds(g, d_sae)}
        if affine:
            tensors["affine_skip_connection"] = torch.randn(d_model, d_model, generator=g) / d_model**0.5
        config = {
            "hf_hook_point_in": f"model.layers.{layer}.pre_feedforward_layernorm.output",
            "hf_hook_point_out": f"model.layers.{layer}.post_feedforward_layernorm.output",
            "width": d_sae, "model_name": f"google/gemma-3-{size}-pt", "architecture": "jump_relu",
            "l0": 10 if l0 == "small" else 60, "affine_connection": affine, "type": "transcoder",
        }
        hub.write(repo_id, f"{path}/params.safetensors", save({k: v.contiguous() for k, v in tensors.items()}))
        hub.write(repo_id, f"{path}/config.json", json.dumps(config).encode())
        raw.append(tensors)
    return ReleaseTranscoders(release, repo_id, sae_ids, _load(release, sae_ids), raw)


def qwen3_transcoders(
    hub: LocalHub, *, d_model: int, d_sae: int, n_layers: int, release: str = QWEN3_RELEASE, seed: int = 0
) -> ReleaseTranscoders:
    """Qwen3 transcoders (``mwhanna-qwen3-{size}-transcoders[-lowl0]``, the sets circuit-tracer uses), ReLU.

    The repo holds ``layer_{L}.safetensors`` (bfloat16, as released: ``W_enc [d_sae, d_model]``,
    i.e. transposed from SAELens, ``W_dec [d_sae, d_model]``, ``b_enc``, ``b_dec``),
    circuit-tracer's ``config.yaml`` and the training run's ``wandb-config.yaml``, from which
    SAELens's ``mwhanna_transcoder`` loader reads d_model and d_sae. It maps the layer to
    ``blocks.L.mlp.hook_in`` → ``blocks.L.hook_mlp_out`` with ``model_from_pretrained_kwargs``
    ``{"fold_ln": False}`` and casts the weights to float32.
    """
    size = re.fullmatch(r"mwhanna-qwen3-([\d.]+)b-transcoders(-lowl0)?", release)
    if size is None:
        raise ValueError(f"{release!r} is not one of SAELens's mwhanna-qwen3-*-transcoders releases.")
    sae_ids = [f"layer_{layer}" for layer in range(n_layers)]
    repo_id, paths = _release_entry(release, sae_ids)
    raw = []
    for layer, path in enumerate(paths):
        g = _generator(seed, layer)
        w_enc, w_dec = _encoder_and_decoder(g, d_model, d_sae)
        tensors = {"W_enc": w_enc.T, "W_dec": w_dec, "b_enc": 0.1 * torch.randn(d_sae, generator=g),
                   "b_dec": 0.1 * torch.randn(d_model, generator=g)}
        tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}
        hub.write(repo_id, path, save(tensors))
        raw.append(tensors)
    hub.write(repo_id, "config.yaml", yaml.safe_dump({
        "model_name": f"Qwen/Qwen3-{size.group(1)}B", "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in", "feature_output_hook": "hook_mlp_out",
        "scan": repo_id.split("/")[1],
        "transcoders": [f"hf://{repo_id}/{path}" for path in paths],
    }).encode())
    hub.write(repo_id, "wandb-config.yaml", yaml.safe_dump({
        "_wandb": {"value": {"cli_version": "0.19.1"}}, "d_model": {"value": d_model}, "d_feature": {"value": d_sae},
        "batch_size": {"value": 4096}, "lr": {"value": 2e-4},
    }).encode())
    return ReleaseTranscoders(release, repo_id, sae_ids, _load(release, sae_ids), raw)


def _with_shapes(d_model: int, d_sae: int) -> Callable[..., tuple[dict[str, Any], dict[str, torch.Tensor], torch.Tensor | None]]:
    """SAELens's ``gemma_2_transcoder`` loader, told the tiny shapes its config reader hard-codes."""

    def converter(repo_id: str, folder_name: str, device: str, force_download: bool, cfg_overrides: dict[str, Any] | None):
        shapes = {"d_in": d_model, "d_out": d_model, "d_sae": d_sae}
        return gemma_2_transcoder_huggingface_loader(repo_id, folder_name, device, force_download, {**(cfg_overrides or {}), **shapes})

    return converter


def gemma_scope_2b_transcoders(hub: LocalHub, *, d_model: int, d_sae: int, n_layers: int, seed: int = 0) -> ReleaseTranscoders:
    """Gemma Scope's Gemma 2 transcoders (``gemma-scope-2b-pt-transcoders``), JumpReLU, no skip.

    Per layer, the release's ``layer_{L}/width_16k/average_l0_{N}/params.npz`` (float32
    ``W_enc [d_model, d_sae]``, ``W_dec [d_sae, d_model]``, ``b_enc``, ``b_dec``, ``threshold``).
    SAELens's ``gemma_2_transcoder`` loader maps it to ``blocks.L.ln2.hook_normalized`` →
    ``blocks.L.hook_mlp_out``; its config reader takes d_sae from the id and d_model from the repo
    id, so the tiny shapes are given as config overrides through ``from_pretrained``'s converter.
    """
    directory = get_pretrained_saes_directory()[GEMMA_SCOPE_2B_RELEASE]
    sae_ids = [next((i for i in directory.saes_map if i.startswith(f"layer_{layer}/")), f"layer_{layer}/?") for layer in range(n_layers)]
    repo_id, paths = _release_entry(GEMMA_SCOPE_2B_RELEASE, sae_ids)
    raw = []
    for layer, path in enumerate(paths):
        g = _generator(seed, layer)
        w_enc, w_dec = _encoder_and_decoder(g, d_model, d_sae)
        tensors = {"W_enc": w_enc, "W_dec": w_dec, "b_enc": 0.1 * torch.randn(d_sae, generator=g),
                   "b_dec": 0.1 * torch.randn(d_model, generator=g), "threshold": _thresholds(g, d_sae)}
        buffer = io.BytesIO()
        np.savez(buffer, **{k: v.numpy() for k, v in tensors.items()})
        hub.write(repo_id, f"{path}/params.npz", buffer.getvalue())
        raw.append(tensors)
    return ReleaseTranscoders(
        GEMMA_SCOPE_2B_RELEASE, repo_id, sae_ids, _load(GEMMA_SCOPE_2B_RELEASE, sae_ids, converter=_with_shapes(d_model, d_sae)), raw
    )
