"""The viewer in a real browser: headless Chromium (Debian's ``chromium`` + ``chromium-driver``)
driven by Selenium loads a served folder with a real graph and real feature files.

Screenshots go to pytest's tmp dir and, when ``SLT_SCREENSHOT_DIR`` is set, there too.
``SLT_CHROMIUM`` / ``SLT_CHROMEDRIVER`` override where the browser and its driver are found.
"""

import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sae_lens_transcoder.features.paths import node_feature
from sae_lens_transcoder.viewer import ViewerServer
from tests.test_feature_files import build_viewer_folder, tiny_setup

INSTALL = "apt-get install -y chromium chromium-driver && pip install 'selenium>=4.20'"
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1600,1000",
)
WAIT_S = 20


def _find(env: str, names: tuple[str, ...]) -> str | None:
    """The executable named by ``env``, else the first of ``names`` on PATH (None if absent)."""
    candidates = (os.environ[env],) if os.environ.get(env) else names
    return next((path for path in map(shutil.which, candidates) if path), None)


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip(f"selenium is not installed; to run the browser test: {INSTALL}")
    binary = _find("SLT_CHROMIUM", ("chromium", "chromium-browser", "google-chrome"))
    driver_path = _find("SLT_CHROMEDRIVER", ("chromedriver",))
    if binary is None or driver_path is None:
        pytest.skip(f"headless Chromium or chromedriver not found (binary={binary}, driver={driver_path}); install them: {INSTALL}")
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never download a browser
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def _screenshot(driver: Any, tmp_path: Path, name: str) -> None:
    targets = [tmp_path / "screenshots"]
    if os.environ.get("SLT_SCREENSHOT_DIR"):
        targets.append(Path(os.environ["SLT_SCREENSHOT_DIR"]))
    for folder in targets:
        folder.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(folder / f"{name}.png")), f"screenshot {name} failed"


def _visible_count(graph: dict[str, Any], cut: float) -> int:
    always = ("embedding", "logit")
    return sum(1 for n in graph["nodes"] if n["feature_type"] in always or n["influence"] is None or n["influence"] <= cut)


def _shown(text: str) -> str:
    return text.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


def test_graph_renders_and_a_click_opens_the_feature_page(browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    folder = tmp_path / "served"
    folder.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # graphs written before cantor ids warn; the viewer reads both
        graph_path = build_viewer_folder(folder, tiny_setup())
    graph = json.loads(graph_path.read_text())
    wait = WebDriverWait(browser, WAIT_S)

    with ViewerServer(folder) as server:
        browser.get(server.url)
        link = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "a.graph-link")))
        assert link.text == graph["metadata"]["slug"]
        _screenshot(browser, tmp_path, "1-graph-list")
        link.click()

        # The graph page opens pruned at the graph's node_threshold, as circuit-tracer's viewer does.
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#graph-svg .node")))
        cut = graph["metadata"]["node_threshold"]
        assert len(browser.find_elements(By.CSS_SELECTOR, "#graph-svg .node")) == _visible_count(graph, cut)
        assert _visible_count(graph, cut) < len(graph["nodes"]), "the fixture graph should have nodes to prune"
        labels = [t.text for t in browser.find_elements(By.CSS_SELECTOR, "#graph-svg .token-label")]
        assert labels == [_shown(t) for t in graph["metadata"]["prompt_tokens"]]
        for value in (1.0, 0.3):
            browser.execute_script(
                "const s = document.getElementById('prune'); s.value = arguments[0]; s.dispatchEvent(new Event('input'));", value
            )
            assert len(browser.find_elements(By.CSS_SELECTOR, "#graph-svg .node")) == _visible_count(graph, value)
        browser.execute_script(
            "const s = document.getElementById('prune'); s.value = 1; s.dispatchEvent(new Event('input'));"
        )

        # Hover: details of the feature with the most inputs in the graph; then click it.
        features = [n for n in graph["nodes"] if node_feature(n) is not None]
        node = max(features, key=lambda n: (sum(link["target"] == n["node_id"] for link in graph["links"]), -n["influence"]))
        circle = browser.find_element(By.CSS_SELECTOR, f'#graph-svg .node[data-node-id="{node["node_id"]}"]')
        ActionChains(browser).move_to_element(circle).perform()
        tooltip = wait.until(ec.visibility_of_element_located((By.ID, "tooltip")))
        assert node["node_id"] in tooltip.text
        wait.until(lambda _: "logit lens:" in tooltip.text)  # from the feature file, loaded on hover
        assert browser.find_elements(By.CSS_SELECTOR, "#graph-svg .edge.path"), "hovering should light the path to the output"
        _screenshot(browser, tmp_path, "2-graph-hover")
        circle.click()

        # The feature page: its top contexts with their highlighted tokens, logit lens, links.
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#contexts .context")))
        layer, index = node_feature(node)  # type: ignore[misc]
        feature = json.loads((folder / "features" / graph["metadata"]["scan"] / f"{(layer + index) * (layer + index + 1) // 2 + index}.json").read_text())
        assert browser.find_element(By.ID, "node-title").text == f"L{layer} feature {index} at “{_shown(graph['metadata']['prompt_tokens'][node['ctx_idx']])}” (t{node['ctx_idx']})"
        top = feature["examples_quantiles"][0]["examples"]
        rows = browser.find_elements(By.CSS_SELECTOR, "#contexts .examples")[0].find_elements(By.CSS_SELECTOR, ".context")
        assert len(rows) == len(top) > 0
        for row, example in zip(rows, top):
            assert row.get_attribute("textContent") == "".join(_shown(t) for t in example["tokens"])
            marked = row.find_element(By.CSS_SELECTOR, ".tok.max")
            assert float(marked.get_attribute("title")) == pytest.approx(example["tokens_acts_list"][example["train_token_ind"]], rel=1e-2)
        n_groups = len(browser.find_elements(By.CSS_SELECTOR, "#contexts h3.quantile"))
        assert n_groups == len(feature["examples_quantiles"])
        lens = browser.find_element(By.ID, "logit-lens").get_attribute("textContent")
        assert all(_shown(t) in lens for t in feature["top_logits"])
        assert browser.find_element(By.ID, "de-embedding").find_elements(By.CSS_SELECTOR, ".chip")
        n_in = sum(1 for link in graph["links"] if link["target"] == node["node_id"])
        n_out = sum(1 for link in graph["links"] if link["source"] == node["node_id"])
        assert n_in > 0 and len(browser.find_elements(By.CSS_SELECTOR, "#upstream tr")) == n_in + 1  # + header row
        assert len(browser.find_elements(By.CSS_SELECTOR, "#downstream tr")) == n_out + (1 if n_out else 0)
        path_nodes = browser.find_elements(By.CSS_SELECTOR, "#path .path-node")
        assert len(path_nodes) >= 2 and path_nodes[-1].text.startswith("Output")
        browser.set_window_size(1600, 2400)
        _screenshot(browser, tmp_path, "3-feature-page")

        severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert not severe, f"console errors: {severe}"
