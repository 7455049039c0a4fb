"""``sae-lens-transcoder attribute``: explain one prediction of a model through its transcoders, for one
prompt or for each of a file of them (shared by the ranks under torchrun)."""

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sae_lens_transcoder.circuits.attribution import Target
from sae_lens_transcoder.circuits.graph import AttributionGraph, build_graph, prune
from sae_lens_transcoder.circuits.graph_json import save_graph_json
from sae_lens_transcoder.circuits.graph_plot import format_paths, logit_lens_labels, save_graph_html, save_graph_png
from sae_lens_transcoder.circuits.paths import find_paths
from sae_lens_transcoder.circuits.targets import check_feature_flags, resolve_target
from sae_lens_transcoder.circuits.trace import Trace, trace_prompt
from sae_lens_transcoder.distributed.collectives import PeerFailure
from sae_lens_transcoder.distributed.prompts import PromptsFailed, over_prompts
from sae_lens_transcoder.distributed.world import DEFAULT_TIMEOUT_S, launched_by_torchrun, process_group_from_env
from sae_lens_transcoder.features.feature_files import write_graph_feature_files
from sae_lens_transcoder.loading import load_model_for, load_transcoders
from sae_lens_transcoder.replacement import PerLayerTranscoders, ReplacementSet
from sae_lens_transcoder.report import heldout_tokens, load_heldout_split
from sae_lens_transcoder.saes.clt_files import is_clt_dir, load_clt
from sae_lens_transcoder.splicing import as_splices
from sae_lens_transcoder.validation import check_number, check_replacement_fits_model, check_splices_fit_model, exit_on_bad_input


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae-lens-transcoder attribute",
        description="Attribute a logit (difference) or a feature to upstream features, heads and "
        "embeddings; write the graph (viewer JSON, HTML, PNG) and print the strongest paths.",
    )
    parser.add_argument("--transcoders", nargs="+", required=True,
                        help="SAELens-format dirs or release/sae_id, one per layer; a set directory; or one cross-layer transcoder directory")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt")
    prompts.add_argument("--prompts-file", help="one prompt per line: each gets its own folder prompt_<i>/ under --out, "
                         "and --out/index.json lists them; under torchrun the ranks share the prompts")
    parser.add_argument("--out", required=True, help="directory for graph.json, graph.html, graph.png, paths.txt")
    parser.add_argument("--model", help="model name (default: the transcoders' metadata.model_name)")
    parser.add_argument("--target", choices=("logit", "feature"), default="logit")
    parser.add_argument("--token", help="logit target token (default: the top prediction)")
    parser.add_argument("--versus", help="subtract this token's logit (default: the runner-up, if --token is not given)")
    parser.add_argument("--layer", type=int, help="feature target: the transcoder's layer")
    parser.add_argument("--feature", type=int, help="feature target: the feature id")
    parser.add_argument("--pos", type=int, default=-1, help="token position of the target (negative: from the end)")
    parser.add_argument("--max-expansions", type=int, default=64, help="features/heads expanded in the graph")
    parser.add_argument("--node-threshold", type=float, default=0.8, help="pruning: share of influence kept")
    parser.add_argument("--edge-threshold", type=float, default=0.98, help="pruning: share of edge weight kept")
    parser.add_argument("--keep-extra-nodes", action="store_true",
                        help="graph.json: keep heads, biases, skips as nodes of their own (default: folded into "
                        "circuit-tracer's node kinds, every edge total unchanged)")
    parser.add_argument("--num-iters", type=int, default=3, help="path search depth")
    parser.add_argument("--num-branches", type=int, default=10, help="path search beam width")
    parser.add_argument("--top-paths", type=int, default=10, help="paths printed")
    parser.add_argument("--dashboards", action="store_true",
                        help="also write the feature files of the graph's features (features/<scan>/<id>.json, what `serve` shows)")
    parser.add_argument("--dataset", help="--dashboards: dataset with a held-out split (default: the metadata's dataset_path)")
    parser.add_argument("--dashboard-tokens", type=int, default=16384, help="--dashboards: held-out tokens scanned")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="--prompts-file under torchrun: seconds a rank waits for the others to finish their prompts")
    return parser


