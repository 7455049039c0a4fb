"""Feature files: every number checked against a direct pass over the same tokens, the files
where circuit-tracer's viewer looks for them, and its own pydantic model accepting them."""

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformer_lens import HookedTransformer

from sae_lens_transcoder.circuits.graph import build_graph
from sae_lens_transcoder.circuits.graph_json import save_graph_json
from sae_lens_transcoder.circuits.targets import resolve_target
from sae_lens_transcoder.circuits.trace import trace_prompt
from sae_lens_transcoder.circuits.weights import de_embedding, logit_lens
from sae_lens_transcoder.data import load_text_split
from sae_lens_transcoder.features import (
    FeatureFileOptions,
    build_feature_files,
    cantor_pair,
    cantor_unpair,
    graph_features,
    scan_for_layer,
    write_graph_feature_files,
)
from sae_lens_transcoder.features.paths import feature_file_relpath
from sae_lens_transcoder.features.streaming import GrowingHistogram
from sae_lens_transcoder.models import load_model
from sae_lens_transcoder.replacement import PerLayerTranscoders, Splice
from sae_lens_transcoder.report import heldout_tokens
from tests.circuit_fixtures import random_transcoder

PROMPT = "To be, or not to be, that is the"
SCAN = "tiny-gpt2/random-transcoders"
CT_FEATURE_MODELS = Path("/work/ct-venv/lib/python3.11/site-packages/circuit_tracer/frontend/feature_models.py")
OPTIONS = FeatureFileOptions(n_top=6, n_quantiles=3, n_per_quantile=3, window=(5, 3), batch_size=5)


@dataclass
class Setup:
    model: HookedTransformer
    replacement: PerLayerTranscoders
    tokens: torch.Tensor


def tiny_setup() -> Setup:
    """The bundled tiny model, one random transcoder per layer, 23 held-out sequences of 32
    tokens (batch size 5 leaves a short last batch)."""
    model = load_model("tiny-gpt2")
    replacement = PerLayerTranscoders([random_transcoder(model, layer, hook="ln2.hook_normalized") for layer in range(model.cfg.n_layers)])
    tokens = heldout_tokens(model, load_text_split("test"), 32, 32 * 23)
    return Setup(model, replacement, tokens)


def build_viewer_folder(folder: Path, setup: Setup, options: FeatureFileOptions = OPTIONS) -> Path:
    """A served folder as a user makes it: a graph of a real trace and its feature files."""
    trace = trace_prompt(setup.model, setup.replacement, PROMPT)
    root, label = resolve_target(trace)
    graph = build_graph(trace, root, 12)  # save_graph_json prunes it
    path = save_graph_json(graph, folder / "to-be.json", trace=trace, prompt=PROMPT, node_threshold=0.8, scan=SCAN,
                           target_token=root.node.index, target_label=label)
    write_graph_feature_files(path, setup.model, setup.replacement, setup.tokens, options=options, progress=False)
    return path


@pytest.fixture(scope="module")
def setup() -> Setup:
    return tiny_setup()


def _direct_acts(setup: Setup, layer: int) -> torch.Tensor:
    """``[n_seq, seq, d_sae]``: the features' activations from one unbatched forward pass."""
    hook = setup.replacement.hook_in(layer)
    with torch.no_grad():
        _, cache = setup.model.run_with_cache(setup.tokens, names_filter=[hook])
        return setup.replacement.encode(layer, cache[hook]).float()


def test_cantor_ids_round_trip_and_match_circuit_tracer() -> None:
    # circuit-tracer's feature_node(layer=2, feat_idx=3) writes feature=(2+3)(2+3+1)/2+3 = 18.
    assert cantor_pair(2, 3) == 18
    for layer in range(5):
        for index in (0, 1, 7, 12345):
            assert cantor_unpair(cantor_pair(layer, index)) == (layer, index)


