"""Our direct effects through a cross-layer transcoder next to circuit-tracer's CLT attribution.

The CLT counterpart of ``circuit_tracer_side_by_side.py`` (same conventions, same comparison
and summary code, the same circuit-tracer worker): for the bundled tiny-gpt2 and for
SmolLM2-135M a random CLT over every MLP is saved with ``save_clt`` (circuit-tracer's CLT
layout; circuit-tracer reads one CLT over all layers), circuit-tracer (its own venv,
``_circuit_tracer_worker.py``, which loads the files through ``load_transcoders_from_cache``)
builds the attribution graph of a prompt with ``attribute()``, and ours computes the same rows
from the same files (``load_clt`` + ``trace_prompt`` + ``total_effects_batch``). Written:

(a) agreement of feature->logit, feature->feature, error and token direct effects, relative to
    each target row's largest |effect| (a CLT feature's edge sums its writes into every later
    layer in both);
(b) wall time and peak RSS of circuit-tracer's ``attribute()`` and of our equivalent job, each
    in a fresh process, alternating, 1 torch thread each, and their ratios.

    PYTHONPATH=. python benchmarks/clt_vs_circuit_tracer_attribution.py \
        [--models tiny-gpt2 smollm2-135m] [--repeats 3] [--ct-python /work/ct-venv/bin/python]

Results go to ``benchmarks/results/clt_circuit_tracer/attribution.{json,md}``; the CLT files,
model weights and graphs to ``--workdir`` (not committed). The random CLTs: unit random
encoder columns with ``b_enc`` at ``z`` standard deviations above each feature's mean
projection on a calibration text's MLP inputs (not the prompt), random decoders scaled so
each layer's summed reconstruction is about as large as its MLP output, ``b_dec = 0``; ReLU,
or JumpReLU with thresholds at ``z`` standard deviations (and ``b_enc`` at the mean).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
from circuit_tracer_side_by_side import CALIBRATION, NOTES, _fmt_rel, drive, load, run, summarise

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "_circuit_tracer_worker.py"
RESULTS = ROOT / "benchmarks" / "results" / "clt_circuit_tracer"

MODELS: dict[str, dict[str, Any]] = {
    "tiny-gpt2": dict(prompt="The cat sat on the mat because it was warm and the dog was", d_sae=2048, z=2.0,
                      activation="relu", max_feature_nodes=None, ct_batch_size=32),
    "tiny-gpt2-jumprelu": dict(model="tiny-gpt2", prompt="The cat sat on the mat because it was warm and the dog was",
                               d_sae=2048, z=2.0, activation="jumprelu", max_feature_nodes=None, ct_batch_size=32),
    # ~1.7% of 30 x 512 features fire per prompt token: every active feature gets its row (the full graph)
    "smollm2-135m": dict(prompt="The capital of France is Paris, and the capital of Germany is", d_sae=512, z=2.5,
                         activation="relu", max_feature_nodes=None, ct_batch_size=32),
}


# ----------------------------------------------------------------------------- prepare


def random_clt(model: Any, spec: dict[str, Any], x: torch.Tensor, y: torch.Tensor) -> Any:
    """A random CLT over every MLP of ``model``, calibrated on ``x``/``y`` ``[pos, L, d]``."""
    from sae_lens_transcoder.replacement.cross_layer import CLT_HOOKS_KEY
    from sae_lens_transcoder.saes.clt import CLT_CLASSES, TrainingCrossLayerTranscoder

    n_layers, d, d_sae, z = model.cfg.n_layers, model.cfg.d_model, spec["d_sae"], spec["z"]
    architecture = "jumprelu_clt" if spec["activation"] == "jumprelu" else "clt"
    cfg = CLT_CLASSES[architecture][1](d_in=d, d_sae=d_sae, n_layers=n_layers)
    cfg.metadata[CLT_HOOKS_KEY] = [[f"blocks.{i}.mlp.hook_in", f"blocks.{i}.hook_mlp_out"] for i in range(n_layers)]
    clt = TrainingCrossLayerTranscoder(cfg)
    g = torch.Generator().manual_seed(2000)
    expected_l0 = d_sae * 0.5 * math.erfc(z / math.sqrt(2))
    with torch.no_grad():
        W_enc = torch.randn(n_layers, d, d_sae, generator=g)
        W_enc /= W_enc.norm(dim=1, keepdim=True)
        pre = torch.einsum("pld,lds->pls", x, W_enc)
        clt.W_enc.copy_(W_enc)
        if architecture == "jumprelu_clt":
            clt.b_enc.copy_(-pre.mean(0))
            clt.log_threshold.copy_(torch.log(z * pre.std(0)))
        else:
            clt.b_enc.copy_(-(pre.mean(0) + z * pre.std(0)))
        target_norm = y.norm(dim=-1).median(0).values  # [L]
        for i, decoder in enumerate(clt.W_dec):
            W = torch.randn(decoder.shape, generator=g)  # [d_sae, L - i, d]
            n_sources = torch.arange(i, n_layers, dtype=torch.float32) + 1  # sources writing into each output
            W *= (target_norm[i:] / torch.sqrt(expected_l0 * n_sources))[None, :, None] / W.norm(dim=-1, keepdim=True)
            decoder.copy_(W)
        clt.b_dec.zero_()
    clt._data_init_pending = False
    return clt.eval()


def prepare(name: str, workdir: Path) -> dict[str, Any]:
    """Save the CLT, the model's weights and config, the prompt and our logits."""
    from safetensors.torch import save_file

    from sae_lens_transcoder.hooks import ensure_mlp_hook_in
    from sae_lens_transcoder.saes.clt_files import save_clt

    spec = MODELS[name]
    model_name = spec.get("model", name)
    model = load(model_name)
    ensure_mlp_hook_in(model)
    n_layers = model.cfg.n_layers
    names = [f"blocks.{i}.{h}" for i in range(n_layers) for h in ("mlp.hook_in", "hook_mlp_out")]
    with torch.no_grad():
        _, cache = model.run_with_cache(model.to_tokens(CALIBRATION), names_filter=names)
    x = torch.stack([cache[f"blocks.{i}.mlp.hook_in"][0, 1:] for i in range(n_layers)], dim=1)
    y = torch.stack([cache[f"blocks.{i}.hook_mlp_out"][0, 1:] for i in range(n_layers)], dim=1)
    save_clt(random_clt(model, spec, x, y), workdir / "transcoders", scan=f"random-clt-{name}")
    tokens = model.to_tokens(spec["prompt"])[0]
    with torch.no_grad():
        logits = model(tokens[None])[0]
    cfg = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in model.cfg.to_dict().items()}
    cfg = json.loads(json.dumps(cfg, default=lambda v: float(v) if hasattr(v, "__float__") else str(v)))
    (workdir / "model_cfg.json").write_text(json.dumps(cfg, indent=1))
    save_file({k: v.detach().clone().contiguous() for k, v in model.named_parameters()}, str(workdir / "model.safetensors"))
    save_file({"tokens": tokens.contiguous(), "logits": logits.contiguous()}, str(workdir / "reference.safetensors"))
    setup = {
        "model": model_name, "variant": name, "prompt": spec["prompt"], "tokens": model.to_str_tokens(tokens),
        "n_pos": int(tokens.shape[0]), "n_layers": n_layers, "d_model": model.cfg.d_model, "d_sae": spec["d_sae"],
        "activation": spec["activation"],
        "clt_bytes": sum(p.stat().st_size for p in (workdir / "transcoders").glob("*.safetensors")),
        "random_clt": f"{spec['activation']}, z = {spec['z']} (see the module docstring)",
    }
    (workdir / "setup.json").write_text(json.dumps(setup, indent=1))
    return setup


