"""Every trainable architecture: trains, saves to what plain SAELens loads, and keeps its promises
(straight-through thresholds, AuxK against the target, the skip term, the sparse decode)."""

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from sae_lens import LanguageModelSAERunnerConfig
from sae_lens.saes.batchtopk_sae import BatchTopK
from sae_lens.saes.sae import SAE, SAEMetadata, TrainStepInput, TrainStepOutput
from sae_lens.saes.transcoder import SkipTranscoder, SkipTranscoderConfig
from torch.utils._python_dispatch import TorchDispatchMode

from sae_lens_transcoder import TranscoderTrainingRunner
from sae_lens_transcoder.evals import evaluate_spliced
from sae_lens_transcoder.hooks import ensure_mlp_hook_in
from sae_lens_transcoder.saes.batch_topk_select import batch_topk_codes
from sae_lens_transcoder.saes.topk_transcoder import TOPK_SKIP_TRANSCODER, TOPK_TRANSCODER
from sae_lens_transcoder.saes.transcoder import (
    TRAINING_CLASSES,
    JumpReLUTrainingTranscoder,
    JumpReLUTrainingTranscoderConfig,
    TopKTrainingTranscoder,
    TopKTrainingTranscoderConfig,
)
from sae_lens_transcoder.splicing import Splice
from sae_lens_transcoder.training.checkpoint_view import TRAINING_CFG_FILENAME
from tests.conftest import CONTEXT, D_MODEL, D_VOCAB, build_model, runner_config

D_SAE = 256
# What each architecture needs beyond the defaults to train in a few hundred steps.
SETTINGS: dict[str, dict[str, Any]] = {
    "transcoder": {},
    "skip_transcoder": {},
    "jumprelu_transcoder": {"l0_coefficient": 1e-3},
    "jumprelu_skip_transcoder": {"l0_coefficient": 1e-3, "jumprelu_sparsity_loss_mode": "tanh", "pre_act_loss_coefficient": 3e-6},
    "topk_transcoder": {"k": 16},
    "topk_skip_transcoder": {"k": 16},
    # 40 steps: the saved threshold (an EMA of the batch's cut) must follow the weights faster.
    "batchtopk_transcoder": {"k": 16, "topk_threshold_lr": 0.2},
    "batchtopk_skip_transcoder": {"k": 16, "topk_threshold_lr": 0.2},
    "matryoshka_batchtopk_transcoder": {"k": 16, "matryoshka_widths": [64, D_SAE], "topk_threshold_lr": 0.2},
    "matryoshka_batchtopk_skip_transcoder": {"k": 16, "matryoshka_widths": [64, D_SAE], "topk_threshold_lr": 0.2},
}
SAVED_AS = {
    "transcoder": "transcoder",
    "skip_transcoder": "skip_transcoder",
    "jumprelu_transcoder": "jumprelu_transcoder",
    "jumprelu_skip_transcoder": "jumprelu_skip_transcoder",
    "topk_transcoder": TOPK_TRANSCODER,
    "topk_skip_transcoder": TOPK_SKIP_TRANSCODER,
    "batchtopk_transcoder": "jumprelu_transcoder",
    "batchtopk_skip_transcoder": "jumprelu_skip_transcoder",
    "matryoshka_batchtopk_transcoder": "jumprelu_transcoder",
    "matryoshka_batchtopk_skip_transcoder": "jumprelu_skip_transcoder",
}


def test_every_architecture_is_registered_and_has_settings() -> None:
    assert set(SETTINGS) == set(TRAINING_CLASSES) == set(SAVED_AS)


