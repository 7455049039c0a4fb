"""The replacement set: one object between transcoders and splicing, evals, circuits and files."""

import copy
import os
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from sae_lens.saes.sae import SAE
from transformer_lens import HookedTransformer

from sae_lens_transcoder.circuits import direct_contributions, feature_target, logit_target, target_value, trace_prompt
from sae_lens_transcoder.evals import evaluate_spliced
from sae_lens_transcoder.export.circuit_tracer import load_circuit_tracer_transcoders
from sae_lens_transcoder.loading import load_transcoder_set
from sae_lens_transcoder.replacement import PerLayerTranscoders, ReplacementSet, Splice
from sae_lens_transcoder.replacement.saving import save_transcoder_set
from sae_lens_transcoder.splicing import spliced
from tests.circuit_fixtures import random_transcoder
from tests.conftest import CONTEXT, D_MODEL, D_VOCAB, build_model

N_LAYERS = 3
LAYOUTS = [("gpt2", "skip"), ("llama", "jumprelu_skip")]


def _setup(arch: str, kind: str, input_scale: float = 1.0) -> tuple[HookedTransformer, list[SAE], PerLayerTranscoders]:  # type: ignore[type-arg]
    model = build_model(arch, n_layers=N_LAYERS)
    saes = [random_transcoder(model, layer, kind=kind) for layer in range(N_LAYERS)]
    return model, saes, PerLayerTranscoders(saes, input_scale=input_scale)


def _tokens(n: int = 4, seed: int = 3) -> torch.Tensor:
    return torch.randint(1, D_VOCAB, (n, CONTEXT), generator=torch.Generator().manual_seed(seed))


