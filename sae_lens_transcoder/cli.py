"""``sae-lens-transcoder``: train, evaluate, export and attribute transcoders from the shell.

SAELens's own CLI never imports plugins; this one registers the transcoder first and
then hands every training flag to SAELens's parser.
"""

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from sae_lens.util import get_special_token_ids

import sae_lens_transcoder  # noqa: F401  (registers architecture="transcoder")
from sae_lens_transcoder.circuits.command import attribute
from sae_lens_transcoder.config_io import runner_config_from_args
from sae_lens_transcoder.convert import UnsafePickleError, convert_pchlenski_transcoder
from sae_lens_transcoder.distributed import PeerFailure, process_group_from_env
from sae_lens_transcoder.distributed.data import rank_share
from sae_lens_transcoder.distributed.launch import resume_latest
from sae_lens_transcoder.distributed.layers import LAYER_MODES
from sae_lens_transcoder.distributed.world import DEFAULT_TIMEOUT_S, World
from sae_lens_transcoder.evals import evaluate_spliced
from sae_lens_transcoder.export.circuit_tracer import export_circuit_tracer
from sae_lens_transcoder.features.command import features
from sae_lens_transcoder.llm_transcoder_training_runner import TranscoderTrainingRunner
from sae_lens_transcoder.loading import load_model_for, load_transcoders
from sae_lens_transcoder.plots import plot_feature_density
from sae_lens_transcoder.report import format_table, heldout_tokens, load_heldout_split
from sae_lens_transcoder.splicing import as_splices
from sae_lens_transcoder.saes.clt_files import is_clt_dir, load_clt
from sae_lens_transcoder.validation import check_number, check_replacement_fits_model, check_splices_fit_model, exit_on_bad_input
from sae_lens_transcoder.training.activations_store import NonFiniteActivationsError
from sae_lens_transcoder.training.trainer import NonFiniteLossError, TrainingInterrupted
from sae_lens_transcoder.viewer.command import serve


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.tolist()
        elif isinstance(value, dict):
            out[key] = _jsonable(value)
        elif isinstance(value, list):
            out[key] = [_jsonable(v) if isinstance(v, dict) else v for v in value]
        else:
            out[key] = value
    return out


