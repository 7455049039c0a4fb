"""Per-feature JSON files that circuit-tracer's viewer, Neuronpedia and ``serve`` read.

One file per feature, in circuit-tracer's ``frontend/feature_models.Model`` shape:
``transcoder_id``, ``index``, ``examples_quantiles`` (groups of examples, each with its
tokens, per-token activations ``tokens_acts_list`` for highlighting and ``train_token_ind``,
the token whose activation put it there), ``top_logits`` / ``bottom_logits``, ``act_min`` /
``act_max`` (the colour scale), ``quantile_values`` (the activation at each percentile 1..100
of the feature's positive activations; the viewer reports a node's percentile from them),
``histogram`` (counts of positive activations in equal bins over ``[act_min, act_max]``) and
``activation_frequency`` (the fraction of tokens where the feature is positive). Extra keys,
which pydantic and the viewer ignore, carry what our own viewer shows: ``layer``,
``feature`` (the raw index), ``hook_name``, ``n_tokens``, and scored ``logit_lens`` and
``de_embedding`` token lists.

Examples: ``"Top activations"`` holds the sequences with the highest max activation; the
quantile groups ``"Quantile q/Q"`` split a uniform random sample of the sequences where the
feature fires into ``Q`` equal bands by activation, so they show what typical firing looks
like at each strength. Each example is a window around its sequence's max activation.

The pass over the dataset streams: per feature it keeps only the top and sampled windows
(``KeptContexts``) and a histogram (``GrowingHistogram``), for any number of features of any
replacement set; transcoders are seen only through ``ReplacementSet.encode(layer, x)`` at
``hook_in(layer)``, so a per-layer set and a cross-layer transcoder work alike. Where the
files go is circuit-tracer's convention (``paths.py``).
"""

import json
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens.saes.sae import SAE
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from sae_lens_transcoder.circuits.weights import decoder_directions, encoder_directions, logit_lens_readers, top_tokens
from sae_lens_transcoder.features.paths import (
    cantor_pair,
    feature_file_path,
    node_feature,
    scan_for_layer,
)
from sae_lens_transcoder.features.streaming import PAD_TOKEN, GrowingHistogram, KeptContexts, hash_uniform
from sae_lens_transcoder.hooks import ensure_input_hooks, hook_layer
from sae_lens_transcoder.replacement import ReplacementSet, Splice, as_replacement_set

FeatureFile = dict[str, Any]
_PERCENTILES = torch.arange(1, 101, dtype=torch.float64) / 100
_DIGITS = 4  # activations are rounded in the files, which are read by people


@dataclass(frozen=True)
class FeatureFileOptions:
    """How much each file holds.

    ``n_top`` top examples; ``n_quantiles`` bands of ``n_per_quantile`` examples each, from a
    random sample of ``n_quantiles * n_per_quantile`` active sequences; ``window`` = (tokens
    before, tokens after) the max; ``n_logits`` tokens per logit-lens / de-embedding list;
    ``n_bins`` histogram bins; ``histogram_resolution`` fine bins kept while streaming.
    """

    n_top: int = 10
    n_quantiles: int = 5
    n_per_quantile: int = 5
    window: tuple[int, int] = (16, 8)
    n_logits: int = 10
    n_bins: int = 32
    histogram_resolution: int = 1024
    batch_size: int = 16
    features_per_pass: int = 8192
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_top", "n_quantiles", "n_per_quantile", "n_logits", "n_bins", "batch_size", "features_per_pass"):
            if getattr(self, name) < 1:
                raise ValueError(f"feature files: {name}={getattr(self, name)} must be at least 1.")
        if min(self.window) < 0:
            raise ValueError(f"feature files: window={self.window} must be two non-negative token counts.")


@dataclass
class _LayerScan:
    """Running summaries of the chosen features of one layer."""

    features: torch.Tensor
    top: KeptContexts
    sample: KeptContexts
    histogram: GrowingHistogram
    n_active: torch.Tensor
    n_tokens: int = 0