def _inputs(rs: ReplacementSet, n: int = 32) -> dict[int, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return {layer: torch.randn(n, rs.d_in(layer), generator=generator) for layer in rs.layers}


def _assert_same_function(a: ReplacementSet, b: ReplacementSet, inputs: dict[int, torch.Tensor]) -> None:
    assert a.layers == b.layers
    acts_a = {layer: a.encode(layer, x) for layer, x in inputs.items()}
    acts_b = {layer: b.encode(layer, x) for layer, x in inputs.items()}
    for layer, x in inputs.items():
        assert acts_a[layer].count_nonzero() > 0
        torch.testing.assert_close(acts_a[layer], acts_b[layer], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.decode(layer, acts_a), b.decode(layer, acts_b), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.reconstruct(layer, acts_a, x), b.reconstruct(layer, acts_b, x), rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize(("arch", "kind"), LAYOUTS)
def test_all_replaced_evaluation_equals_composing_the_per_layer_splices(arch: str, kind: str) -> None:
    model, saes, rs = _setup(arch, kind)
    tokens = _tokens()
    with spliced(model, rs):
        together = model(tokens)
    with ExitStack() as stack:
        for sae in saes:
            stack.enter_context(spliced(model, [sae]))
        composed = model(tokens)
    torch.testing.assert_close(together, composed, rtol=0, atol=1e-5)
    metrics = evaluate_spliced(model, rs, tokens)
    log_probs = composed[:, :-1].log_softmax(-1).float()
    ce = -log_probs.gather(-1, tokens[:, 1:, None])[..., 0].mean()
    assert metrics["ce_loss_spliced"] == pytest.approx(float(ce), rel=1e-5)
    for layer, per_layer in zip(rs.layers, metrics["per_transcoder"]):  # type: ignore[arg-type]
        alone = evaluate_spliced(model, [saes[layer]], tokens)
        assert per_layer["explained_variance"] == pytest.approx(alone["explained_variance"], rel=1e-6)


@torch.no_grad()
@pytest.mark.parametrize(("arch", "kind"), LAYOUTS)
def test_circuits_on_the_set_are_exact(arch: str, kind: str) -> None:
    model, _, rs = _setup(arch, kind, input_scale=1.7)
    trace = trace_prompt(model, rs, _tokens(1)[0, :12])
    assert trace.replacement is rs and sorted(trace.decoders) == [(layer, layer) for layer in range(N_LAYERS)]
    pos = 11
    feature = int(trace.feature_acts[2][pos].argmax())
    pre = rs.transcoder(2).encode  # SAELens's own pre-activation, on the scaled real input
    captured: list[torch.Tensor] = []
    with rs.transcoder(2).hooks(fwd_hooks=[("hook_sae_acts_pre", lambda a, hook: captured.append(a))]):
        pre(trace.get(rs.hook_in(2))[pos : pos + 1] * rs.input_scale(2))
    for target, actual in (
        (feature_target(trace, 2, feature, pos), float(captured[0][0, feature])),
        (logit_target(trace, pos, 5, versus=7), float(trace.logits[pos, 5] - trace.logits[pos, 7])),
    ):
        assert target_value(trace, target) == pytest.approx(actual, rel=1e-4, abs=1e-6)
        assert direct_contributions(trace, target).total() == pytest.approx(actual, rel=1e-4, abs=1e-6)


@torch.no_grad()
def test_a_scale_is_folded_exactly_once() -> None:
    model = build_model("llama", n_layers=N_LAYERS)
    saes = [random_transcoder(model, layer, kind="jumprelu_skip") for layer in range(N_LAYERS)]
    scale = 3.0
    scaled = PerLayerTranscoders(saes, input_scale=scale)
    folded_saes = [copy.deepcopy(sae) for sae in saes]
    for sae in folded_saes:
        sae.fold_activation_norm_scaling_factor(scale)  # SAELens's own folding
    inputs = _inputs(scaled)
    _assert_same_function(scaled, PerLayerTranscoders(folded_saes), inputs)
    for layer, x in inputs.items():  # and both are the transcoder on scaled inputs, unscaled back
        acts = scaled.encode(layer, x)
        torch.testing.assert_close(scaled.reconstruct(layer, {layer: acts}, x), saes[layer](x * scale) / scale, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="give the scale once"):
        PerLayerTranscoders([Splice.from_sae(saes[0], input_scale=scale)], input_scale=scale)


def test_batch_layout_names_every_hook_and_width() -> None:
    _, _, rs = _setup("gpt2", "relu")
    layout = rs.batch_layout
    assert layout == [entry for l in range(N_LAYERS) for entry in ((f"blocks.{l}.mlp.hook_in", D_MODEL), (f"blocks.{l}.hook_mlp_out", D_MODEL))]
    packed = torch.arange(2 * len(layout) * D_MODEL, dtype=torch.float32).reshape(2, -1)
    parts = rs.split_batch(packed)
    assert list(parts) == [name for name, _ in layout] and torch.equal(torch.cat(list(parts.values()), -1), packed)
    for layer in range(N_LAYERS):  # each layer's [input | output] is one block of columns
        pair = packed[:, rs.pair_columns(layer)]
        assert torch.equal(pair, torch.cat([parts[rs.hook_in(layer)], parts[rs.hook_out(layer)]], -1))


@torch.no_grad()
@pytest.mark.parametrize(("arch", "kind"), LAYOUTS)
def test_saved_set_round_trips_and_every_reader_gets_the_same_function(arch: str, kind: str, tmp_path: Path) -> None:
    _, _, rs = _setup(arch, kind, input_scale=2.5)
    out = save_transcoder_set(rs, tmp_path / "set", model_name="test-model")
    inputs = _inputs(rs)
    loaded = load_transcoder_set(out)
    _assert_same_function(rs, loaded, inputs)
    assert all(loaded.input_scale(layer) == 1.0 for layer in loaded.layers)
    _assert_same_function(rs, PerLayerTranscoders(load_circuit_tracer_transcoders(out)), inputs)
    assert (out / "config.yaml").is_file() and sorted(p.name for p in out.glob("layer_*.safetensors")) == [f"layer_{l}.safetensors" for l in range(N_LAYERS)]
    with pytest.raises(FileExistsError):
        save_transcoder_set(rs, out, model_name="test-model")


LOAD_WITHOUT_PLUGIN = """
import sys, torch
from sae_lens import SAE
sae = SAE.load_from_disk(sys.argv[1])
assert "sae_lens_transcoder" not in sys.modules
x = torch.load(sys.argv[2])
torch.save({"y": sae(x), "class": type(sae).__name__}, sys.argv[3])
"""


@torch.no_grad()
def test_each_layer_directory_loads_in_plain_sae_lens(tmp_path: Path) -> None:
    _, saes, rs = _setup("llama", "jumprelu_skip", input_scale=2.0)
    out = save_transcoder_set(rs, tmp_path / "set", model_name="test-model")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    x = torch.randn(8, D_MODEL, generator=torch.Generator().manual_seed(2))
    torch.save(x, tmp_path / "x.pt")
    for layer in rs.layers:
        result = subprocess.run(
            [sys.executable, "-c", LOAD_WITHOUT_PLUGIN, str(out / f"layer_{layer}_sae"), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
            capture_output=True, text=True, env=env, cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        loaded = torch.load(tmp_path / "y.pt")
        assert loaded["class"] == type(saes[layer]).__name__
        torch.testing.assert_close(loaded["y"], saes[layer](x * 2.0) / 2.0, rtol=1e-5, atol=1e-5)
