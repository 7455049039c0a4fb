"""The training step of a TopK transcoder with the sparse decode vs SAELens's dense one, side by side.

For each k, times ``training_forward_pass`` + ``backward`` of the same ``topk_transcoder``
(same weights, same batch) with ``decoder_impl`` ``dense`` and ``sparse``, alternating, and
prints the ratio; a bf16-autocast dense column says whether autocast pays on this device.
The k sweep up to ~20% of d_sae is what sets ``SPARSE_DECODE_MAX_DENSITY``.

    python benchmarks/sparse_decode.py --d-sae 4608 --batch 1024 --ks 16 32 64 128 230 460 920
"""

import argparse
import contextlib
import time
from collections.abc import Callable

import torch
from sae_lens.saes.sae import TrainStepInput

from sae_lens_transcoder.saes.transcoder import TopKTrainingTranscoder, TopKTrainingTranscoderConfig


def _step_timer(sae: TopKTrainingTranscoder, packed: torch.Tensor, autocast: bool) -> Callable[[], float]:
    dead = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    dead[::4] = True  # AuxK runs, as in training

    def once() -> float:
        start = time.perf_counter()
        context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with context:
            out = sae.training_forward_pass(
                TrainStepInput(sae_in=packed, coefficients={}, dead_neuron_mask=dead, n_training_steps=1, is_logging_step=False)
            )
        sae.zero_grad()
        out.loss.backward()
        return time.perf_counter() - start

    return once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 32, 64, 128, 230, 460, 920])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    packed = torch.randn(args.batch, 2 * args.d_in, generator=generator)
    print(f"d_in {args.d_in}, d_sae {args.d_sae}, batch {args.batch}, {torch.get_num_threads()} threads; ms per step (median)")
    print("| k | density | dense | sparse | dense/sparse | dense bf16 autocast | dense/bf16 |")
    print("|---|---|---|---|---|---|---|")
    for k in args.ks:
        timers = {}
        for name, impl, autocast in (("dense", "dense", False), ("sparse", "sparse", False), ("bf16", "dense", True)):
            torch.manual_seed(0)
            cfg = TopKTrainingTranscoderConfig(d_in=args.d_in, d_sae=args.d_sae, k=k, decoder_impl=impl)
            timers[name] = _step_timer(TopKTrainingTranscoder(cfg), packed, autocast)
        for timer in timers.values():
            timer()  # warm-up
        times: dict[str, list[float]] = {name: [] for name in timers}
        for _ in range(args.repeats):  # alternate, so drift in machine load hits all alike
            for name, timer in timers.items():
                times[name].append(timer())
        ms = {name: 1000 * sorted(t)[len(t) // 2] for name, t in times.items()}
        print(
            f"| {k} | {k / args.d_sae:.1%} | {ms['dense']:.0f} | {ms['sparse']:.0f} | {ms['dense'] / ms['sparse']:.2f} "
            f"| {ms['bf16']:.0f} | {ms['dense'] / ms['bf16']:.2f} |"
        )


if __name__ == "__main__":
    main()
