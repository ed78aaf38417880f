"""The browser's pages in a real headless Chromium (Selenium): index, sorting, filtering, feature pages, no JS errors.

Skips when Chromium, chromedriver or selenium is missing (`.ci/install-browser` installs the first two).
Set VITCLT_DEMO_BROWSER=<a browser built on the demo> and VITCLT_SCREENSHOTS=<dir> to also save the
screenshots that docs/browser.md shows.
"""

import functools
import http.server
import io
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.test_browser import DEAD, make_run, read_data

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
    return build_browser(run, spec, backbone=tiny_backbone.name, images_per_forward=6, top_k=4, samples=4, vocab_size=50,
                         exports=False, progress=False)


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
