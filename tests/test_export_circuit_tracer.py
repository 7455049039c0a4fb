"""Export to circuit-tracer's transcoder-set format and read it back, through real objects."""

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from sae_lens import SAE
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
from sae_lens.saes.transcoder import (
    JumpReLUSkipTranscoder,
    JumpReLUSkipTranscoderConfig,
    JumpReLUTranscoder,
    JumpReLUTranscoderConfig,
    SkipTranscoder,
    SkipTranscoderConfig,
    Transcoder,
    TranscoderConfig,
)
from transformer_lens import HookedTransformer

import sae_lens_transcoder.export.circuit_tracer as ct
from sae_lens_transcoder.saes.topk_transcoder import (
    TopKSkipTranscoder,
    TopKSkipTranscoderConfig,
    TopKTranscoder,
    TopKTranscoderConfig,
)
from sae_lens_transcoder import TrainingTranscoder, TrainingTranscoderConfig
from sae_lens_transcoder.cli import main
from sae_lens_transcoder.evals import evaluate_spliced
from sae_lens_transcoder.export.circuit_tracer import export_circuit_tracer, load_circuit_tracer_transcoders
from sae_lens_transcoder.hooks import ensure_mlp_hook_in
from sae_lens_transcoder.llm_transcoder_training_runner import load_offline_model
from sae_lens_transcoder.report import heldout_tokens, load_heldout_split
from sae_lens_transcoder.splicing import Splice, spliced
from tests.conftest import CONTEXT, D_MODEL, D_VOCAB, build_model
from tests.test_cli import FAST, TINY_CONFIG

pytestmark = pytest.mark.filterwarnings("ignore:(?s).*non-empty model_from_pretrained_kwargs")

D_SAE = 96
CLASSES: dict[str, tuple[type[Transcoder], type[TranscoderConfig]]] = {
    "transcoder": (Transcoder, TranscoderConfig),
    "skip_transcoder": (SkipTranscoder, SkipTranscoderConfig),
    "jumprelu_transcoder": (JumpReLUTranscoder, JumpReLUTranscoderConfig),
    "jumprelu_skip_transcoder": (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig),
    "topk_transcoder": (TopKTranscoder, TopKTranscoderConfig),
    "topk_skip_transcoder": (TopKSkipTranscoder, TopKSkipTranscoderConfig),
}
TOPK_K = 12


