"""``model_class_name: AutoModelForCausalLM``: training activations from transformers' own forward
pass (SAELens's ``HookedProxyLM``), under the HookedTransformer's hook names."""

from pathlib import Path

import pytest
import torch
from datasets import Dataset
from sae_lens.saes.sae import SAE

from sae_lens_transcoder import TranscoderTrainingRunner
from sae_lens_transcoder.evals import evaluate_spliced
from sae_lens_transcoder.models import load_model
from sae_lens_transcoder.models.transformers_source import TransformersMLPHooks, load_transformers_source
from sae_lens_transcoder.replacement.cross_layer import CLT_HOOKS_KEY
from tests.conftest import CONTEXT, D_MODEL, D_VOCAB, runner_config
from tests.family_models import FAMILIES, N_LAYERS, TOKENIZER, build_family_pair
from tests.release_fixtures import COMMIT, LocalHub, local_hub  # noqa: F401

# An official TransformerLens name, so both libraries take their Hub path (from the local hub).
HUB_MODEL = "Qwen/Qwen3-0.6B"
REVISION = "0123456789abcdef0123456789abcdef01234567"

# The module whose output carries each hook, per family (Gemma's MLP sits between two norms).
EXPECTED_MODULES = {
    "qwen3": ("post_attention_layernorm", "mlp"),
    "gemma2": ("pre_feedforward_layernorm", "post_feedforward_layernorm"),
    "gemma3": ("pre_feedforward_layernorm", "post_feedforward_layernorm"),
}


def _save_pair(family: str, directory: Path, seed: int = 0) -> Path:
    hf_model, _ = build_family_pair(family, seed)
    hf_model.save_pretrained(directory)
    TOKENIZER.save_pretrained(directory)
    return directory


def _hooks(layers: range | list[int]) -> list[str]:
    return [hook for layer in layers for hook in (f"blocks.{layer}.mlp.hook_in", f"blocks.{layer}.hook_mlp_out")]


