"""Feature dashboards on the tiny trained model and held-out text, checked against brute force."""

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch
from transformer_lens import HookedTransformer

from sae_lens_transcoder.circuits.dashboard import (
    NEWLINE,
    feature_dashboard,
    save_dashboard_html,
    save_dashboard_json,
    top_activating_contexts,
)
from sae_lens_transcoder.models import load_model
from sae_lens_transcoder.report import heldout_tokens, load_heldout_split
from sae_lens_transcoder.splicing import Splice
from tests.circuit_fixtures import random_transcoder

HOOK = "ln2.hook_normalized"
K = 8


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    return load_model("tiny-gpt2")


@pytest.fixture(scope="module")
def splices(model: HookedTransformer) -> list[Splice]:
    assert f"blocks.1.{HOOK}" in model.hook_dict
    return [Splice.from_sae(random_transcoder(model, layer, hook=HOOK)) for layer in (0, 1)]


@pytest.fixture(scope="module")
def tokens(model: HookedTransformer) -> torch.Tensor:
    return heldout_tokens(model, load_heldout_split("embedded"), 64, 384)


def _all_acts(model: HookedTransformer, splice: Splice, tokens: torch.Tensor) -> torch.Tensor:
    """``[batch, seq, d_sae]``: SAELens's ``encode`` on the real model's cached MLP inputs, all at once."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=splice.hook_name)
        return splice.transcoder.encode(cache[splice.hook_name] * splice.input_scale)


@pytest.fixture(scope="module")
def feature(model: HookedTransformer, splices: list[Splice], tokens: torch.Tensor) -> int:
    """A feature active on between 5% and 50% of tokens, so its top ``K`` has no ties at zero."""
    density = (_all_acts(model, splices[1], tokens) > 0).float().mean((0, 1))
    return int(((density > 0.05) & (density < 0.5)).nonzero()[0])


def _centered(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(-1, keepdim=True)


def test_top_contexts_equal_brute_force_topk(
    model: HookedTransformer, splices: list[Splice], tokens: torch.Tensor, feature: int
) -> None:
    acts = _all_acts(model, splices[1], tokens)[..., feature]
    contexts = top_activating_contexts(model, splices[1], feature, tokens, k=K, batch_size=2)
    values = torch.tensor([c.activation for c in contexts])
    assert len({c.sequence // 2 for c in contexts}) > 1, "the top k should span batches, to test the merge"
    torch.testing.assert_close(values, acts.flatten().topk(K).values)
    assert values.tolist() == sorted(values.tolist(), reverse=True)
    for c in contexts:
        assert float(acts[c.sequence, c.position]) == pytest.approx(c.activation, rel=1e-5)
        stop = c.start + len(c.tokens)
        assert (c.start, stop) == (max(0, c.position - 8), min(tokens.shape[1], c.position + 5))
        assert c.tokens == model.to_str_tokens(tokens[c.sequence, c.start : stop])
        torch.testing.assert_close(torch.tensor(c.activations), acts[c.sequence, c.start : stop], rtol=1e-5, atol=1e-6)


def test_windows_are_cut_at_sequence_edges(model: HookedTransformer, splices: list[Splice], tokens: torch.Tensor, feature: int) -> None:
    short = tokens[:, :6]
    contexts = top_activating_contexts(model, splices[1], feature, short, k=short.numel(), window=(2, 2))
    assert {c.position for c in contexts} == set(range(6))
    for c in contexts:
        assert c.start == max(0, c.position - 2)
        assert c.start + len(c.tokens) == min(6, c.position + 3) == c.start + len(c.activations)


@pytest.fixture(scope="module")
def dashboard(model: HookedTransformer, splices: list[Splice], tokens: torch.Tensor, feature: int) -> dict[str, Any]:
    return feature_dashboard(model, splices[1], feature, tokens, upstream=[splices[0]], k=K)


def _assert_top_tokens(model: HookedTransformer, section: dict[str, Any], scores: torch.Tensor) -> None:
    for side, signed in (("top", scores), ("bottom", -scores)):
        best = signed.topk(K)
        assert [t["token"] for t in section[side]] == [model.to_single_str_token(int(i)) for i in best.indices]
        torch.testing.assert_close(torch.tensor([t["score"] for t in section[side]]), scores[best.indices], rtol=1e-4, atol=1e-5)


def test_dashboard_weight_views_equal_topk_of_weight_products(
    model: HookedTransformer, splices: list[Splice], tokens: torch.Tensor, feature: int, dashboard: dict[str, Any]
) -> None:
    tc0, tc1 = splices[0].transcoder, splices[1].transcoder
    read = _centered(tc1.W_enc[:, feature].detach())  # hook_normalized reads the centred residual
    with torch.no_grad():
        _assert_top_tokens(model, dashboard["logit_lens"], (_centered(tc1.W_dec[feature]) * model.ln_final.w) @ model.W_U)
        _assert_top_tokens(model, dashboard["de_embedding"], _centered(model.W_E) @ read)
        ov = [  # the source residual direction each head maps onto the feature's input direction
            [_centered(model.blocks[layer].ln1.w * (attn.W_V[h] @ (attn.W_O[h] @ read))) for h in range(model.cfg.n_heads)]
            for layer, attn in ((layer, model.blocks[layer].attn) for layer in (0, 1))
        ]
        norms = torch.tensor([[float(d.norm()) for d in row] for row in ov])
        best = norms.flatten().topk(K)
        heads = [(int(i) // model.cfg.n_heads, int(i) % model.cfg.n_heads) for i in best.indices]
        assert [(h["layer"], h["head"]) for h in dashboard["top_heads"]] == heads
        torch.testing.assert_close(torch.tensor([h["norm"] for h in dashboard["top_heads"]]), best.values, rtol=1e-4, atol=1e-6)
        _assert_top_tokens(model, dashboard["best_head_de_embedding"], model.W_E @ ov[heads[0][0]][heads[0][1]])
        connections = tc0.W_dec @ read
    (up,) = dashboard["upstream"]
    assert (up["layer"], up["hook_name"]) == (0, f"blocks.0.{HOOK}")
    assert [c["feature"] for c in up["top"]] == connections.topk(K).indices.tolist()
    assert [c["feature"] for c in up["bottom"]] == (-connections).topk(K).indices.tolist()
    acts = _all_acts(model, splices[1], tokens)[..., feature]
    assert dashboard["density"] == pytest.approx(float((acts > 0).float().mean()))
    assert [c["activation"] for c in dashboard["contexts"]] == pytest.approx(acts.flatten().topk(K).values.tolist(), rel=1e-5)


def test_upstream_must_come_before_the_feature(model: HookedTransformer, splices: list[Splice], tokens: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="is not before layer 0"):
        feature_dashboard(model, splices[0], 0, tokens[:1], upstream=[splices[1]])


class _Spans(HTMLParser):
    """The text inside each token span, as a browser would show it."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []
        self.inside = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.inside = tag == "span" and "tok" in (dict(attrs).get("class") or "").split()
        if self.inside:
            self.texts.append("")

    def handle_endtag(self, tag: str) -> None:
        self.inside = False

    def handle_data(self, data: str) -> None:
        if self.inside:
            self.texts[-1] += data


