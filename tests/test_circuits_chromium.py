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


@pytest.fixture(scope="module")
def class_viewer(viewer):
    """The class circuit of "red car" over 3 images of the same run; returns (viewer dir, graph payload, dataset spec)."""
    from vitclt.cli import main

    out, _, browser = viewer
    run, spec = browser.parent, "folder:" + str(browser.parent.parent / "images")
    class_out = out.parent / "class-viewer"
    main(["explain", str(run), "--class-images", "red car", "--classes", spec, "--max-images", "3", "--out", str(class_out),
          "--node-fraction", "1.0"])
    return class_out, json.loads((class_out / "graph.json").read_text()), spec


def fresh(browser, url: str) -> None:
    """Open `url` as a new document (a change of the #fragment alone would not reload the page)."""
    browser.get("about:blank")
    open_page(browser, url)


def node_ids(browser) -> list[str]:
    return [e.get_attribute("data-id") for e in browser.find_elements(By.CSS_SELECTOR, "#graph .node")]


def drawn(browser) -> dict:
    """What the graph shows: node ids, folded counts per row, edge count, the svg's and the page's widths."""
    return browser.execute_script("""const svg = document.getElementById('graph');
        return {ids: [...svg.querySelectorAll('.node[data-id]')].map(e => e.dataset.id),
                folded: Object.fromEntries([...svg.querySelectorAll('.node.group')].map(e => [e.dataset.row, +e.dataset.count])),
                edges: svg.querySelectorAll('path.edge').length, svg: svg.getBoundingClientRect().right,
                panel: svg.parentElement.getBoundingClientRect().right, page: document.documentElement.scrollWidth,
                window: window.innerWidth, per: svg.dataset.per};""")


def row_of(node: dict, n_layers: int) -> int:
    return -1 if node["kind"] == "embedding" else n_layers if node["kind"] == "target" else node["layer"]


def test_each_row_shows_its_strongest_nodes_and_folds_the_rest(driver, viewer):  # noqa: F811
    out, data, _ = viewer
    nodes, L = data["nodes"], data["meta"]["n_layers"]
    open_page(driver, (out / "index.html").as_uri())
    g = drawn(driver)
    per = int(g["per"])
    assert len(g["ids"]) < len(nodes) and g["folded"], "the tiny graph (196 nodes) must need folding"
    for r in range(-1, L + 1):
        row = [n for n in nodes if row_of(n, L) == r]
        shown = [n for n in row if n["id"] in g["ids"]]
        assert len(shown) + g["folded"].get(str(r), 0) == len(row)
        if g["folded"].get(str(r)):
            # What is shown is the row's strongest nodes.
            assert len(shown) == per
            assert min(n["influence"] for n in shown) >= max(n["influence"] for n in row if n not in shown)
    # Node size follows influence among what is drawn.
    sizes = driver.execute_script("""return Object.fromEntries([...document.querySelectorAll('#graph .node[data-id]')].map(e =>
        [e.dataset.id, e.tagName === 'circle' ? +e.getAttribute('r') : +e.getAttribute('width') / 2]));""")
    ranked = sorted((n for n in nodes if n["kind"] != "target"), key=lambda n: -n["influence"])
    assert sizes[ranked[0]["id"]] == max(v for k, v in sizes.items() if k != "Y")
    # Unfolding every row (#per=all) draws every kept node and every kept edge.
    fresh(driver, (out / "index.html").as_uri() + "#per=all")
    g = drawn(driver)
    assert sorted(g["ids"]) == sorted(n["id"] for n in nodes)
    assert not g["folded"] and g["edges"] == len(data["edges"])
    assert data["meta"]["target_name"] in driver.find_element(By.ID, "title").text
    assert js_errors(driver) == []


def test_a_click_on_a_fold_unfolds_its_row_and_the_address_keeps_it(driver, viewer):  # noqa: F811
    out, data, _ = viewer
    open_page(driver, (out / "index.html").as_uri())
    row, count = next(iter(drawn(driver)["folded"].items()))
    before = len(drawn(driver)["ids"])
    fold = driver.find_element(By.CSS_SELECTOR, f'#graph .node.group[data-row="{row}"]')
    driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", fold)
    after = drawn(driver)
    assert row not in after["folded"] and len(after["ids"]) == before + count
    url = driver.current_url
    assert urllib.parse.parse_qs(urllib.parse.urlparse(url).fragment)["open"] == [row]
    fresh(driver, url)
    assert drawn(driver)["ids"] == after["ids"]