def _as_set(transcoders: "ReplacementSet | Sequence[SAE | Splice]") -> ReplacementSet:  # type: ignore[type-arg]
    return transcoders if isinstance(transcoders, ReplacementSet) else as_replacement_set(transcoders)


def _check_features(replacement: ReplacementSet, features: Mapping[int, Sequence[int]]) -> dict[int, torch.Tensor]:
    chosen = {}
    for layer, indices in features.items():
        if layer not in replacement.layers:
            raise ValueError(f"features of layer {layer} asked for, but the transcoders replace layers {replacement.layers}.")
        ids = torch.tensor(sorted(set(int(i) for i in indices)), dtype=torch.long)
        if len(ids) and (ids.min() < 0 or ids.max() >= replacement.d_sae(layer)):
            raise ValueError(f"layer {layer}: feature ids must lie in [0, {replacement.d_sae(layer)}); got {ids.tolist()}.")
        if len(ids):
            chosen[layer] = ids
    if not chosen:
        raise ValueError("no features to write: give at least one (layer, feature).")
    return chosen


def _batches(tokens: torch.Tensor, batch_size: int, progress: bool, desc: str) -> Iterable[tuple[int, torch.Tensor]]:
    bar = tqdm(total=tokens.shape[0], unit="seq", desc=desc, disable=not progress)
    with bar:
        for offset in range(0, tokens.shape[0], batch_size):
            batch = tokens[offset : offset + batch_size]
            yield offset, batch
            bar.update(batch.shape[0])


@torch.no_grad()
def scan_features(
    model: HookedTransformer,
    replacement: ReplacementSet,
    features: Mapping[int, Sequence[int]],
    tokens: torch.Tensor,
    options: FeatureFileOptions = FeatureFileOptions(),
    progress: bool = True,
    desc: str = "feature files",
) -> dict[int, _LayerScan]:
    """One streaming pass over ``tokens [n_seq, seq]`` for ``features`` (layer -> feature ids)."""
    if tokens.dim() != 2 or tokens.shape[0] == 0:
        raise ValueError(f"dataset tokens must be [n_sequences, context] with at least one sequence; got {tuple(tokens.shape)}.")
    chosen = _check_features(replacement, features)
    hooks = {layer: replacement.hook_in(layer) for layer in chosen}
    ensure_input_hooks(model, hooks.values())
    stop = max(hook_layer(name) for name in hooks.values()) + 1
    before, after = options.window
    n_sample = options.n_quantiles * options.n_per_quantile
    scans = {
        layer: _LayerScan(
            features=ids,
            top=KeptContexts.empty(len(ids), options.n_top, before, after),
            sample=KeptContexts.empty(len(ids), n_sample, before, after),
            histogram=GrowingHistogram.empty(len(ids), options.histogram_resolution),
            n_active=torch.zeros(len(ids), dtype=torch.long),
        )
        for layer, ids in chosen.items()
    }
    # Each feature's sample is keyed by its own id, so it does not depend on the other features.
    streams = {layer: torch.tensor([cantor_pair(layer, i) for i in ids.tolist()]) for layer, ids in chosen.items()}
    for offset, batch in _batches(tokens, options.batch_size, progress, desc):
        _, cache = model.run_with_cache(
            batch.to(model.cfg.device), names_filter=list(hooks.values()), stop_at_layer=min(stop, model.cfg.n_layers)
        )
        batch = batch.cpu()
        for layer, scan in scans.items():
            acts = replacement.encode(layer, cache[hooks[layer]])[..., scan.features.to(cache[hooks[layer]].device)]
            acts = acts.float().cpu()  # [batch, seq, n_features]
            seq_max = acts.amax(dim=1)
            scan.top.update(seq_max, acts, batch, offset)
            draws = hash_uniform(torch.arange(offset, offset + batch.shape[0]), streams[layer], options.seed)
            scan.sample.update(torch.where(seq_max > 0, draws, -torch.inf), acts, batch, offset)
            scan.histogram.add(acts.flatten(0, 1))
            scan.n_active += (acts > 0).sum(dim=(0, 1))
            scan.n_tokens += acts.shape[0] * acts.shape[1]
    return scans


