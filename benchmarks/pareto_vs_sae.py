"""Transcoders vs SAELens standard SAEs on the same MLP: the paper's central comparison.

For each L1 coefficient, trains a transcoder (MLP input -> MLP output) and a standard SAE
on the MLP output, with the same d_sae, token budget, batch size and data; evaluates each
spliced into the model (replacing the MLP output) on held-out text; prints a table and
writes `pareto_ce_increase.png`, `pareto_ce_recovered.png` and `results.json`.

    python benchmarks/pareto_vs_sae.py --model smollm2-135m --layer 3 --tokens 262144 \
        --transcoder-l1 1 2 3 5 --sae-l1 1 2 3 5 --out benchmarks/results/pareto
"""

import argparse
import json
from pathlib import Path
from typing import Any

from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
from sae_lens.saes.standard_sae import StandardTrainingSAEConfig
from sae_lens.util import get_special_token_ids

from sae_lens_transcoder import TrainingTranscoderConfig, TranscoderTrainingRunner
from sae_lens_transcoder.data import load_text_split
from sae_lens_transcoder.evals import evaluate_spliced
from sae_lens_transcoder.llm_transcoder_training_runner import SAE_LENS_DEFAULT_HOOK
from sae_lens_transcoder.models import load_model
from sae_lens_transcoder.plots import plot_pareto
from sae_lens_transcoder.report import format_table, heldout_tokens
from sae_lens_transcoder.splicing import Splice


def _config(sae: Any, args: argparse.Namespace, hook_name: str) -> LanguageModelSAERunnerConfig[Any]:
    return LanguageModelSAERunnerConfig(
        sae=sae, model_name=args.model, hook_name=hook_name, dataset_path="embedded",
        is_dataset_tokenized=False, streaming=False, context_size=128, prepend_bos=True,
        exclude_special_tokens=True, training_tokens=args.tokens, train_batch_size_tokens=args.batch,
        store_batch_size_prompts=16, n_batches_in_buffer=64, n_batches_for_norm_estimate=20,
        lr=args.lr, lr_warm_up_steps=100, checkpoint_path=None, output_path=None,
        logger=LoggingConfig(log_to_wandb=False), verbose=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--tokens", type=int, default=262144)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--transcoder-l1", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0])
    parser.add_argument("--sae-l1", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0])
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--out", default="benchmarks/results/pareto")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model = load_model(args.model)
    d_model, layer = model.cfg.d_model, args.layer
    train = load_text_split("train")
    tokens = heldout_tokens(model, load_text_split("test"), 128, args.eval_tokens)
    exclude = get_special_token_ids(model.tokenizer)  # type: ignore[arg-type]
    mlp_out = f"blocks.{layer}.hook_mlp_out"
    rows: dict[str, list[dict[str, Any]]] = {"transcoder": [], "SAE on mlp_out": []}

    for l1 in args.transcoder_l1:
        sae_cfg = TrainingTranscoderConfig(
            d_in=d_model, d_sae=args.d_sae, mlp_layer=layer, l1_coefficient=l1,
            l1_warm_up_steps=200, normalize_activations="expected_average_only_in",
        )
        runner = TranscoderTrainingRunner(_config(sae_cfg, args, SAE_LENS_DEFAULT_HOOK), override_model=model, override_dataset=train)
        tc = runner.run()
        metrics = evaluate_spliced(model, [tc], tokens, exclude_special_tokens=exclude)
        rows["transcoder"].append({"name": f"transcoder l1={l1}", "l1": l1, **metrics})
    for l1 in args.sae_l1:
        sae_cfg = StandardTrainingSAEConfig(
            d_in=d_model, d_sae=args.d_sae, l1_coefficient=l1, l1_warm_up_steps=200,
            normalize_activations="expected_average_only_in",
        )
        sae = LanguageModelSAETrainingRunner(_config(sae_cfg, args, mlp_out), override_model=model, override_dataset=train).run()
        metrics = evaluate_spliced(model, [Splice(sae, mlp_out, mlp_out)], tokens, exclude_special_tokens=exclude)
        rows["SAE on mlp_out"].append({"name": f"SAE l1={l1}", "l1": l1, **metrics})

    flat = [r for series in rows.values() for r in series]
    for row in flat:
        row["ce_loss_increase"] = row["ce_loss_spliced"] - row["ce_loss_clean"]
        row.pop("feature_density")
        row.pop("per_transcoder")
    print(f"{args.model} layer {layer}, d_sae {args.d_sae}, {args.tokens} training tokens each, "
          f"{tokens.numel()} held-out tokens")
    print(format_table(flat))
    plot_pareto(rows, out / "pareto_ce_increase.png")
    plot_pareto(rows, out / "pareto_ce_recovered.png", y_key="ce_loss_recovered", y_label="CE loss recovered")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": flat}, indent=2))


if __name__ == "__main__":
    main()
