"""One TopK transcoder training step, ours vs EleutherAI sparsify's, on the same real batches.

The faithfulness benchmark's tokens/s include the LLM forward that makes the activations, which
TransformerLens runs for ours and transformers for sparsify. This separates the part each
trainer owns: the step on a batch already in memory. Batches are SmolLM2-135M MLP-3 inputs and
outputs from our activation store (``faithfulness_vs_peers.transcoder_runner``, the same stream
as there), saved once to ``--workdir``; both sides step through them in the same order.

* ours: ``TranscoderTrainer.step`` of a ``topk_transcoder`` (SAELens's trainer step: encode,
  decode, AuxK, backward, Adam, its firing statistics), with ``--dead`` latents counted dead so
  AuxK runs as it does late in a run (0: AuxK idle);
* sparsify: ``_sparsify_step_worker.py`` in sparsify's venv, its ``SparseCoder`` in transcode
  mode with its default signum optimizer (schedule-free SignSGD), AuxK off (its default).

Rounds alternate (ours for every ``--dead``, then sparsify) so both see the same machine load;
each prints the median of ``--steps`` timed steps after two warm-up steps, and the last line
the ratio per dead count (sparsify ms / ours ms: above 1, ours is faster).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/step_vs_sparsify.py --threads 1 --dead 0 300 1200
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from sae_lens_transcoder.data import load_text_split
from sae_lens_transcoder.models import load_model
from sae_lens_transcoder.training.trainer import TranscoderTrainer

sys.path.insert(0, str(Path(__file__).parent))
import faithfulness_vs_peers as peers  # noqa: E402

WORKER = Path(__file__).parent / "_sparsify_step_worker.py"
N_BATCHES = 8


def real_batches(args: argparse.Namespace) -> tuple[Path, peers.TranscoderTrainingRunner]:
    """``N_BATCHES`` packed ``[x | y]`` training batches from the benchmark's store, saved for the worker."""
    model = load_model(peers.MODEL, cache_dir=".cache/models")
    runner_args = argparse.Namespace(
        d_sae=args.d_sae, layer=args.layer, tokens=args.batch * 64, batch=args.batch, lr=2e-3,
        train_dataset=peers.EMBEDDED_DATASET, lm_autocast=False, our_auxk="on",
    )
    runner = peers.transcoder_runner("topk_transcoder", args.k, model, load_text_split("train"), runner_args)
    path = args.workdir / f"batches_{args.batch}_l{args.layer}.pt"
    if not path.exists():
        stream = runner.activations_store.batches_with_state()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(torch.stack([next(stream)[0].clone() for _ in range(N_BATCHES)]), path)
    return path, runner


def time_ours(runner: peers.TranscoderTrainingRunner, batches: torch.Tensor, n_dead: int, steps: int) -> float:
    """Median ms of our trainer's step with exactly ``n_dead`` latents counted dead (the others as
    just fired, however long they have been silent here) before each step."""
    trainer = TranscoderTrainer(cfg=runner.cfg.to_sae_trainer_config(), sae=runner.sae, data_provider=iter(()))
    times = []
    for i in range(steps + 2):
        trainer.n_forward_passes_since_fired.zero_()
        trainer.n_forward_passes_since_fired[:n_dead] = trainer.cfg.dead_feature_window + 1
        start = time.perf_counter()
        trainer.step(batches[i % len(batches)])
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[2:])


def time_sparsify(args: argparse.Namespace, batches_path: Path) -> float:
    result = subprocess.run(
        [args.sparsify_python, str(WORKER), "--batches", str(batches_path), "--d-in", str(args.d_in),
         "--k", str(args.k), "--d-sae", str(args.d_sae), "--steps", str(args.steps), "--threads", str(args.threads)],
        check=True, capture_output=True, text=True,
    )
    return float(json.loads(result.stdout.strip().splitlines()[-1])["median_step_ms"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--dead", type=int, nargs="+", default=[0, 300, 1200], help="latents counted dead for ours (AuxK)")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sparsify-python", default="/work/sparsify-venv/bin/python")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/step_vs_sparsify"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    batches_path, runner = real_batches(args)
    batches = torch.load(batches_path)
    args.d_in = runner.sae.cfg.d_in
    ours: dict[int, list[float]] = {n: [] for n in args.dead}
    theirs: list[float] = []
    for round_ in range(args.rounds):
        for n_dead in args.dead:
            ours[n_dead].append(time_ours(runner, batches, n_dead, args.steps))
            print(f"round {round_}: ours, {n_dead} dead: {ours[n_dead][-1]:.1f} ms/step", flush=True)
        theirs.append(time_sparsify(args, batches_path))
        print(f"round {round_}: sparsify (AuxK off): {theirs[-1]:.1f} ms/step", flush=True)
    sparsify_ms = statistics.median(theirs)
    print(f"d_sae {args.d_sae}, k {args.k}, batch {args.batch}, {args.threads} thread(s); sparsify {sparsify_ms:.1f} ms/step")
    print("; ".join(
        f"{n} dead: ours {statistics.median(ms):.1f} ms, sparsify/ours {sparsify_ms / statistics.median(ms):.2f}"
        for n, ms in ours.items()
    ))


if __name__ == "__main__":
    main()
