"""circuit-tracer's side of ``circuit_tracer_side_by_side.py``; runs in circuit-tracer's own venv.

    /work/ct-venv/bin/python benchmarks/_circuit_tracer_worker.py WORKDIR OUT.pt [--save-graph] \
        [--batch-size 64] [--max-feature-nodes N] [--max-n-logits 10] [--desired-logit-prob 0.95]

Imports only torch, safetensors, transformer_lens and circuit_tracer (never this package).
WORKDIR, written by the driver, holds ``model_cfg.json`` and ``model.safetensors`` (the
model's parameters, unprocessed), ``reference.safetensors`` (the prompt's token ids and our
model's logits) and ``transcoders/`` (our export in circuit-tracer's transcoder-set format).

The worker builds circuit-tracer's ``TransformerLensReplacementModel`` on those weights,
checks its logits against ours, then times ``attribute()`` alone and measures the peak RSS
of that call (``VmHWM`` reset through ``/proc/self/clear_refs`` once everything is loaded).
It saves the graph's fields the comparison needs: active features ``(layer, pos, feature)``,
the selected (row-computed) features, the activations, the logit token ids and
probabilities in OUT.pt; with ``--save-graph`` also, in ``OUT_rows.pt``, the adjacency
rows of the selected features and of the logits (``[target, source]``; source columns:
selected features, then errors ``layer * n_pos + pos``, then tokens, then logits).
"""

import argparse
import ctypes
import dataclasses
import gc
import json
import time
from pathlib import Path
from typing import Any

import torch


def rows_path(out: Path) -> Path:
    return out.with_name(out.stem + "_rows.pt")


def memory_kib() -> dict[str, int]:
    """Current (VmRSS) and peak (VmHWM) resident set size of this process, in KiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1])
    return out


def settle_and_reset_peak() -> int:
    """Free what can be freed, reset the peak RSS to the current RSS; returns that RSS (KiB)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")
    return memory_kib()["VmRSS"]


class StubTokenizer:
    """The little of a tokenizer that ``attribute`` touches. The prompt already starts with
    the model's BOS, so declaring it special stops circuit-tracer from prepending another."""

    def __init__(self, bos_id: int, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.all_special_ids = [bos_id]
        self.bos_token_id, self.pad_token_id, self.eos_token_id = bos_id, None, None
        self.padding_side = "right"

    def decode(self, ids: Any) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return " ".join(f"<{i}>" for i in (ids if isinstance(ids, list) else [ids]))


def build_model(workdir: Path) -> tuple[Any, dict[str, Any]]:
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformerConfig

    from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
    from circuit_tracer.utils.caching import load_transcoders_from_cache

    raw = json.loads((workdir / "model_cfg.json").read_text())
    known = {f.name for f in dataclasses.fields(HookedTransformerConfig) if f.init}
    dropped = sorted(k for k in raw if k not in known)
    cfg_kwargs = {k: v for k, v in raw.items() if k in known and k not in ("n_params",)}
    cfg_kwargs["dtype"] = getattr(torch, str(cfg_kwargs.get("dtype", "float32")).removeprefix("torch."))
    cfg_kwargs["device"] = "cpu"
    model = TransformerLensReplacementModel(HookedTransformerConfig(**cfg_kwargs))
    state = load_file(str(workdir / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    weights_missing = [k for k in missing if not k.endswith(("IGNORE", "mask", "rotary_sin", "rotary_cos"))]
    if weights_missing or unexpected:
        raise RuntimeError(f"model weights: missing {weights_missing}, unexpected {unexpected}")
    transcoders, config = load_transcoders_from_cache("transcoders", cache_dir=workdir, device=torch.device("cpu"))
    model._configure_replacement_model(transcoders)
    model.eval()
    ref = load_file(str(workdir / "reference.safetensors"))
    model.tokenizer = StubTokenizer(int(ref["tokens"][0]), int(model.cfg.d_vocab))  # type: ignore[assignment]
    with torch.no_grad():
        logits = model(ref["tokens"][None])[0]
    info = {
        "dropped_cfg_fields": dropped,
        "logits_max_abs_diff_vs_ours": float((logits - ref["logits"]).abs().max()),
        "logits_scale": float(ref["logits"].abs().max()),
        "feature_input_hook": config["feature_input_hook"],
        "feature_output_hook": config["feature_output_hook"],
        "skip_connection": bool(transcoders.skip_connection),
    }
    return model, {"tokens": ref["tokens"], **info}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-feature-nodes", type=int, default=None)
    parser.add_argument("--max-n-logits", type=int, default=10)
    parser.add_argument("--desired-logit-prob", type=float, default=0.95)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--verbose", action="store_true", help="circuit-tracer's own phase timings, on stderr")
    parser.add_argument("--save-graph", action="store_true", help="also save the adjacency rows for the comparison")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from circuit_tracer import attribute

    t_load = time.perf_counter()
    model, info = build_model(args.workdir)
    load_seconds = time.perf_counter() - t_load
    tokens = info.pop("tokens")

    rss_loaded = settle_and_reset_peak()
    start = time.perf_counter()
    graph = attribute(
        tokens, model, max_n_logits=args.max_n_logits, desired_logit_prob=args.desired_logit_prob,
        batch_size=args.batch_size, max_feature_nodes=args.max_feature_nodes, verbose=args.verbose,
    )
    seconds = time.perf_counter() - start
    peak = memory_kib()["VmHWM"]

    n_selected = len(graph.selected_features)
    n_logits = len(graph.logit_targets)
    adjacency = graph.adjacency_matrix
    result: dict[str, Any] = {
        "seconds": seconds,
        "load_seconds": load_seconds,
        "rss_loaded_kib": rss_loaded,
        "peak_rss_kib": peak,
        "torch_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "max_feature_nodes": args.max_feature_nodes,
        "n_active": int(graph.active_features.shape[0]),
        "n_selected": n_selected,
        "n_logits": n_logits,
        "n_pos": int(graph.n_pos),
        "adjacency_shape": list(adjacency.shape),
        **info,
    }
    torch.save({
        "info": result,
        "active_features": graph.active_features.cpu(),
        "selected_features": graph.selected_features.cpu(),
        "activation_values": graph.activation_values.cpu(),
        "logit_ids": graph.logit_token_ids.cpu(),
        "logit_probabilities": graph.logit_probabilities.cpu(),
    }, args.out)
    if args.save_graph:  # the rows, in a file of their own so that reading the targets stays cheap
        torch.save({
            "feature_rows": adjacency[:n_selected].cpu().clone(),
            "logit_rows": adjacency[adjacency.shape[0] - n_logits :].cpu().clone(),
        }, rows_path(args.out))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
