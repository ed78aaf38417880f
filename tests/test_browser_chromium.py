"""The browser's pages in a real headless Chromium (Selenium): index, sorting, filtering, feature pages, no JS errors.

Skips when Chromium, chromedriver or selenium is missing (`.ci/install-browser` installs the first two).
Set VITCLT_DEMO_BROWSER=<a browser built on the demo> and VITCLT_SCREENSHOTS=<dir> to also save the
screenshots that docs/browser.md shows.
"""

import base64
import functools
import http.server
import io
import json
import os
import shutil
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
from PIL import Image

from tests.test_browser import DEAD, make_run, read_data
from vitclt.data.datasets import load_dataset

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
selenium = pytest.importorskip("selenium", reason="selenium is not installed: pip install selenium")
if not (CHROMIUM and DRIVER):
    pytest.skip("Chromium and chromedriver are not installed (run .ci/install-browser, or apt-get install chromium "
                "chromium-driver)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_backbone):
    from vitclt.browser import build_browser

    root = tmp_path_factory.mktemp("browse_chromium")
    run, spec = make_run(root, tiny_backbone)
    # A seeded subset (9 of the 12 images), so that page ids and dataset indices differ.
    return build_browser(run, spec, backbone=tiny_backbone.name, images_per_forward=6, top_k=4, samples=4, vocab_size=50,
                         exports=False, progress=False, max_images=9, seed=3)


@pytest.fixture(scope="module")
def driver():
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield d
    d.quit()


def open_page(driver, url: str) -> None:
    """Load `url`, wait until the page says it has rendered, and fail on any JavaScript error."""
    driver.get(url)
    deadline = time.time() + 15
    while driver.execute_script("return document.body && document.body.dataset.ready") != "1":
        assert time.time() < deadline, f"{url} never finished rendering; JS errors: {js_errors(driver)}"
        time.sleep(0.05)
    assert js_errors(driver) == []


def js_errors(driver) -> list[str]:
    """Console errors and uncaught exceptions (the pages record the latter in window.__vitcltErrors)."""
    logged = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    return logged + (driver.execute_script("return window.__vitcltErrors || []") or [])


def rows(driver) -> list[tuple[int, int]]:
    return [(int(r.get_attribute("data-layer")), int(r.get_attribute("data-feature")))
            for r in driver.find_elements(By.CSS_SELECTOR, "#features tbody tr")]


def index_data(site: Path) -> tuple[dict, list[dict]]:
    meta = read_data(site / "data" / "site.js")
    tc = meta["transcoders"][0]
    return tc, [read_data(site / "data" / tc["id"] / f"index-L{layer}.js") for layer in range(tc["n_layers"])]


def test_index_lists_every_feature_from_disk(driver, site):
    tc, _ = index_data(site)
    open_page(driver, (site / "index.html").as_uri())
    n = tc["n_layers"] * tc["n_features"]
    assert driver.find_element(By.ID, "count").text == f"{n} of {n} features"
    assert rows(driver) == [(layer, f) for layer in range(tc["n_layers"]) for f in range(tc["n_features"])][:100]
    banner = driver.find_element(By.ID, "banner")
    assert banner.is_displayed() and "folder:elsewhere" in banner.text


def test_sorting_and_filtering_change_the_rows(driver, site):
    tc, index = index_data(site)
    open_page(driver, (site / "index.html").as_uri())
    driver.find_element(By.CSS_SELECTOR, 'th[data-key="freq"]').click()
    freq = {(i["layer"], f): x for i in index for f, x in enumerate(i["freq"])}
    shown = [freq[r] for r in rows(driver)]
    assert shown == sorted(shown, reverse=True) and shown[0] == max(freq.values())
    Select(driver.find_element(By.ID, "layer")).select_by_value("1")
    assert {layer for layer, _ in rows(driver)} == {1} and len(rows(driver)) == tc["n_features"]
    Select(driver.find_element(By.ID, "layer")).select_by_value("")
    Select(driver.find_element(By.ID, "band")).select_by_value("dead")
    assert rows(driver) == [DEAD]
    assert "dead" in driver.find_element(By.CSS_SELECTOR, "#features tbody tr").get_attribute("class")
    Select(driver.find_element(By.ID, "band")).select_by_value("")
    word = index[0]["word"][0]
    driver.find_element(By.ID, "text").send_keys(word)
    expected = {(i["layer"], f) for i in index for f in range(tc["n_features"])
                if any(word.lower() in i[key][f].lower() for key in ("word", "label", "sees", "writes"))}
    assert set(rows(driver)) == expected
    driver.find_element(By.ID, "text").clear()
    driver.find_element(By.ID, "text").send_keys(" ")
    driver.find_element(By.CSS_SELECTOR, 'th[data-key="sees_margin"]').click()
    margin = {(i["layer"], f): (x if x is not None else -float("inf")) for i in index for f, x in enumerate(i["sees_margin"])}
    shown = [margin[r] for r in rows(driver)]
    assert shown == sorted(shown, reverse=True) and shown[0] == max(margin.values())
    driver.find_element(By.ID, "explained").click()
    labelled = {(i["layer"], f) for i in index for f in range(tc["n_features"]) if i["sees"][f] or i["writes"][f]}
    assert driver.find_element(By.ID, "count").text.startswith(f"{len(labelled)} of ")
    assert js_errors(driver) == []


def test_feature_page_shows_images_with_heatmaps(driver, site):
    tc, index = index_data(site)
    layer, feature = 2, max(range(tc["n_features"]), key=lambda f: index[2]["freq"][f])
    open_page(driver, (site / "feature.html").as_uri() + f"?tc={tc['id']}&layer={layer}&feature={feature}")
    images = driver.find_elements(By.CSS_SELECTOR, ".imgbox img")
    assert images and all(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", im)
                          for im in images)
    painted = driver.execute_script("""
        return [...document.querySelectorAll('canvas.heatmap')].map(c => {
          const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
          let alpha = 0; for (let i = 3; i < d.length; i += 4) alpha = Math.max(alpha, d[i]);
          return alpha; });""")
    assert len(painted) >= len(images) and max(painted) > 0
    text = driver.find_element(By.ID, "main").text
    for heading in ("What it sees and what it writes", "Text labels", "Top images by maximum over tokens",
                    "Top images by CLS activation", "Nearest features"):
        assert heading in text
    assert driver.find_elements(By.CSS_SELECTOR, "svg.chart rect")
    assert "folder:elsewhere" in driver.find_element(By.ID, "banner").text


def busiest_feature(site: Path, layer: int = 2) -> tuple[dict, int, dict, dict]:
    """(transcoder meta, feature, its detail record, the site meta) of the feature of `layer` that fires most often."""
    tc, index = index_data(site)
    feature = max(range(tc["n_features"]), key=lambda f: index[layer]["freq"][f])
    shard = read_data(site / "data" / tc["id"] / f"L{layer}" / f"s{feature // tc['shard_size']}.js")
    return tc, feature, shard["features"][feature - shard["start"]], read_data(site / "data" / "site.js")


CANVAS_PIXELS = """return [...document.querySelectorAll('canvas.heatmap')].map(c =>
    Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data));"""


def test_outlines_leave_every_patch_s_colours_untouched(driver, site):
    tc, feature, record, meta = busiest_feature(site)
    open_page(driver, (site / "feature.html").as_uri() + f"?tc={tc['id']}&layer=2&feature={feature}")
    g, prefix, T = meta["grid"], meta["n_prefix"], meta["n_tokens"]
    acts = base64.b64decode(record["top_tok"])
    canvases = driver.execute_script(CANVAS_PIXELS)[: len(record["top"])]
    assert canvases
    seen_active = 0
    for k, pixels in enumerate(canvases):
        size = int(round((len(pixels) // 4) ** 0.5))
        cell = size / g
        alpha = lambda x, y: pixels[4 * (y * size + x) + 3]  # noqa: E731
        rgb = lambda x, y: pixels[4 * (y * size + x) : 4 * (y * size + x) + 3]  # noqa: E731
        weights = []
        for i in range(g * g):
            a = acts[k * T + prefix + i]
            x0, y0 = int((i % g) * cell), int((i // g) * cell)
            inner = [(x, y) for x in range(x0, int(x0 + cell)) for y in range(y0, int(y0 + cell))]
            # The middle of every patch is left to the image: no tint can change what the image shows.
            assert alpha(int(x0 + cell / 2), int(y0 + cell / 2)) == 0
            if a == 0:
                assert all(alpha(x, y) == 0 for x, y in inner), f"inactive patch {i} of image {k} is drawn on"
                continue
            seen_active += 1
            weights.append((a, sum(alpha(x, y) for x, y in inner)))
            if a >= 64:
                # Black and white both: the outline stands out on a white object and on a red one alike.
                top = max(alpha(x, y) for x, y in inner)
                opaque = [rgb(x, y) for x, y in inner if alpha(x, y) >= 0.9 * top]
                assert any(max(c) < 60 for c in opaque) and any(min(c) > 200 for c in opaque)
        weights.sort()
        strong, weak = weights[-1], weights[0]
        if strong[0] > 1.5 * weak[0]:
            assert strong[1] > weak[1], "a stronger patch must get a stronger outline"
    assert seen_active


def test_activation_map_replaces_the_image(driver, site):
    tc, feature, _, _ = busiest_feature(site)
    open_page(driver, (site / "feature.html").as_uri() + f"?tc={tc['id']}&layer=2&feature={feature}")
    driver.find_element(By.CSS_SELECTOR, '#views input[value="map"]').click()
    image = driver.find_element(By.CSS_SELECTOR, ".imgbox img")
    assert image.value_of_css_property("visibility") == "hidden"
    assert all(min(p[3::4]) == 255 for p in driver.execute_script(CANVAS_PIXELS))
    driver.find_element(By.CSS_SELECTOR, '#views input[value="image"]').click()
    assert image.value_of_css_property("visibility") == "visible"
    assert all(max(p[3::4]) == 0 for p in driver.execute_script(CANVAS_PIXELS))
    # The choice is kept in the address.
    url = driver.current_url
    assert "view=image" in url
    driver.get("about:blank")
    open_page(driver, url.replace("view=image", "view=map"))
    assert driver.find_element(By.CSS_SELECTOR, '#views input[value="map"]').is_selected()
    assert driver.find_element(By.CSS_SELECTOR, ".imgbox img").value_of_css_property("visibility") == "hidden"
    assert js_errors(driver) == []


def test_every_image_names_its_dataset_index_and_seed(driver, site):
    """Each card and thumbnail shows `#index · seed s`, and load_dataset(spec, split)[index] is that very image."""
    tc, feature, record, meta = busiest_feature(site)
    summary = json.loads((site / "browse.json").read_text())["subset"]
    whole = load_dataset(summary["spec"], summary["split"])
    assert summary["indices"] == load_dataset(summary["spec"], summary["split"], max_images=9, seed=3).indices.tolist()
    assert len(summary["indices"]) == 9 and summary["seed"] == 3

    def same_image(index: int, src: str) -> bool:
        shown = Image.open(site / urllib.parse.unquote(urllib.parse.urlparse(src).path).split(site.name + "/", 1)[1])
        from vitclt.browser.site import thumbnail

        return shown.tobytes() == Image.open(io.BytesIO(thumbnail(whole[index][0], 128)[0])).tobytes()

    open_page(driver, (site / "feature.html").as_uri() + f"?tc={tc['id']}&layer=2&feature={feature}")
    cards = driver.find_elements(By.CSS_SELECTOR, ".card")
    assert cards
    for card in cards:
        index = int(card.get_attribute("data-image"))
        assert f"#{index} · seed 3" in card.text
        assert same_image(index, card.find_element(By.TAG_NAME, "img").get_attribute("src"))
    assert {int(c.get_attribute("data-image")) for c in cards} - set(range(9)), "ids, not dataset indices, are shown"
    open_page(driver, (site / "index.html").as_uri())
    thumbs = driver.find_elements(By.CSS_SELECTOR, ".thumbcell")
    assert thumbs
    for cell in thumbs[:20]:
        index = int(cell.get_attribute("data-image"))
        assert cell.text == f"#{index} · seed 3" and f"image #{index}" in cell.get_attribute("title")
        assert same_image(index, cell.find_element(By.TAG_NAME, "img").get_attribute("src"))


def test_filters_and_sort_live_in_the_address(driver, site):
    open_page(driver, (site / "index.html").as_uri())
    Select(driver.find_element(By.ID, "layer")).select_by_value("1")
    Select(driver.find_element(By.ID, "band")).select_by_value("alive")
    driver.find_element(By.CSS_SELECTOR, 'th[data-key="mean"]').click()
    driver.find_element(By.ID, "later").click()
    shown, url = rows(driver), driver.current_url
    query = urllib.parse.parse_qs(urllib.parse.urlparse(url).query)
    assert query["layer"] == ["1"] and query["band"] == ["alive"] and query["sort"] == ["mean"] and query["later"] == ["1"]
    driver.get("about:blank")
    open_page(driver, url)
    assert rows(driver) == shown and shown
    assert Select(driver.find_element(By.ID, "layer")).first_selected_option.get_attribute("value") == "1"
    assert driver.find_element(By.ID, "later").is_selected()
    assert "sorted-desc" in driver.find_element(By.CSS_SELECTOR, 'th[data-key="mean"]').get_attribute("class")


def test_dead_feature_page_says_dead_and_nothing_else(driver, site):
    tc, _ = index_data(site)
    open_page(driver, (site / "feature.html").as_uri() + f"?tc={tc['id']}&layer={DEAD[0]}&feature={DEAD[1]}")
    assert "is dead" in driver.find_element(By.CSS_SELECTOR, ".dead-note").text
    assert not driver.find_elements(By.CSS_SELECTOR, ".imgbox")


def test_pages_work_from_a_static_server(driver, site):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        open_page(driver, f"{base}/index.html")
        assert rows(driver)
        tc, _ = index_data(site)
        open_page(driver, f"{base}/feature.html?tc={tc['id']}&layer=1&feature=0")
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.skipif(not (os.environ.get("VITCLT_DEMO_BROWSER") and os.environ.get("VITCLT_SCREENSHOTS")),
                    reason="set VITCLT_DEMO_BROWSER and VITCLT_SCREENSHOTS to save the documentation's screenshots")
def test_screenshots_of_the_demo_browser(driver):
    site, out = Path(os.environ["VITCLT_DEMO_BROWSER"]), Path(os.environ["VITCLT_SCREENSHOTS"])
    out.mkdir(parents=True, exist_ok=True)
    tc, index = index_data(site)
    last = tc["n_layers"] - 1
    feature = max(range(tc["n_features"]), key=lambda f: index[last]["freq"][f] if not index[last]["dead"][f] else -1)
    feature = int(os.environ.get("VITCLT_SCREENSHOT_FEATURE", feature))
    query = f"?tc={tc['id']}&layer={last}&feature={feature}"
    for name, page, query, height in (("browser-index.png", "index.html", "", 760),
                                      ("browser-feature.png", "feature.html", query, 1100)):
        driver.set_window_size(1200, height)
        open_page(driver, (site / page).as_uri() + query)
        # A 256-colour palette keeps the documentation's PNGs small.
        shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
        shot.quantize(256).save(out / name, optimize=True)
    driver.set_window_size(1280, 900)
