"""A cross-layer transcoder against a per-layer transcoder set on SmolLM2-135M's first N MLPs.

Both are trained on the same tokens (same recipe, seed and activation-store order: the main
job's configs/smollm2-135m-layer3.yaml with ``--tokens``, ``--d-sae`` and the warm-ups scaled
to the budget) with TopK and the same ``k`` at every layer, so their total L0 is equal by
construction (``k · N`` features per token): ``topk_clt`` (features write into their layer and
every later covered one) and ``topk_transcoder`` (one transcoder per layer). Both read the raw
activations (``normalize_activations: none``, which CLTs need).

Measured on held-out text of the ``test`` split:

* per-layer FVU and L0, all N replaced at once: CE loss recovered and KL (``evaluate_spliced``);
* on ``--prompts`` held-out prompts, circuit-tracer's graph measures, computed here with its
  definitions (circuit_tracer/graph.py, 0.5.0) on our exact direct effects
  (``total_effects_batch``, the rows circuit-tracer's ``attribute`` computes; the side-by-side
  benchmarks check they agree to 1e-4): nodes are every active feature and error at positions
  ≥ 1 (circuit-tracer zeroes BOS), the tokens and the top logits (cumulative probability 0.95,
  at most 10, de-meaned, weighted by probability); the adjacency is |direct effect| normalised
  per target row; a node's influence is its weight summed over all paths to the logits. Reported:
  how many feature and error nodes carry 80% of the influence (circuit-tracer's node threshold
  0.8, before edge pruning), the replacement score (token influence over token + error
  influence) and the completeness score (influence-weighted non-error share of each node's
  inputs). MLPs beyond the first N are whole-MLP error nodes in both, the same for both.

    PYTHONPATH=. python benchmarks/clt_vs_set_smollm2.py [--layers 6 --d-sae 768 --k 16 --tokens 49152 --prompts 12]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from sae_lens.util import get_special_token_ids

from sae_lens_transcoder import TranscoderTrainingRunner
from sae_lens_transcoder.circuits import feature_target, trace_prompt, unembed_target
from sae_lens_transcoder.circuits.effects import active_features, total_effects_batch
from sae_lens_transcoder.config_io import load_config_file, runner_config_from_dict
from sae_lens_transcoder.data import load_text_split
from sae_lens_transcoder.evals import evaluate_spliced
from sae_lens_transcoder.loading import load_transcoder_set
from sae_lens_transcoder.models import load_model
from sae_lens_transcoder.replacement.base import ReplacementSet
from sae_lens_transcoder.report import heldout_tokens

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "smollm2-135m-layer3.yaml"
KINDS = {"set": "topk_transcoder", "clt": "topk_clt"}
TRAINING_ARGS = ("layers", "d_sae", "k", "tokens", "batch_tokens", "buffer_batches", "threads")
NODE_THRESHOLD = 0.8  # circuit-tracer's default node_threshold
LOGIT_PROB, MAX_LOGITS = 0.95, 10  # circuit-tracer's attribute() defaults


# ----------------------------------------------------------------------------- training


def train(kind: str, args: argparse.Namespace, model: Any) -> float:
    data = load_config_file(CONFIG)
    steps = args.tokens // args.batch_tokens
    data.update(
        training_tokens=args.tokens,
        train_batch_size_tokens=args.batch_tokens,
        lr_warm_up_steps=steps // 10,
        lr_decay_steps=steps // 5,
        n_batches_in_buffer=args.buffer_batches,
        n_checkpoints=0,
        checkpoint_path=str(Path(args.out) / "checkpoints" / kind),
        output_path=str(Path(args.out) / kind),
    )
    data["sae"] = {"architecture": KINDS[kind], "mlp_layer": None, "mlp_layers": f"0-{args.layers - 1}",
                   "d_in": model.cfg.d_model, "d_sae": args.d_sae, "k": args.k, "normalize_activations": "none"}
    start = time.perf_counter()
    TranscoderTrainingRunner(runner_config_from_dict(data), override_model=model, overwrite_output=True).run()
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- graph measures


def _influence(A: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each node's influence: ``weights`` pushed back along every path of the row-normalised
    |adjacency| (the graph is acyclic, so the sum of powers ends after at most depth steps);
    also that normalised adjacency."""
    normalised = A.abs() / A.abs().sum(1, keepdim=True).clamp_min(1e-10)
    total = torch.zeros_like(weights)
    step = weights @ normalised
    for _ in range(A.shape[0] + 1):
        if not step.any():
            return total, normalised
        total += step
        step = step @ normalised
    raise RuntimeError("influence did not converge: the adjacency is not acyclic")


