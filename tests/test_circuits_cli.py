"""``sae-lens-transcoder attribute`` end to end on the tiny trained model."""

import json
from pathlib import Path

import pytest
import torch

from sae_lens_transcoder.circuits.graph_json import load_graph_schema
from sae_lens_transcoder.cli import main
from sae_lens_transcoder.models import load_model
from tests.circuit_fixtures import random_transcoder

PROMPT = "To be, or not to be, that is the"


def _saved_transcoders(tmp_path: Path) -> list[str]:
    model = load_model("tiny-gpt2")
    paths = []
    for layer in range(model.cfg.n_layers):
        tc = random_transcoder(model, layer, hook="ln2.hook_normalized")
        tc.cfg.metadata.model_name = "tiny-gpt2"
        path = tmp_path / f"layer{layer}"
        tc.save_model(path)
        paths.append(str(path))
    return paths


def test_attribute_writes_graph_files_and_explains_the_top_prediction(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "graph"
    main(["attribute", "--transcoders", *_saved_transcoders(tmp_path), "--prompt", PROMPT, "--out", str(out), "--max-expansions", "16"])
    summary = json.loads((out / "summary.json").read_text())
    model = load_model("tiny-gpt2")
    with torch.no_grad():
        logits = model(model.to_tokens(PROMPT))[0, -1]
    top2 = logits.topk(2).values
    assert summary["root_value"] == pytest.approx(float(top2[0] - top2[1]), rel=1e-4)
    graph = json.loads((out / "graph.json").read_text())
    schema = load_graph_schema()
    assert set(schema["required"]) <= set(graph)
    assert {n["feature_type"] for n in graph["nodes"]} >= {"logit", "cross layer transcoder"}
    assert (out / "graph.html").read_text().count("<svg") >= 1 and (out / "graph.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert (out / "paths.txt").read_text().splitlines()[0] in printed


def test_attribute_feature_target_and_bad_token_are_reported(tmp_path: Path) -> None:
    paths = _saved_transcoders(tmp_path)
    out = tmp_path / "feature"
    main(["attribute", "--transcoders", *paths, "--prompt", PROMPT, "--out", str(out), "--target", "feature", "--layer", "1", "--feature", "3", "--pos", "2"])
    assert json.loads((out / "summary.json").read_text())["root"] == "feature/L1/t2/f3"
    with pytest.raises(SystemExit, match="token='not one token at all'"):
        main(["attribute", "--transcoders", *paths, "--prompt", PROMPT, "--out", str(out), "--token", "not one token at all"])
    with pytest.raises(SystemExit, match="a feature target needs layer and feature"):
        main(["attribute", "--transcoders", *paths, "--prompt", PROMPT, "--out", str(out), "--target", "feature"])


def test_attribute_dashboards_write_the_graphs_feature_files(tmp_path: Path) -> None:
    from sae_lens_transcoder.features.feature_files import graph_features

    out = tmp_path / "graph"
    main(["attribute", "--transcoders", *_saved_transcoders(tmp_path), "--prompt", PROMPT, "--out", str(out),
          "--max-expansions", "12", "--dashboards", "--dataset", "embedded", "--dashboard-tokens", "2048"])
    graph = json.loads((out / "graph.json").read_text())
    wanted = graph_features(graph)
    written = sorted((out / "features").rglob("*.json"))
    assert sum(len(v) for v in wanted.values()) == len(written) == json.loads((out / "summary.json").read_text())["feature_files"] > 0
    page = json.loads(written[0].read_text())
    assert page["n_tokens"] >= 2048 - 64 and page["examples_quantiles"]
    with pytest.raises(SystemExit, match="--dashboard-tokens"):
        main(["attribute", "--transcoders", *_saved_transcoders(tmp_path), "--prompt", PROMPT, "--out", str(out), "--dashboards", "--dashboard-tokens", "0"])


def test_attribute_takes_a_cross_layer_transcoder(tmp_path: Path) -> None:
    from sae_lens_transcoder.replacement.cross_layer import CLT_HOOKS_KEY
    from sae_lens_transcoder.saes.clt import TrainingCLTConfig, TrainingCrossLayerTranscoder
    from sae_lens_transcoder.saes.clt_files import save_clt

    model = load_model("tiny-gpt2")
    cfg = TrainingCLTConfig(d_in=model.cfg.d_model, d_sae=64, n_layers=2)
    cfg.metadata.model_name = "tiny-gpt2"
    cfg.metadata[CLT_HOOKS_KEY] = [[f"blocks.{i}.ln2.hook_normalized", f"blocks.{i}.hook_mlp_out"] for i in range(2)]
    torch.manual_seed(0)
    clt = TrainingCrossLayerTranscoder(cfg)
    with torch.no_grad():
        for param in clt.parameters():
            param.copy_(0.3 * torch.randn_like(param))
    out = tmp_path / "graph"
    main(["attribute", "--transcoders", str(save_clt(clt, tmp_path / "clt")), "--prompt", PROMPT, "--out", str(out), "--max-expansions", "12"])
    summary = json.loads((out / "summary.json").read_text())
    with torch.no_grad():
        top2 = model(model.to_tokens(PROMPT))[0, -1].topk(2).values
    assert summary["root_value"] == pytest.approx(float(top2[0] - top2[1]), rel=1e-4)
    assert any(n["feature_type"] == "cross layer transcoder" for n in json.loads((out / "graph.json").read_text())["nodes"])