@pytest.mark.parametrize("width, height", [(1300, 900), (900, 900), (1300, 480)])
def test_the_graph_fits_the_window(driver, viewer, width, height):  # noqa: F811
    out, _, _ = viewer
    driver.set_window_size(width, height)
    try:
        open_page(driver, (out / "index.html").as_uri())
        g = drawn(driver)
        assert g["svg"] <= g["panel"] and g["page"] <= g["window"], "no horizontal scrolling"
        svg_height = driver.execute_script("return document.getElementById('graph').getBoundingClientRect().height")
        assert svg_height <= driver.execute_script("return window.innerHeight") - 100, "the whole graph in one screen"
    finally:
        driver.set_window_size(1280, 900)


def test_features_carry_their_browser_label_beside_the_node(driver, viewer):  # noqa: F811
    from vitclt.browser.site import feature_labels

    out, data, browser = viewer
    labels = feature_labels(browser, data["meta"]["browser"]["tc"])
    features = [n for n in data["nodes"] if n["kind"] == "feature"]
    assert features and all(n["label"] == labels[n["layer"]][n["feature"]] for n in features)
    open_page(driver, (out / "index.html").as_uri())
    texts = driver.execute_script("""return Object.fromEntries([...document.querySelectorAll('#graph text.nodelabel[data-id]')]
        .map(e => [e.dataset.id, e.textContent]));""")
    shown = [n for n in features if n["id"] in drawn(driver)["ids"]]
    assert shown
    for n in shown:
        assert labels[n["layer"]][n["feature"]].startswith(texts[n["id"]].rstrip("…")) and texts[n["id"]].rstrip("…")


def test_the_effects_table_lists_the_top_nodes_with_measured_effects(driver, viewer):  # noqa: F811
    out, data, _ = viewer
    open_page(driver, (out / "index.html").as_uri())
    table = driver.find_element(By.ID, "top-nodes")
    assert "zeroed: graph" in table.text and "CLT replacement" in table.text
    ids = [r.get_attribute("data-id") for r in table.find_elements(By.CSS_SELECTOR, "tr[data-id]")]
    ranked = sorted(data["nodes"], key=lambda n: -n["influence"])
    features = [n["id"] for n in ranked if n["kind"] == "feature"]
    others = [n["id"] for n in ranked if n["kind"] not in ("feature", "target")]
    assert ids[:20] == features[:20] and ids[-5:] == others[:5] and set(data["effects"]) <= set(ids)
    assert f"image file: {data['meta']['source']}" == driver.find_element(By.ID, "provenance").text


def test_the_class_view_shows_its_images_by_dataset_index_and_an_effects_table(driver, class_viewer):  # noqa: F811
    from vitclt.browser.site import thumbnail
    from vitclt.data.datasets import load_dataset

    out, data, spec = class_viewer
    dataset = load_dataset(spec, "test")
    members = [i for i, y in enumerate(dataset.labels) if dataset.classnames[y] == "red car"][:3]
    open_page(driver, (out / "index.html").as_uri())
    figures = driver.find_elements(By.CSS_SELECTOR, "#imagegrid figure")
    assert [int(f.get_attribute("data-image")) for f in figures] == members
    for f, index in zip(figures, members):
        assert f.text == f"#{index}"
        src = urllib.parse.unquote(urllib.parse.urlparse(f.find_element(By.TAG_NAME, "img").get_attribute("src")).path)
        assert Image.open(src).tobytes() == Image.open(io.BytesIO(thumbnail(dataset[index][0], 128)[0])).tobytes()
    table = driver.find_element(By.ID, "top-nodes").text
    assert "share of images" in table and "direct effect" in table
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
    # The patch is outlined in black and white, never tinted: the image keeps its colours.
    assert driver.execute_script("return getComputedStyle(arguments[0]).fill", marked[0]) in ("none", "transparent",
                                                                                              "rgba(0, 0, 0, 0)")
    rings = driver.execute_script("""return [...document.querySelectorAll('#patch-marks rect')].map(e => {
        const s = getComputedStyle(e); return [s.fill, s.stroke]; });""")
    assert sorted(stroke for _, stroke in rings) == ["rgb(0, 0, 0)", "rgb(255, 255, 255)"]
    assert all(fill == "none" for fill, _ in rings)
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
    feats = [e.get_attribute("data-id") for e in driver.find_elements(By.CSS_SELECTOR, "#graph .node.feature")][:2]
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
