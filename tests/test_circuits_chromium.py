"""The circuit viewer in a real headless Chromium: graph, node details, patch marks, browser links, supernodes.

Skips like tests/test_browser_chromium.py when Chromium, chromedriver or selenium is missing. Set
VITCLT_DEMO_CIRCUIT=<a viewer built on the demo> and VITCLT_SCREENSHOTS=<dir> to also save the
screenshot that docs/circuits.md shows.
"""

import io
import json
import os
import urllib.parse
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import random_images
from tests.test_browser import make_run
from tests.test_browser_chromium import driver, js_errors, open_page  # noqa: F401  (driver is a fixture)

By = pytest.importorskip("selenium.webdriver.common.by").By


@pytest.fixture(scope="module")
def viewer(tmp_path_factory, tiny_backbone):
    """A feature browser and a circuit viewer of the same tiny run; returns (viewer dir, graph payload, browser dir)."""
    from vitclt.browser import build_browser
    from vitclt.cli import main

    root = tmp_path_factory.mktemp("circuit_chromium")
    run, spec = make_run(root, tiny_backbone)
    browser = build_browser(run, spec, backbone=tiny_backbone.name, images_per_forward=6, top_k=4, samples=4, vocab_size=0,
                            exports=False, progress=False)
    image = root / "photo.png"
    random_images(1, seed=5)[0].save(image)
    out = root / "viewer"
    main(["explain", str(run), "--image", str(image), "--classes", spec, "--out", str(out), "--effects-top", "4",
          "--node-fraction", "1.0"])
    return out, json.loads((out / "graph.json").read_text()), browser


def fresh(browser, url: str) -> None:
    """Open `url` as a new document (a change of the #fragment alone would not reload the page)."""
    browser.get("about:blank")
    open_page(browser, url)


def node_ids(browser) -> list[str]:
    return [e.get_attribute("data-id") for e in browser.find_elements(By.CSS_SELECTOR, "#graph .node")]


def test_graph_draws_every_kept_node_and_edge(driver, viewer):  # noqa: F811
    out, data, _ = viewer
    open_page(driver, (out / "index.html").as_uri())
    assert node_ids(driver) == [n["id"] for n in data["nodes"]]
    assert len(driver.find_elements(By.CSS_SELECTOR, "#graph path.edge")) == len(data["edges"])
    assert data["meta"]["target_name"] in driver.find_element(By.ID, "title").text
    # Node size follows influence: the most influential non-target node is drawn largest.
    sizes = driver.execute_script("""return [...document.querySelectorAll('#graph .node')].map(e =>
        e.tagName === 'circle' ? +e.getAttribute('r') : +e.getAttribute('width') / 2);""")
    ranked = [i for i, n in sorted(enumerate(data["nodes"]), key=lambda x: -x[1]["influence"]) if n["kind"] != "target"]
    assert sizes[ranked[0]] == max(s for i, s in enumerate(sizes) if data["nodes"][i]["kind"] != "target")
    assert js_errors(driver) == []


def test_selecting_a_feature_marks_its_patch_and_links_to_the_browser(driver, viewer):  # noqa: F811
    out, data, browser = viewer
    grid, prefix = data["meta"]["grid"], data["meta"]["n_prefix"]
    feature = next(n for n in data["nodes"] if n["kind"] == "feature" and n["token"] >= prefix)
    fresh(driver, (out / "index.html").as_uri() + "#node=" + feature["id"])
    details = driver.find_element(By.ID, "details").text
    assert f"L{feature['layer']} #{feature['feature']}" in details
    k = feature["token"] - prefix
    assert f"r{k // grid} c{k % grid}" in details
    marked = driver.find_elements(By.CSS_SELECTOR, "#patches rect.mark")
    assert [m.get_attribute("data-token") for m in marked] == [str(feature["token"])]
    link = driver.find_element(By.ID, "browser-link")
    query = urllib.parse.parse_qs(urllib.parse.urlparse(link.get_attribute("href")).query)
    assert query["layer"] == [str(feature["layer"])] and query["feature"] == [str(feature["feature"])]
    link.click()
    open_page(driver, driver.current_url)
    assert f"layer {feature['layer']} · feature {feature['feature']}" in driver.find_element(By.ID, "title").text
    assert Path(urllib.parse.urlparse(driver.current_url).path).parent == browser.resolve()


def test_effects_show_predicted_next_to_measured(driver, viewer):  # noqa: F811
    out, data, _ = viewer
    node_id, fx = next(iter(data["effects"].items()))
    fresh(driver, (out / "index.html").as_uri() + "#node=" + node_id)
    table = driver.find_element(By.ID, "effects").text
    assert "graph (predicted)" in table and "CLT replacement (measured)" in table and "original model" in table


def test_supernodes_live_in_the_address_and_in_json(driver, viewer):  # noqa: F811
    out, data, _ = viewer
    fresh(driver, (out / "index.html").as_uri())
    feats = [n["id"] for n in data["nodes"] if n["kind"] == "feature"][:2]
    for node_id in feats:
        el = driver.find_element(By.CSS_SELECTOR, f'#graph .node[data-id="{node_id}"]')
        driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {shiftKey: true, bubbles: true}))", el)
    driver.find_element(By.ID, "group-name").send_keys("my group")
    driver.find_element(By.ID, "group").click()
    assert driver.find_element(By.CSS_SELECTOR, "#supernodes li").get_attribute("data-name") == "my group"
    url = driver.current_url
    hash_params = urllib.parse.parse_qs(urllib.parse.urlparse(url).fragment)
    assert json.loads(hash_params["supernodes"][0]) == [["my group", *feats]]
    assert json.loads(driver.execute_script("return C.supernodesJson()"))["supernodes"] == [["my group", *feats]]
    # Reopening the address restores the group.
    fresh(driver, url)
    assert driver.find_element(By.CSS_SELECTOR, "#supernodes li").get_attribute("data-name") == "my group"
    assert len(driver.find_elements(By.CSS_SELECTOR, "#graph .groupring")) == 2
    assert js_errors(driver) == []


@pytest.mark.skipif(not (os.environ.get("VITCLT_DEMO_CIRCUIT") and os.environ.get("VITCLT_SCREENSHOTS")),
                    reason="set VITCLT_DEMO_CIRCUIT and VITCLT_SCREENSHOTS to save the documentation's screenshot")
def test_screenshot_of_the_demo_circuit(driver):  # noqa: F811
    site, out = Path(os.environ["VITCLT_DEMO_CIRCUIT"]), Path(os.environ["VITCLT_SCREENSHOTS"])
    out.mkdir(parents=True, exist_ok=True)
    driver.set_window_size(1300, 860)
    open_page(driver, (site / "index.html").as_uri())
    shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    shot.quantize(256).save(out / "circuit-viewer.png", optimize=True)
    driver.set_window_size(1280, 900)