# ----------------------------------------------------------------------------- driver

CLT_NOTES = [
    "- **De-meaned logits.** circuit-tracer's logit target is `W_U[:, t] − mean_v W_U[:, v]` after the final norm "
    "with its scale frozen; ours is `unembed_target(trace, pos, W_U[:, t] − W_U.mean(1))` (see the per-layer "
    "side-by-side for what the raw logit gives instead).",
    "- **CLT features.** A CLT feature is one node with one activation; its edge into a target sums its writes "
    "into every later MLP output (circuit-tracer injects one decoder vector per (feature, output layer)). "
    "circuit-tracer reads a CLT over every layer of the model, so these CLTs cover all MLPs.",
    "- **Full graphs.** The CLTs are small enough (SmolLM2: ~3.5k active features) for every active feature to get "
    "its row on both sides (max_feature_nodes=None), so every edge of circuit-tracer's graph is compared.",
    "- **Timing and memory.** Wall time of circuit-tracer's `attribute()` alone and of our trace_prompt + targets + "
    "`total_effects_batch`, model and CLT loading excluded; fresh process per run, sides alternating, 1 torch thread "
    "each on the shared 2-core machine. Peak RSS (VmHWM) is reset once everything is loaded, so 'peak − loaded' is "
    "what the attribution adds. circuit-tracer's loader keeps CLT decoders on disk (lazy) and reads the active "
    "features' rows; `load_clt` keeps safetensors' memory maps of the decoder files (SmolLM2: 557 MiB), and a trace "
    "reads only the active features' rows of them (its pages count in 'peak − loaded' as they are read). "
    "SmolLM2 takes ~4-6 min per circuit-tracer run here: "
    "`--models smollm2-135m --repeats 1` keeps a run within ~10 minutes.",
]


