"""Case study: why SmolLM2-135M closes ``print(len(items`` with ``))`` rather than ``)``.

The metric is the logit difference ``"))" − ")"`` at the last token: the model has to know
that two brackets are open. The script traces the prompt through the plugin-trained
transcoders (one per early MLP, from ``benchmarks/all_layers_smollm2.py``), prints the
strongest paths, writes the attribution graph (viewer JSON, HTML, PNG) and dashboards of the
top features, and then checks the circuit by ablation: removing the writes of the features
the graph ranks highest should lower the metric far more than removing random active
features of about the same activation at the same layers and tokens.

    python examples/smollm2_bracket_circuit.py --out examples/output/bracket
"""

import argparse
import json
import random
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from transformer_lens import HookedTransformer

from sae_lens_transcoder.circuits import logit_target, trace_prompt
from sae_lens_transcoder.circuits.dashboard import feature_dashboard, save_dashboard_html
from sae_lens_transcoder.circuits.graph import build_graph
from sae_lens_transcoder.circuits.graph_json import save_graph_json
from sae_lens_transcoder.circuits.graph_plot import format_paths, save_graph_html, save_graph_png
from sae_lens_transcoder.circuits.paths import find_paths
from sae_lens_transcoder.circuits.trace import Trace
from sae_lens_transcoder.models import load_model
from sae_lens_transcoder.report import heldout_tokens, load_heldout_split
from sae_lens_transcoder.splicing import Splice, ablated_features

PROMPTS = ["print(len(items", "total = sum(map(int", "if not isinstance(value", "x = list(range(n"]
TWO, ONE = "))", ")"

Feature = tuple[int, int, int]  # (layer, token position, feature id)


def _metric(model: HookedTransformer, tokens: torch.Tensor, splices: list[Splice], ablate: list[Feature]) -> float:
    with torch.no_grad(), ablated_features(model, splices, ablate):
        logits = model(tokens[None])[0, -1]
    return float(logits[model.to_single_token(TWO)] - logits[model.to_single_token(ONE)])


