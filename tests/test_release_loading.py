"""Released transcoders load through SAELens's own conversion code from a hub-layout cache.

For each release the fixture writes random weights in the release's file layout; here the
loaded SAELens objects are checked against the formula each release documents, computed from
the raw tensors as written (so a transposed matrix, a dropped skip or threshold, or a wrong
dtype cast in the conversion shows up).
"""

import json
import socket

import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from sae_lens import SAE
from sae_lens.saes.transcoder import JumpReLUSkipTranscoder, JumpReLUTranscoder, Transcoder
from safetensors import safe_open

from tests.release_fixtures import (
    COMMIT,
    LocalHub,
    gemma_scope_2_transcoders,
    gemma_scope_2b_transcoders,
    local_hub,  # noqa: F401 (the fixture)
    qwen3_transcoders,
)

D_MODEL, D_SAE, N_LAYERS = 24, 40, 2


def inputs(d_model: int = D_MODEL) -> torch.Tensor:
    return torch.randn(3, 5, d_model, generator=torch.Generator().manual_seed(7))


def jumprelu(pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Gemma Scope's JumpReLU: ReLU(pre) where pre > threshold, else 0."""
    return torch.relu(pre) * (pre > threshold)


def check_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("affine", [False, True])
def test_gemma_scope_2(local_hub: LocalHub, affine: bool) -> None:
    loaded = gemma_scope_2_transcoders(local_hub, d_model=D_MODEL, d_sae=D_SAE, n_layers=N_LAYERS, affine=affine)
    assert loaded.release == "gemma-scope-2-270m-pt-transcoders-all"
    assert loaded.sae_ids == [f"layer_{i}_width_16k_l0_small" + ("_affine" if affine else "") for i in range(N_LAYERS)]
    x = inputs()
    for layer, (sae, raw) in enumerate(zip(loaded.transcoders, loaded.raw, strict=True)):
        assert type(sae) is (JumpReLUSkipTranscoder if affine else JumpReLUTranscoder)
        meta = sae.cfg.metadata
        assert (meta.hook_name, meta.hook_name_out) == (f"blocks.{layer}.hook_mlp_in", f"blocks.{layer}.hook_mlp_out")
        assert meta.hf_hook_name == f"model.layers.{layer}.pre_feedforward_layernorm.output"
        assert meta.model_name == "google/gemma-3-270m"
        assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.d_out) == (D_MODEL, D_SAE, D_MODEL)
        check_close(sae.threshold, raw["threshold"])
        acts = jumprelu(x @ raw["w_enc"] + raw["b_enc"], raw["threshold"])
        assert 0.05 < (acts > 0).float().mean() < 0.95
        with torch.no_grad():
            check_close(sae.encode(x), acts)
            check_close(sae.decode(acts), acts @ raw["w_dec"] + raw["b_dec"])
            expected = acts @ raw["w_dec"] + raw["b_dec"]
            if affine:
                check_close(sae.W_skip, raw["affine_skip_connection"].T)
                expected = expected + x @ raw["affine_skip_connection"]
            check_close(sae(x), expected)
    header_reads = [r for r in local_hub.served if r.endswith(("bytes=0-7",)) and "params.safetensors" in r]
    assert len(header_reads) == N_LAYERS  # SAELens read each file's shapes from the local endpoint


def test_qwen3(local_hub: LocalHub) -> None:
    loaded = qwen3_transcoders(local_hub, d_model=D_MODEL, d_sae=D_SAE, n_layers=N_LAYERS)
    assert loaded.release == "mwhanna-qwen3-0.6b-transcoders-lowl0"
    x = inputs()
    for layer, (sae, raw) in enumerate(zip(loaded.transcoders, loaded.raw, strict=True)):
        assert type(sae) is Transcoder
        meta = sae.cfg.metadata
        assert (meta.hook_name, meta.hook_name_out) == (f"blocks.{layer}.mlp.hook_in", f"blocks.{layer}.hook_mlp_out")
        assert meta.model_name == "Qwen/Qwen3-0.6B"
        assert meta.model_from_pretrained_kwargs == {"fold_ln": False}
        assert raw["W_enc"].dtype == torch.bfloat16 and raw["W_enc"].shape == (D_SAE, D_MODEL)
        assert sae.W_enc.dtype == torch.float32
        w = {k: v.float() for k, v in raw.items()}
        acts = torch.relu(x @ w["W_enc"].T + w["b_enc"])
        with torch.no_grad():
            check_close(sae.encode(x), acts)
            check_close(sae(x), acts @ w["W_dec"] + w["b_dec"])
    assert local_hub.served == []  # everything came from the cache