def _vocabulary(model: HookedTransformer, ids: Iterable[int], cache: dict[int, str]) -> None:
    for i in ids:
        if i not in cache and i != PAD_TOKEN:
            cache[i] = model.to_single_str_token(int(i))


def _examples(kept: KeptContexts, j: int, slots: Sequence[int], vocab: dict[int, str], top_sequences: set[int]) -> list[dict[str, Any]]:
    """Examples of feature ``j`` from slots ``slots`` of ``kept``, padding cut off."""
    examples = []
    for slot in slots:
        tokens = kept.tokens[j, slot]
        real = tokens != PAD_TOKEN
        first = int(real.nonzero()[0])
        sequence = int(kept.sequences[j, slot])
        examples.append({
            "tokens": [vocab[int(t)] for t in tokens[real]],
            "tokens_acts_list": [round(float(a), _DIGITS) for a in kept.acts[j, slot][real]],
            "train_token_ind": kept.before - first,
            "is_repeated_datapoint": sequence in top_sequences,
            "sequence": sequence,
        })
    return examples


def _quantile_groups(scan: _LayerScan, j: int, n_quantiles: int, vocab: dict[int, str]) -> list[dict[str, Any]]:
    top_slots = [s for s in range(scan.top.k) if scan.top.keys[j, s] > -torch.inf and scan.top.values[j, s] > 0]
    top_sequences = {int(scan.top.sequences[j, s]) for s in top_slots}
    groups = [{"quantile_name": "Top activations", "examples": _examples(scan.top, j, top_slots, vocab, set())}]
    sampled = [s for s in range(scan.sample.k) if scan.sample.keys[j, s] > -torch.inf]
    sampled.sort(key=lambda s: -float(scan.sample.values[j, s]))
    bands = torch.tensor_split(torch.tensor(sampled, dtype=torch.long), n_quantiles) if sampled else []
    for q, band in enumerate(bands):
        if len(band) == 0:
            continue
        slots = band.tolist()
        low, high = float(scan.sample.values[j, slots[-1]]), float(scan.sample.values[j, slots[0]])
        groups.append({
            "quantile_name": f"Quantile {n_quantiles - q}/{n_quantiles} ({low:.3g} to {high:.3g})",
            "examples": _examples(scan.sample, j, slots, vocab, top_sequences),
        })
    return groups