def _eval_tokens() -> torch.Tensor:
    return torch.randint(1, D_VOCAB, (8, CONTEXT), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every architecture trained once on the tiny GPT-2 (MLP 1), with its metrics before and after."""
    model = build_model("gpt2")
    ids = torch.randint(1, D_VOCAB, (600, CONTEXT), generator=torch.Generator().manual_seed(1))
    dataset = Dataset.from_dict({"input_ids": ids.tolist()})
    root = tmp_path_factory.mktemp("architectures")
    runs: dict[str, Any] = {}
    for arch, settings in SETTINGS.items():
        cfg = runner_config(
            sae={"architecture": arch, "d_sae": D_SAE, **settings},
            training_tokens=CONTEXT * 320,
            output_path=str(root / arch),
            checkpoint_path=str(root / f"{arch}-ckpt"),
            n_checkpoints=1,
        )
        runner = TranscoderTrainingRunner(cfg, override_model=model, override_dataset=dataset)
        before = evaluate_spliced(model, [Splice(runner.sae, cfg.hook_name, "blocks.1.hook_mlp_out")], _eval_tokens())
        sae = runner.run()
        after = evaluate_spliced(model, [sae], _eval_tokens())
        runs[arch] = {"sae": sae, "out": root / arch, "ckpt": root / f"{arch}-ckpt", "before": before, "after": after}
    return {"model": model, "runs": runs, "root": root}


@pytest.mark.parametrize("arch", list(SETTINGS))
def test_training_lowers_mse_and_raises_ev(trained: dict[str, Any], arch: str) -> None:
    before, after = trained["runs"][arch]["before"], trained["runs"][arch]["after"]
    assert after["mse"] < 0.5 * before["mse"]
    assert after["explained_variance"] > max(0.4, before["explained_variance"] + 0.3)
    k = SETTINGS[arch].get("k")
    if arch.startswith("topk"):
        assert after["l0"] == pytest.approx(k)
    elif k is not None:  # BatchTopK's k is a mean over the batch; saved, a threshold keeps about k
        assert k / 3 < after["l0"] < 3 * k


@pytest.mark.parametrize("arch", list(SETTINGS))
def test_saved_as_the_inference_class_and_checkpoints_keep_the_training_config(trained: dict[str, Any], arch: str) -> None:
    run = trained["runs"][arch]
    assert json.loads((run["out"] / "cfg.json").read_text())["architecture"] == SAVED_AS[arch]
    (checkpoint,) = [p for p in Path(run["ckpt"]).rglob("layer_1") if p.is_dir()]
    assert json.loads((checkpoint / "cfg.json").read_text())["architecture"] == SAVED_AS[arch]
    assert json.loads((checkpoint / TRAINING_CFG_FILENAME).read_text())["architecture"] == arch


LOAD_WITHOUT_PLUGIN = """
import json, sys, torch
from sae_lens import SAE
x = torch.load(sys.argv[1])
out = {}
for directory in sys.argv[2:]:
    try:
        sae = SAE.load_from_disk(directory)
    except Exception as e:
        out[directory] = {"error": f"{type(e).__name__}: {e}"}
        continue
    out[directory] = {"class": type(sae).__name__, "y": sae(x), "acts": sae.encode(x)}
assert "sae_lens_transcoder" not in sys.modules
torch.save(out, sys.argv[1] + ".out")
"""


def test_saved_files_load_in_plain_sae_lens_and_topk_is_refused_naming_the_plugin(trained: dict[str, Any]) -> None:
    root: Path = trained["root"]
    x = torch.randn(32, D_MODEL) * 3
    torch.save(x, root / "x.pt")
    checkpoints = [next(p for p in Path(run["ckpt"]).rglob("layer_1") if p.is_dir()) for run in trained["runs"].values()]
    dirs = [str(run["out"]) for run in trained["runs"].values()] + [str(p) for p in checkpoints]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_PLUGIN, str(root / "x.pt"), *dirs], capture_output=True, text=True, env=env, cwd=root
    )
    assert result.returncode == 0, result.stderr
    loaded = torch.load(str(root / "x.pt") + ".out")
    for arch, run in trained["runs"].items():
        got = loaded[str(run["out"])]
        if SAVED_AS[arch].startswith("sae_lens_transcoder."):
            assert "KeyError" in got["error"] and SAVED_AS[arch] in got["error"]
            continue
        expected = SAE.load_from_disk(run["out"])  # with the plugin: the same file, the same class
        assert got["class"] == type(expected).__name__
        with torch.no_grad():
            torch.testing.assert_close(got["y"], expected(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got["acts"], expected.encode(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", list(SETTINGS))
def test_the_saved_transcoder_computes_what_the_trained_one_does(trained: dict[str, Any], arch: str) -> None:
    run = trained["runs"][arch]
    loaded = SAE.load_from_disk(run["out"])  # TopK ones load here, with the plugin
    splice = Splice.from_sae(run["sae"])  # the training object, as splicing and evals see it
    x = torch.randn(32, D_MODEL) * 3
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), splice(x), rtol=1e-5, atol=1e-5)
    if arch.startswith("topk"):
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), run["sae"](x), rtol=1e-5, atol=1e-5)


def _step(sae: Any, x: torch.Tensor, y: torch.Tensor, dead: torch.Tensor | None = None, step: int = 0) -> TrainStepOutput:
    coefficients = {k: getattr(v, "value", v) for k, v in sae.get_coefficients().items()}
    return sae.training_forward_pass(
        TrainStepInput(
            sae_in=torch.cat([x, y], dim=-1), coefficients=coefficients, dead_neuron_mask=dead,
            n_training_steps=step, is_logging_step=False,
        )
    )


def test_jumprelu_threshold_gets_a_straight_through_gradient_from_the_reconstruction() -> None:
    torch.manual_seed(0)
    sae = JumpReLUTrainingTranscoder(
        JumpReLUTrainingTranscoderConfig(d_in=16, d_sae=64, d_out=12, l0_coefficient=0.0, jumprelu_bandwidth=0.5)
    )
    x, y = torch.randn(128, 16), torch.randn(128, 12)
    out = _step(sae, x, y)
    assert out.losses["l0_loss"].item() == 0.0  # only the MSE can move the threshold here
    out.loss.backward()
    assert sae.threshold.grad is not None and sae.threshold.grad.abs().sum() > 0


class _InputBasedAuxK(TopKTrainingTranscoder):
    """What handing the transcoder's *input* to AuxK would do (the mistake the mixin avoids)."""

    def calculate_aux_loss(self, step_input: Any, feature_acts: Any, hidden_pre: Any, sae_out: Any) -> Any:
        return super().calculate_aux_loss(replace(step_input, sae_in=step_input.mlp_in), feature_acts, hidden_pre, sae_out)


def _train_with_dead_latents(cls: type) -> tuple[int, float, float]:
    """x lives in dims 0-3, y in dims 4-7. Latents 8-15 start dead; latents 0-7 can write nothing,
    so only AuxK can bring the dead ones back. Returns (revived, MSE before, MSE after)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.zeros(1024, 8)
    x[:, :4] = torch.randn(1024, 4, generator=generator)
    y = torch.zeros(1024, 8)
    y[:, 4:] = torch.relu(x[:, :4] @ torch.randn(4, 4, generator=generator)) * 3
    torch.manual_seed(0)
    cfg = TopKTrainingTranscoderConfig(
        d_in=8, d_out=8, d_sae=16, k=1, b_enc_init="zeros", b_dec_init="zeros", rescale_acts_by_decoder_norm=False
    )
    sae = cls(cfg)
    dead = torch.arange(16) >= 8
    with torch.no_grad():
        sae.b_enc[8:] = -5.0  # never in the top k
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    start = float((y - y.mean(0)).pow(2).sum(-1).mean())
    for step in range(300):
        out = _step(sae, x, y, dead, step)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        with torch.no_grad():
            sae.W_dec[:8] = 0.0
    with torch.no_grad():
        revived = int((sae.encode(x)[:, 8:] > 0).any(dim=0).sum())
    return revived, start, float(out.losses["mse_loss"].detach())


def test_auxk_revives_dead_latents_against_the_target_where_the_input_based_loss_does_not() -> None:
    revived, start, end = _train_with_dead_latents(TopKTrainingTranscoder)
    assert revived >= 2 and end < 0.95 * start
    revived_input_based, _, end_input_based = _train_with_dead_latents(_InputBasedAuxK)
    assert revived_input_based == 0 and end_input_based >= start


def _skip_transcoder() -> SkipTranscoder:
    torch.manual_seed(3)
    meta = SAEMetadata(hook_name="blocks.1.mlp.hook_in", hook_name_out="blocks.1.hook_mlp_out")
    tc = SkipTranscoder(SkipTranscoderConfig(d_in=D_MODEL, d_sae=64, d_out=D_MODEL, apply_b_dec_to_input=False, metadata=meta))
    with torch.no_grad():
        for param in tc.parameters():
            param.copy_(0.2 * torch.randn_like(param))
    return tc


def test_a_non_zero_skip_is_part_of_the_spliced_evaluation() -> None:
    model = build_model("gpt2")
    ensure_mlp_hook_in(model)
    tc = _skip_transcoder()
    tokens = _eval_tokens()
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in ("blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"))
    x, y = cache["blocks.1.mlp.hook_in"], cache["blocks.1.hook_mlp_out"]
    with_skip = evaluate_spliced(model, [tc], tokens)
    with torch.no_grad():
        expected_mse = float((tc(x) - y).pow(2).mean())  # per element, as evaluate_spliced
        tc.W_skip.zero_()
    without_skip = evaluate_spliced(model, [tc], tokens)
    assert with_skip["mse"] != pytest.approx(without_skip["mse"], rel=1e-3)
    assert with_skip["mse"] == pytest.approx(expected_mse, rel=1e-4)


EXACT_SPARSE = [arch for arch, (_, cfg) in TRAINING_CLASSES.items() if cfg.sparse_decode_exact]


@pytest.mark.parametrize("arch", EXACT_SPARSE)
def test_the_sparse_decode_equals_the_dense_one_in_forward_and_gradients(arch: str) -> None:
    sae_cls, cfg_cls = TRAINING_CLASSES[arch]
    settings = {**SETTINGS[arch], "matryoshka_widths": [16, 64]} if "matryoshka" in arch else SETTINGS[arch]
    x, y = torch.randn(64, 16), torch.randn(64, 12)
    dead = torch.arange(64) % 2 == 0  # AuxK and the pre-activation loss run too
    results = []
    for impl in ("dense", "sparse"):
        torch.manual_seed(1)
        sae = sae_cls(cfg_cls(d_in=16, d_sae=64, d_out=12, decoder_impl=impl, **{k: v for k, v in settings.items() if k != "d_sae"}))
        if sae.cfg.has_skip:
            torch.nn.init.normal_(sae.W_skip, std=0.1)
        out = _step(sae, x, y, dead)
        out.loss.backward()
        results.append((out.sae_out.detach(), {name: p.grad for name, p in sae.named_parameters()}))
    (dense_out, dense_grads), (sparse_out, sparse_grads) = results
    torch.testing.assert_close(sparse_out, dense_out, rtol=1e-5, atol=1e-5)
    assert set(dense_grads) == set(sparse_grads)
    for name, grad in dense_grads.items():
        assert grad is not None and sparse_grads[name] is not None, name
        torch.testing.assert_close(sparse_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ["matryoshka_batchtopk_transcoder", "matryoshka_batchtopk_skip_transcoder"])
def test_matryoshka_nested_sparse_decodes_equal_sae_lens_dense_ones_with_its_aux_loss_and_rescale(arch: str) -> None:
    """Three levels, codes rescaled by the decoder norms and the per-level AuxK (which decodes
    every level once more): the gathered nested decodes give SAELens's losses and gradients."""
    sae_cls, cfg_cls = TRAINING_CLASSES[arch]
    x, y = torch.randn(64, 16), torch.randn(64, 12)
    dead = torch.arange(64) % 3 == 0
    results = []
    for impl in ("dense", "sparse"):
        torch.manual_seed(2)
        sae = sae_cls(cfg_cls(
            d_in=16, d_sae=64, d_out=12, k=4, matryoshka_widths=[8, 24, 64], use_matryoshka_aux_loss=True,
            rescale_acts_by_decoder_norm=True, decoder_impl=impl,
        ))
        with torch.no_grad():
            sae.W_dec.mul_(torch.rand(64, 1) + 0.5)  # decoder norms other than 1, so the rescale matters
        out = _step(sae, x, y, dead)
        out.loss.backward()
        results.append((out.losses, {name: p.grad for name, p in sae.named_parameters()}))
    (dense_losses, dense_grads), (sparse_losses, sparse_grads) = results
    assert set(dense_losses) == set(sparse_losses) and "inner_mse_loss_24" in dense_losses
    for name, loss in dense_losses.items():
        torch.testing.assert_close(sparse_losses[name], loss, rtol=1e-5, atol=1e-5, msg=name)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


TOPK_FAMILY = [arch for arch in EXACT_SPARSE if "topk" in arch]


def _random_dead(n_dead: int, d_sae: int) -> torch.Tensor:
    """A dead-latent mask with ``n_dead`` latents dead, spread over the dictionary."""
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[torch.randperm(d_sae, generator=torch.Generator().manual_seed(0))[:n_dead]] = True
    return dead


def _dense_then_sparse_steps(
    arch: str, settings: dict[str, Any], x: torch.Tensor, y: torch.Tensor, dead: torch.Tensor
) -> Iterator[tuple[Any, TrainStepOutput]]:
    """The same step of ``arch`` (d_sae 1024, a non-zero skip where it has one) from the same
    initial weights, first SAELens's dense computation, then ours (``decoder_impl: auto``)."""
    sae_cls, cfg_cls = TRAINING_CLASSES[arch]
    for impl in ("dense", "auto"):
        torch.manual_seed(1)
        sae = sae_cls(cfg_cls(d_in=16, d_sae=1024, d_out=12, decoder_impl=impl, **settings))
        if sae.cfg.has_skip:
            torch.nn.init.normal_(sae.W_skip, std=0.1)
        yield sae, _step(sae, x, y, dead)


@pytest.mark.parametrize("n_dead", [3, 20, 200])
@pytest.mark.parametrize("arch", TOPK_FAMILY)
def test_sparse_encoder_gradient_and_auxk_equal_sae_lens_dense_step_at_real_sparsity(arch: str, n_dead: int) -> None:
    """At d_sae 1024, k 8 the gradient reaching the pre-activations is ~1-2% dense, so the
    encoder's gathered backward runs, with the dead latents' columns as a dense block where AuxK
    fills them. AuxK keeps k_aux = 6 codes per row: 3 dead, all of them (scale 3/6), decoded
    densely; 20 dead, 6 of them, still densely; 200 dead, gathered. ``decoder_impl: dense`` is
    SAELens's own step."""
    settings = {**SETTINGS[arch], "k": 8}
    if "matryoshka" in arch:
        settings["matryoshka_widths"] = [128, 1024]
    x, y = torch.randn(256, 16), torch.randn(256, 12)
    dead = _random_dead(n_dead, 1024)
    results = []
    for sae, out in _dense_then_sparse_steps(arch, settings, x, y, dead):
        assert out.losses["auxiliary_reconstruction_loss"] > 0
        out.loss.backward()
        results.append((out, {name: p.grad for name, p in sae.named_parameters()}))
    (dense_out, dense_grads), (fast_out, fast_grads) = results
    for name, loss in dense_out.losses.items():
        torch.testing.assert_close(fast_out.losses[name], loss, rtol=1e-5, atol=1e-6, msg=name)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("aux_loss_coefficient", [1.0, 0.0])
@pytest.mark.parametrize("n_dead", [20, 200])
@pytest.mark.parametrize("arch", TOPK_FAMILY)
def test_a_topk_family_step_never_makes_the_dense_pre_activation_gradient(
    arch: str, n_dead: int, aux_loss_coefficient: float
) -> None:
    """The kept codes and AuxK's dead columns (a dense block at 20 dead, gathered at 200) take
    their gradients from the pre-activations they read, so no gradient reaches the whole
    ``[batch, d_sae]`` ``hidden_pre``, yet the encoder gets SAELens's gradient. Matryoshka's
    per-level AuxK reads ``hidden_pre`` itself, and there the whole gradient must arrive."""
    settings = {**SETTINGS[arch], "k": 8, "aux_loss_coefficient": aux_loss_coefficient}
    if "matryoshka" in arch:
        settings |= {"matryoshka_widths": [128, 1024], "use_matryoshka_aux_loss": aux_loss_coefficient > 0}
    x, y = torch.randn(256, 16), torch.randn(256, 12)
    dead = _random_dead(n_dead, 1024)
    grads = []
    for sae, out in _dense_then_sparse_steps(arch, settings, x, y, dead):
        assert (out.losses["auxiliary_reconstruction_loss"] > 0) == (aux_loss_coefficient > 0)
        reached: list[torch.Tensor] = []
        out.hidden_pre.register_hook(reached.append)
        out.loss.backward()
        grads.append(sae.W_enc.grad)
    whole_gradient_expected = "matryoshka" in arch and aux_loss_coefficient > 0
    assert bool(reached) == whole_gradient_expected
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("crowded_rows", [0, 3])
def test_the_row_wise_batch_topk_selection_keeps_what_sae_lens_batch_topk_keeps(crowded_rows: int) -> None:
    """The candidates are each row's top 8k; a crowded row (more than 8k of the batch's kept
    codes) must take part with all of its codes."""
    hidden_pre = torch.randn(128, 1024, generator=torch.Generator().manual_seed(0))
    hidden_pre[:crowded_rows] += 4.0  # each of these rows alone holds hundreds of the batch's top codes
    codes = batch_topk_codes(hidden_pre, 8)
    assert codes is not None
    rows, columns, values = codes
    selected = torch.zeros_like(hidden_pre).index_put((rows, columns), values)
    torch.testing.assert_close(selected, BatchTopK(8)(hidden_pre), rtol=0, atol=0)
    assert bool((rows.diff() >= 0).all())  # row by row, as the decode's bags need
    if crowded_rows:
        assert int((rows == 0).sum()) > 8 * 8
    # Fewer positive codes than k * batch: SAELens's selection, which keeps zeros, must run.
    assert batch_topk_codes(-hidden_pre.abs() - 1, 8) is None


@pytest.mark.parametrize("arch", ["topk_transcoder", "batchtopk_skip_transcoder"])
def test_a_topk_family_step_trains_under_bf16_autocast(arch: str) -> None:
    sae_cls, cfg_cls = TRAINING_CLASSES[arch]
    sae = sae_cls(cfg_cls(d_in=16, d_sae=1024, d_out=12, **{**SETTINGS[arch], "k": 8}))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _step(sae, torch.randn(64, 16), torch.randn(64, 12), torch.arange(1024) < 3)
    out.loss.backward()
    assert sae.W_enc.grad is not None and torch.isfinite(sae.W_enc.grad).all() and sae.W_enc.grad.abs().sum() > 0


class _CountTopK(TorchDispatchMode):
    """Counts the ``aten.topk`` calls made while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls += func is torch.ops.aten.topk.default
        return func(*args, **(kwargs or {}))


def test_a_topk_step_searches_the_codes_once_and_decodes_what_the_activation_kept() -> None:
    """The sparse decode reuses the TopK activation's indices: one top-k over ``[batch, d_sae]``
    per step, as in SAELens's dense step, and the same output. No latent is dead, so AuxK (which
    has a top-k of its own) is off and every top-k is counted here."""
    sae_cls, cfg_cls = TRAINING_CLASSES["topk_transcoder"]
    x, y = torch.randn(256, 16), torch.randn(256, 12)
    outputs = []
    for impl in ("dense", "auto"):
        torch.manual_seed(1)
        sae = sae_cls(cfg_cls(d_in=16, d_sae=1024, d_out=12, k=8, decoder_impl=impl))
        with _CountTopK() as counter:
            outputs.append(_step(sae, x, y, torch.zeros(1024, dtype=torch.bool)).sae_out)
        assert counter.calls == 1, impl
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)


def test_a_hook_that_changes_the_codes_is_what_the_topk_step_decodes() -> None:
    sae_cls, cfg_cls = TRAINING_CLASSES["topk_transcoder"]
    torch.manual_seed(1)
    sae = sae_cls(cfg_cls(d_in=16, d_sae=1024, d_out=12, k=8))
    x, y = torch.randn(64, 16), torch.randn(64, 12)
    sae.hook_sae_acts_post.add_hook(lambda acts, hook: acts * (torch.arange(1024) % 2 == 0))  # noqa: ARG005
    out = _step(sae, x, y)
    assert (out.feature_acts[:, 1::2] == 0).all() and (out.feature_acts != 0).any()
    expected = (out.feature_acts / sae.W_dec.norm(dim=-1)) @ sae.W_dec + sae.b_dec  # rescale_acts_by_decoder_norm
    torch.testing.assert_close(out.sae_out, expected, rtol=1e-5, atol=1e-5)


# Column densities: all gathered, all one dense block, and 40 dense columns beside sparse ones.
@pytest.mark.parametrize("densities", [(0.01, 0.01), (0.5, 0.5), (0.6, 0.01)])
@pytest.mark.parametrize("rescaled", [False, True])
def test_preacts_with_sparse_grad_equal_autograd(densities: tuple[float, float], rescaled: bool) -> None:
    from sae_lens_transcoder.saes.sparse_encode import preacts_with_sparse_grad

    torch.manual_seed(0)
    x, W, b = torch.randn(64, 16), torch.randn(16, 512), torch.randn(512)
    scale = torch.rand(512) + 0.5 if rescaled else None
    density = torch.full((512,), densities[1])
    density[torch.randperm(512)[:40]] = densities[0]
    grad = torch.randn(64, 512) * (torch.rand(64, 512) < density)
    results = []
    for fused in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, W, b)] + ([scale.clone().requires_grad_()] if rescaled else [])
        scale_leaf = leaves[3] if rescaled else None
        if fused:
            out = preacts_with_sparse_grad(*leaves[:3], scale_leaf)
        else:
            out = leaves[0] @ leaves[1] + leaves[2]
            out = out * scale_leaf if rescaled else out
        out.backward(grad)
        results.append((out.detach(), [leaf.grad for leaf in leaves]))
    torch.testing.assert_close(results[1][0], results[0][0])
    for fused_grad, autograd_grad in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(fused_grad, autograd_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ste_to_input", [False, True])
@pytest.mark.parametrize("arch", ["jumprelu_transcoder", "jumprelu_skip_transcoder"])
def test_jumprelu_gathered_decode_keeps_the_threshold_gradient_and_equals_the_dense_step(
    arch: str, ste_to_input: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With thresholds at each feature's 98th percentile about 3% of the codes are active, and
    some inactive codes lie within half a bandwidth below their threshold, where the
    straight-through estimator reads their gradient: the gathered decode must hand it to them,
    and the JumpReLU's backward, taken at the gathered entries alone, must give SAELens's
    threshold and input gradients (also with the estimator's term passed on to the input)."""
    import sae_lens_transcoder.saes.mixin as mixin

    gathered: list[int] = []
    decode_gathered = mixin.decode_gathered
    monkeypatch.setattr(mixin, "decode_gathered", lambda *a, **k: gathered.append(a[0].numel()) or decode_gathered(*a, **k))
    sae_cls, cfg_cls = TRAINING_CLASSES[arch]
    x, y = torch.randn(64, 16), torch.randn(64, 12)
    results = []
    for impl in ("dense", "auto"):
        torch.manual_seed(1)
        sae = sae_cls(cfg_cls(
            d_in=16, d_sae=1024, d_out=12, decoder_impl=impl, jumprelu_bandwidth=0.005, b_enc_init="zeros",
            jumprelu_ste_to_input=ste_to_input, **SETTINGS[arch],
        ))
        if sae.cfg.has_skip:
            torch.nn.init.normal_(sae.W_skip, std=0.1)
        with torch.no_grad():
            hidden_pre = sae.encode_with_hidden_pre(x)[1]
            sae.threshold.copy_(hidden_pre.quantile(0.98, dim=0))
            in_window = (hidden_pre > sae.threshold - 0.0025) & (hidden_pre <= sae.threshold)
        assert in_window.sum() > 0
        gathered.clear()
        out = _step(sae, x, y)
        out.loss.backward()
        assert bool(gathered) == (impl == "auto") and all(n < 0.05 * 64 * 1024 for n in gathered)
        results.append((out.loss.detach(), out.sae_out.detach(), {name: p.grad for name, p in sae.named_parameters()}))
    (dense_loss, dense_out, dense_grads), (sparse_loss, sparse_out, sparse_grads) = results
    torch.testing.assert_close(sparse_loss, dense_loss)
    torch.testing.assert_close(sparse_out, dense_out, rtol=1e-5, atol=1e-5)
    assert dense_grads["threshold"].abs().sum() > 0
    for name, grad in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_the_sparse_decode_is_refused_where_it_is_not_exact() -> None:
    with pytest.raises(ValueError, match="decoder_impl='sparse' is not exact for jumprelu_transcoder"):
        JumpReLUTrainingTranscoderConfig(d_in=16, d_sae=64, decoder_impl="sparse")