def test_html_is_standalone_escaped_and_has_one_span_per_token(
    model: HookedTransformer, splices: list[Splice], feature: int, dashboard: dict[str, Any], tmp_path: Path
) -> None:
    prompt = model.to_tokens('if (a < b && c > d) { s = "<b>&amp;</b>"; }')
    risky = feature_dashboard(model, splices[1], feature, prompt, k=prompt.shape[1])
    for board, name in ((dashboard, "heldout.html"), (risky, "risky.html")):
        save_dashboard_html(board, tmp_path / name)
        page = (tmp_path / name).read_text(encoding="utf-8")
        parser = _Spans()
        parser.feed(page)
        assert parser.texts == [t.replace("\n", NEWLINE) for c in board["contexts"] for t in c["tokens"]]
        outside_tokens = re.sub(r'<span class="tok[^>]*>.*?</span>', "", page, flags=re.S)
        assert "http" not in outside_tokens
        assert not re.search(r"src=|href=|url\(|@import|<script|<link", outside_tokens)
    assert any("<" in t for c in risky["contexts"] for t in c["tokens"])
    assert any("&" in t for c in risky["contexts"] for t in c["tokens"])
    assert "&lt;" in page and "&amp;" in page


def test_json_round_trips(dashboard: dict[str, Any], tmp_path: Path) -> None:
    save_dashboard_json(dashboard, tmp_path / "dashboard.json")
    assert json.loads((tmp_path / "dashboard.json").read_text()) == dashboard