def side_by_side(name: str, args: argparse.Namespace) -> dict[str, Any]:
    spec = MODELS[name]
    workdir = args.workdir / name
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"[{name}] saving a random CLT and the weights to {workdir}", flush=True)
    setup = prepare(name, workdir)
    threads = str(args.threads)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    ct_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    ct_cmd = [args.ct_python, str(WORKER), str(workdir), "--batch-size", str(spec["ct_batch_size"]),
              "--max-n-logits", str(args.max_n_logits), "--desired-logit-prob", str(args.desired_logit_prob), "--threads", threads]
    if spec["max_feature_nodes"] is not None:
        ct_cmd += ["--max-feature-nodes", str(spec["max_feature_nodes"])]
    ct_first = workdir / "ct_0.pt"

    def ct(r: int) -> dict[str, Any]:
        path = workdir / f"ct_{r}.pt"
        load_before = os.getloadavg()[0]
        run([*ct_cmd, str(path), *(["--save-graph"] if r == 0 else [])], ct_env)
        info = torch.load(path, weights_only=False)["info"]
        info["loadavg_1min_before"] = load_before
        print(f"[{name}]   circuit-tracer run {r}: {info['seconds']:.2f} s, peak RSS {info['peak_rss_kib'] / 1024:.0f} MiB", flush=True)
        return info

    def ours(r: int) -> dict[str, Any]:
        path = workdir / f"ours_{r}.json"
        cmd = [sys.executable, __file__, "_ours", str(workdir), str(ct_first), str(path), "--batch-size", str(args.batch_size)]
        load_before = os.getloadavg()[0]
        run([*cmd, "--threads", threads, *(["--compare"] if r == 0 else [])], env)
        info = json.loads(path.read_text())
        info["loadavg_1min_before"] = load_before
        print(f"[{name}]   ours run {r}: {info['seconds']:.2f} s, peak RSS {info['peak_rss_kib'] / 1024:.0f} MiB", flush=True)
        return info

    ct_runs, our_runs = [ct(0)], [ours(0)]
    for r in range(1, args.repeats):  # alternate who goes first, so background load hits both
        first, second = (ours, ct) if r % 2 else (ct, ours)
        a, b = first(r), second(r)
        (our_runs if first is ours else ct_runs).append(a)
        (ct_runs if first is ours else our_runs).append(b)
    return summarise(setup, ct_runs, our_runs, args)