@torch.no_grad()
def weight_views(
    model: HookedTransformer, replacement: ReplacementSet, layer: int, features: torch.Tensor, chunk: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logit lens, de-embedding)``, each ``[n_features, d_vocab]``, for ``features`` of ``layer``:
    ``circuits/weights.py``'s maps for many features at once (a cross-layer feature's writes
    summed over its output layers); ``chunk`` bounds memory for large vocabularies."""
    readers = logit_lens_readers(model)  # [vocab, d_model]
    lens, de_embed = [], []
    for part in features.split(chunk):
        lens.append((decoder_directions(replacement, layer, features=part).to(readers.dtype) @ readers.T).float().cpu())
        encoder = encoder_directions(model, replacement, layer, part).to(model.W_E.dtype)
        de_embed.append((encoder @ model.W_E.T).float().cpu())
    return torch.cat(lens), torch.cat(de_embed)


def _scored(model: HookedTransformer, scores: torch.Tensor, k: int) -> dict[str, list[dict[str, Any]]]:
    top, bottom = top_tokens(model, scores, min(k, scores.shape[0]))
    return {side: [{"token": t, "score": round(s, _DIGITS)} for t, s in pairs] for side, pairs in (("top", top), ("bottom", bottom))}


def _passes(features: Mapping[int, torch.Tensor], per_pass: int) -> list[dict[int, torch.Tensor]]:
    """``features`` cut into groups of at most ``per_pass`` features, layers kept in order."""
    passes: list[dict[int, torch.Tensor]] = [{}]
    room = per_pass
    for layer, ids in features.items():
        while len(ids):
            if room == 0:
                passes.append({})
                room = per_pass
            passes[-1][layer], ids = ids[:room], ids[room:]
            room -= len(passes[-1][layer])
    return passes


def _layer_files(
    model: HookedTransformer, replacement: ReplacementSet, layer: int, scan: _LayerScan, scan_id: str, options: FeatureFileOptions
) -> Iterator[tuple[tuple[int, int], FeatureFile]]:
    vocab: dict[int, str] = {}
    _vocabulary(model, torch.cat([scan.top.tokens.flatten(), scan.sample.tokens.flatten()]).unique().tolist(), vocab)
    lens, de_embed = weight_views(model, replacement, layer, scan.features)
    for j, index in enumerate(scan.features.tolist()):
        act_max = float(scan.top.values[j].max().clamp_min(0))
        n_active = int(scan.n_active[j])
        quantiles = scan.histogram.quantiles(j, _PERCENTILES).clamp(max=act_max)  # the max is exact
        if n_active:
            quantiles[-1] = act_max
        logit_lens, de_embedding = _scored(model, lens[j], options.n_logits), _scored(model, de_embed[j], options.n_logits)
        yield (layer, index), {
            "transcoder_id": scan_id,
            "index": cantor_pair(layer, index),
            "examples_quantiles": _quantile_groups(scan, j, options.n_quantiles, vocab),
            "top_logits": [t["token"] for t in logit_lens["top"]],
            "bottom_logits": [t["token"] for t in logit_lens["bottom"]],
            "act_min": 0.0,
            "act_max": round(act_max, _DIGITS),
            "quantile_values": [round(float(v), _DIGITS) for v in quantiles],
            "histogram": [float(c) for c in scan.histogram.rebinned(j, options.n_bins, act_max)],
            "activation_frequency": n_active / scan.n_tokens,
            "layer": layer,
            "feature": index,
            "hook_name": replacement.hook_in(layer),
            "n_tokens": scan.n_tokens,
            "n_active": n_active,
            "logit_lens": logit_lens,
            "de_embedding": de_embedding,
        }


def iter_feature_files(
    model: HookedTransformer,
    transcoders: "ReplacementSet | Sequence[SAE | Splice]",  # type: ignore[type-arg]
    features: Mapping[int, Sequence[int]],
    tokens: torch.Tensor,
    transcoder_ids: Mapping[int, str] | str,
    options: FeatureFileOptions = FeatureFileOptions(),
    progress: bool = True,
) -> Iterator[tuple[tuple[int, int], FeatureFile]]:
    """``((layer, index), file)`` for ``features`` (layer -> ids), one pass over ``tokens``
    ``[n_seq, seq]`` per ``options.features_per_pass`` features, each pass's files yielded
    before the next starts. ``transcoder_ids`` is each layer's scan (``paths.scan_for_layer``),
    recorded as the file's ``transcoder_id``."""
    replacement = _as_set(transcoders)
    passes = _passes(_check_features(replacement, features), options.features_per_pass)
    for i, chosen in enumerate(passes):
        desc = "feature files" if len(passes) == 1 else f"feature files, pass {i + 1}/{len(passes)}"
        scans = scan_features(model, replacement, {layer: ids.tolist() for layer, ids in chosen.items()}, tokens, options, progress, desc)
        for layer, scan in scans.items():
            scan_id = transcoder_ids if isinstance(transcoder_ids, str) else transcoder_ids[layer]
            yield from _layer_files(model, replacement, layer, scan, scan_id, options)


def build_feature_files(
    model: HookedTransformer,
    transcoders: "ReplacementSet | Sequence[SAE | Splice]",  # type: ignore[type-arg]
    features: Mapping[int, Sequence[int]],
    tokens: torch.Tensor,
    transcoder_ids: Mapping[int, str] | str,
    options: FeatureFileOptions = FeatureFileOptions(),
    progress: bool = True,
) -> dict[tuple[int, int], FeatureFile]:
    """``iter_feature_files`` as one dict keyed by ``(layer, index)`` (for few features)."""
    return dict(iter_feature_files(model, transcoders, features, tokens, transcoder_ids, options, progress))


