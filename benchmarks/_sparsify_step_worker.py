"""EleutherAI sparsify's side of ``step_vs_sparsify.py``: its TopK transcoder's training step, timed.

    /work/sparsify-venv/bin/python benchmarks/_sparsify_step_worker.py --batches FILE.pt --d-in 576 \
        --k 32 --d-sae 4608 [--steps 24] [--threads 1]

Imports only torch, sparsify, schedulefree and the standard library (runs in sparsify's venv,
set up as ``_sparsify_worker.py`` says). FILE.pt holds ``[n, batch, d_in + d_out]`` packed MLP
inputs and outputs. The step is what sparsify's ``Trainer`` does per batch for one transcoder
at its defaults: ``SparseCoder(transcode=True)`` forward with the FVU loss (AuxK off, its
default ``auxk_alpha = 0``), backward, and its signum optimizer (``ScheduleFreeWrapper(SignSGD)``,
momentum 0.95, lr ``5e-3 / sqrt(d_sae / 2**14)``). Prints one JSON line: the median step in ms
of ``--steps`` steps after two warm-up steps, cycling through the batches in order.
"""

import argparse
import json
import statistics
import time

import torch
from schedulefree import ScheduleFreeWrapper
from sparsify import SparseCoder, SparseCoderConfig
from sparsify.sign_sgd import SignSGD


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", required=True)
    p.add_argument("--d-in", type=int, required=True)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--d-sae", type=int, required=True)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    batches = torch.load(args.batches)
    torch.manual_seed(0)
    sae = SparseCoder(args.d_in, SparseCoderConfig(num_latents=args.d_sae, k=args.k, transcode=True), device="cpu")
    lr = 5e-3 / (args.d_sae / 2**14) ** 0.5
    optimizer = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": lr}]), momentum=0.95)
    optimizer.train()
    times = []
    for i in range(args.steps + 2):
        batch = batches[i % len(batches)]
        x, y = batch[:, : args.d_in], batch[:, args.d_in :]
        start = time.perf_counter()
        total_variance = (y - y.mean(0)).pow(2).sum()
        sae(x=x, y=y, dead_mask=None, total_variance=total_variance).fvu.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    print(json.dumps({"median_step_ms": 1000 * statistics.median(times[2:])}))


if __name__ == "__main__":
    main()
