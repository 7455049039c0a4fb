"""Every MLP of SmolLM2-135M replaced: one transcoder set, trained from one forward pass per batch.

Trains the set (``sae.mlp_layers``, default all 30) with the main job's recipe
(configs/smollm2-135m-layer3.yaml; ``--d-sae`` and ``--tokens`` yours, the warm-ups scaled to
the budget: lr over 10% of the steps, L1 over 25%), saves it as a set
directory (one SAELens directory per layer, the manifest and circuit-tracer's files), links
each layer where ``circuit_tracer_side_by_side.py`` looks for trained transcoders, then
evaluates on the held-out split all of them spliced in at once (per-layer reconstruction from the
same pass; ``--per-layer-ce`` also splices each layer alone).
A run that is stopped (Ctrl-C, SIGTERM) resumes with ``--resume CHECKPOINT``.

    python benchmarks/smollm2_set.py --d-sae 2304 --tokens 131072
"""

import argparse
import json
import time
from pathlib import Path
from typing import Any

from sae_lens.util import get_special_token_ids

from sae_lens_transcoder import TranscoderTrainingRunner
from sae_lens_transcoder.config_io import load_config_file, runner_config_from_dict
from sae_lens_transcoder.data import load_text_split
from sae_lens_transcoder.evals import evaluate_spliced
from sae_lens_transcoder.loading import load_transcoder_set
from sae_lens_transcoder.models import load_model
from sae_lens_transcoder.replacement.saving import layer_dir
from sae_lens_transcoder.report import TABLE_COLUMNS, format_table, heldout_tokens

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "smollm2-135m-layer3.yaml"
SIDE_BY_SIDE_LAYERS = Path(".cache/transcoders/smollm2-135m/layer{L}")  # read by circuit_tracer_side_by_side.py


def train(args: argparse.Namespace, model: Any) -> float:
    data = load_config_file(CONFIG)
    steps = args.tokens // data["train_batch_size_tokens"]
    data.update(
        lr_warm_up_steps=steps // 10,  # the recipe's warm-ups, scaled to this budget
        training_tokens=args.tokens,
        n_checkpoints=args.checkpoints,
        checkpoint_path=args.checkpoint_path,
        output_path=args.out,
        resume_from_checkpoint=args.resume,
    )
    data["sae"] = {**data["sae"], "mlp_layer": None, "mlp_layers": args.layers, "d_sae": args.d_sae,
                   "l1_warm_up_steps": steps // 4}
    start = time.perf_counter()
    TranscoderTrainingRunner(runner_config_from_dict(data), override_model=model, overwrite_output=True).run()
    return time.perf_counter() - start


def link_layers(out: Path, layers: list[int]) -> None:
    """Point the side-by-side benchmark's per-layer paths at this set (never over other files)."""
    for layer in layers:
        link = Path(str(SIDE_BY_SIDE_LAYERS).replace("{L}", str(layer)))
        if link.is_symlink():
            link.unlink()
        if link.exists():
            print(f"left {link} alone: it is not a link to a set")
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to((out / layer_dir(layer)).resolve())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="all", help="sae.mlp_layers: 'all', '0-7', ...")
    parser.add_argument("--d-sae", type=int, default=2304)
    parser.add_argument("--tokens", type=int, default=131072, help="training tokens (each transcoder sees all)")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--out", default=".cache/transcoders/smollm2-135m-set")
    parser.add_argument("--checkpoint-path", default=".cache/checkpoints/smollm2-135m-set")
    parser.add_argument("--checkpoints", type=int, default=2)
    parser.add_argument("--resume", help="a checkpoint of a stopped run of this script")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the set already in --out")
    parser.add_argument("--per-layer-ce", action="store_true", help="also splice each layer alone (one pass each)")
    parser.add_argument("--results", default="benchmarks/results/smollm2_set")
    parser.add_argument("--model-cache", default=".cache/models", help="cache of the GGUF conversion")
    args = parser.parse_args()

    model = load_model("smollm2-135m", cache_dir=args.model_cache)
    seconds = None if args.eval_only else train(args, model)
    out = Path(args.out)
    replacement = load_transcoder_set(out)
    link_layers(out, replacement.layers)

    data = load_config_file(CONFIG)
    tokens = heldout_tokens(model, load_text_split("test"), data["context_size"], args.eval_tokens, data["prepend_bos"])
    exclude = get_special_token_ids(model.tokenizer)  # type: ignore[arg-type]
    everything = evaluate_spliced(model, replacement, tokens, exclude_special_tokens=exclude)
    # Reconstruction per layer is measured on the clean model's activations in the same pass.
    rows: list[dict[str, Any]] = [
        {"name": f"layer {layer}", **metrics}
        for layer, metrics in zip(replacement.layers, everything["per_transcoder"])  # type: ignore[call-overload]
    ]
    if args.per_layer_ce:
        for row, layer in zip(rows, replacement.layers):
            alone = evaluate_spliced(model, [replacement.splices[layer]], tokens, exclude_special_tokens=exclude)
            row.update({k: v for k, v in alone.items() if k.startswith(("ce_loss", "kl_div"))})
            print(f"layer {layer}: CE recovered alone {alone['ce_loss_recovered']:.1%}", flush=True)
    rows.append({"name": f"all {len(replacement.layers)} replaced", **everything})
    keep = {key for key, _, _ in TABLE_COLUMNS} | {"name"}
    rows = [{k: v for k, v in row.items() if k in keep} for row in rows]

    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    summary = {"args": vars(args), "train_seconds": seconds, "tokens_per_s": None if seconds is None else args.tokens / seconds,
               "eval_positions_scored": int(everything["n_tokens"]), "rows": rows}  # type: ignore[call-overload]
    (results / "results.json").write_text(json.dumps(summary, indent=2))
    table = format_table(rows)
    (results / "table.md").write_text(
        f"# SmolLM2-135M, {len(replacement.layers)} MLPs replaced by one transcoder set\n\n"
        f"d_sae {args.d_sae}, {args.tokens:,} training tokens (one forward pass per batch for all layers), "
        f"recipe configs/smollm2-135m-layer3.yaml; held-out {args.eval_tokens:,} tokens of the `test` split, "
        f"special tokens excluded. Training wall time: {'-' if seconds is None else f'{seconds:.0f} s'}.\n\n{table}\n"
    )
    print(table)


if __name__ == "__main__":
    main()
