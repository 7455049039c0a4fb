"""The forward pass that makes training activations: TransformerLens vs transformers, side by side.

Times what the activation store runs per LLM batch, ``run_with_cache`` of one MLP's input and
output hooks stopping after that layer, for the embedded SmolLM2's HookedTransformer and for its
transformers model as ``model_class_name: AutoModelForCausalLM`` reads it
(``load_transformers_source``, which also checks that both give the same activations). The two
alternate in one process, in float32 and under bf16 autocast (``autocast_lm``), and the script
prints the median milliseconds per 1,024 tokens and their ratio.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/lm_forward_speed.py [--threads 1] [--layer 3] [--rounds 7]
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformer_lens.hook_points import HookedRootModule

from sae_lens_transcoder.hooks import mlp_in_hook, mlp_out_hook
from sae_lens_transcoder.models import SMOLLM2_MODEL_NAME, load_model
from sae_lens_transcoder.models.transformers_source import load_transformers_source

ROOT = Path(__file__).resolve().parents[1]


def seconds(model: HookedRootModule, tokens: torch.Tensor, hooks: list[str], stop: int, bf16: bool) -> float:
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model.run_with_cache(tokens, names_filter=hooks, stop_at_layer=stop)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--prompts", type=int, default=16, help="sequences per forward (the store's batch)")
    p.add_argument("--context", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    hooks = [mlp_in_hook(args.layer), mlp_out_hook(args.layer)]
    lens = load_model(SMOLLM2_MODEL_NAME, cache_dir=str(ROOT / ".cache" / "models"))
    models = {"TransformerLens": lens, "transformers": load_transformers_source(SMOLLM2_MODEL_NAME, lens, hooks)}
    tokens = torch.randint(100, lens.cfg.d_vocab, (args.prompts, args.context), generator=torch.Generator().manual_seed(0))
    per_1024 = 1024 / tokens.numel() * 1000
    print(f"SmolLM2-135M to MLP {args.layer}, {args.prompts} x {args.context} tokens per forward, "
          f"{args.threads} thread(s), median of {args.rounds} alternating rounds")
    for bf16 in (False, True):
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.rounds):
            for name, model in models.items():
                times[name].append(seconds(model, tokens, hooks, args.layer + 1, bf16))
        ms = {name: statistics.median(values) * per_1024 for name, values in times.items()}
        print(f"{'bf16 autocast' if bf16 else 'float32':>13}: TransformerLens {ms['TransformerLens']:.1f} ms, "
              f"transformers {ms['transformers']:.1f} ms per 1,024 tokens; "
              f"transformers {ms['TransformerLens'] / ms['transformers']:.2f}x faster")


if __name__ == "__main__":
    main()