def graph_measures(model: Any, replacement: ReplacementSet, tokens: torch.Tensor, batch_size: int) -> dict[str, Any]:
    """circuit-tracer's node count at 80% influence, replacement and completeness scores."""
    trace = trace_prompt(model, replacement, tokens)
    n_pos, n_layers, last = trace.n_pos, trace.n_layers, trace.n_pos - 1
    probs = torch.softmax(trace.logits[last].double(), -1)
    top_p, top_ids = probs.topk(MAX_LOGITS)
    n_logits = int((top_p.cumsum(0) < LOGIT_PROB).sum()) + 1
    n_logits = min(n_logits, MAX_LOGITS)
    top_p, top_ids = top_p[:n_logits], top_ids[:n_logits]
    W_U = model.W_U
    mean_column = W_U.mean(1)

    active = active_features(trace)
    nodes = (active[:, 1] >= 1).nonzero().flatten()  # circuit-tracer has no BOS features
    features = active[nodes]
    targets = [feature_target(trace, int(l), int(f), int(p)) for l, p, f in features.tolist()]
    targets += [unembed_target(trace, last, W_U[:, t] - mean_column) for t in top_ids.tolist()]
    with torch.no_grad():
        effects = total_effects_batch(trace, targets, batch_size=batch_size)
    assert torch.equal(effects.active, active)

    n_feat = len(features)
    n_err = n_layers * n_pos
    size = n_feat + n_err + n_pos + n_logits
    A = torch.zeros(size, size, dtype=torch.float64)
    rows = torch.cat([torch.arange(n_feat), torch.arange(size - n_logits, size)])
    A[rows, :n_feat] = effects.features[:, nodes].double()
    for layer in range(n_layers):
        if layer in effects.errors:
            A[rows, n_feat + layer * n_pos + 1 : n_feat + (layer + 1) * n_pos] = effects.errors[layer][:, 1:].double()
    A[rows, n_feat + n_err : n_feat + n_err + n_pos] = effects.embed.double()
    weights = torch.zeros(size, dtype=torch.float64)
    weights[size - n_logits :] = top_p

    influence, normalised = _influence(A, weights)
    ranked = influence.sort(descending=True).values
    cumulative = ranked.cumsum(0) / ranked.sum()
    cut = ranked[min(int(torch.searchsorted(cumulative, NODE_THRESHOLD)), len(ranked) - 1)]
    kept = influence >= cut
    errors = slice(n_feat, n_feat + n_err)
    # Within the replaced layers: how few features carry 80% of all features' influence.
    feature_share = influence[:n_feat].sort(descending=True).values.cumsum(0) / influence[:n_feat].sum().clamp_min(1e-30)
    token_influence = influence[n_feat + n_err : n_feat + n_err + n_pos].sum()
    error_influence = influence[errors].sum()
    non_error = 1 - normalised[:, errors].sum(1)
    output_influence = influence + weights
    return {
        "n_tokens": n_pos,
        "n_logits": n_logits,
        "active_features": n_feat,
        "nodes_80": int(kept[: n_feat + n_err].sum()),
        "feature_nodes_80": int(kept[:n_feat].sum()),
        "error_nodes_80": int(kept[errors].sum()),
        "features_for_80_of_feature_influence": int((feature_share < NODE_THRESHOLD).sum()) + 1 if n_feat else 0,
        "feature_influence_share": float(influence[:n_feat].sum() / influence[: n_feat + n_err + n_pos].sum()),
        "replacement_score": float(token_influence / (token_influence + error_influence)),
        "completeness_score": float((non_error * output_influence).sum() / output_influence.sum()),
    }


def held_out_prompts(model: Any, n: int, n_tokens: int) -> list[torch.Tensor]:
    """The first ``n_tokens`` tokens (BOS included) of ``n`` documents from the end of the test
    split (the evaluation tokens come from its start)."""
    docs = load_text_split("test")
    prompts = []
    for i in range(len(docs) - 1, -1, -1):
        tokens = model.to_tokens(docs[i]["text"], truncate=False)[0]
        if len(tokens) >= n_tokens:
            prompts.append(tokens[:n_tokens])
        if len(prompts) == n:
            break
    return prompts


# ----------------------------------------------------------------------------- report


