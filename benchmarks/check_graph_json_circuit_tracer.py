"""Do our graph files survive circuit-tracer's own graph models? Runs in circuit-tracer's venv.

    /work/ct-venv/bin/python benchmarks/check_graph_json_circuit_tracer.py GRAPH.json|DIR ... \
        [--reference WORKDIR --tokenizer DIR --reference-out DIR] [--results OUT.md]

Imports only the standard library, pydantic and circuit_tracer (never this package). For
every graph file given (a folder stands for the graphs its ``graph-metadata.json`` lists)
it

* validates the file with circuit-tracer's pydantic ``Model``
  (``circuit_tracer/frontend/graph_models.py``);
* round-trips it: ``Model.model_validate(data).model_dump()`` and
  ``json.loads(model_dump_json())`` must equal the file's JSON exactly, key by key, so no
  field is dropped, renamed, coerced or filled in with a default;
* checks what circuit-tracer's front end relies on beyond the models: unique ``node_id``s,
  links between listed nodes, ``feature == cantor(layer, index)`` for transcoder features
  (index read from ``node_id``), unique ``layer_feature_ctx`` keys (the viewer's
  ``featureId``), every ``ctx_idx`` inside ``prompt_tokens``, and how many nodes the
  viewer's pruning slider hides when it opens at ``metadata.node_threshold`` (it keeps
  embeddings, logits and nodes with ``influence <= node_threshold``).

With ``--reference`` it first has circuit-tracer itself write a graph: it loads the model
and transcoder set that ``circuit_tracer_side_by_side.prepare`` wrote to WORKDIR (through
``_circuit_tracer_worker.build_model``), runs ``attribute`` and then
``create_graph_files`` with the tokenizer in ``--tokenizer``, into ``--reference-out``; that
file is checked like the others (and is the test fixture
``tests/fixtures/circuit_tracer_graph.json``). ``--results`` writes the table as markdown.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

INDEX_NAME = "graph-metadata.json"


def cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def write_reference_graph(
    workdir: Path, tokenizer_dir: Path, out_dir: Path, node_threshold: float, edge_threshold: float, max_feature_nodes: int
) -> Path:
    """circuit-tracer's own graph file for the prompt in ``workdir`` (see the module docstring)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _circuit_tracer_worker import build_model

    from circuit_tracer import attribute
    from circuit_tracer.utils import create_graph_files

    # The tokenizer folder may come from a newer transformers than this venv's ("TokenizersBackend"):
    # a copy of its tokenizer.json declared as a plain fast tokenizer decodes the same.
    portable = out_dir / "_tokenizer"
    portable.mkdir(parents=True, exist_ok=True)
    shutil.copy(tokenizer_dir / "tokenizer.json", portable / "tokenizer.json")
    (portable / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    model, info = build_model(workdir)
    graph = attribute(info["tokens"], model, max_n_logits=3, desired_logit_prob=0.9, batch_size=32, max_feature_nodes=max_feature_nodes)
    graph.cfg.tokenizer_name = str(portable)  # create_graph_files decodes prompt tokens with it
    graph.input_string = json.loads((workdir / "setup.json").read_text())["prompt"]  # not the stub tokenizer's decoding
    slug = "circuit-tracer-reference"
    create_graph_files(graph, slug, str(out_dir), node_threshold=node_threshold, edge_threshold=edge_threshold)
    return out_dir / f"{slug}.json"


def differences(a: Any, b: Any, where: str = "$") -> list[str]:
    """Where two JSON values differ (types included: 1 and 1.0 differ), at most a few."""
    if type(a) is not type(b):
        return [f"{where}: {a!r} ({type(a).__name__}) vs {b!r} ({type(b).__name__})"]
    if isinstance(a, dict):
        out = [f"{where}.{k}: only in the file" for k in a.keys() - b.keys()]
        out += [f"{where}.{k}: added by the model" for k in b.keys() - a.keys()]
        for k in a.keys() & b.keys():
            out += differences(a[k], b[k], f"{where}.{k}")
        return out[:5]
    if isinstance(a, list):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} vs {len(b)}"]
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += differences(x, y, f"{where}[{i}]")
            if len(out) >= 5:
                break
        return out
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def viewer_checks(data: dict[str, Any]) -> list[str]:
    """What circuit-tracer's front end assumes of a graph beyond its pydantic models."""
    problems = []
    nodes, links = data["nodes"], data["links"]
    ids = [n["node_id"] for n in nodes]
    if len(set(ids)) != len(ids):
        problems.append(f"{len(ids) - len(set(ids))} duplicate node_id")
    known = set(ids)
    dangling = sum(link["source"] not in known or link["target"] not in known for link in links)
    if dangling:
        problems.append(f"{dangling} links to unlisted nodes")
    keys = [(n["layer"], n["feature"], n["ctx_idx"]) for n in nodes]
    if len(set(keys)) != len(keys):
        problems.append(f"{len(keys) - len(set(keys))} duplicate layer_feature_ctx keys")
    for n in nodes:
        if n["feature_type"] == "cross layer transcoder":
            layer, index, _ = n["node_id"].split("_")
            if n["feature"] != cantor(int(layer), int(index)):
                problems.append(f"{n['node_id']}: feature {n['feature']} is not cantor({layer}, {index})")
                break
    n_tokens = len(data["metadata"]["prompt_tokens"])
    outside = sum(not 0 <= n["ctx_idx"] < n_tokens for n in nodes)
    if outside:
        problems.append(f"{outside} nodes with ctx_idx outside prompt_tokens")
    return problems