def table(results: dict[str, Any]) -> str:
    lines = ["# CLT attribution: ours vs circuit-tracer 0.5.0, same CLT files and prompt", "",
             "## (a) Agreement of direct effects", "",
             "Relative error = |ours − circuit-tracer| / (largest |circuit-tracer effect| in that target row). "
             "Sources and targets at positions ≥ 1 (circuit-tracer has no BOS nodes).", "",
             "| model | edges | max rel. error | within 1e-4 | rows × sources |", "|---|---|---|---|---|"]
    for name, r in results["models"].items():
        a = r["agreement"]
        for label, k in (("feature → logit (de-meaned)", "feature_to_logit"), ("feature → feature", "feature_to_feature"),
                         ("error → logit", "error_to_logit"), ("error → feature", "error_to_feature"),
                         ("token → logit", "token_to_logit")):
            lines.append(f"| {name} | {label} | {_fmt_rel(a[k])} |")
    lines += ["", "## (b) Wall time and peak memory (fresh process each, CPU, 1 torch thread each)", "",
              "| model | side | rows | median s (runs) | peak RSS MiB | peak − loaded MiB | time ratio ct/ours | mem. ratio ours/ct (peak − loaded) | total peak ratio ours/ct |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["models"].items():
        ct, ours, ratio = r["circuit_tracer"], r["ours"], r["ratios"]
        lines.append(f"| {name} | circuit-tracer (batch {ct['batch_size']}) | {ct['n_selected_features'] + ct['n_logits']} | "
                     f"{ct['median_seconds']:.2f} ({', '.join(f'{s:.2f}' for s in ct['seconds'])}) | "
                     f"{ct['median_peak_rss_mib']:.0f} | {ct['median_peak_increase_mib']:.0f} | | | |")
        lines.append(f"| {name} | ours (batch {ours['batch_size']}) | {ours['n_rows']} | {ours['median_seconds']:.2f} "
                     f"({', '.join(f'{s:.2f}' for s in ours['seconds'])}) | {ours['median_peak_rss_mib']:.0f} | "
                     f"{ours['median_peak_increase_mib']:.0f} | {ratio['time_ct_over_ours_median']:.1f}× | "
                     f"{ratio['peak_increase_ours_over_ct']:.2f} | {ratio['peak_rss_ours_over_ct']:.2f} |")
    lines += ["", "## Setup", ""]
    for name, r in results["models"].items():
        s, ct, acts = r["setup"], r["circuit_tracer"], r["agreement"]["activations"]
        lines.append(f"- **{name}**: {s['n_pos']} tokens ({s['prompt']!r} with BOS); a random {s['activation']} CLT over all "
                     f"{s['n_layers']} MLPs, d_sae {s['d_sae']} per layer ({s['clt_bytes'] / 2**20:.0f} MiB of files); "
                     f"{ct['n_active_features']} active features at positions ≥ 1 (ours also has "
                     f"{acts['ours_active_at_pos_0_bos']} at BOS; activations differ by at most {acts['max_abs_diff']:.1e}, "
                     f"max activation {acts['max_activation']:.1f}; active in one only: "
                     f"{acts['ct_active_not_ours'] + acts['ours_active_not_ct']}); circuit-tracer rows: {ct['n_logits']} "
                     f"logits + {ct['n_selected_features']} features (max_feature_nodes={ct['max_feature_nodes']}); "
                     f"logits of circuit-tracer's model vs ours: max |diff| {ct['logits_max_abs_diff_vs_ours']:.1e}.")
    lines.append(f"- command: `{results['command']}`")
    shared = [n for n in NOTES if n.startswith(("- **BOS", "- **Tokens"))]
    lines += ["", "## Notes", "", *shared, *CLT_NOTES]
    return "\n".join(lines) + "\n"


def main() -> None:
    drive(__doc__.split("\n\n")[0], MODELS, side_by_side, table, "clt_vs_circuit_tracer_attribution.py",
          Path("/tmp/clt_vs_circuit_tracer"), RESULTS, stem=("attribution", "attribution"))


if __name__ == "__main__":
    main()
