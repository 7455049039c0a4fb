"""Data-parallel throughput on CPU: the same run (global batch, tokens) on 1 rank and on N gloo
ranks of this machine, printed as tokens/s and the N-rank / 1-rank ratio. With ``--set``, the
run trains the set of every MLP of the model, and a third row trains it layer sharded
(``distributed_layers="shard"``: each rank trains its share of the layers on the global batch).

Each rank gets ``--threads`` torch threads, so N ranks use N times the cores of one rank; the
ratio is the data-parallel speed-up on as many more cores (the ideal is N). On a machine with
fewer free cores than ranks x threads the ranks compete and the ratio shows it. Times are of
``runner.run()`` alone (model load and imports excluded), the best of ``--repeats``.

    python benchmarks/distributed_cpu.py --ranks 2 --tokens 32768 --json benchmarks/results/distributed/cpu.json
    python benchmarks/distributed_cpu.py --ranks 2 --tokens 32768 --set --json benchmarks/results/distributed/cpu_set.json
"""

import argparse
import datetime
import json
import os
import platform
import socket
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig

from sae_lens_transcoder import TrainingTranscoderConfig, TranscoderTrainingRunner


def _config(args: argparse.Namespace) -> LanguageModelSAERunnerConfig[Any]:
    return LanguageModelSAERunnerConfig(
        sae=TrainingTranscoderConfig(d_in=128, d_sae=args.d_sae, **({"mlp_layers": "all"} if args.set else {"mlp_layer": 1})),
        model_name="tiny-gpt2",
        dataset_path="embedded",
        is_dataset_tokenized=False,
        streaming=False,
        context_size=64,
        training_tokens=args.tokens,
        train_batch_size_tokens=args.batch,
        store_batch_size_prompts=args.batch // 64 // args.ranks,  # one LLM batch per rank per step
        n_batches_in_buffer=2 * args.batch // 64,  # the shuffle buffer holds two global batches
        checkpoint_path=None,
        output_path=None,
        logger=LoggingConfig(log_to_wandb=False),
        verbose=False,
    )


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str, layers: str) -> None:
    torch.set_num_threads(args.threads)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        runner = TranscoderTrainingRunner(_config(args), distributed_layers=layers)  # type: ignore[arg-type]
        if world > 1:
            dist.barrier()  # all ranks loaded: time the training only
        start = time.perf_counter()
        runner.run()
        wall = time.perf_counter() - start
        if rank == 0:
            Path(out).write_text(json.dumps({"wall_s": wall}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _tokens_per_s(world: int, args: argparse.Namespace, scratch: Path, layers: str = "replicate") -> float:
    out = scratch / f"world{world}-{layers}.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    processes = [context.Process(target=_rank, args=(r, world, port, args, str(out), layers)) for r in range(world)]
    for p in processes:
        p.start()
    for p in processes:
        p.join()
    if any(p.exitcode != 0 for p in processes):
        raise SystemExit(f"a rank of the {world}-rank run failed: exit codes {[p.exitcode for p in processes]}")
    return args.tokens / json.loads(out.read_text())["wall_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=1024, help="global training batch (tokens)")
    parser.add_argument("--d-sae", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--set", action="store_true", help="train the set of every MLP; add a layer-sharded row")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"distributed_cpu_{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    rows = [("1 rank", 1, "replicate"), (f"{args.ranks} ranks", args.ranks, "replicate")]
    if args.set:
        rows.append((f"{args.ranks} ranks, layers sharded", args.ranks, "shard"))
    best: dict[str, float] = {}
    for _ in range(args.repeats):  # alternate, so all see the same machine load
        for name, world, layers in rows:
            best[name] = max(best.get(name, 0.0), _tokens_per_s(world, args, scratch, layers))
    one = best["1 rank"]
    for name, _, _ in rows:
        print(f"{name}: {best[name]:.0f} tokens/s; ratio to 1 rank {best[name] / one:.2f}")
    ratio = best[f"{args.ranks} ranks"] / one
    if args.json:
        result = {
            "args": vars(args),
            "tokens_per_s": best,
            "ratio": ratio,
            "ratios_to_1_rank": {name: v / one for name, v in best.items()},
            "machine": {"cpus": os.cpu_count(), "load_average_1m": os.getloadavg()[0], "platform": platform.platform()},
            "torch": torch.__version__,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