def hidden_at_threshold(data: dict[str, Any]) -> int:
    """Nodes the viewer's slider hides when it opens at ``metadata.node_threshold``."""
    threshold = data["metadata"].get("node_threshold")
    if not threshold:
        return 0
    always = ("embedding", "logit")
    return sum(
        n["feature_type"] not in always and not ((n.get("influence") or 0.0) <= threshold) for n in data["nodes"]
    )


def check(path: Path) -> dict[str, Any]:
    from pydantic import ValidationError

    from circuit_tracer.frontend.graph_models import Model

    data = json.loads(path.read_text(encoding="utf-8"))
    row: dict[str, Any] = {"file": str(path), "nodes": len(data.get("nodes", [])), "links": len(data.get("links", []))}
    try:
        model = Model.model_validate(data)
    except ValidationError as e:
        return {**row, "validates": False, "round_trip": False, "problems": [str(e).splitlines()[0]]}
    diff = differences(data, model.model_dump()) + differences(data, json.loads(model.model_dump_json()))
    types = sorted({n["feature_type"] for n in data["nodes"]})
    return {
        **row,
        "validates": True,
        "round_trip": not diff,
        "problems": diff + viewer_checks(data),
        "feature_types": types,
        "schema_version": data["metadata"].get("schema_version"),
        "hidden_at_threshold": hidden_at_threshold(data),
    }


def graph_files(targets: list[Path]) -> list[Path]:
    """The files given, and for each folder the graphs its ``graph-metadata.json`` lists (as
    the viewer finds them)."""
    files = []
    for target in targets:
        if target.is_dir():
            listing = json.loads((target / INDEX_NAME).read_text(encoding="utf-8"))
            files += [target / f"{g['slug']}.json" for g in listing["graphs"]]
        else:
            files.append(target)
    return files


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| file | nodes | links | pydantic validates | exact round trip | hidden by the slider at node_threshold | feature types | problems |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{Path(r['file']).name}` | {r['nodes']} | {r['links']} | {'yes' if r['validates'] else 'NO'} | "
            f"{'yes' if r['round_trip'] else 'NO'} | {r.get('hidden_at_threshold', '-')} | "
            f"{', '.join(r.get('feature_types', []))} | {'; '.join(r['problems']) or 'none'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("graphs", nargs="*", type=Path, help="graph JSON files or folders of them")
    parser.add_argument("--reference", type=Path, help="workdir from circuit_tracer_side_by_side.prepare")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder for the reference graph's prompt tokens")
    parser.add_argument("--reference-out", type=Path, default=Path("/tmp/circuit_tracer_reference_graph"))
    parser.add_argument("--node-threshold", type=float, default=0.5, help="reference graph pruning (small fixture)")
    parser.add_argument("--edge-threshold", type=float, default=0.7, help="reference graph pruning (small fixture)")
    parser.add_argument("--max-feature-nodes", type=int, default=64)
    parser.add_argument("--results", type=Path, help="write the table here (markdown)")
    args = parser.parse_args()

    files = graph_files(args.graphs)
    if args.reference:
        if args.tokenizer is None:
            parser.error("--reference needs --tokenizer")
        files.insert(0, write_reference_graph(
            args.reference, args.tokenizer, args.reference_out, args.node_threshold, args.edge_threshold, args.max_feature_nodes
        ))
    if not files:
        parser.error("no graph files given")
    rows = [check(f) for f in files]
    text = table(rows)
    print(text)
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(text + "\n", encoding="utf-8")
    if not all(r["validates"] and r["round_trip"] and not r["problems"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
