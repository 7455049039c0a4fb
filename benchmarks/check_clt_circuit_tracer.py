"""Does circuit-tracer's own CLT loader read our cross-layer transcoder files, and does it
compute what ours computes?

Two steps in two environments (circuit-tracer pins older transformers/transformer-lens than
this package, so it lives in its own venv):

    # 1. in this package's venv: CLTs over both MLPs of the bundled tiny-gpt2 (one trained
    #    through TranscoderTrainingRunner, random ReLU / JumpReLU / TopK ones saved with a
    #    folded input_scale), saved with save_clt; the MLP inputs of a real prompt and our
    #    features and reconstructions saved next to them
    PYTHONPATH=. .venv/bin/python benchmarks/check_clt_circuit_tracer.py make /tmp/clt-ct-check
    # 2. in circuit-tracer's venv (it imports nothing from this package)
    /work/ct-venv/bin/python benchmarks/check_clt_circuit_tracer.py check /tmp/clt-ct-check \
        [--table benchmarks/results/clt_circuit_tracer/table.md]

``check`` loads every CLT directory with circuit-tracer's ``load_transcoders_from_cache``
(which reads our ``config.yaml``) and with ``load_clt`` itself (lazy and eager decoders),
in float32, and compares its ``encode``, ``encode_layer``, ``decode``, ``forward`` and
``compute_attribution_components`` with ours on the same inputs. Exit status 0: every
circuit-tracer-readable CLT matches to 1e-6 (absolute, or relative to the largest value
where values exceed 1). TopK CLTs are ours alone: circuit-tracer has no TopK CLT and reads
such files as ReLU, which the check reports (and expects to differ).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

TOL = 1e-6
PROMPT = "The cat sat on the mat because it was warm, and the dog slept by the door."


# ----------------------------------------------------------------------------- make (our venv)


def _random_clt(model: Any, architecture: str, d_sae: int, seed: int, x: torch.Tensor) -> Any:
    """A CLT over every MLP whose features fire on a few percent of the prompt's tokens:
    random unit encoder columns, ``b_enc`` at 2 standard deviations above each feature's
    mean projection, random decoders, random positive thresholds for JumpReLU."""
    from sae_lens_transcoder.replacement.cross_layer import CLT_HOOKS_KEY
    from sae_lens_transcoder.saes.clt import CLT_CLASSES, TrainingCrossLayerTranscoder

    n_layers, d = model.cfg.n_layers, model.cfg.d_model
    extra = {"clt": {}, "jumprelu_clt": {}, "topk_clt": {"k": 16}}[architecture]
    cfg = CLT_CLASSES[architecture][1](d_in=d, d_sae=d_sae, n_layers=n_layers, **extra)
    cfg.metadata[CLT_HOOKS_KEY] = [[f"blocks.{i}.mlp.hook_in", f"blocks.{i}.hook_mlp_out"] for i in range(n_layers)]
    clt = TrainingCrossLayerTranscoder(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        W_enc = torch.randn(n_layers, d, d_sae, generator=g)
        W_enc /= W_enc.norm(dim=1, keepdim=True)
        pre = torch.einsum("pld,lds->pls", x, W_enc)
        clt.W_enc.copy_(W_enc)
        clt.b_enc.copy_(-(pre.mean(0) + 2.0 * pre.std(0)))
        for decoder in clt.W_dec:
            decoder.copy_(0.1 * torch.randn(decoder.shape, generator=g))
        clt.b_dec.copy_(0.1 * torch.randn(clt.b_dec.shape, generator=g))
        if architecture == "jumprelu_clt":  # thresholds within the pre-activations' positive range
            clt.log_threshold.copy_(torch.log(0.5 * pre.std(0) * torch.rand(pre.shape[1:], generator=g) + 1e-3))
    clt._data_init_pending = False
    return clt.eval()


def _train_clt(model: Any, out: Path) -> Any:
    """A ReLU CLT trained briefly on the embedded text, saved by the runner itself."""
    from sae_lens_transcoder import TranscoderTrainingRunner
    from sae_lens_transcoder.config_io import runner_config_from_dict

    data = {
        "model_name": "tiny-gpt2", "dataset_path": "embedded", "is_dataset_tokenized": False, "streaming": False,
        "context_size": 64, "prepend_bos": True, "training_tokens": 8192, "train_batch_size_tokens": 256,
        "store_batch_size_prompts": 4, "n_batches_in_buffer": 4, "lr": 3e-3, "n_checkpoints": 0,
        "n_eval_batches": 1, "eval_batch_size_prompts": 4, "output_path": str(out), "checkpoint_path": None,
        "sae": {"architecture": "clt", "mlp_layer": None, "mlp_layers": "all", "d_in": model.cfg.d_model,
                "d_sae": 256, "l1_coefficient": 3e-4},
        "logger": {"log_to_wandb": False},
    }
    runner = TranscoderTrainingRunner(runner_config_from_dict(data), override_model=model, overwrite_output=True)
    return runner.run().eval()


def make(out: Path) -> None:
    from safetensors.torch import save_file

    from sae_lens_transcoder.hooks import ensure_mlp_hook_in
    from sae_lens_transcoder.models import load_model
    from sae_lens_transcoder.replacement.cross_layer import CrossLayerTranscoders, clt_replacement
    from sae_lens_transcoder.saes.clt_files import save_clt

    model = load_model("tiny-gpt2")
    ensure_mlp_hook_in(model)
    n_layers = model.cfg.n_layers
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("mlp.hook_in"))
    x = torch.stack([cache[f"blocks.{i}.mlp.hook_in"][0] for i in range(n_layers)], dim=1)  # [pos, L, d]

    clts: dict[str, tuple[CrossLayerTranscoders, str]] = {}
    trained = _train_clt(model, out / "trained_relu")
    clts["trained_relu"] = (clt_replacement(trained), "ReLU, trained by TranscoderTrainingRunner (8,192 tokens), files written by the runner")
    for name, architecture, scale, seed in (("relu", "clt", 2.5, 1), ("jumprelu", "jumprelu_clt", 0.7, 2), ("topk", "topk_clt", 1.0, 3)):
        # input_scale divides x before encoding in the training frame: feed it the scaled input
        clt = _random_clt(model, architecture, 512, seed, x * scale)
        save_clt(clt, out / name, input_scale=scale)
        clts[name] = (CrossLayerTranscoders(clt, clt.cfg.metadata["clt_hooks"], input_scale=scale),
                      f"{architecture}, random (d_sae 512), input_scale {scale} folded into the files")

    tensors: dict[str, torch.Tensor] = {"x": x.transpose(0, 1).contiguous()}  # circuit-tracer's [L, pos, d]
    with torch.no_grad():
        for name, (replacement, _) in clts.items():
            acts = {layer: replacement.encode(layer, x[:, i]) for i, layer in enumerate(replacement.layers)}
            for i, layer in enumerate(replacement.layers):
                tensors[f"{name}.acts.{i}"] = acts[layer].contiguous()
                tensors[f"{name}.recon.{i}"] = replacement.decode(layer, acts).contiguous()
    save_file(tensors, str(out / "reference.safetensors"))
    info = {"prompt": PROMPT, "n_pos": int(x.shape[0]), "n_layers": n_layers, "d_model": model.cfg.d_model,
            "clts": {name: {"what": what, "d_sae": replacement.d_sae(0), "ours_only": name == "topk",
                            "l0_per_layer": [float((tensors[f"{name}.acts.{i}"] > 0).sum(-1).float().mean()) for i in range(n_layers)]}
                     for name, (replacement, what) in clts.items()}}
    (out / "reference.json").write_text(json.dumps(info, indent=2))
    print(f"wrote {', '.join(clts)} and reference.safetensors to {out}")


# ----------------------------------------------------------------------------- check (circuit-tracer's venv)


def check(out: Path, table: Path | None) -> int:
    from safetensors.torch import load_file

    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
    from circuit_tracer.utils.caching import load_transcoders_from_cache

    info = json.loads((out / "reference.json").read_text())
    ref = load_file(str(out / "reference.safetensors"))
    x = ref["x"]
    n_layers = info["n_layers"]
    device = torch.device("cpu")
    rows: list[tuple[str, str, str, float, float, bool]] = []
    failures = 0

    def compare(name: str, loader: str, what: str, got: torch.Tensor, want: torch.Tensor, expect_equal: bool) -> None:
        nonlocal failures
        diff = float((got.float() - want.float()).abs().max())
        scale = float(want.abs().max())
        ok = diff <= TOL * max(1.0, scale)
        if expect_equal and not ok:
            failures += 1
        rows.append((name, loader, what, diff, scale, ok))
        status = "ok  " if ok else ("FAIL" if expect_equal else "differs (expected)")
        print(f"{status} [{name}] {loader} {what}: max |diff| {diff:.2e} (max |value| {scale:.2e})")

    for name, spec in info["clts"].items():
        expect = not spec["ours_only"]
        acts = torch.stack([ref[f"{name}.acts.{i}"] for i in range(n_layers)])  # [L, pos, d_sae]
        recon = torch.stack([ref[f"{name}.recon.{i}"] for i in range(n_layers)])  # [L, pos, d_model]
        cached, config = load_transcoders_from_cache(name, cache_dir=out, device=device, dtype=torch.float32)
        print(f"[{name}] config.yaml: {config}; circuit-tracer: {type(cached).__name__}, n_layers {cached.n_layers}, "
              f"d_transcoder {cached.d_transcoder}, activation "
              f"{'JumpReLU' if hasattr(cached.activation_function, 'threshold') else 'ReLU'}")
        loaders = {
            "load_transcoders_from_cache (lazy decoders)": cached,
            "load_clt (eager)": load_clt(str(out / name), feature_input_hook=config["feature_input_hook"],
                                         feature_output_hook=config["feature_output_hook"], device=device,
                                         dtype=torch.float32, lazy_decoder=False),
            "load_clt (lazy encoder + decoder)": load_clt(str(out / name), device=device, dtype=torch.float32,
                                                          lazy_decoder=True, lazy_encoder=True),
        }
        with torch.no_grad():
            for loader, clt in loaders.items():
                compare(name, loader, "encode", clt.encode(x), acts, expect)
                if loader.startswith("load_transcoders"):
                    for layer in range(n_layers):
                        compare(name, loader, f"encode_layer({layer})", clt.encode_layer(x[layer], layer), acts[layer], expect)
                compare(name, loader, "decode(our features)", clt.decode(acts.to_sparse()), recon, expect)
                compare(name, loader, "forward", clt(x), recon, expect)
            components = cached.compute_attribution_components(x, zero_positions=slice(0, 0))
            compare(name, "load_transcoders_from_cache (lazy decoders)", "attribution components: activations",
                    components["activation_matrix"].to_dense(), acts, expect)
            compare(name, "load_transcoders_from_cache (lazy decoders)", "attribution components: reconstruction",
                    components["reconstruction"], recon, expect)
    print("ALL MATCH" if failures == 0 else f"{failures} MISMATCHES")
    if table is not None:
        table.parent.mkdir(parents=True, exist_ok=True)
        table.write_text(_table(info, rows, failures))
    return 1 if failures else 0


def _table(info: dict[str, Any], rows: list[tuple[str, str, str, float, float, bool]], failures: int) -> str:
    from importlib.metadata import version

    lines = [
        "# Our CLT files, read by circuit-tracer's own loader", "",
        f"circuit-tracer {version('circuit-tracer')}, torch "
        f"{torch.__version__}, float32, CPU. Inputs: the exact MLP inputs (`mlp.hook_in`) of the bundled tiny-gpt2 "
        f"({info['n_layers']} layers, d_model {info['d_model']}) on a {info['n_pos']}-token prompt. "
        f"Pass: max |diff| ≤ {TOL:g} · max(1, max |value|).", "",
        "| CLT | what | L0 per layer (prompt) |", "|---|---|---|",
    ]
    for name, spec in info["clts"].items():
        lines.append(f"| {name} | {spec['what']} | {', '.join(f'{v:.1f}' for v in spec['l0_per_layer'])} |")
    # One row per CLT and quantity: the largest difference over the loaders (and layers) that computed it.
    worst: dict[tuple[str, str], tuple[float, float, bool, int]] = {}
    for name, _loader, what, diff, scale, ok in rows:
        key = (name, what.split("(")[0].strip() if what.startswith("encode_layer") else what)
        d, s, all_ok, n = worst.get(key, (0.0, 0.0, True, 0))
        worst[key] = (max(d, diff), max(s, scale), all_ok and ok, n + 1)
    lines += ["", "Loaders: `load_transcoders_from_cache` (reads our `config.yaml`; lazy decoders), `load_clt` eager, "
              "`load_clt` with lazy encoder and decoder; each row is the worst of the loaders (and layers) that computed it.", "",
              "| CLT | compared with ours | runs (loaders × layers) | max abs diff | max abs value | match |", "|---|---|---|---|---|---|"]
    for (name, what), (diff, scale, ok, n) in worst.items():
        ours_only = info["clts"][name]["ours_only"]
        verdict = "yes" if ok else ("no (expected: circuit-tracer has no TopK CLT)" if ours_only else "**NO**")
        lines.append(f"| {name} | {what} | {n} | {diff:.1e} | {scale:.2e} | {verdict} |")
    lines += ["", f"Result: {'every circuit-tracer CLT (ReLU, JumpReLU) matches' if not failures else f'{failures} mismatches'}; "
              "the TopK CLT is ours alone (circuit-tracer infers ReLU or JumpReLU from the files, ignores "
              "`config.yaml`'s `activation: topk`, and so reads it as a ReLU CLT).", "",
              "Commands: `PYTHONPATH=. .venv/bin/python benchmarks/check_clt_circuit_tracer.py make /tmp/clt-ct-check` then "
              "`/work/ct-venv/bin/python benchmarks/check_clt_circuit_tracer.py check /tmp/clt-ct-check "
              "--table benchmarks/results/clt_circuit_tracer/table.md`."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["make", "check"])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--table", type=Path, help="(check) write the markdown table here")
    args = parser.parse_args()
    if args.step == "make":
        args.dir.mkdir(parents=True, exist_ok=True)
        make(args.dir)
    else:
        sys.exit(check(args.dir, args.table))


if __name__ == "__main__":
    main()