def table(results: dict[str, Any]) -> str:
    a = results["args"]
    ev, graphs = results["eval"], results["graphs"]
    lines = [
        f"# Cross-layer transcoder vs per-layer set, SmolLM2-135M MLPs 0-{a['layers'] - 1}", "",
        f"Budget: first {a['layers']} of 30 MLPs; TopK, k = {a['k']} per layer for both (total L0 {a['k'] * a['layers']} "
        f"features per token), d_sae {a['d_sae']} per layer; {a['tokens']:,} training tokens each in batches of "
        f"{a['batch_tokens']} (same tokens, recipe configs/smollm2-135m-layer3.yaml, normalize_activations none; "
        f"{a['threads']} torch thread). Training wall time: set "
        f"{results['train_seconds']['set']:.0f} s, CLT {results['train_seconds']['clt']:.0f} s (2 shared CPU cores). "
        f"Held-out: {ev['set']['n_tokens']:,} scored tokens of the `test` split for the evals; {a['prompts']} prompts of "
        f"{a['prompt_tokens']} tokens (BOS included) for the graphs.", "",
        "| layer | FVU set | FVU CLT | L0 set | L0 CLT |", "|---|---|---|---|---|",
    ]
    for s, c in zip(ev["set"]["per_transcoder"], ev["clt"]["per_transcoder"]):
        lines.append(f"| {s['layer']} | {s['fvu']:.3f} | {c['fvu']:.3f} | {s['l0']:.1f} | {c['l0']:.1f} |")
    lines += ["", f"All {a['layers']} replaced at once:", "",
              "| | mean FVU | CE clean | CE spliced | CE zero-abl. | CE recovered (vs zero / vs mean abl.) | KL | nodes @80% (median) | of which features | "
              "of which errors | features for 80% of feature influence (median) | feature share of influence | "
              "replacement score | completeness score |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind in ("set", "clt"):
        e, g = ev[kind], graphs[kind]

        def med(key: str) -> float:
            return statistics.median(p[key] for p in g)

        lines.append(
            f"| {'per-layer set' if kind == 'set' else 'CLT'} | {statistics.mean(p['fvu'] for p in e['per_transcoder']):.3f} | "
            f"{e['ce_loss_clean']:.3f} | {e['ce_loss_spliced']:.3f} | {e['ce_loss_zero_ablation']:.3f} | "
            f"{e['ce_loss_recovered']:.1%} / {e['ce_loss_recovered_mean']:.1%} | {e['kl_div']:.3f} | "
            f"{med('nodes_80'):.0f} | {med('feature_nodes_80'):.0f} | {med('error_nodes_80'):.0f} | "
            f"{med('features_for_80_of_feature_influence'):.0f} | {statistics.mean(p['feature_influence_share'] for p in g):.3f} | "
            f"{statistics.mean(p['replacement_score'] for p in g):.3f} | {statistics.mean(p['completeness_score'] for p in g):.3f} |"
        )
    lines += ["", "Nodes @80%: feature and error nodes above circuit-tracer's 0.8 node-influence threshold (before edge "
              "pruning), median over the prompts (medians of the parts need not add up); fewer for the CLT on "
              f"{sum(c['nodes_80'] < p['nodes_80'] for p, c in zip(graphs['set'], graphs['clt']))} of {len(graphs['set'])} prompts; 'features for 80% of feature influence': the fewest active features "
              "whose influence sums to 80% of all active features' influence (the replaced layers' share of the graph); "
              "'feature share': features' influence over that of features, errors and tokens; scores are means over the prompts. Replacement and completeness are "
              "circuit-tracer's definitions, computed here on our exact direct effects; MLPs "
              f"{a['layers']}-29 stay unreplaced and are error nodes (whole MLP outputs) for both.", "",
              f"Command: `{results.get('train_command', results['command'])}`"
              + (f", evaluated again with `{results['command']}`" if "train_command" in results else "")]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> Path:
    """Three panels: per-layer FVU, nodes carrying 80% of the influence per prompt (CLT against
    set), and the replacement / completeness scores per prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev, graphs = results["eval"], results["graphs"]
    colours = {"set": "tab:blue", "clt": "tab:orange"}
    names = {"set": "per-layer set", "clt": "CLT"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for kind in KINDS:
        rows = ev[kind]["per_transcoder"]
        axes[0].plot([r["layer"] for r in rows], [r["fvu"] for r in rows], "o-", color=colours[kind], label=names[kind])
    axes[0].set(xlabel="layer", ylabel="FVU (lower is better)", title="Per-layer FVU, held-out tokens")
    axes[0].legend()
    nodes = {kind: [g["nodes_80"] for g in graphs[kind]] for kind in KINDS}
    axes[1].scatter(nodes["set"], nodes["clt"], color="tab:purple")
    low, high = min(min(v) for v in nodes.values()) * 0.95, max(max(v) for v in nodes.values()) * 1.05
    axes[1].plot([low, high], [low, high], "k--", linewidth=0.8, label="equal")
    axes[1].set(xlabel="nodes, per-layer set", ylabel="nodes, CLT", xlim=(low, high), ylim=(low, high),
                title=f"Nodes for 80% of influence ({len(nodes['set'])} prompts)")
    axes[1].legend()
    for offset, score in ((0, "replacement_score"), (1, "completeness_score")):
        for shift, kind in ((-0.15, "set"), (0.15, "clt")):
            values = [g[score] for g in graphs[kind]]
            axes[2].scatter([offset + shift] * len(values), values, color=colours[kind], alpha=0.5, s=14,
                            label=names[kind] if offset == 0 else None)
            axes[2].hlines(statistics.mean(values), offset + shift - 0.1, offset + shift + 0.1, color=colours[kind])
    axes[2].set_xticks([0, 1], ["replacement score", "completeness score"])
    axes[2].set(ylabel="score (higher is better)", title="circuit-tracer's graph scores (bar: mean)")
    axes[2].legend()
    a = results["args"]
    fig.suptitle(f"SmolLM2-135M MLPs 0-{a['layers'] - 1}: CLT vs per-layer set, TopK k={a['k']} per layer, "
                 f"d_sae {a['d_sae']}, {a['tokens']:,} training tokens each")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _metrics(everything: dict[str, Any], replacement: ReplacementSet) -> dict[str, Any]:
    keep = ("n_tokens", "ce_loss_clean", "ce_loss_spliced", "ce_loss_zero_ablation", "ce_loss_mean_ablation",
            "ce_loss_recovered", "ce_loss_recovered_mean", "kl_div", "fvu", "l0")
    out = {k: everything[k] for k in keep if k in everything}
    out["per_transcoder"] = [{"layer": layer, "fvu": m["fvu"], "l0": m["l0"], "dead": m.get("dead_features")}
                             for layer, m in zip(replacement.layers, everything["per_transcoder"])]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6, help="the first N MLPs")
    parser.add_argument("--d-sae", type=int, default=768, help="features per layer")
    parser.add_argument("--k", type=int, default=16, help="TopK per layer (both)")
    parser.add_argument("--tokens", type=int, default=49152, help="training tokens (each)")
    parser.add_argument("--batch-tokens", type=int, default=512, help="train_batch_size_tokens (the recipe's 1024 gives few steps here)")
    parser.add_argument("--buffer-batches", type=int, default=16, help="n_batches_in_buffer (the recipe's 64 holds 131k tokens)")
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=256, help="targets per total_effects_batch call")
    parser.add_argument("--out", default=".cache/clt_vs_set")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the transcoders already in --out")
    parser.add_argument("--results", default="benchmarks/results/clt_vs_set")
    parser.add_argument("--model-cache", default=".cache/models")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (on the shared 2-core machine one thread ran SmolLM2 4x faster than two)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model("smollm2-135m", cache_dir=args.model_cache)
    results: dict[str, Any] = {"command": "PYTHONPATH=. python benchmarks/clt_vs_set_smollm2.py " + " ".join(sys.argv[1:]),
                               "args": vars(args), "train_seconds": {}, "eval": {}, "graphs": {}}
    previous = Path(args.results) / "results.json"
    if args.eval_only and previous.is_file():  # the training budget is the earlier run's
        before = json.loads(previous.read_text())
        results["train_seconds"] = before["train_seconds"]
        results["args"].update({k: before["args"][k] for k in TRAINING_ARGS})
        results["train_command"] = before.get("train_command", before["command"])
    for kind in KINDS:
        if not args.eval_only:
            results["train_seconds"][kind] = train(kind, args, model)
            print(f"[{kind}] trained in {results['train_seconds'][kind]:.0f} s", flush=True)

    data = load_config_file(CONFIG)
    tokens = heldout_tokens(model, load_text_split("test"), data["context_size"], args.eval_tokens, data["prepend_bos"])
    exclude = get_special_token_ids(model.tokenizer)  # type: ignore[arg-type]
    prompts = held_out_prompts(model, args.prompts, args.prompt_tokens)
    for kind in KINDS:
        replacement = load_transcoder_set(Path(args.out) / kind)
        start = time.perf_counter()
        results["eval"][kind] = _metrics(evaluate_spliced(model, replacement, tokens, exclude_special_tokens=exclude), replacement)
        print(f"[{kind}] evaluated in {time.perf_counter() - start:.0f} s: CE recovered "
              f"{results['eval'][kind]['ce_loss_recovered']:.1%}", flush=True)
        start = time.perf_counter()
        results["graphs"][kind] = [graph_measures(model, replacement, p, args.batch_size) for p in prompts]
        print(f"[{kind}] {len(prompts)} graphs in {time.perf_counter() - start:.0f} s: median nodes @80% "
              f"{statistics.median(g['nodes_80'] for g in results['graphs'][kind])}", flush=True)

    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    text = table(results)
    (out / "table.md").write_text(text)
    plot(results, out / "clt_vs_set.png")
    print(text)


if __name__ == "__main__":
    main()