def _tokens(rows: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(1, D_VOCAB, (rows, CONTEXT), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_forward_gives_the_hooked_transformers_mlp_activations(family: str, tmp_path: Path) -> None:
    checkpoint = _save_pair(family, tmp_path / family)
    model = load_model(checkpoint)
    hooks = _hooks(range(N_LAYERS))
    source = load_transformers_source(str(checkpoint), model, hooks)
    assert isinstance(source, TransformersMLPHooks)
    for layer in range(N_LAYERS):
        modules = [source.module_for_hook[hook] for hook in _hooks([layer])]
        assert modules == [f"model.layers.{layer}.{name}" for name in EXPECTED_MODULES[family]]
    tokens = _tokens(2)
    with torch.no_grad():
        _, expected = model.run_with_cache(tokens, names_filter=hooks)
        # SAELens's store stops after the last hook it reads: no logits come back.
        logits, got = source.run_with_cache(tokens, names_filter=hooks, stop_at_layer=N_LAYERS)
    assert logits is None
    assert sorted(got.keys()) == sorted(hooks)
    for hook in hooks:
        torch.testing.assert_close(got[hook], expected[hook], rtol=1e-4, atol=1e-5)


def _runner(
    model: Path | str, tmp_path: Path, model_class_name: str, model_kwargs: dict[str, object] | None = None, **sae: object
) -> TranscoderTrainingRunner:
    cfg = runner_config(
        model_name=str(model), model_class_name=model_class_name, model_from_pretrained_kwargs=model_kwargs or {},
        output_path=str(tmp_path / model_class_name), training_tokens=CONTEXT * 160,
        sae={"mlp_layers": "0-1", "mlp_layer": None, "d_sae": 128, **sae},
    )
    return TranscoderTrainingRunner(cfg, override_dataset=Dataset.from_dict({"input_ids": _tokens(120, seed=1).tolist()}))


def test_a_set_trains_on_transformers_activations_and_saves_for_the_hooked_transformer(tmp_path: Path) -> None:
    """The store's batches are the HookedTransformer store's (same tokens, same order, the same
    activations up to float rounding), so training gives the same transcoders; what is saved
    names TransformerLens's hooks and model class."""
    checkpoint = _save_pair("qwen3", tmp_path / "qwen3")
    runner = _runner(checkpoint, tmp_path, "AutoModelForCausalLM")
    reference = _runner(checkpoint, tmp_path, "HookedTransformer")
    assert isinstance(runner.activations_store.model, TransformersMLPHooks)
    assert reference.activations_store.model is reference.model
    got, _ = next(_runner(checkpoint, tmp_path, "AutoModelForCausalLM").activations_store.batches_with_state())
    expected, _ = next(_runner(checkpoint, tmp_path, "HookedTransformer").activations_store.batches_with_state())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    trained, trained_reference = runner.run(), reference.run()
    loaded = [SAE.load_from_disk(tmp_path / "AutoModelForCausalLM" / f"layer_{layer}_sae") for layer in (0, 1)]
    assert [sae.cfg.metadata.hook_name for sae in loaded] == [f"blocks.{layer}.mlp.hook_in" for layer in (0, 1)]
    assert {sae.cfg.metadata.model_class_name for sae in loaded} == {"HookedTransformer"}
    tokens = _tokens(4, seed=7)
    metrics = evaluate_spliced(runner.model, loaded, tokens)
    assert metrics["explained_variance"] > 0.1  # better than predicting the mean
    assert evaluate_spliced(runner.model, list(trained.values()), tokens)["mse"] == pytest.approx(metrics["mse"], rel=1e-4)
    reference_metrics = evaluate_spliced(reference.model, list(trained_reference.values()), tokens)
    assert metrics["explained_variance"] == pytest.approx(reference_metrics["explained_variance"], abs=0.01)


def test_a_cross_layer_transcoder_reads_every_covered_mlp_from_transformers(tmp_path: Path) -> None:
    """The CLT runner builds its store through the same source: all layers' inputs and outputs."""
    checkpoint = _save_pair("gemma2", tmp_path / "gemma2")
    clt = {"architecture": "clt", "mlp_layers": "all", "l1_coefficient": 1e-3}
    store = _runner(checkpoint, tmp_path, "AutoModelForCausalLM", **clt).activations_store
    assert isinstance(store.model, TransformersMLPHooks)
    got, _ = next(store.batches_with_state())
    expected, _ = next(_runner(checkpoint, tmp_path, "HookedTransformer", **clt).activations_store.batches_with_state())
    assert got.shape[-1] == 2 * N_LAYERS * D_MODEL
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    trained = _runner(checkpoint, tmp_path, "AutoModelForCausalLM", **clt).run()
    assert trained.cfg.metadata[CLT_HOOKS_KEY] == [_hooks([layer]) for layer in range(N_LAYERS)]


def test_the_residual_input_hook_is_refused_before_training(tmp_path: Path) -> None:
    checkpoint = _save_pair("gemma3", tmp_path / "gemma3")
    with pytest.raises(ValueError, match=r"reads only the MLP's own input and output.*'blocks.0.hook_mlp_in'.*mlp_input_hook: exact"):
        _runner(checkpoint, tmp_path, "AutoModelForCausalLM", mlp_input_hook="hook_mlp_in")
    assert not (tmp_path / "AutoModelForCausalLM").exists()


def test_a_transformers_model_that_computes_something_else_is_refused(tmp_path: Path) -> None:
    """Other weights under the same name: the probe batch tells the two models apart."""
    other = _save_pair("qwen3", tmp_path / "other", seed=1)
    model = build_family_pair("qwen3", seed=0)[1]
    with pytest.raises(ValueError, match=r"'model.layers.0.post_attention_layernorm' output differs from the HookedTransformer's 'blocks.0.mlp.hook_in'.*model_class_name: HookedTransformer"):
        load_transformers_source(str(other), model, _hooks([0]))


def _publish(hub: LocalHub, seed: int, commit: str, directory: Path) -> None:
    """A random-weight Qwen3 as the Hub repo ``HUB_MODEL`` at ``commit``."""
    _save_pair("qwen3", directory, seed)
    for file in directory.iterdir():
        hub.write(HUB_MODEL, file.name, file.read_bytes(), commit=commit)


def test_a_hub_model_is_read_at_the_revision_transformer_lens_reads(local_hub: LocalHub, tmp_path: Path) -> None:
    """``model_from_pretrained_kwargs`` that TransformerLens hands on to transformers (here a
    revision whose weights differ from main's) reach the transformers model too."""
    _publish(local_hub, seed=0, commit=COMMIT, directory=tmp_path / "main")
    _publish(local_hub, seed=1, commit=REVISION, directory=tmp_path / "revision")
    kwargs = {"revision": REVISION, "n_ctx": CONTEXT}  # n_ctx: TransformerLens's own, not for transformers
    source = _runner(HUB_MODEL, tmp_path, "AutoModelForCausalLM", kwargs).activations_store
    assert isinstance(source.model, TransformersMLPHooks)
    reference = _runner(HUB_MODEL, tmp_path, "HookedTransformer", kwargs)
    got, _ = next(source.batches_with_state())
    expected, _ = next(reference.activations_store.batches_with_state())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="the two models disagree"):  # main's weights are not the revision's
        load_transformers_source(HUB_MODEL, reference.model, _hooks([0]))
