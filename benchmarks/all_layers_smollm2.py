"""Replace the first K MLPs of SmolLM2-135M with transcoders, one at a time and all at once.

Why: one transcoder with a good CE-loss-recovered score can still drift the residual stream
a little; circuit analysis replaces many MLPs together, where those errors compound. This
trains one transcoder per MLP for layers 0..K-1 with the main job's recipe
(configs/smollm2-135m-layer3.yaml, only ``mlp_layer`` and the token budget changed, no
checkpoints), saves each in SAELens format under ``--out-dir`` (reused later by circuit
studies; a layer whose directory already holds a saved transcoder is not retrained), then
evaluates on the held-out split each transcoder alone and all K spliced in together, with
CE loss recovered measured against zero-ablating the same MLPs.

    python benchmarks/all_layers_smollm2.py --layers 0 1 2 3 4 5 6 7 --tokens 262144
"""

import argparse
import json
import time
from pathlib import Path
from typing import Any

from sae_lens import SAE
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.util import get_special_token_ids
from transformer_lens import HookedTransformer

from sae_lens_transcoder import TranscoderTrainingRunner
from sae_lens_transcoder.config_io import load_config_file, runner_config_from_dict
from sae_lens_transcoder.data import load_text_split
from sae_lens_transcoder.evals import evaluate_spliced
from sae_lens_transcoder.models import load_model
from sae_lens_transcoder.report import TABLE_COLUMNS, heldout_tokens

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "smollm2-135m-layer3.yaml"
TRAIN_SUMMARY = "train_summary.json"  # written beside the transcoder: wall time of its training
N_LAYERS_IN_MODEL = 30
# The evaluation table's columns (without its name column) plus training time.
COLUMNS = (*TABLE_COLUMNS[1:], ("train_seconds", "train s", "{:.0f}"))


def _layer_dir(out_dir: str, layer: int) -> Path:
    return Path(out_dir.format(L=layer))


def _is_saved(path: Path) -> bool:
    return (path / SAE_CFG_FILENAME).is_file() and (path / SAE_WEIGHTS_FILENAME).is_file()


def _train(model: HookedTransformer, layer: int, tokens: int, path: Path) -> float:
    """Train the layer's transcoder with the main job's recipe, save it to ``path``; wall seconds."""
    data = load_config_file(CONFIG)
    data.update(training_tokens=tokens, n_checkpoints=0, checkpoint_path=None, output_path=str(path))
    data["sae"] = {**data["sae"], "mlp_layer": layer}
    start = time.perf_counter()
    TranscoderTrainingRunner(runner_config_from_dict(data), override_model=model).run()
    seconds = time.perf_counter() - start
    (path / TRAIN_SUMMARY).write_text(json.dumps({"train_seconds": seconds, "training_tokens": tokens}))
    return seconds


def _train_seconds(path: Path) -> float | None:
    summary = path / TRAIN_SUMMARY
    return json.loads(summary.read_text())["train_seconds"] if summary.is_file() else None


def _row(name: str, metrics: dict[str, Any], train_seconds: float | None) -> dict[str, Any]:
    row = {"name": name, **{k: v for k, v in metrics.items() if k not in ("feature_density", "per_transcoder")}}
    row["train_seconds"] = train_seconds
    return row


def _markdown(rows: list[dict[str, Any]], layers: list[int], args: argparse.Namespace, n_eval: int) -> str:
    header = "| transcoder | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for row in rows:
        cells = ["-" if row.get(key) is None else fmt.format(row[key]) for key, _, fmt in COLUMNS]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    everything = rows[-1]
    return "\n".join([
        f"# SmolLM2-135M: {len(layers)} of {N_LAYERS_IN_MODEL} MLPs replaced by transcoders",
        "",
        f"Layers replaced: {', '.join(map(str, layers))}. Recipe: configs/smollm2-135m-layer3.yaml "
        f"(d_sae 4608, lr 2e-3, l1_coefficient 1.7, batch 1024, context 128) with "
        f"{args.tokens:,} training tokens per transcoder (the main job uses 786,432), no checkpoints. "
        f"Held-out evaluation: {args.eval_tokens:,} tokens of the embedded corpus's `test` split "
        f"(sequences of 128 with BOS); special tokens excluded, {n_eval:,} positions scored.",
        "",
        *lines,
        "",
        "Each per-layer row replaces that one MLP; its CE recovered is against zero-ablating that MLP; "
        "train s is the wall time of its training run (the total on the last row), not corrected for "
        "other jobs sharing the machine. "
        f"The `all {len(layers)} replaced` row splices all transcoders in at once: L0 and EV are means "
        "over the transcoders, dead is their sum, and CE zero-abl / CE recovered are against "
        f"zero-ablating all {len(layers)} MLPs together: "
        f"{everything['ce_loss_recovered']:.1%} recovered "
        f"(clean {everything['ce_loss_clean']:.4f}, spliced {everything['ce_loss_spliced']:.4f}, "
        f"all {len(layers)} zero-ablated {everything['ce_loss_zero_ablation']:.4f} nats).",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--tokens", type=int, default=262144, help="training tokens per transcoder")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--out-dir", default=".cache/transcoders/smollm2-135m/layer{L}",
                        help="where each layer's transcoder is saved; {L} is the layer")
    parser.add_argument("--results", default="benchmarks/results/all_layers_smollm2")
    parser.add_argument("--model-cache", default=".cache/models", help="cache of the GGUF conversion")
    args = parser.parse_args()
    layers = sorted(args.layers)

    model = load_model("smollm2-135m", cache_dir=args.model_cache)
    for layer in layers:
        path = _layer_dir(args.out_dir, layer)
        if _is_saved(path):
            print(f"layer {layer}: using the transcoder saved in {path}")
            continue
        seconds = _train(model, layer, args.tokens, path)
        print(f"layer {layer}: trained {args.tokens:,} tokens in {seconds:.0f} s, saved to {path}")

    transcoders = [SAE.load_from_disk(str(_layer_dir(args.out_dir, layer))) for layer in layers]
    data = load_config_file(CONFIG)
    tokens = heldout_tokens(model, load_text_split("test"), data["context_size"], args.eval_tokens, data["prepend_bos"])
    exclude = get_special_token_ids(model.tokenizer)  # type: ignore[arg-type]
    rows = []
    for layer, tc in zip(layers, transcoders):
        metrics = evaluate_spliced(model, [tc], tokens, exclude_special_tokens=exclude)
        rows.append(_row(f"layer {layer}", metrics, _train_seconds(_layer_dir(args.out_dir, layer))))
        print(f"layer {layer}: CE recovered {metrics['ce_loss_recovered']:.1%}")
    everything = evaluate_spliced(model, transcoders, tokens, exclude_special_tokens=exclude)
    seconds = [r["train_seconds"] for r in rows]
    total = None if None in seconds else sum(seconds)
    rows.append(_row(f"all {len(layers)} replaced", everything, total))

    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    n_eval = int(everything["n_tokens"])  # type: ignore[call-overload]
    result = {"args": vars(args), "n_layers_in_model": N_LAYERS_IN_MODEL, "eval_tokens_scored": n_eval, "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    table = _markdown(rows, layers, args, n_eval)
    (out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