def make_transcoder(
    arch: str,
    layer: int,
    seed: int = 0,
    hook: str = "mlp.hook_in",
    hook_out: str = "hook_mlp_out",
    d_sae: int = D_SAE,
    d_out: int = D_MODEL,
    dtype: str = "float32",
    model_kwargs: dict[str, Any] | None = None,
    **cfg: Any,
) -> Transcoder:
    """A transcoder with random non-trivial weights: biases, skip and thresholds all matter."""
    sae_cls, cfg_cls = CLASSES[arch]
    if arch.startswith("topk"):
        cfg.setdefault("k", TOPK_K)
    config = cfg_cls(d_in=D_MODEL, d_sae=d_sae, d_out=d_out, dtype=dtype, apply_b_dec_to_input=False, **cfg)
    config.metadata = SAEMetadata(
        model_name="test-model",
        hook_name=f"blocks.{layer}.{hook}",
        hook_name_out=f"blocks.{layer}.{hook_out}",
        model_from_pretrained_kwargs=model_kwargs,
    )
    sae = sae_cls(config)
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            if name == "threshold":
                param.copy_(0.4 * torch.rand(param.shape, generator=g))
            else:
                std = {"W_enc": 0.15, "W_skip": 0.05}.get(name, 0.1)
                param.copy_(std * torch.randn(param.shape, generator=g))
    return sae.eval()


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    m = build_model("gpt2")
    ensure_mlp_hook_in(m)
    return m


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(1, D_VOCAB, (4, CONTEXT), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def mlp_inputs(model: HookedTransformer, tokens: torch.Tensor) -> dict[int, torch.Tensor]:
    """What each MLP of the real model reads, [tokens, d_model]."""
    names = [f"blocks.{layer}.mlp.hook_in" for layer in range(2)]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    return {layer: cache[name].reshape(-1, D_MODEL) for layer, name in enumerate(names)}


def circuit_tracer_forward(tensors: dict[str, torch.Tensor], x: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """circuit-tracer's SingleLayerTranscoder.forward, written from its documented semantics
    (upstream's TopK keeps the k largest pre-activations as they are)."""
    pre = F.linear(x, tensors["W_enc"], tensors["b_enc"])
    thr = tensors.get("activation_function.threshold")
    if k is not None:
        top = pre.topk(k, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    else:
        acts = F.relu(pre) if thr is None else pre * (pre > thr)
    out = acts @ tensors["W_dec"] + tensors["b_dec"]
    if "W_skip" in tensors:
        out = out + x @ tensors["W_skip"].T
    return out


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("arch", list(CLASSES))
def test_round_trip_keeps_class_hooks_and_outputs(arch: str, tmp_path: Path, mlp_inputs: dict[int, torch.Tensor]) -> None:
    saes = [make_transcoder(arch, layer, seed=layer) for layer in (1, 0)]  # any order in
    out = export_circuit_tracer(saes, tmp_path / "ct", "test-model")
    loaded = load_circuit_tracer_transcoders(out)
    assert [s.layer for s in loaded] == [0, 1]
    config = yaml.safe_load((out / "config.yaml").read_text())
    k = config.get("k")
    assert (config.get("activation"), k) == (("topk", TOPK_K) if arch.startswith("topk") else (None, None))
    for splice, sae in zip(loaded, saes[::-1]):
        x = mlp_inputs[splice.layer]
        assert type(splice.transcoder) is type(sae)
        assert (splice.hook_name, splice.hook_name_out) == (sae.cfg.metadata.hook_name, sae.cfg.metadata.hook_name_out)
        assert splice.transcoder.cfg.metadata.model_name == "test-model"
        expected = sae(x)
        assert_close(splice(x), expected)
        files = load_file(out / f"layer_{splice.layer}.safetensors")
        if k is not None:  # upstream has no ReLU after the top-k: equal where the k kept are positive
            pre = x @ sae.W_enc + sae.b_enc
            positive = pre.topk(k, dim=-1).values.min(dim=-1).values > 0
            assert positive.sum() > len(x) / 2
            assert_close(circuit_tracer_forward(files, x, k)[positive], expected[positive])
        else:
            assert_close(circuit_tracer_forward(files, x), expected)
        if isinstance(sae, JumpReLUTranscoder):  # the thresholds really cut features here
            pre = x @ sae.W_enc + sae.b_enc
            assert ((pre > 0) & (pre <= sae.threshold)).sum() > 100


def test_files_keys_shapes_and_config_are_circuit_tracers(tmp_path: Path) -> None:
    saes = [make_transcoder("jumprelu_skip_transcoder", layer, seed=layer) for layer in (0, 1)]
    out = export_circuit_tracer(saes, tmp_path / "ct", "org/test-model")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "layer_0.safetensors", "layer_1.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]  # no temporary leftovers
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model_name"] == "org/test-model"
    assert config["model_kind"] == "transcoder_set"
    assert (config["feature_input_hook"], config["feature_output_hook"]) == ("mlp.hook_in", "hook_mlp_out")
    assert config["scan"] == "test-model/ct"
    assert "transcoders" not in config  # circuit-tracer then finds layer_*.safetensors itself
    for layer, sae in enumerate(saes):
        t = load_file(out / f"layer_{layer}.safetensors")
        assert set(t) == {"W_enc", "b_enc", "W_dec", "b_dec", "W_skip", "activation_function.threshold"}
        assert t["W_enc"].shape == (D_SAE, D_MODEL) and torch.equal(t["W_enc"], sae.W_enc.T)
        assert t["W_dec"].shape == (D_SAE, D_MODEL) and torch.equal(t["W_dec"], sae.W_dec)
        assert t["W_skip"].shape == (D_MODEL, D_MODEL) and torch.equal(t["W_skip"], sae.W_skip)
        assert torch.equal(t["b_enc"], sae.b_enc) and torch.equal(t["b_dec"], sae.b_dec)
        assert torch.equal(t["activation_function.threshold"], sae.threshold)
        assert all(v.dtype == torch.float32 for v in t.values())
    t = load_file(export_circuit_tracer([make_transcoder("transcoder", 0)], tmp_path / "relu", "m") / "layer_0.safetensors")
    assert set(t) == {"W_enc", "b_enc", "W_dec", "b_dec"}  # ReLU, no skip: nothing else


@torch.no_grad()
@pytest.mark.parametrize(("scale", "dtype"), [(4.0, "float32"), (3.7, "float64")])
def test_input_scale_and_expected_average_scaling_are_folded(
    scale: float, dtype: str, tmp_path: Path, mlp_inputs: dict[int, torch.Tensor]
) -> None:
    splices = [
        Splice.from_sae(make_transcoder("jumprelu_skip_transcoder", 0, dtype=dtype, normalize_activations="expected_average_only_in"), input_scale=scale),
        Splice.from_sae(make_transcoder("transcoder", 1, seed=1, dtype=dtype), input_scale=scale),
    ]
    loaded = load_circuit_tracer_transcoders(export_circuit_tracer(splices, tmp_path / "ct", "test-model"))
    for orig, new in zip(splices, loaded):
        x = mlp_inputs[orig.layer]
        assert new.input_scale == 1.0 and new.transcoder.cfg.normalize_activations == "none"
        assert orig(x).abs().max() > 0.1
        assert_close(new(x), orig(x))


@torch.no_grad()
def test_training_transcoder_with_its_scaler_exports_like_the_saved_one(tmp_path: Path, mlp_inputs: dict[int, torch.Tensor]) -> None:
    """What the training evaluator splices: the training SAE plus the activation scaler."""
    splices = []
    for layer in (0, 1):
        sae = TrainingTranscoder(TrainingTranscoderConfig(d_in=D_MODEL, d_sae=D_SAE, normalize_activations="expected_average_only_in"))
        sae.cfg.metadata = SAEMetadata(hook_name=f"blocks.{layer}.mlp.hook_in", hook_name_out=f"blocks.{layer}.hook_mlp_out")
        sae.b_enc.data.normal_(0, 0.1)
        sae.b_dec.data.normal_(0, 0.1)
        splices.append(Splice.from_sae(sae, input_scale=2.0))
    loaded = load_circuit_tracer_transcoders(export_circuit_tracer(splices, tmp_path / "ct", "test-model"))
    for orig, new in zip(splices, loaded):
        assert type(new.transcoder) is Transcoder
        assert_close(new(mlp_inputs[orig.layer]), orig(mlp_inputs[orig.layer]))


@torch.no_grad()
def test_mixed_skip_set_pads_zero_skip(tmp_path: Path, mlp_inputs: dict[int, torch.Tensor]) -> None:
    # circuit-tracer decides "skip connection" from layer 0 and then calls it for every layer.
    saes = [make_transcoder("jumprelu_transcoder", 0), make_transcoder("skip_transcoder", 1, seed=1)]
    out = export_circuit_tracer(saes, tmp_path / "ct", "test-model")
    assert torch.equal(load_file(out / "layer_0.safetensors")["W_skip"], torch.zeros(D_MODEL, D_MODEL))
    for new, sae in zip(load_circuit_tracer_transcoders(out), saes):
        assert_close(new(mlp_inputs[new.layer]), sae(mlp_inputs[new.layer]))


@torch.no_grad()
def test_fold_ln_transcoder_reads_ln2_normalized_in_circuit_tracers_unfolded_model(
    tmp_path: Path, model: HookedTransformer, tokens: torch.Tensor
) -> None:
    """Trained on a fold_ln model's mlp.hook_in; circuit-tracer runs unfolded models."""
    folded = build_model("gpt2")  # the same weights as `model`
    folded.process_weights_(fold_ln=True, center_writing_weights=False, center_unembed=False)
    ensure_mlp_hook_in(folded)
    saes = [make_transcoder("skip_transcoder", layer, seed=layer, model_kwargs={"fold_ln": True}) for layer in (0, 1)]
    out = export_circuit_tracer(saes, tmp_path / "ct", "test-model")
    assert yaml.safe_load((out / "config.yaml").read_text())["feature_input_hook"] == "ln2.hook_normalized"
    loaded = load_circuit_tracer_transcoders(out)
    assert loaded[1].hook_name == "blocks.1.ln2.hook_normalized"
    assert loaded[1].transcoder.cfg.metadata.model_from_pretrained_kwargs == {"fold_ln": True}
    with spliced(folded, saes):
        logits_folded = folded(tokens)
    with spliced(model, loaded):  # the unfolded model, as circuit-tracer loads it
        logits_unfolded = model(tokens)
    torch.testing.assert_close(logits_unfolded, logits_folded, rtol=1e-4, atol=1e-4)
    with spliced(model, saes):  # mlp.hook_in of the unfolded model is a different input
        assert not torch.allclose(model(tokens), logits_folded, atol=1e-2)


def _standard_sae() -> SAE:  # type: ignore[type-arg]
    cfg = StandardSAEConfig(d_in=D_MODEL, d_sae=D_SAE)
    cfg.metadata = SAEMetadata(hook_name="blocks.0.mlp.hook_in", hook_name_out="blocks.0.hook_mlp_out")
    return StandardSAE(cfg)


def _masked() -> Splice:
    splice = Splice.from_sae(make_transcoder("transcoder", 0))
    splice.feature_mask = torch.ones(D_SAE)
    return splice


BAD_EXPORTS: dict[str, tuple[Any, str]] = {
    "layer_norm": (lambda: [make_transcoder("transcoder", 0, normalize_activations="layer_norm")], "normalize_activations='layer_norm'"),
    "unknown_scale": (lambda: [make_transcoder("transcoder", 0, normalize_activations="expected_average_only_in")], "normalize_activations='expected_average_only_in'.*input_scale"),
    "two_for_one_layer": (lambda: [make_transcoder("transcoder", 0), make_transcoder("transcoder", 0, seed=1)], "two transcoders for layer 0"),
    "missing_layer": (lambda: [make_transcoder("transcoder", 1)], r"no transcoder for layers \[0\]"),
    "d_sae": (lambda: [make_transcoder("transcoder", 0), make_transcoder("transcoder", 1, d_sae=48)], "d_sae"),
    "input_hooks_differ": (lambda: [make_transcoder("transcoder", 0), make_transcoder("transcoder", 1, hook="ln2.hook_normalized")], "hook_name: layer 0 uses 'mlp.hook_in'"),
    "output_not_mlp": (lambda: [make_transcoder("transcoder", 0, hook_out="hook_resid_post")], "hook_name_out='blocks.0.hook_resid_post'"),
    "not_a_transcoder": (lambda: [_standard_sae()], "architecture='standard'"),
    "feature_mask": (lambda: [_masked()], "feature_mask"),
    "d_out": (lambda: [make_transcoder("transcoder", 0, d_out=32)], "d_out=32"),
    "center_writing_weights": (lambda: [make_transcoder("transcoder", 0, model_kwargs={"center_writing_weights": True})], "center_writing_weights"),
}


@pytest.mark.parametrize("case", list(BAD_EXPORTS))
def test_unrepresentable_exports_name_the_field(case: str, tmp_path: Path) -> None:
    build, match = BAD_EXPORTS[case]
    with pytest.raises(ValueError, match=match):
        export_circuit_tracer(build(), tmp_path / "ct", "test-model")
    assert list(tmp_path.iterdir()) == []


def test_layers_must_match_and_cover_n_layers(tmp_path: Path) -> None:
    sae = make_transcoder("transcoder", 1)
    sae.cfg.metadata.hook_name = "blocks.0.mlp.hook_in"
    with pytest.raises(ValueError, match="hook_name='blocks.0.mlp.hook_in' is in layer 0"):
        export_circuit_tracer([sae], tmp_path / "a", "m")
    saes = [make_transcoder("transcoder", layer) for layer in (0, 1)]
    with pytest.raises(ValueError, match=r"no transcoder for layers \[2\]"):
        export_circuit_tracer(saes, tmp_path / "b", "m", n_layers=3)
    export_circuit_tracer(saes, tmp_path / "c", "m", n_layers=2)


def test_write_is_atomic_and_refuses_to_clobber(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saes = [make_transcoder("transcoder", layer, seed=layer) for layer in (0, 1)]
    out = export_circuit_tracer(saes, tmp_path / "ct", "m")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_circuit_tracer(saes, out, "m")
    real_save, calls = ct.save_file, []

    def failing_save(tensors: dict[str, torch.Tensor], filename: str, metadata: Any = None) -> None:
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ct, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export_circuit_tracer(saes, tmp_path / "new", "m")
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        export_circuit_tracer([make_transcoder("skip_transcoder", 0), saes[1]], out, "m", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]  # no half-written export anywhere
    assert set(load_file(out / "layer_0.safetensors")) == {"W_enc", "b_enc", "W_dec", "b_dec"}  # old one intact
    monkeypatch.setattr(ct, "save_file", real_save)
    export_circuit_tracer([make_transcoder("skip_transcoder", 0), saes[1]], out, "m", overwrite=True)
    assert "W_skip" in load_file(out / "layer_0.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]


def _rewrite(out: Path, layer: int, **changes: Any) -> None:
    path = out / f"layer_{layer}.safetensors"
    tensors = {**load_file(path), **changes}
    save_file({k: v for k, v in tensors.items() if v is not None}, str(path))


def test_reader_rejects_what_it_cannot_represent(tmp_path: Path) -> None:
    out = export_circuit_tracer([make_transcoder("jumprelu_transcoder", layer, seed=layer) for layer in (0, 1)], tmp_path / "ct", "m")
    config_path = out / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config_path.write_text(yaml.safe_dump({**config, "model_kind": "cross_layer_transcoder"}))
    with pytest.raises(ValueError, match="model_kind='cross_layer_transcoder'"):
        load_circuit_tracer_transcoders(out)
    config_path.write_text(yaml.safe_dump(config))
    _rewrite(out, 1, **{"activation_function.threshold": -torch.ones(D_SAE)})
    with pytest.raises(ValueError, match=r"layer_1.safetensors: activation_function.threshold has negative"):
        load_circuit_tracer_transcoders(out)
    _rewrite(out, 1, **{"activation_function.threshold": torch.tensor(0.1), "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected tensors \['extra'\]"):
        load_circuit_tracer_transcoders(out)
    _rewrite(out, 1, extra=None, W_dec=torch.zeros(D_MODEL, D_SAE))
    with pytest.raises(ValueError, match=r"W_dec has shape \(64, 96\), expected \(96, 64\)"):
        load_circuit_tracer_transcoders(out)
    (out / "layer_0.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="layer_0.safetensors"):
        load_circuit_tracer_transcoders(out)


def test_reader_maps_mlp_hook_out_and_reads_scalar_threshold(tmp_path: Path, mlp_inputs: dict[int, torch.Tensor]) -> None:
    """A set as circuit-tracer writes it (config.yaml from its cache, no extra block)."""
    sae = make_transcoder("jumprelu_transcoder", 0)
    out = export_circuit_tracer([sae], tmp_path / "ct", "m")
    (out / "config.yaml").write_text(yaml.safe_dump({"model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out", "scan": "s"}))
    _rewrite(out, 0, **{"activation_function.threshold": torch.tensor(0.2)})
    (splice,) = load_circuit_tracer_transcoders(out / "config.yaml")
    assert splice.hook_name_out == "blocks.0.hook_mlp_out"
    with torch.no_grad():
        sae.threshold.fill_(0.2)
        assert_close(splice(mlp_inputs[0]), sae(mlp_inputs[0]))


def test_cli_exports_trained_transcoders_and_they_evaluate_the_same(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outs = []
    for layer in (0, 1):
        out = tmp_path / f"layer{layer}"
        main(["train", "--config", str(TINY_CONFIG), "--mlp_layer", str(layer), "--d_sae", "256", "--output_path", str(out),
              "--checkpoint_path", str(tmp_path / "ck"), "--eval-tokens", "0", *FAST])
        outs.append(str(out))
    ct_dir = tmp_path / "circuit-tracer"
    main(["export", "circuit-tracer", *outs, "--out", str(ct_dir)])
    assert str(ct_dir) in capsys.readouterr().out
    config = yaml.safe_load((ct_dir / "config.yaml").read_text())
    assert (config["model_name"], config["feature_input_hook"], config["feature_output_hook"]) == ("tiny-gpt2", "mlp.hook_in", "hook_mlp_out")
    originals = [SAE.load_from_disk(p) for p in outs]
    loaded = load_circuit_tracer_transcoders(ct_dir)
    assert [type(s.transcoder) for s in loaded] == [Transcoder, Transcoder]
    model = load_offline_model("tiny-gpt2", "cpu", {})
    tokens = heldout_tokens(model, load_heldout_split("embedded"), 64, 512, True)
    ensure_mlp_hook_in(model)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("mlp.hook_in"))
    with torch.no_grad():
        for sae, splice in zip(originals, loaded):
            x = cache[splice.hook_name]
            assert_close(splice(x), sae(x))
    before = evaluate_spliced(model, originals, tokens)
    after = evaluate_spliced(model, loaded, tokens)
    for key in ("ce_loss_spliced", "explained_variance", "l0", "kl_div"):
        assert after[key] == pytest.approx(before[key], abs=1e-5)
    with pytest.raises(SystemExit, match="overwrite"):
        main(["export", "circuit-tracer", *outs, "--out", str(ct_dir)])
    main(["export", "circuit-tracer", outs[0], outs[1], "--out", str(ct_dir), "--model-name", "other", "--overwrite"])
    assert yaml.safe_load((ct_dir / "config.yaml").read_text())["model_name"] == "other"
    with pytest.raises(SystemExit, match="layer"):
        main(["export", "circuit-tracer", outs[1], "--out", str(tmp_path / "only1")])