def _load_replacement(args: argparse.Namespace) -> tuple[ReplacementSet, dict[int, str], Any, list[str] | None]:
    """(replacement set, the spec each layer came from, metadata, per-transcoder labels or None for a CLT)."""
    if len(args.transcoders) == 1 and is_clt_dir(Path(args.transcoders[0]).expanduser()):
        clt = load_clt(args.transcoders[0], args.device)
        return clt, {layer: args.transcoders[0] for layer in clt.layers}, clt.clt.cfg.metadata, None
    loaded = [(spec, name, tc) for spec in args.transcoders for name, tc in load_transcoders([spec], args.device)]
    splices = as_splices([tc for *_, tc in loaded])
    specs_by_layer = {s.layer: spec for (spec, _, _), s in zip(loaded, splices)}
    return PerLayerTranscoders(splices), specs_by_layer, loaded[0][2].cfg.metadata, [name for _, name, _ in loaded]


def _write_feature_pages(json_path: Path, model: Any, replacement: ReplacementSet, meta: Any, args: argparse.Namespace) -> int:
    """The feature files of the graph's features, from held-out text, beside the graph."""
    dataset_path = args.dataset or meta.dataset_path
    if not dataset_path:
        raise ValueError("--dashboards needs --dataset (the transcoders' metadata names no dataset_path)")
    context = min(meta.context_size or 128, model.cfg.n_ctx)
    prepend_bos = meta.prepend_bos if meta.prepend_bos is not None else True
    tokens = heldout_tokens(model, load_heldout_split(dataset_path), context, args.dashboard_tokens, prepend_bos)
    return len(write_graph_feature_files(json_path, model, replacement, tokens))


def _write_graph_files(
    out: Path, full: AttributionGraph, graph: AttributionGraph, trace: Trace, root: Target, label: str, title: str,
    specs_by_layer: dict[int, str], prompt: str, args: argparse.Namespace,
) -> Path:
    """graph.json (the unpruned graph, pruned on writing as circuit-tracer does), graph.html
    and graph.png (the pruned graph within the pictures' node budget), features labelled by
    their top logit-lens token; returns the JSON file."""
    labels = logit_lens_labels(trace, graph)
    one_logit = root.node.kind == "target" and args.token is not None and args.versus is None
    json_path = save_graph_json(
        full, out / "graph.json", trace=trace, prompt=prompt, scan=specs_by_layer,
        node_threshold=args.node_threshold, edge_threshold=args.edge_threshold, target_label=label,
        target_token=root.node.index if one_logit else None, keep_extra_nodes=args.keep_extra_nodes,
        token_prob=float(trace.logits[root.node.pos].softmax(-1)[root.node.index]) if root.node.kind == "target" else None,
        clerps={(n.layer, n.index): text for n, text in labels.items()},
    )
    for save, name in ((save_graph_html, "graph.html"), (save_graph_png, "graph.png")):
        save(full, out / name, title=title, labels=labels, node_threshold=args.node_threshold, edge_threshold=args.edge_threshold)
    return json_path