def _matched_random(trace: Trace, chosen: list[Feature], rng: random.Random) -> list[Feature]:
    """For each chosen feature, another active feature at the same layer and token whose
    activation is closest to it among a random half of the candidates (so draws differ)."""
    picked: list[Feature] = []
    taken = set(chosen)
    for layer, pos, feature in chosen:
        acts = trace.feature_acts[layer][pos]
        target = float(acts[feature])
        candidates = [int(i) for i in acts.nonzero().flatten() if (layer, pos, int(i)) not in taken]
        pool = rng.sample(candidates, max(1, len(candidates) // 2))
        best = min(pool, key=lambda i: abs(float(acts[i]) - target))
        picked.append((layer, pos, best))
        taken.add((layer, pos, best))
    return picked


def _ablation_study(model: HookedTransformer, splices: list[Splice], prompt: str, top_n: int, n_random: int, seed: int) -> dict[str, Any]:
    trace = trace_prompt(model, splices, prompt)
    root = logit_target(trace, trace.n_pos - 1, model.to_single_token(TWO), versus=model.to_single_token(ONE))
    graph = build_graph(trace, root, max_expansions=96)
    features = sorted((n for n in graph.influence if n.kind == "feature" and n.pos > 0), key=lambda n: -graph.influence[n])
    chosen = [(n.layer, n.pos, n.index) for n in features[:top_n]]
    clean = _metric(model, trace.tokens, splices, [])
    ablated = _metric(model, trace.tokens, splices, chosen)
    rng = random.Random(seed)
    random_drops = [clean - _metric(model, trace.tokens, splices, _matched_random(trace, chosen, rng)) for _ in range(n_random)]
    return {
        "prompt": prompt,
        "tokens": trace.str_tokens(),
        "metric_clean": clean,
        "chosen_features": [{"layer": l, "pos": p, "feature": f, "activation": float(trace.feature_acts[l][p, f]),
                             "influence": graph.influence[n]} for (l, p, f), n in zip(chosen, features)],
        "metric_top_ablated": ablated,
        "drop_top": clean - ablated,
        "drop_random_mean": sum(random_drops) / len(random_drops),
        "drop_random_max": max(random_drops),
        "drop_random_all": random_drops,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transcoders", default=".cache/transcoders/smollm2-135m", help="folder of layer{L} SAELens dirs")
    parser.add_argument("--out", default="examples/output/bracket")
    parser.add_argument("--top-n", type=int, default=10, help="features ablated")
    parser.add_argument("--n-random", type=int, default=20, help="random draws of matched features")
    parser.add_argument("--dashboards", type=int, default=3, help="dashboards for the top features")
    parser.add_argument("--node-threshold", type=float, default=0.5, help="graph pruning: share of influence kept")
    parser.add_argument("--max-edges", type=int, default=300, help="edges drawn in the pictures")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model = load_model("smollm2-135m", cache_dir=".cache/models")
    dirs = sorted(Path(args.transcoders).glob("layer*"), key=lambda p: int(p.name[5:]))
    if not dirs:
        raise SystemExit(f"no transcoders in {args.transcoders}: run benchmarks/all_layers_smollm2.py first")
    splices = [Splice.from_sae(SAE.load_from_disk(str(d))) for d in dirs]
    layers = [s.layer for s in splices]

    prompt = PROMPTS[0]
    trace = trace_prompt(model, splices, prompt)
    tokens = trace.str_tokens()
    root = logit_target(trace, trace.n_pos - 1, model.to_single_token(TWO), versus=model.to_single_token(ONE))
    paths = find_paths(trace, root, num_iters=4, num_branches=12)
    listing = format_paths(paths[:25], tokens)
    (out / "paths.txt").write_text(listing + "\n")
    graph = build_graph(trace, root, max_expansions=96)  # unpruned: the writers prune it themselves
    label = f"{TWO} − {ONE}"
    save_graph_json(graph, out / "graph.json", trace=trace, prompt=prompt, target_token=model.to_single_token(TWO), target_label=label,
                    scan=[str(d) for d in dirs], node_threshold=args.node_threshold, edge_threshold=0.9)
    title = f"SmolLM2-135M: {prompt!r} -> {label}"
    save_graph_html(graph, out / "graph.html", title=title, max_edges=args.max_edges)
    save_graph_png(graph, out / "graph.png", title=title, max_edges=args.max_edges)

    studies = [_ablation_study(model, splices, p, args.top_n, args.n_random, args.seed) for p in PROMPTS]
    heldout = heldout_tokens(model, load_heldout_split("embedded"), 64, 8192, True)
    top_features = [f for f in studies[0]["chosen_features"]][: args.dashboards]
    by_layer = {s.layer: s for s in splices}
    for f in top_features:
        upstream = [s for s in splices if s.layer < f["layer"]]
        board = feature_dashboard(model, by_layer[f["layer"]], f["feature"], heldout, upstream=upstream[-1:], k=8)
        save_dashboard_html(board, out / f"feature_L{f['layer']}_{f['feature']}.html")

    result = {"model": "smollm2-135m", "transcoder_layers": layers, "metric": label, "root_value": graph.root_value,
              "graph_nodes": len(graph.nodes), "graph_edges": len(graph.edges), "studies": studies}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"transcoders for MLPs {layers}; {prompt!r}: {label} = {graph.root_value:+.3f}")
    print(listing)
    for s in studies:
        print(f"{s['prompt']!r}: metric {s['metric_clean']:+.3f}; ablating top {args.top_n} features -> drop {s['drop_top']:+.3f}; "
              f"{args.n_random} matched random sets -> mean drop {s['drop_random_mean']:+.3f} (max {s['drop_random_max']:+.3f})")


if __name__ == "__main__":
    main()