def _write(files: Iterable[tuple[tuple[int, int], FeatureFile]], folder: Path) -> list[Path]:
    written = []
    for (layer, index), data in files:
        path = feature_file_path(folder, data["transcoder_id"], layer, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, ensure_ascii=False, allow_nan=False), encoding="utf-8")
        written.append(path)
    return written


def write_feature_files(
    model: HookedTransformer,
    transcoders: "ReplacementSet | Sequence[SAE | Splice]",  # type: ignore[type-arg]
    tokens: torch.Tensor,
    out_dir: str | Path,
    scan: str | Mapping[int, str],
    features: Mapping[int, Sequence[int]] | None = None,
    options: FeatureFileOptions = FeatureFileOptions(),
    progress: bool = True,
) -> list[Path]:
    """Write the files of ``features`` (default: every feature of every layer) under
    ``out_dir/features/<scan>/<cantor(layer, index)>.json`` and return their paths.

    ``scan`` is the graphs' ``metadata.scan`` (one id for the whole set) or, for graphs with a
    ``custom-`` scan, each layer's ``transcoder_list`` entry.
    """
    replacement = _as_set(transcoders)
    if features is None:
        features = {layer: range(replacement.d_sae(layer)) for layer in replacement.layers}
    return _write(iter_feature_files(model, replacement, features, tokens, scan, options, progress), Path(out_dir))


def graph_features(graph: Mapping[str, Any]) -> dict[int, list[int]]:
    """The transcoder features (layer -> raw indices) among a graph JSON's nodes.

    Warns once when the graph's ``feature`` fields are not cantor-paired ids: files are named
    by the cantor id, which is where circuit-tracer's viewer looks, so such a graph (written
    before it followed that convention) opens in our viewer but not in circuit-tracer's.
    """
    features: dict[int, set[int]] = {}
    unpaired = []
    for node in graph.get("nodes", []):
        found = node_feature(node)
        if found is not None:
            layer, index = found
            features.setdefault(layer, set()).add(index)
            if node.get("feature") != cantor_pair(layer, index):
                unpaired.append(str(node["node_id"]))
    if unpaired:
        warnings.warn(
            f"{len(unpaired)} feature nodes (e.g. {unpaired[0]}) have a 'feature' that is not cantor(layer, index): "
            "circuit-tracer's viewer will not find their feature files; re-export the graph with cantor ids.",
            stacklevel=2,
        )
    return {layer: sorted(ids) for layer, ids in sorted(features.items())}


def write_graph_feature_files(
    graph_json_path: str | Path,
    model: HookedTransformer,
    transcoders: "ReplacementSet | Sequence[SAE | Splice]",  # type: ignore[type-arg]
    dataset_tokens: torch.Tensor,
    out_dir: str | Path | None = None,
    options: FeatureFileOptions = FeatureFileOptions(),
    progress: bool = True,
) -> list[Path]:
    """Write the feature files of every transcoder feature in the graph at ``graph_json_path``
    where its viewer looks for them (``out_dir``, default the graph's folder, is the folder
    served), and return their paths."""
    graph_json_path = Path(graph_json_path)
    graph = json.loads(graph_json_path.read_text(encoding="utf-8"))
    if not isinstance(graph, dict) or "metadata" not in graph or "nodes" not in graph:
        raise ValueError(f"{graph_json_path} is not a graph JSON (it needs 'metadata' and 'nodes').")
    features = graph_features(graph)
    if not features:
        raise ValueError(f"{graph_json_path} has no transcoder-feature nodes, so there are no feature files to write.")
    scans = {layer: scan_for_layer(graph["metadata"], layer) for layer in features}
    for layer, scan in scans.items():
        feature_file_path(".", scan, layer, 0)  # a non-portable scan fails here, before the pass
    files = iter_feature_files(model, transcoders, features, dataset_tokens, scans, options, progress)
    return _write(files, graph_json_path.parent if out_dir is None else Path(out_dir))