def test_numbers_equal_a_direct_computation(setup: Setup) -> None:
    features = {0: [0, 5, 17], 1: list(range(setup.replacement.d_sae(1)))}
    files = build_feature_files(setup.model, setup.replacement, features, setup.tokens, SCAN, OPTIONS, progress=False)
    assert set(files) == {(layer, i) for layer, ids in features.items() for i in ids}
    for layer in (0, 1):
        acts = _direct_acts(setup, layer)
        for index in features[layer]:
            data, a = files[(layer, index)], acts[..., index]
            active = a[a > 0]
            assert data["index"] == cantor_pair(layer, index) and data["transcoder_id"] == SCAN
            assert data["activation_frequency"] == pytest.approx(float((a > 0).float().mean()))
            assert data["n_tokens"] == a.numel() and data["n_active"] == active.numel()
            assert data["act_max"] == pytest.approx(float(a.max().clamp_min(0)), abs=1e-4)
            assert sum(data["histogram"]) == active.numel()
            if active.numel() == 0:
                continue
            # Top examples: the sequences with the highest max activation, in order, each
            # window's marked token being that max, and the tokens being the dataset's.
            top = data["examples_quantiles"][0]
            assert top["quantile_name"] == "Top activations"
            seq_max = a.amax(dim=1)
            expected = seq_max[seq_max > 0].sort(descending=True).values[: OPTIONS.n_top]
            got = [ex["tokens_acts_list"][ex["train_token_ind"]] for ex in top["examples"]]
            assert got == pytest.approx(expected.tolist(), abs=1e-4)
            for ex in top["examples"]:
                seq, pos = ex["sequence"], int(a[ex["sequence"]].argmax())
                start = pos - ex["train_token_ind"]
                ids = setup.tokens[seq, start : start + len(ex["tokens"])]
                assert ex["tokens"] == [setup.model.to_single_str_token(int(t)) for t in ids]
                assert ex["tokens_acts_list"] == pytest.approx(a[seq, start : start + len(ex["tokens"])].tolist(), abs=1e-4)
            # Quantile groups: sampled active sequences, strongest band first, no overlap.
            sampled = [ex for group in data["examples_quantiles"][1:] for ex in group["examples"]]
            assert len(sampled) == min(OPTIONS.n_quantiles * OPTIONS.n_per_quantile, int((seq_max > 0).sum()))
            assert len({ex["sequence"] for ex in sampled}) == len(sampled)
            values = [ex["tokens_acts_list"][ex["train_token_ind"]] for ex in sampled]
            assert values == sorted(values, reverse=True) and min(values) > 0
            # Percentiles: the value below which p of the active values lie, to within one
            # fine histogram bin (at most 2 * max / resolution wide).
            width = 2 * float(active.max()) / OPTIONS.histogram_resolution
            n = active.numel()
            for p, value in zip(range(1, 101), data["quantile_values"]):
                assert float((active <= value + width).sum()) / n >= p / 100 - 1e-9
                assert float((active < value - width).sum()) / n <= p / 100 + 1e-9
            assert data["quantile_values"] == sorted(data["quantile_values"])


def test_logit_lens_and_de_embedding_equal_the_dashboard_weights(setup: Setup) -> None:
    files = build_feature_files(setup.model, setup.replacement, {1: [3, 40]}, setup.tokens, SCAN, OPTIONS, progress=False)
    splice = setup.replacement.splices[1]
    assert isinstance(splice, Splice)
    for index in (3, 40):
        data = files[(1, index)]
        for name, scores in (("logit_lens", logit_lens(setup.model, splice, index)), ("de_embedding", de_embedding(setup.model, splice, index))):
            top = scores.topk(OPTIONS.n_logits)
            assert [t["score"] for t in data[name]["top"]] == pytest.approx(top.values.tolist(), abs=1e-3)
            assert [t["token"] for t in data[name]["top"]] == [setup.model.to_single_str_token(int(i)) for i in top.indices]
        assert data["top_logits"] == [t["token"] for t in data["logit_lens"]["top"]]
        assert data["bottom_logits"] == [t["token"] for t in data["logit_lens"]["bottom"]]


def test_growing_histogram_counts_every_value_exactly_once() -> None:
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(50, 3, generator=generator) * scale for scale in (0.1, 1.0, 30.0, 2.0)]
    histogram = GrowingHistogram.empty(3, 64)
    for batch in batches:
        histogram.add(batch)
    values = torch.cat(batches)
    for f in range(3):
        positive = values[:, f][values[:, f] > 0].double()
        edges = histogram.edges(f)
        assert int(histogram.counts[f].sum()) == positive.numel()
        assert torch.equal(histogram.counts[f], torch.histogram(positive, edges).hist.long())