def attribute(argv: Sequence[str]) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    with exit_on_bad_input("attribute"):
        check_number("--dashboard-tokens", args.dashboard_tokens, integer=True, minimum=1)
        check_number("--dist-timeout", args.dist_timeout, integer=False, minimum=1)
        prompts = _read_prompts(Path(args.prompts_file)) if args.prompts_file else None
    if prompts is None:
        if launched_by_torchrun() and int(os.environ["RANK"]) != 0:
            # One prompt is one rank's work: the others would only write the same files again.
            print(f"rank {os.environ['RANK']}: one --prompt is attributed by rank 0 (--prompts-file shares prompts over the ranks)")
            return {"rank": int(os.environ["RANK"])}
        return _attribute_prompt(args.prompt, Path(args.out), *_load(args), args)
    # Under torchrun, each rank attributes its share of the prompts (rank r: r, r + N, ...).
    with process_group_from_env(args.device, args.dist_timeout) as world:
        loaded = _load(args)
        try:
            results = over_prompts(prompts, lambda i, prompt: _attribute_prompt(prompt, Path(args.out) / prompt_dir(i), *loaded, args), world)
        except (PromptsFailed, PeerFailure) as error:
            raise SystemExit(f"sae-lens-transcoder attribute: {error}") from None
    if results is None:
        return {"rank": world.rank}
    index = {"prompts": [{"prompt": prompt, "dir": prompt_dir(i), **result} for i, (prompt, result) in enumerate(zip(prompts, results))]}
    (Path(args.out) / "index.json").write_text(json.dumps(index, indent=2))
    print(f"attributed {len(prompts)} prompts on {world.size} rank(s) -> {Path(args.out) / 'index.json'}")
    return index


def prompt_dir(i: int) -> str:
    """The folder of the i-th prompt of a --prompts-file under --out."""
    return f"prompt_{i:04d}"


def _read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise ValueError(f"--prompts-file {path}: no such file.")
    prompts = [line for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts-file {path} holds no prompt; write one prompt per line.")
    return prompts


def _load(args: argparse.Namespace) -> tuple[Any, ReplacementSet, dict[int, str], Any, str]:
    """(model, replacement set, the spec each layer came from, metadata, model name), checked
    against each other and the target flags."""
    with exit_on_bad_input("attribute"):
        replacement, specs_by_layer, meta, names = _load_replacement(args)
        check_feature_flags(args.target, args.layer, args.feature, {layer: replacement.d_sae(layer) for layer in replacement.layers})
        model_name = args.model or meta.model_name
        if not model_name:
            raise ValueError("give --model (the transcoders' metadata names no model)")
        model = load_model_for(model_name, meta, args.device)
        if isinstance(replacement, PerLayerTranscoders):
            check_splices_fit_model(model, list(replacement.splices.values()), model_name, labels=names)
        else:
            check_replacement_fits_model(model, replacement)
    return model, replacement, specs_by_layer, meta, model_name


def _attribute_prompt(
    prompt: str, out: Path, model: Any, replacement: ReplacementSet, specs_by_layer: dict[int, str], meta: Any, model_name: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One prompt's graph, paths and summary, written under ``out``; the summary."""
    with exit_on_bad_input("attribute"):
        trace = trace_prompt(model, replacement, prompt)
        root, label = resolve_target(trace, args.target, args.pos, args.token, args.versus, args.layer, args.feature)
    tokens = trace.str_tokens()
    paths = find_paths(trace, root, args.num_iters, args.num_branches)
    full = build_graph(trace, root, args.max_expansions)
    graph = prune(full, args.node_threshold, args.edge_threshold)
    out.mkdir(parents=True, exist_ok=True)
    json_path = _write_graph_files(out, full, graph, trace, root, label, f"{model_name}: {prompt!r} -> {label}", specs_by_layer, prompt, args)
    listing = format_paths(paths[: args.top_paths], tokens)
    (out / "paths.txt").write_text(listing + "\n")
    n_pages = 0
    if args.dashboards:
        with exit_on_bad_input("attribute"):
            n_pages = _write_feature_pages(json_path, model, replacement, meta, args)
        print(f"wrote {n_pages} feature files beside {json_path} (sae-lens-transcoder serve {out})")
    print(f"target {root.node} = {graph.root_value:+.4f}; graph: {len(graph.nodes)} nodes, {len(graph.edges)} edges -> {out}")
    print(listing)
    summary = {"root": str(root.node), "root_value": graph.root_value, "n_nodes": len(graph.nodes),
               "n_edges": len(graph.edges), "graph_json": str(json_path), "top_paths": listing.splitlines(),
               "feature_files": n_pages}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