def test_qwen3_other_release(local_hub: LocalHub) -> None:
    loaded = qwen3_transcoders(local_hub, d_model=D_MODEL, d_sae=D_SAE, n_layers=1, release="mwhanna-qwen3-4b-transcoders")
    assert loaded.repo_id == "mwhanna/qwen3-4b-transcoders"
    assert loaded.transcoders[0].cfg.metadata.model_name == "Qwen/Qwen3-4B"


def test_nothing_but_the_local_hub_is_reachable(local_hub: LocalHub) -> None:
    with pytest.raises(OSError, match="network access attempted"):
        socket.create_connection(("127.0.0.1", 9), timeout=1)


def test_gemma_scope_2b(local_hub: LocalHub) -> None:
    loaded = gemma_scope_2b_transcoders(local_hub, d_model=D_MODEL, d_sae=D_SAE, n_layers=N_LAYERS)
    assert loaded.sae_ids == ["layer_0/width_16k/average_l0_76", "layer_1/width_16k/average_l0_65"]
    x = inputs()
    for layer, (sae, raw) in enumerate(zip(loaded.transcoders, loaded.raw, strict=True)):
        assert type(sae) is JumpReLUTranscoder
        meta = sae.cfg.metadata
        assert (meta.hook_name, meta.hook_name_out) == (f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out")
        assert meta.model_name == "gemma-2-2b"
        check_close(sae.threshold, raw["threshold"])
        acts = jumprelu(x @ raw["W_enc"] + raw["b_enc"], raw["threshold"])
        with torch.no_grad():
            check_close(sae.encode(x), acts)
            check_close(sae(x), acts @ raw["W_dec"] + raw["b_dec"])


def test_files_are_laid_out_as_the_hub_cache(local_hub: LocalHub) -> None:
    gemma_scope_2_transcoders(local_hub, d_model=D_MODEL, d_sae=D_SAE, n_layers=1, affine=True)
    repo = local_hub.cache_dir / "models--google--gemma-scope-2-270m-pt"
    assert (repo / "refs" / "main").read_text() == COMMIT
    folder = repo / "snapshots" / COMMIT / "transcoder_all" / "layer_0_width_16k_l0_small_affine"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "params.safetensors"]
    assert (folder / "params.safetensors").is_symlink() and (folder / "params.safetensors").resolve().parent.name == "blobs"
    with safe_open(str(folder / "params.safetensors"), framework="pt") as f:
        shapes = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118
    assert shapes == {
        "w_enc": ((D_MODEL, D_SAE), "F32"), "w_dec": ((D_SAE, D_MODEL), "F32"), "b_enc": ((D_SAE,), "F32"),
        "b_dec": ((D_MODEL,), "F32"), "threshold": ((D_SAE,), "F32"), "affine_skip_connection": ((D_MODEL, D_MODEL), "F32"),
    }
    assert json.loads((folder / "config.json").read_text())["affine_connection"] is True


def test_d_model_follows_the_request(local_hub: LocalHub) -> None:
    loaded = qwen3_transcoders(local_hub, d_model=32, d_sae=8, n_layers=1)
    assert (loaded.transcoders[0].cfg.d_in, loaded.transcoders[0].cfg.d_sae) == (32, 8)


def test_more_layers_than_the_release_is_named(local_hub: LocalHub) -> None:
    with pytest.raises(ValueError, match="at most as many layers as the release covers"):
        qwen3_transcoders(local_hub, d_model=D_MODEL, d_sae=D_SAE, n_layers=29)


def test_the_cache_is_what_is_read(local_hub: LocalHub) -> None:
    """Without the files, the same call fails offline: nothing comes from elsewhere."""
    with pytest.raises(LocalEntryNotFoundError):
        SAE.from_pretrained("mwhanna-qwen3-0.6b-transcoders-lowl0", "layer_0")