@pytest.mark.parametrize("arch", list(SETTINGS))
def test_every_architecture_parses_from_a_dict_and_the_cli(arch: str) -> None:
    from sae_lens_transcoder.config_io import runner_config_from_args

    _, cfg_cls = TRAINING_CLASSES[arch]
    cfg = LanguageModelSAERunnerConfig.from_dict(
        {"sae": {"architecture": arch, "d_in": 64, "d_sae": 256, **SETTINGS[arch]}, "logger": {"log_to_wandb": False}}
    )
    assert type(cfg.sae) is cfg_cls
    cli = runner_config_from_args(["--architecture", arch, "--d_in", "64", "--d_sae", "256", "--mlp_layer", "1"])
    assert type(cli.sae) is cfg_cls and cli.sae.mlp_layer == 1


def test_a_dead_feature_window_longer_than_the_run_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    from sae_lens_transcoder.validation import validate_runner_config

    dataset = Dataset.from_dict({"input_ids": [[1] * CONTEXT] * 4})
    cfg = runner_config(sae={"architecture": "topk_transcoder", "k": 8}, training_tokens=256 * 40, dead_feature_window=1000)
    with caplog.at_level("WARNING"):
        validate_runner_config(cfg, dataset)
    assert "dead_feature_window=1000" in caplog.text and "AuxK never runs" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        cfg = runner_config(sae={"architecture": "topk_transcoder", "k": 8}, training_tokens=256 * 40, dead_feature_window=5)
        validate_runner_config(cfg, dataset)
    assert "dead_feature_window" not in caplog.text


def test_the_batchtopk_threshold_starts_at_the_first_batch_cut_then_follows_sae_lens_ema() -> None:
    sae_cls, cfg_cls = TRAINING_CLASSES["batchtopk_transcoder"]
    torch.manual_seed(0)
    sae = sae_cls(cfg_cls(d_in=16, d_sae=64, d_out=12, k=4, topk_threshold_lr=0.01))
    x, y = torch.randn(64, 16), torch.randn(64, 12)
    first = _step(sae, x, y).feature_acts
    assert float(sae.topk_threshold) == pytest.approx(float(first[first > 0].min()))
    before = float(sae.topk_threshold)
    second = _step(sae, 2 * x, y, step=1).feature_acts
    expected = 0.99 * before + 0.01 * float(second[second > 0].min())
    assert float(sae.topk_threshold) == pytest.approx(expected)