def train(argv: Sequence[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="sae-lens-transcoder train",
        description="Train a transcoder. All SAELens training flags are accepted "
        "(see `sae-lens-transcoder train --help-sae-lens`); flags override --config.",
    )
    parser.add_argument("--config", help="YAML/JSON runner config (LanguageModelSAERunnerConfig.from_dict format)")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens for the final table (0: skip)")
    parser.add_argument("--json", help="write the final metrics here")
    parser.add_argument("--overwrite", action="store_true", help="replace --output_path even if it holds other files")
    parser.add_argument("--help-sae-lens", action="store_true", help="list SAELens's flags")
    parser.add_argument(
        "--resume-latest",
        action="store_true",
        help="resume from the newest complete checkpoint under --checkpoint_path, if any (what a torchrun "
        "--max-restarts restart needs; give each experiment its own --checkpoint_path)",
    )
    parser.add_argument(
        "--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S, help="under torchrun: seconds a rank waits for the others"
    )
    parser.add_argument(
        "--distributed-layers",
        choices=LAYER_MODES,
        default=None,
        help="under torchrun (overrides sae.distributed_layers, default 'replicate'): 'replicate' (every rank "
        "trains everything, data parallel), 'shard' (a set: each rank trains its share of the layers, "
        "round-robin, on the global batch) or 'shard_features' (a CLT: each rank trains its share of every "
        "layer's features)",
    )
    ours, sae_lens_args = parser.parse_known_args(argv)
    if ours.help_sae_lens:
        runner_config_from_args(["--architecture", "transcoder", "--help"])
    with exit_on_bad_input("train"):
        check_number("--eval-tokens", ours.eval_tokens, integer=True, minimum=0, hint=" (0 skips the evaluation)")
        check_number("--dist-timeout", ours.dist_timeout, integer=False, minimum=1)
        cfg = runner_config_from_args(sae_lens_args, config_file=ours.config)
    # Under torchrun, every rank runs this; the group lasts until training and saving end.
    with process_group_from_env(cfg.device, ours.dist_timeout) as world:
        with exit_on_bad_input("train"):
            if ours.resume_latest:
                resume_latest(cfg, world)
            start = time.perf_counter()
            runner = TranscoderTrainingRunner(cfg, overwrite_output=ours.overwrite, distributed_layers=ours.distributed_layers)
        try:
            runner.run()
        except TrainingInterrupted as stop:
            print(f"sae-lens-transcoder train: {stop}", file=sys.stderr)
            raise SystemExit(128 + (stop.signal_number or 0)) from None
        except (NonFiniteLossError, NonFiniteActivationsError, PeerFailure) as error:
            raise SystemExit(f"sae-lens-transcoder train: {error}") from None
        except OSError as error:  # e.g. a full disk at the final save, which leaves output_path as it was
            raise SystemExit(f"sae-lens-transcoder train: {error}") from None
    if not world.is_writer:
        return {"rank": world.rank, "output_path": cfg.output_path}
    return _report_training(runner, cfg, ours, start)


def _report_training(runner: TranscoderTrainingRunner, cfg: Any, ours: argparse.Namespace, start: float) -> dict[str, Any]:
    """The summary table, held-out evaluation and JSON of a finished run (rank 0's job)."""
    wall = time.perf_counter() - start
    summary: dict[str, Any] = {
        "name": f"{cfg.model_name}:{cfg.hook_name}",
        "wall_time_s": wall,
        "training_tokens": cfg.training_tokens,
        "tokens_per_s": cfg.training_tokens / wall,
        "output_path": cfg.output_path,
    }
    if ours.eval_tokens > 0:
        heldout = load_heldout_split(cfg.dataset_path)
        tokens = heldout_tokens(runner.model, heldout, cfg.context_size, ours.eval_tokens, cfg.prepend_bos)  # type: ignore[arg-type]
        metrics = evaluate_spliced(
            runner.model,  # type: ignore[arg-type]
            runner.build_replacement(),
            tokens,
            exclude_special_tokens=runner.activations_store.exclude_special_tokens,
        )
        summary.update({k: v for k, v in metrics.items() if k not in ("feature_density", "per_transcoder")})
        print(format_table([summary]))
    print(
        f"trained {cfg.training_tokens:,} tokens in {wall:.0f} s "
        f"({summary['tokens_per_s']:.0f} tokens/s); transcoder saved to {cfg.output_path}"
    )
    if ours.json:
        Path(ours.json).write_text(json.dumps(_jsonable(summary), indent=2))
    return summary


EVAL_BATCH_SIZE = 8  # sequences per forward pass of `evaluate`, and the unit ranks share


def evaluate(argv: Sequence[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="sae-lens-transcoder evaluate",
        description="Evaluate transcoders spliced into their model, one at a time and all together.",
    )
    parser.add_argument("paths", nargs="+", help="SAELens-format directories or release/sae_id, or one cross-layer transcoder directory")
    parser.add_argument("--model", help="model name (default: the transcoders' metadata.model_name)")
    parser.add_argument("--dataset", help="dataset with a held-out split (default: the metadata's dataset_path)")
    parser.add_argument("--split", help="held-out split name (default: test, else validation)")
    parser.add_argument("--n-tokens", type=int, default=16384)
    parser.add_argument("--context-size", type=int, help="default: the metadata's context_size, else 128")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--keep-special-tokens", action="store_true", help="score BOS/EOS positions too")
    parser.add_argument("--json", help="write all metrics here")
    parser.add_argument("--plots", help="directory for feature-density histograms")
    args = parser.parse_args(argv)
    # Under torchrun, each rank scores its share of the sequences and the sums are added up.
    with process_group_from_env(args.device) as world:
        return _evaluate(args, world)


def _evaluate(args: argparse.Namespace, world: World) -> dict[str, Any]:
    with exit_on_bad_input("evaluate"):
        check_number("--n-tokens", args.n_tokens, integer=True, minimum=1)
        check_number("--context-size", args.context_size, integer=True, minimum=1, optional=True)
        clt = load_clt(args.paths[0], args.device) if len(args.paths) == 1 and is_clt_dir(Path(args.paths[0]).expanduser()) else None
        if clt is not None:  # one model over all its layers: evaluated all replaced, per layer inside
            names, transcoders, meta = args.paths, [], clt.clt.cfg.metadata
        else:
            names, transcoders = map(list, zip(*load_transcoders(args.paths, args.device)))
            meta = transcoders[0].cfg.metadata
        model_name = args.model or meta.model_name
        dataset_path = args.dataset or meta.dataset_path
        if not model_name or not dataset_path:
            raise ValueError("give --model and --dataset (the transcoder's metadata lacks model_name or dataset_path)")
        model = load_model_for(model_name, meta, args.device)
        if clt is None:
            check_splices_fit_model(model, as_splices(transcoders), model_name, labels=names)
        else:
            check_replacement_fits_model(model, clt)
        context = args.context_size or meta.context_size or 128
        if context > model.cfg.n_ctx:
            raise ValueError(f"context size {context} is longer than {model_name!r}'s n_ctx={model.cfg.n_ctx}: pass --context-size {model.cfg.n_ctx}")
        prepend_bos = meta.prepend_bos if meta.prepend_bos is not None else True
        tokens = heldout_tokens(model, load_heldout_split(dataset_path, args.split), context, args.n_tokens, prepend_bos)
        tokens = rank_share(tokens, world, EVAL_BATCH_SIZE)
    exclude = None if args.keep_special_tokens else get_special_token_ids(model.tokenizer)  # type: ignore[arg-type]
    rows: list[dict[str, Any]] = []
    settings = dict(exclude_special_tokens=exclude, batch_size=EVAL_BATCH_SIZE, sum_over_ranks=world.is_distributed)
    if clt is not None:
        rows.append({"name": f"{names[0]} (all {len(clt.layers)} layers)", **evaluate_spliced(model, clt, tokens, **settings)})  # type: ignore[arg-type]
    for path, tc in zip(names, transcoders):
        rows.append({"name": path, **evaluate_spliced(model, [tc], tokens, **settings)})  # type: ignore[arg-type]
    if len(transcoders) > 1:
        rows.append({"name": "all replaced", **evaluate_spliced(model, transcoders, tokens, **settings)})  # type: ignore[arg-type]
    result = {"model": model_name, "dataset": dataset_path, "rows": rows}
    if not world.is_writer:
        return result
    print(format_table(rows))
    if args.plots:
        out = Path(args.plots)
        out.mkdir(parents=True, exist_ok=True)
        for i, row in enumerate(rows[: max(len(transcoders), 1)]):
            plot_feature_density(row["feature_density"], out / f"feature_density_{i}.png", title=row["name"])
    if args.json:
        Path(args.json).write_text(json.dumps(_jsonable(result), indent=2))
    return result


EXPORT_FORMATS = ("circuit-tracer",)


def export(argv: Sequence[str]) -> Path:
    parser = argparse.ArgumentParser(
        prog="sae-lens-transcoder export",
        description="Write transcoders (one per layer) in another tool's format.",
    )
    parser.add_argument("format", choices=EXPORT_FORMATS, help="circuit-tracer: its per-layer transcoder set")
    parser.add_argument("paths", nargs="+", help="SAELens-format directories or release/sae_id, one per layer")
    parser.add_argument("--out", required=True, help="directory to create (config.yaml + layer_<i>.safetensors)")
    parser.add_argument("--model-name", help="TransformerLens model name (default: the transcoders' metadata.model_name)")
    parser.add_argument("--n-layers", type=int, help="the model's layer count: require a transcoder for every layer")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    with exit_on_bad_input("export"):
        transcoders = [tc for _, tc in load_transcoders(args.paths)]
        model_name = args.model_name
        if not model_name:
            names = {tc.cfg.metadata.model_name for tc in transcoders}
            if len(names) != 1 or None in names:
                raise ValueError(f"give --model-name (the transcoders' metadata.model_name is {sorted(map(str, names))})")
            (model_name,) = names
        out = export_circuit_tracer(
            transcoders, args.out, model_name, n_layers=args.n_layers, overwrite=args.overwrite
        )
    print(f"wrote {len(transcoders)} transcoders for {model_name} in circuit-tracer format to {out}")
    return out


CONVERT_FORMATS = ("pchlenski",)


def convert(argv: Sequence[str]) -> Path:
    parser = argparse.ArgumentParser(
        prog="sae-lens-transcoder convert",
        description="Turn another tool's transcoder file into a SAELens directory (loads with SAE.load_from_disk).",
    )
    parser.add_argument("format", choices=CONVERT_FORMATS, help="pchlenski: the paper's pickled GPT-2 transcoders")
    parser.add_argument("path", help="the file to convert (read as tensors only; nothing in it is run)")
    parser.add_argument("--out", required=True, help="the SAELens directory to write")
    args = parser.parse_args(argv)
    with exit_on_bad_input("convert"):
        try:
            out = convert_pchlenski_transcoder(args.path, args.out)
        except UnsafePickleError as e:  # a refused file is bad input too
            raise ValueError(str(e)) from e
    print(f"wrote {out}")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "train": train, "evaluate": evaluate, "export": export, "convert": convert, "attribute": attribute,
        "features": features, "serve": serve,
    }
    if not argv or argv[0] not in commands:
        print(f"usage: sae-lens-transcoder {{{','.join(commands)}}} [options]", file=sys.stderr)
        raise SystemExit(2)
    commands[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