def _circuit_tracer_feature_model() -> Any:
    if not CT_FEATURE_MODELS.is_file():
        pytest.skip(f"circuit-tracer's feature_models.py is not at {CT_FEATURE_MODELS}; install circuit-tracer 0.5.0 there to check the format")
    spec = importlib.util.spec_from_file_location("ct_feature_models", CT_FEATURE_MODELS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Model


def test_graph_feature_files_sit_where_the_viewer_looks(setup: Setup, tmp_path: Path) -> None:
    graph_path = build_viewer_folder(tmp_path, setup)
    graph = json.loads(graph_path.read_text())
    features = graph_features(graph)
    assert features and set(features) <= set(setup.replacement.layers)
    ct_model = _circuit_tracer_feature_model() if CT_FEATURE_MODELS.is_file() else None
    written = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "features").rglob("*.json"))
    expected = sorted(feature_file_relpath(scan_for_layer(graph["metadata"], layer), layer, i) for layer, ids in features.items() for i in ids)
    assert written == expected
    for relpath in written:
        data = json.loads((tmp_path / relpath).read_text())
        assert relpath == f"features/{SCAN}/{data['index']}.json"
        if ct_model is not None:
            ct_model.model_validate(data)


def test_custom_scans_use_the_transcoder_list_and_local_paths_are_refused(setup: Setup) -> None:
    meta = {"scan": "custom-abc", "transcoder_list": ["org/tc-l0", "org/tc-l1"]}
    assert scan_for_layer(meta, 1) == "org/tc-l1"
    assert feature_file_relpath("org/tc-l1", 1, 4) == f"features/org/tc-l1/{cantor_pair(1, 4)}.json"
    assert feature_file_relpath("./local-features", 1, 4) == f"local-features/{cantor_pair(1, 4)}.json"
    with pytest.raises(ValueError, match="transcoder_list"):
        scan_for_layer({"scan": "custom-abc", "transcoder_list": ["org/tc-l0"]}, 1)
    for bad in ("/home/me/layer1", "../up", "C:\\tc"):
        with pytest.raises(ValueError, match="portable id"):
            feature_file_relpath(bad, 1, 4)
    with pytest.raises(ValueError, match="feature ids must lie"):
        build_feature_files(setup.model, setup.replacement, {1: [10_000]}, setup.tokens, SCAN, OPTIONS, progress=False)


def test_files_do_not_depend_on_batching_or_passes(setup: Setup) -> None:
    features = {0: list(range(0, 96, 3)), 1: [1, 2, 50]}
    one = build_feature_files(setup.model, setup.replacement, features, setup.tokens, SCAN, OPTIONS, progress=False)
    split = FeatureFileOptions(**{**OPTIONS.__dict__, "batch_size": 7, "features_per_pass": 5})
    many = build_feature_files(setup.model, setup.replacement, features, setup.tokens, SCAN, split, progress=False)
    assert many.keys() == one.keys()
    for key, data in one.items():
        other = many[key]
        for name in ("examples_quantiles", "act_max", "activation_frequency", "top_logits", "de_embedding"):
            assert other[name] == data[name], (key, name)
        # The fine bins' width follows the first batch's max, so these agree to two fine bins.
        assert sum(other["histogram"]) == sum(data["histogram"])
        width = 2 * data["act_max"] / OPTIONS.histogram_resolution
        assert other["quantile_values"] == pytest.approx(data["quantile_values"], abs=2 * width + 1e-4)


def test_transcoders_reading_hook_mlp_in_get_files_on_a_model_that_does_not_run_it() -> None:
    """TransformerLens runs ``hook_mlp_in`` only with ``use_hook_mlp_in``; the scan turns it on
    instead of finding nothing in the cache. ``hook_mlp_in`` is the residual ``hook_resid_mid``."""
    model = load_model("tiny-gpt2")
    model.set_use_hook_mlp_in(False)
    transcoder = random_transcoder(model, 1, hook="hook_mlp_in")
    tokens = heldout_tokens(model, load_text_split("test"), 32, 32 * 4)
    files = build_feature_files(model, [transcoder], {1: [2]}, tokens, SCAN, OPTIONS, progress=False)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter="blocks.1.hook_resid_mid")
        acts = PerLayerTranscoders([transcoder]).encode(1, cache["blocks.1.hook_resid_mid"])[..., 2]
    assert files[(1, 2)]["hook_name"] == "blocks.1.hook_mlp_in"
    assert files[(1, 2)]["act_max"] == pytest.approx(float(acts.max()), rel=1e-3)
    assert files[(1, 2)]["activation_frequency"] == pytest.approx(float((acts > 0).float().mean()))
