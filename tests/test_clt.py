"""Cross-layer transcoders: training, files, evaluation and exact circuits through CLT features."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.transcoder import Transcoder, TranscoderConfig
from transformer_lens import HookedTransformer

from sae_lens_transcoder import TranscoderTrainingRunner
from sae_lens_transcoder.circuits import Node, child_target, direct_contributions, feature_target, logit_target, target_value, trace_prompt
from sae_lens_transcoder.circuits.effects import total_effects
from sae_lens_transcoder.circuits.graph import build_graph
from sae_lens_transcoder.evals import evaluate_spliced
from sae_lens_transcoder.replacement import PerLayerTranscoders
from sae_lens_transcoder.replacement.cross_layer import CLT_HOOKS_KEY, CrossLayerTranscoders, clt_replacement
from sae_lens_transcoder.saes.clt import CLT_CLASSES, TrainingCrossLayerTranscoder
from sae_lens_transcoder.saes.clt_files import load_clt, save_clt
from sae_lens_transcoder.splicing import spliced
from tests.conftest import CONTEXT, D_MODEL, D_VOCAB, build_model, runner_config
from tests.family_models import TOKENIZER

D_SAE = 48
SETTINGS: dict[str, dict[str, Any]] = {
    "clt": {"l1_coefficient": 1e-3},
    "jumprelu_clt": {"l0_coefficient": 1e-3},
    "topk_clt": {"k": 8},
    "batchtopk_clt": {"k": 8},
}


def _hooks(n_layers: int) -> list[tuple[str, str]]:
    return [(f"blocks.{layer}.mlp.hook_in", f"blocks.{layer}.hook_mlp_out") for layer in range(n_layers)]


def random_clt(
    model: HookedTransformer, architecture: str = "clt", seed: int = 0, d_sae: int = D_SAE, **settings: Any
) -> TrainingCrossLayerTranscoder:
    """A CLT over every MLP of ``model`` whose features fire on about half the tokens."""
    n_layers = model.cfg.n_layers
    config_class = CLT_CLASSES[architecture][1]
    cfg = config_class(d_in=D_MODEL, d_sae=d_sae, n_layers=n_layers, **{**SETTINGS[architecture], **settings})
    cfg.metadata[CLT_HOOKS_KEY] = [list(pair) for pair in _hooks(n_layers)]
    torch.manual_seed(seed)
    clt = TrainingCrossLayerTranscoder(cfg)
    with torch.no_grad():
        for name, param in clt.named_parameters():
            param.copy_(0.3 * torch.randn_like(param) if name != "log_threshold" else torch.log(0.05 * torch.rand_like(param)))
        if architecture == "batchtopk_clt":  # the running cut inference thresholds at
            clt.topk_threshold.copy_(0.2 + 0.3 * torch.rand_like(clt.topk_threshold))
    return clt.eval()


def _prompt(n: int = 12) -> torch.Tensor:
    return torch.randint(1, D_VOCAB, (n,), generator=torch.Generator().manual_seed(5))


def _model(arch: str) -> HookedTransformer:
    model = build_model("llama", n_layers=3) if arch == "llama3" else build_model(arch)
    with torch.no_grad():  # non-zero attention biases, so a missing bias term shows
        for name, param in model.named_parameters():
            if name.endswith(("attn.b_O", "attn.b_V", "attn._b_V")):
                param.add_(0.1 * torch.randn_like(param))
    return model


# ---------------------------------------------------------------- the model


def _approx_nested(value: Any) -> Any:
    """``value`` with every float wrapped in ``pytest.approx`` (1e-6), for comparing JSON-like dicts."""
    if isinstance(value, dict):
        return {k: _approx_nested(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_approx_nested(v) for v in value]
    return pytest.approx(value, rel=1e-6, abs=1e-7) if isinstance(value, float) else value


def test_zero_cross_layer_decoders_equal_the_per_layer_set() -> None:
    """A CLT whose features write only at their own layer is a per-layer set: same evals,
    same attributions (1e-6)."""
    model = _model("gpt2")
    clt = random_clt(model)
    per_layer = []
    with torch.no_grad():
        for i in range(clt.n_layers):
            clt.W_dec[i][:, 1:] = 0.0
            meta = SAEMetadata(hook_name=f"blocks.{i}.mlp.hook_in", hook_name_out=f"blocks.{i}.hook_mlp_out")
            tc = Transcoder(TranscoderConfig(d_in=D_MODEL, d_sae=D_SAE, d_out=D_MODEL, apply_b_dec_to_input=False, metadata=meta))
            tc.load_state_dict({"W_enc": clt.W_enc[i], "b_enc": clt.b_enc[i], "W_dec": clt.W_dec[i][:, 0], "b_dec": clt.b_dec[i]})
            per_layer.append(tc)
    tokens = torch.randint(1, D_VOCAB, (4, CONTEXT), generator=torch.Generator().manual_seed(3))
    a, b = evaluate_spliced(model, clt_replacement(clt), tokens), evaluate_spliced(model, per_layer, tokens)
    for key in ("mse", "explained_variance", "l0", "ce_loss_spliced", "kl_div"):
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7)
    trace_clt, trace_set = trace_prompt(model, clt_replacement(clt), _prompt()), trace_prompt(model, per_layer, _prompt())
    contributions = [direct_contributions(t, logit_target(t, 11, 5, versus=7)) for t in (trace_clt, trace_set)]
    for layer in range(clt.n_layers):
        torch.testing.assert_close(contributions[0].features[layer], contributions[1].features[layer], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(contributions[0].heads[layer], contributions[1].heads[layer], rtol=1e-6, atol=1e-7)
    from sae_lens_transcoder.circuits.dashboard import feature_dashboard

    model.set_tokenizer(TOKENIZER)
    boards = (feature_dashboard(model, clt_replacement(clt), 3, tokens, upstream=[0], k=4, layer=1),
              feature_dashboard(model, per_layer[1], 3, tokens, upstream=[per_layer[0]], k=4))
    assert boards[0]["writes"] == [{"layer": 1, "norm": pytest.approx(boards[1]["writes"][0]["norm"], rel=1e-6)}]
    for board in boards:
        del board["writes"]
    assert boards[0] == _approx_nested(boards[1])


@pytest.mark.parametrize("architecture", list(SETTINGS))
def test_the_replacement_set_is_the_training_model(architecture: str) -> None:
    """Per-layer encode and (source, output) decoders reproduce the CLT's own forward."""
    model = _model("llama3")
    clt = random_clt(model, architecture)
    replacement = clt_replacement(clt)
    x = torch.randn(5, clt.n_layers, D_MODEL, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        acts = clt.encode(x)
        expected = clt.decode(acts)
        by_layer = {layer: replacement.encode(layer, x[:, i]) for i, layer in enumerate(replacement.layers)}
        for i, layer in enumerate(replacement.layers):
            torch.testing.assert_close(by_layer[layer], acts[:, i])
            torch.testing.assert_close(replacement.decode(layer, by_layer), expected[:, i], rtol=1e-5, atol=1e-5)
    assert replacement.sources(2) == [0, 1, 2] and replacement.sources(0) == [0]
    if architecture == "topk_clt":
        assert (acts > 0).sum(-1).max() <= 8
    if architecture == "batchtopk_clt":  # inference: each layer's code passes its running cut
        assert ((acts > 0) == (clt.pre_activations(x) > clt.topk_threshold[:, None])).all()


@contextmanager
def _frozen_model_leaves(trace: Any) -> Iterator[dict[str, torch.Tensor]]:
    """Patterns and norm scales fixed, values detached, every MLP output the CLT's leaf features
    (from every source layer) plus the constant bias and error."""
    leaves: dict[str, torch.Tensor] = {"embed": trace.get("hook_embed").clone().requires_grad_()}
    hooks: list[tuple[str, Any]] = [("hook_embed", lambda x, hook: leaves["embed"][None])]
    if "hook_pos_embed" in trace.cache.cache_dict:
        hooks.append(("hook_pos_embed", lambda x, hook: trace.get("hook_pos_embed")[None]))
    for name in trace.cache.cache_dict:
        if name.endswith(".hook_scale"):
            hooks.append((name, lambda x, hook, name=name: trace.get(name)[None]))
    for layer in range(trace.n_layers):
        leaves[f"pattern{layer}"] = trace.pattern(layer).clone().requires_grad_()
        hooks.append((f"blocks.{layer}.attn.hook_pattern", lambda x, hook, layer=layer: leaves[f"pattern{layer}"][None]))
        hooks.append((f"blocks.{layer}.attn.hook_v", lambda x, hook: x.detach()))
        leaves[f"acts{layer}"] = trace.feature_acts[layer].clone().requires_grad_()

        def mlp_out(x: torch.Tensor, hook: Any, layer: int = layer) -> torch.Tensor:
            written = sum(leaves[f"acts{src}"] @ trace.decoders[src, layer] for src in trace.replacement.sources(layer))
            return (written + trace.transcoder_bias[layer] + trace.errors[layer] + trace.skips.get(layer, 0.0))[None]

        hooks.append((f"blocks.{layer}.hook_mlp_out", mlp_out))
    with trace.model.hooks(fwd_hooks=hooks):
        yield leaves


@pytest.mark.parametrize("arch", ["gpt2", "llama3"])
@pytest.mark.parametrize("architecture", ["clt", "jumprelu_clt", "topk_clt", "batchtopk_clt", "clt+skip"])
def test_attributions_through_clt_features_are_complete_and_equal_autograd(arch: str, architecture: str) -> None:
    model = _model(arch)
    name, _, skip = architecture.partition("+")
    trace = trace_prompt(model, clt_replacement(random_clt(model, name, skip_connection=bool(skip))), _prompt())
    assert bool(trace.skips) == bool(skip)
    assert {(src, out) for src, out in trace.decoders} == {(s, o) for o in range(model.cfg.n_layers) for s in range(o + 1)}
    pos = 11
    target = logit_target(trace, pos, 5, versus=7)
    contributions = direct_contributions(trace, target)
    actual = float(trace.logits[pos, 5] - trace.logits[pos, 7])
    assert contributions.total() == pytest.approx(actual, rel=1e-4, abs=1e-6)
    assert total_effects(trace, target).total() == pytest.approx(actual, rel=1e-4, abs=1e-6)
    with _frozen_model_leaves(trace) as leaves:
        logits = model(trace.tokens[None])[0]
        (logits[pos, 5] - logits[pos, 7]).backward()
    for layer in range(model.cfg.n_layers):
        acts = leaves[f"acts{layer}"]
        torch.testing.assert_close(contributions.features[layer], (acts.grad * acts)[pos].detach(), rtol=1e-4, atol=1e-5)
        pattern = leaves[f"pattern{layer}"]
        torch.testing.assert_close(contributions.heads[layer], (pattern.grad * pattern)[:, pos, :].detach(), rtol=1e-4, atol=1e-5)
    # A feature of layer 0 writes into every later layer: its child target adds those writes up.
    for node, value in contributions.top(6, keep=lambda n: n.kind == "feature"):
        child = child_target(trace, target, node)
        assert target_value(trace, child) == pytest.approx(value, rel=1e-4, abs=1e-6)
        assert direct_contributions(trace, child).total() == pytest.approx(value, rel=1e-4, abs=1e-6)
    feature = int(trace.feature_acts[2 if arch == "llama3" else 1][pos].argmax())
    pre = feature_target(trace, 2 if arch == "llama3" else 1, feature, pos)
    assert direct_contributions(trace, pre).total() == pytest.approx(target_value(trace, pre), rel=1e-4, abs=1e-6)
    graph = build_graph(trace, target, max_expansions=8)
    assert sum(graph.incoming(graph.root).values()) == pytest.approx(graph.root_value, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("skip", [False, True])
def test_splicing_writes_the_summed_reconstruction_at_every_layer(skip: bool) -> None:
    model = _model("llama3")
    clt = random_clt(model, skip_connection=skip)
    tokens = torch.randint(1, D_VOCAB, (2, CONTEXT), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        clean = model(tokens)
        with spliced(model, clt_replacement(clt), use_error_term=True):
            torch.testing.assert_close(model(tokens), clean, rtol=1e-4, atol=1e-5)
        with spliced(model, clt_replacement(clt)):
            _, cache = model.run_with_cache(tokens)
        x = torch.stack([cache[f"blocks.{layer}.mlp.hook_in"] for layer in range(3)], dim=-2)
        expected = clt(x)  # features' writes plus the skip terms
        for layer in range(3):
            torch.testing.assert_close(cache[f"blocks.{layer}.hook_mlp_out"], expected[..., layer, :], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("architecture", [*SETTINGS, "clt+skip"])
def test_files_round_trip_in_circuit_tracers_layout(architecture: str, tmp_path: Path) -> None:
    model = _model("llama3")
    name, _, skip = architecture.partition("+")
    clt = random_clt(model, name, skip_connection=bool(skip))
    out = save_clt(clt, tmp_path / "clt", input_scale=2.0)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["W_dec_0.safetensors", "W_dec_1.safetensors", "W_dec_2.safetensors", "W_enc_0.safetensors",
                     "W_enc_1.safetensors", "W_enc_2.safetensors", "cfg.json", "config.yaml"]
    loaded = load_clt(out)
    original = CrossLayerTranscoders(clt, _hooks(3), input_scale=2.0)
    x = torch.randn(6, D_MODEL, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for layer in range(3):
            torch.testing.assert_close(loaded.encode(layer, x), original.encode(layer, x), rtol=1e-6, atol=1e-7)
            for source in range(layer + 1):
                torch.testing.assert_close(loaded.decoder(source, layer), original.decoder(source, layer))
            torch.testing.assert_close(loaded.b_dec(layer), original.b_dec(layer))
            if skip:
                torch.testing.assert_close(loaded.skip(layer, x), original.skip(layer, x))


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    ids = torch.randint(1, D_VOCAB, (600, CONTEXT), generator=torch.Generator().manual_seed(1))
    return Dataset.from_dict({"input_ids": ids.tolist()})


def _config(tmp_path: Path, architecture: str, **overrides: Any) -> Any:
    sae = {"architecture": architecture, "mlp_layers": "all", "mlp_layer": None, "d_sae": 96, **SETTINGS[architecture]}
    settings: dict[str, Any] = dict(training_tokens=CONTEXT * 320, output_path=str(tmp_path / "out"))
    return runner_config(sae=sae, **{**settings, **overrides})


@pytest.mark.parametrize(("arch", "architecture"), [
    ("gpt2", "clt"), ("llama3", "jumprelu_clt"), ("llama3", "topk_clt"), ("gpt2", "batchtopk_clt"), ("gpt2", "clt+skip"),
])
def test_training_lowers_the_loss_and_raises_every_layers_ev(arch: str, architecture: str, tmp_path: Path, dataset: Dataset) -> None:
    model = _model(arch)
    name, _, skip = architecture.partition("+")
    cfg = _config(tmp_path, name)
    cfg.sae.skip_connection = bool(skip)
    runner = TranscoderTrainingRunner(cfg, override_model=model, override_dataset=dataset)
    tokens = torch.randint(1, D_VOCAB, (4, CONTEXT), generator=torch.Generator().manual_seed(7))
    before = evaluate_spliced(model, CrossLayerTranscoders(runner.sae, _hooks(model.cfg.n_layers)), tokens)
    clt = runner.run()
    assert bool(skip) == ("W_skip" in dict(clt.named_parameters())) and (not skip or clt.W_skip.abs().max() > 0)
    assert isinstance(clt, TrainingCrossLayerTranscoder) and clt.cfg.metadata[CLT_HOOKS_KEY] == [list(p) for p in _hooks(model.cfg.n_layers)]
    saved = load_clt(tmp_path / "out")
    after = evaluate_spliced(model, saved, tokens)
    assert after["mse"] < 0.7 * before["mse"]
    for layer in after["per_transcoder"]:  # every layer better than its mean (EV 0) after 40 steps
        assert layer["explained_variance"] > (0.3 if arch == "gpt2" else 0.1)
    assert evaluate_spliced(model, clt_replacement(clt), tokens)["mse"] == pytest.approx(after["mse"], rel=1e-5)


def test_resume_from_a_checkpoint_ends_bit_identical(tmp_path: Path, dataset: Dataset) -> None:
    model = _model("gpt2")
    settings = dict(n_checkpoints=2, training_tokens=CONTEXT * 160, lr_warm_up_steps=3, lr_scheduler_name="cosineannealing",
                    feature_sampling_window=7)  # sparsity windows reset (and straddle checkpoints)
    whole = TranscoderTrainingRunner(
        _config(tmp_path / "a", "jumprelu_clt", checkpoint_path=str(tmp_path / "a" / "ckpt"), **settings),
        override_model=model, override_dataset=dataset,
    ).run()
    checkpoints = sorted((p for p in (tmp_path / "a" / "ckpt").rglob("checkpoint_complete.json")), key=lambda p: int(p.parent.name))
    assert len(checkpoints) >= 2
    first = checkpoints[0].parent
    assert load_clt(first / "clt" / "clt_files").layers == [0, 1]  # the checkpoint's CLT files load
    resumed = TranscoderTrainingRunner(
        _config(tmp_path / "b", "jumprelu_clt", checkpoint_path=str(tmp_path / "b" / "ckpt"), resume_from_checkpoint=str(first), **settings),
        override_model=model, override_dataset=dataset,
    ).run()
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_sigterm_mid_step_checkpoints_and_resume_ends_bit_identical(
    tmp_path: Path, dataset: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pre-emption in the middle of a CLT step: that step finishes, a complete checkpoint is
    written, nothing is saved as the output, and resuming ends bit-identical to an unstopped run."""
    import os
    import signal

    from sae_lens_transcoder.llm_transcoder_training_runner import CHECKPOINT_COMPLETE_FILENAME
    from sae_lens_transcoder.training.trainer import TrainingInterrupted

    model = _model("gpt2")
    settings: dict[str, Any] = dict(n_checkpoints=0, training_tokens=CONTEXT * 160, lr_warm_up_steps=3)

    def run(name: str, **more: Any) -> TrainingCrossLayerTranscoder:
        cfg = _config(tmp_path / name, "clt", checkpoint_path=str(tmp_path / name / "ckpt"), **settings, **more)
        return TranscoderTrainingRunner(cfg, override_model=model, override_dataset=dataset).run()

    whole = run("whole")
    step = TrainingCrossLayerTranscoder.training_forward_pass

    def preempted(self: TrainingCrossLayerTranscoder, step_input: Any) -> Any:
        if step_input.n_training_steps == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, step_input)

    monkeypatch.setattr(TrainingCrossLayerTranscoder, "training_forward_pass", preempted)
    with pytest.raises(TrainingInterrupted) as stopped:
        run("stopped")
    monkeypatch.undo()
    assert (stopped.value.checkpoint / CHECKPOINT_COMPLETE_FILENAME).is_file()
    assert not (tmp_path / "stopped" / "out").exists()
    resumed = run("resumed", resume_from_checkpoint=str(stopped.value.checkpoint))
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_cli_trains_a_clt(tmp_path: Path) -> None:
    from sae_lens_transcoder.cli import evaluate as evaluate_cli
    from sae_lens_transcoder.cli import main

    out = tmp_path / "clt"
    main(["train", "--model_name", "tiny-gpt2", "--dataset_path", "embedded", "--is_dataset_tokenized", "False",
          "--architecture", "clt", "--mlp_layers", "0-1", "--d_in", "128", "--d_sae", "64",
          "--training_tokens", "2048", "--train_batch_size_tokens", "256", "--context_size", "64",
          "--n_batches_in_buffer", "4", "--store_batch_size_prompts", "4", "--output_path", str(out),
          "--log_to_wandb", "False", "--n_checkpoints", "0"])
    loaded = load_clt(out)
    assert loaded.layers == [0, 1] and loaded.sources(1) == [0, 1]
    result = evaluate_cli([str(out), "--n-tokens", "512", "--context-size", "64"])
    (row,) = result["rows"]
    assert [t["hook_name_out"] for t in row["per_transcoder"]] == ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]
    assert row["n_tokens"] > 400 and row["kl_div"] > 0  # scored on held-out text, CLT spliced in


def test_a_clt_circuit_tracer_wrote_loads_from_its_own_files(tmp_path: Path) -> None:
    """No cfg.json: the hooks come from config.yaml, the sizes and activation from the files."""
    from sae_lens_transcoder.loading import load_transcoder_set

    model = _model("llama3")
    clt = random_clt(model, "jumprelu_clt")
    out = save_clt(clt, tmp_path / "ct")
    (out / "cfg.json").unlink()
    loaded = load_transcoder_set(out)
    assert isinstance(loaded, CrossLayerTranscoders) and loaded.clt.cfg.architecture() == "jumprelu_clt"
    assert [loaded.hook_in(layer) for layer in loaded.layers] == [pair[0] for pair in _hooks(3)]
    x = torch.randn(6, D_MODEL, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for layer in range(3):
            torch.testing.assert_close(loaded.encode(layer, x), clt_replacement(clt).encode(layer, x), rtol=1e-6, atol=1e-7)
    trace = trace_prompt(model, loaded, _prompt())
    target = logit_target(trace, 11, 5)
    assert direct_contributions(trace, target).total() == pytest.approx(float(trace.logits[11, 5]), rel=1e-4, abs=1e-6)


def test_feature_files_of_clt_features(tmp_path: Path) -> None:
    """A CLT feature's file: its activations at its own layer, its logit lens through every
    layer it writes to."""
    import json

    from sae_lens_transcoder.circuits.trace import final_norm
    from sae_lens_transcoder.features.feature_files import write_feature_files

    model = _model("gpt2")
    model.set_tokenizer(TOKENIZER)
    replacement = clt_replacement(random_clt(model))
    tokens = torch.randint(1, D_VOCAB, (8, CONTEXT), generator=torch.Generator().manual_seed(0))
    (path,) = write_feature_files(model, replacement, tokens, tmp_path, "tiny-clt", features={0: [3]}, progress=False)
    data = json.loads(path.read_text())
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter="blocks.0.mlp.hook_in")
        acts = replacement.encode(0, cache["blocks.0.mlp.hook_in"])[..., 3]
        written = replacement.decoder(0, 0)[3] + replacement.decoder(0, 1)[3]
        lens = final_norm(model).read_direction(model.W_U.T) @ written
    assert data["act_max"] == pytest.approx(float(acts.max()), rel=1e-4)
    assert data["activation_frequency"] == pytest.approx(float((acts > 0).float().mean()))
    assert data["top_logits"][0] == model.to_single_str_token(int(lens.argmax()))


def test_a_trace_holds_views_of_the_clts_weights_not_copies() -> None:
    """A trace keeps every (source, output) decoder and every encoder: as views of the CLT's own
    weights, so tracing a large CLT does not hold it twice; a training scale makes copies."""
    model = _model("gpt2")
    clt = random_clt(model)
    trace = trace_prompt(model, clt_replacement(clt), _prompt())
    for (source, layer), decoder in trace.decoders.items():
        assert decoder.untyped_storage().data_ptr() == clt.W_dec[source].untyped_storage().data_ptr()
    assert all(e.untyped_storage().data_ptr() == clt.W_enc.untyped_storage().data_ptr() for e in trace.encoders.values())
    scaled = trace_prompt(model, clt_replacement(clt, input_scale=2.0), _prompt())
    torch.testing.assert_close(scaled.decoders[0, 1], trace.decoders[0, 1] / 2.0)
    assert scaled.decoders[0, 1].untyped_storage().data_ptr() != clt.W_dec[0].untyped_storage().data_ptr()


def test_decoding_only_the_active_rows_equals_the_dense_decode() -> None:
    """A CLT reconstructs from the decoder rows of features active somewhere in the batch when
    few are (else from the whole decoder); either is the dense sum of codes times decoder."""
    from sae_lens_transcoder.replacement.base import ReplacementSet

    model = _model("llama3")
    replacement = clt_replacement(random_clt(model, "topk_clt"))
    # One token: at most k = 8 of 48 features live, so the rows are gathered; 40 tokens: most are, so not.
    for shape, few_live in (((1,), True), ((8, 5), False)):
        x = {layer: torch.randn(*shape, D_MODEL, generator=torch.Generator().manual_seed(layer)) for layer in range(3)}
        with torch.no_grad():
            acts = {layer: replacement.encode(layer, x[layer]) for layer in range(3)}
            for layer in range(3):
                dense = ReplacementSet.decode(replacement, layer, acts)
                torch.testing.assert_close(replacement.decode(layer, acts), dense, rtol=1e-6, atol=1e-6)
        live = [int(a.reshape(-1, D_SAE).ne(0).any(0).sum()) for a in acts.values()]
        assert all((2 * n <= D_SAE) == few_live for n in live), live


def test_dashboard_of_a_clt_feature_lists_its_writes_and_reads_their_sum(tmp_path: Path) -> None:
    """A CLT feature's dashboard: its activations at its own layer, every layer it writes into,
    the logit lens of its summed writes and connections from an earlier layer of the same CLT."""
    from sae_lens_transcoder.circuits.dashboard import feature_dashboard, save_dashboard_html
    from sae_lens_transcoder.circuits.weights import encoder_direction, logit_lens_readers

    model = _model("llama3")
    model.set_tokenizer(TOKENIZER)
    replacement = clt_replacement(random_clt(model))
    tokens = torch.randint(1, D_VOCAB, (6, CONTEXT), generator=torch.Generator().manual_seed(4))
    feature, k = 3, 4
    dashboard = feature_dashboard(model, replacement, feature, tokens, upstream=[0], k=k, layer=1)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter="blocks.1.mlp.hook_in")
        acts = replacement.encode(1, cache["blocks.1.mlp.hook_in"])[..., feature]
        written = replacement.decoder(1, 1)[feature] + replacement.decoder(1, 2)[feature]
        lens = logit_lens_readers(model) @ written
        connections = replacement.decoder(0, 0) @ encoder_direction(model, replacement, feature, layer=1)
    assert [w["layer"] for w in dashboard["writes"]] == [1, 2]
    assert dashboard["writes"][1]["norm"] == pytest.approx(float(replacement.decoder(1, 2)[feature].detach().norm()), rel=1e-6)
    assert [c["activation"] for c in dashboard["contexts"]] == pytest.approx(acts.flatten().topk(k).values.tolist(), rel=1e-5)
    assert dashboard["density"] == pytest.approx(float((acts > 0).float().mean()))
    assert dashboard["logit_lens"]["top"][0]["score"] == pytest.approx(float(lens.max()), rel=1e-5)
    assert [c["feature"] for c in dashboard["upstream"][0]["top"]] == connections.topk(k).indices.tolist()
    save_dashboard_html(dashboard, tmp_path / "feature.html")
    assert "writes into" in (tmp_path / "feature.html").read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="is not before layer 1"):
        feature_dashboard(model, replacement, feature, tokens[:1], upstream=[2], layer=1)
    with pytest.raises(ValueError, match="pass layer="):
        feature_dashboard(model, replacement, feature, tokens[:1])


def test_clt_feature_connections_equal_attribution_divided_by_activation_and_norm_scales() -> None:
    """Weights-only connections from layer 0's features to a layer-2 feature: through the
    residual they are the exact direct contributions (layer 0 writes into MLPs 0 and 1) over
    the activation and the norm scale; through one head of layer 1 they also carry its
    attention weight and source-token scale (only MLP 0's write reaches that head)."""
    from sae_lens_transcoder.circuits.weights import feature_connections, ov_connections

    model = _model("llama3")
    replacement = clt_replacement(random_clt(model))
    trace = trace_prompt(model, replacement, _prompt())
    pos, src, head = 11, 4, 2
    feature = int(trace.feature_acts[2][pos].argmax())
    root = feature_target(trace, 2, feature, pos)
    acts, scale = trace.feature_acts[0], trace.get("blocks.2.ln2.hook_scale")[pos, 0]
    with torch.no_grad():
        connection = feature_connections(model, replacement, replacement, feature, upstream_layer=0, downstream_layer=2)
        through = ov_connections(model, replacement, replacement, feature, layer=1, head=head, upstream_layer=0, downstream_layer=2)
    active = acts[pos] > 0
    attribution = direct_contributions(trace, root).features[0]
    torch.testing.assert_close(attribution[active] / acts[pos][active], connection[active] / scale, rtol=1e-4, atol=1e-6)
    via_head = direct_contributions(trace, child_target(trace, root, Node("head", 1, pos, head, src))).features[0]
    constants = trace.pattern(1)[head, pos, src] / (trace.get("blocks.1.ln1.hook_scale")[src, 0] * scale)
    active = acts[src] > 0
    torch.testing.assert_close(via_head[active], acts[src][active] * through[active] * constants, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("architecture", ["clt", "topk_clt"])
def test_sparse_decode_equals_the_dense_one_in_outputs_and_gradients(architecture: str) -> None:
    model = _model("llama3")
    results = []
    for impl in ("dense", "sparse"):
        clt = random_clt(model, architecture, decoder_impl=impl).train()
        x = torch.randn(16, clt.n_layers, D_MODEL, generator=torch.Generator().manual_seed(4))
        acts = clt.encode(x)
        out = clt.decode(acts)
        out.pow(2).sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in clt.W_dec], clt.W_enc.grad.clone()))
    (dense, dense_dec, dense_enc), (sparse, sparse_dec, sparse_enc) = results
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    for a, b in zip(sparse_dec, dense_dec):  # summation order differs: float32 rounding only
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sparse_enc, dense_enc, rtol=1e-4, atol=1e-4)


def test_sparse_decode_is_refused_for_jumprelu() -> None:
    with pytest.raises(ValueError, match="decoder_impl='sparse' is not exact"):
        CLT_CLASSES["jumprelu_clt"][1](d_in=D_MODEL, d_sae=D_SAE, n_layers=2, decoder_impl="sparse")


def test_batchtopk_keeps_k_per_token_on_average_and_tracks_each_layers_cut() -> None:
    model = _model("llama3")
    clt = random_clt(model, "batchtopk_clt").train()
    x = torch.randn(32, clt.n_layers, D_MODEL, generator=torch.Generator().manual_seed(6))
    y = torch.randn(32, clt.n_layers, D_MODEL, generator=torch.Generator().manual_seed(7))
    from sae_lens.saes.sae import TrainStepInput

    packed = torch.cat([x, y], dim=-1).flatten(1)
    out = clt.training_forward_pass(TrainStepInput(sae_in=packed, coefficients={}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False))
    acts = out.feature_acts.reshape(32, clt.n_layers, D_SAE)
    assert ((acts > 0).sum(dim=(0, 2)) == 8 * 32).all()  # k * batch per layer
    kept_min = torch.stack([acts[:, i][acts[:, i] > 0].min() for i in range(clt.n_layers)])
    torch.testing.assert_close(clt.topk_threshold, kept_min)  # the first batch sets the cut


def test_mean_attribution_through_clt_features_is_the_average_of_prompt_attributions() -> None:
    """Layer 0's CLT features into a layer-2 feature, averaged over the tokens where it fires:
    the mean of the exact per-prompt direct contributions (same token, through the residual)."""
    from sae_lens_transcoder.circuits.mean import mean_feature_attributions

    model = _model("llama3")
    replacement = clt_replacement(random_clt(model))
    tokens = torch.randint(1, D_VOCAB, (3, 10), generator=torch.Generator().manual_seed(2))
    feature = 4
    mean, count = mean_feature_attributions(model, replacement, replacement, feature, tokens, batch_size=2, upstream_layer=0, downstream_layer=2)
    expected, seen = torch.zeros_like(mean), 0
    for row in tokens:
        trace = trace_prompt(model, replacement, row)
        for pos in range(row.shape[0]):
            if trace.feature_acts[2][pos, feature] > 0:
                expected += direct_contributions(trace, feature_target(trace, 2, feature, pos)).features[0].detach()
                seen += 1
    assert count == seen > 0
    torch.testing.assert_close(mean, expected / seen, rtol=1e-4, atol=1e-5)
