"""Training throughput: plugin transcoder vs SAELens's standard SAE, side by side.

Same model, layer, data, d_sae, batch size and token budget; runs alternate
(transcoder, SAE, transcoder, SAE, ...) so both see the same machine load, and the
best run of each is compared. Target: transcoder/SAE tokens-per-second ratio >= 0.95.

    python benchmarks/train_speed.py --model smollm2-135m --layer 3 --d-sae 4608 --tokens 65536
"""

import argparse
import time
from typing import Any

import torch
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
from sae_lens.saes.standard_sae import StandardTrainingSAEConfig

from sae_lens_transcoder import TrainingTranscoderConfig, TranscoderTrainingRunner
from sae_lens_transcoder.data import load_text_split
from sae_lens_transcoder.llm_transcoder_training_runner import SAE_LENS_DEFAULT_HOOK
from sae_lens_transcoder.models import load_model


def _runner_config(sae: Any, args: argparse.Namespace, hook_name: str) -> LanguageModelSAERunnerConfig[Any]:
    return LanguageModelSAERunnerConfig(
        sae=sae,
        model_name=args.model,
        hook_name=hook_name,
        dataset_path="embedded",
        is_dataset_tokenized=False,
        streaming=False,
        context_size=args.context,
        prepend_bos=True,
        training_tokens=args.tokens,
        train_batch_size_tokens=args.batch,
        store_batch_size_prompts=16,
        n_batches_in_buffer=max(8, 2 * args.batch // args.context),
        checkpoint_path=None,
        output_path=None,
        logger=LoggingConfig(log_to_wandb=False),
        verbose=False,
    )


def _tokens_per_second(make_runner: Any, n_tokens: int) -> float:
    runner = make_runner()
    start = time.perf_counter()
    runner.run()
    return n_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    model = load_model(args.model)
    d_model = model.cfg.d_model
    dataset = load_text_split("train")
    layer = args.layer

    def transcoder_runner() -> TranscoderTrainingRunner:
        sae = TrainingTranscoderConfig(d_in=d_model, d_sae=args.d_sae, mlp_layer=layer, l1_coefficient=5.0)
        return TranscoderTrainingRunner(
            _runner_config(sae, args, SAE_LENS_DEFAULT_HOOK), override_model=model, override_dataset=dataset
        )

    def sae_runner() -> LanguageModelSAETrainingRunner:
        sae = StandardTrainingSAEConfig(d_in=d_model, d_sae=args.d_sae, l1_coefficient=5.0)
        return LanguageModelSAETrainingRunner(
            _runner_config(sae, args, f"blocks.{layer}.hook_mlp_out"), override_model=model, override_dataset=dataset
        )

    results: dict[str, list[float]] = {"transcoder": [], "standard SAE": []}
    for _ in range(args.repeats):
        results["transcoder"].append(_tokens_per_second(transcoder_runner, args.tokens))
        results["standard SAE"].append(_tokens_per_second(sae_runner, args.tokens))
    best = {name: max(values) for name, values in results.items()}
    print(f"model {args.model} layer {layer}, d_sae {args.d_sae}, batch {args.batch}, "
          f"{args.tokens} tokens per run, torch threads {torch.get_num_threads()}")
    for name, values in results.items():
        print(f"{name:>13}: best {best[name]:8.0f} tokens/s  (runs: {', '.join(f'{v:.0f}' for v in values)})")
    print(f"ratio transcoder / standard SAE: {best['transcoder'] / best['standard SAE']:.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main()
