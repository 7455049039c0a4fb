"""Transcoder-set training throughput: one set run vs N single-layer runs vs the roofline.

For each N, the set trainer trains MLPs 0..N-1 of the model from one forward pass per batch;
the same N transcoders are then trained by N separate single-layer runs (each paying its own
forward pass); and, in the same process, the roofline is measured:
1 / (t_forward up to layer N-1 + sum over layers of t_transcoder step), per token, each
transcoder stepping on its own layer's real activations.
Every measurement runs in its own process (so its peak RSS is its own); the model load is
not timed. Targets: set >= 0.9x its roofline, and >= 3x faster than 8 separate runs at N = 8.

    python benchmarks/set_training_speed.py --model smollm2-135m --d-sae 2304 --tokens 16384 --n 1 4 8 \
        [--architecture topk_transcoder]
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

import torch
from sae_lens import LanguageModelSAERunnerConfig
from sae_lens.registry import get_sae_training_class
from train_speed import _runner_config as train_speed_config  # the same runner settings

from sae_lens_transcoder import TranscoderTrainingRunner
from sae_lens_transcoder.data import load_text_split
from sae_lens_transcoder.llm_transcoder_training_runner import SAE_LENS_DEFAULT_HOOK
from sae_lens_transcoder.models import load_model
from sae_lens_transcoder.training.trainer import TranscoderTrainer


# Each architecture's sparsity setting: the L1 transcoder's main-job coefficient, TopK's k of
# the faithfulness benchmark's speed comparison.
SPARSITY: dict[str, dict[str, Any]] = {"transcoder": {"l1_coefficient": 1.7}, "topk_transcoder": {"k": 32}}


def _config(args: argparse.Namespace, d_model: int, **sae: Any) -> LanguageModelSAERunnerConfig[Any]:
    _, config_class = get_sae_training_class(args.architecture)
    sae_cfg = config_class(d_in=d_model, d_sae=args.d_sae, **SPARSITY[args.architecture], **sae)
    return train_speed_config(sae_cfg, args, SAE_LENS_DEFAULT_HOOK)


def _timed_run(runner: TranscoderTrainingRunner) -> float:
    start = time.perf_counter()
    runner.run()
    return time.perf_counter() - start


def _roofline(model: Any, args: argparse.Namespace, n: int) -> dict[str, float]:
    """Seconds per token of the forward to layer n-1 and of the n transcoders' training steps.

    Each layer's transcoder steps on a batch of that layer's real activations (from the set's
    own store): a step's cost depends on the data (which TopK columns are dense, how many codes
    an L1 transcoder keeps), so random inputs would flatter the roofline.
    """
    tokens = torch.randint(0, model.cfg.d_vocab, (args.batch // args.context, args.context))
    hooks = [f"blocks.{n - 1}.hook_mlp_out"]
    with torch.no_grad():
        model.run_with_cache(tokens, names_filter=hooks, stop_at_layer=n)  # warm-up
        start = time.perf_counter()
        for _ in range(args.repeats):
            model.run_with_cache(tokens, names_filter=hooks, stop_at_layer=n)
    forward = (time.perf_counter() - start) / (args.repeats * args.batch)
    runner = TranscoderTrainingRunner(_config(args, model.cfg.d_model, mlp_layer=None, mlp_layers=f"0-{n - 1}"),
                                      override_model=model, override_dataset=load_text_split("train"))
    packed, _ = next(runner.activations_store.batches_with_state())
    batches = runner._split_batch(packed)  # noqa: SLF001 - the set trainer's own per-layer views
    trainers = [TranscoderTrainer(cfg=runner.cfg.to_sae_trainer_config(), sae=sae, data_provider=iter(()))
                for sae in runner._trainer_saes().values()]  # noqa: SLF001
    steps = []
    for trainer, batch in zip(trainers, batches.values(), strict=True):
        trainer.step(batch)  # warm-up
        start = time.perf_counter()
        for _ in range(args.repeats):
            trainer.step(batch)
        steps.append((time.perf_counter() - start) / (args.repeats * args.batch))
    return {"forward_s_per_token": forward, "step_s_per_token": sum(steps) / n, "tokens_per_s": 1 / (forward + sum(steps))}


def measure(mode: str, n: int, args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(0)
    model = load_model(args.model, cache_dir=args.cache_dir) if args.model == "smollm2-135m" else load_model(args.model)
    dataset = load_text_split("train")
    d_model = model.cfg.d_model
    if mode == "set":
        wall = _timed_run(TranscoderTrainingRunner(_config(args, d_model, mlp_layer=None, mlp_layers=f"0-{n - 1}"),
                                                   override_model=model, override_dataset=dataset))
        result = {"tokens_per_s": args.tokens / wall}
    elif mode == "separate":
        wall = sum(
            _timed_run(TranscoderTrainingRunner(_config(args, d_model, mlp_layer=layer), override_model=model,
                                                override_dataset=dataset))
            for layer in range(n)
        )
        result = {"tokens_per_s": args.tokens / wall}
    else:
        result = _roofline(model, args, n)
    return {**result, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cache-dir", default=".cache/models")
    parser.add_argument("--d-sae", type=int, default=2304)
    parser.add_argument("--architecture", choices=list(SPARSITY), default="transcoder")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats for the roofline")
    parser.add_argument("--n", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--one", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args)))
        return
    passthrough = [a for a in sys.argv[1:] if a not in ("--json", args.json)]
    rows = []
    for n in args.n:
        row: dict[str, Any] = {"n": n}
        for mode in ("set", "separate", "roofline"):
            out = subprocess.run([sys.executable, __file__, *passthrough, "--one", mode, str(n)],
                                 capture_output=True, text=True, check=True)
            row[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        row["set_vs_roofline"] = row["set"]["tokens_per_s"] / row["roofline"]["tokens_per_s"]
        row["set_vs_separate"] = row["set"]["tokens_per_s"] / row["separate"]["tokens_per_s"]
        rows.append(row)
        print(f"N={n}: set {row['set']['tokens_per_s']:.0f} tok/s ({row['set']['peak_rss_mib']:.0f} MiB), "
              f"separate {row['separate']['tokens_per_s']:.0f} tok/s ({row['separate']['peak_rss_mib']:.0f} MiB), "
              f"roofline {row['roofline']['tokens_per_s']:.0f} tok/s; set/roofline {row['set_vs_roofline']:.2f} "
              f"(target >= 0.9), set/separate {row['set_vs_separate']:.2f}", flush=True)
    print(f"model {args.model}, {args.architecture} {SPARSITY[args.architecture]}, d_sae {args.d_sae}, batch {args.batch}, {args.tokens} tokens per run, "
          f"torch threads {torch.get_num_threads()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
