"""``sae-lens-transcoder features``: write feature files for a graph's features or for all features."""

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from sae_lens_transcoder.features.feature_files import FeatureFileOptions, write_feature_files, write_graph_feature_files
from sae_lens_transcoder.loading import load_model_for, load_transcoders
from sae_lens_transcoder.report import heldout_tokens, load_heldout_split
from sae_lens_transcoder.validation import check_number, exit_on_bad_input


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae-lens-transcoder features",
        description="Write per-feature files (top contexts by quantile, density, histogram, logit lens, "
        "de-embedding) in circuit-tracer's feature format, where its viewer and `serve` look for them.",
    )
    parser.add_argument("--transcoders", nargs="+", required=True, help="SAELens-format dirs or release/sae_id, one per layer")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--graph", help="a graph JSON: write the files of its feature nodes next to it (or under --out)")
    which.add_argument("--scan", help="write every feature's file under --out/features/<SCAN>/ (the graphs' metadata.scan)")
    parser.add_argument("--out", help="the folder to serve (default: the graph's folder; required with --scan)")
    parser.add_argument("--model", help="model name (default: the transcoders' metadata.model_name)")
    parser.add_argument("--dataset", help="dataset with a held-out split (default: the metadata's dataset_path)")
    parser.add_argument("--split", help="split name (default: test, else validation)")
    parser.add_argument("--n-tokens", type=int, default=65536, help="dataset tokens to scan")
    parser.add_argument("--context-size", type=int, help="default: the metadata's context_size, else 128")
    parser.add_argument("--n-top", type=int, default=FeatureFileOptions.n_top)
    parser.add_argument("--n-quantiles", type=int, default=FeatureFileOptions.n_quantiles)
    parser.add_argument("--n-per-quantile", type=int, default=FeatureFileOptions.n_per_quantile)
    parser.add_argument("--batch-size", type=int, default=FeatureFileOptions.batch_size, help="sequences per forward pass")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def features(argv: Sequence[str]) -> list[Path]:
    args = _parser().parse_args(argv)
    with exit_on_bad_input("features"):
        check_number("--n-tokens", args.n_tokens, integer=True, minimum=1)
        if args.scan is not None and args.out is None:
            raise ValueError("--scan writes every feature: give --out, the folder the viewer will serve.")
        options = FeatureFileOptions(
            n_top=args.n_top, n_quantiles=args.n_quantiles, n_per_quantile=args.n_per_quantile, batch_size=args.batch_size
        )
        transcoders = [tc for _, tc in load_transcoders(args.transcoders, args.device)]
        meta = transcoders[0].cfg.metadata
        model_name = args.model or meta.model_name
        dataset_path = args.dataset or meta.dataset_path
        if not model_name or not dataset_path:
            raise ValueError("give --model and --dataset (the transcoders' metadata lacks model_name or dataset_path)")
        model = load_model_for(model_name, meta, args.device)
        context = args.context_size or meta.context_size or 128
        if context > model.cfg.n_ctx:
            raise ValueError(f"--context-size {context} is longer than {model_name!r}'s n_ctx={model.cfg.n_ctx}.")
        prepend_bos = meta.prepend_bos if meta.prepend_bos is not None else True
        tokens = heldout_tokens(model, load_heldout_split(dataset_path, args.split), context, args.n_tokens, prepend_bos)
        if args.graph is not None:
            written = write_graph_feature_files(args.graph, model, transcoders, tokens, args.out, options)
        else:
            written = write_feature_files(model, transcoders, tokens, args.out, args.scan, options=options)
    print(f"wrote {len(written)} feature files from {tokens.numel():,} tokens")
    return written
