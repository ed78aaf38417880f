"""The report with its frontiers in a real headless Chromium: every figure decodes, the summary table shows.

Skips when Chromium, chromedriver or selenium is missing. Set VITCLT_SCREENSHOTS=<dir> to keep the screenshot.
"""

import os
import shutil
from pathlib import Path

import pytest

from tests.test_report_frontier import evaluated  # noqa: F401  (the module fixture: a sweep's eval)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
selenium = pytest.importorskip("selenium", reason="selenium is not installed: pip install selenium")
if not (CHROMIUM and DRIVER):
    pytest.skip("Chromium and chromedriver are not installed (run .ci/install-browser, or apt-get install chromium "
                "chromium-driver)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402


def test_report_with_frontiers_renders_in_chromium(evaluated, tmp_path):  # noqa: F811
    _, report = evaluated
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1400"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        driver.get(report.as_uri())
        images = driver.find_elements(By.TAG_NAME, "img")
        assert images and all(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", im)
                              for im in images)
        frontier = driver.find_element(By.CSS_SELECTOR, 'img[alt="sparsity-fidelity frontiers"]')
        assert frontier.size["width"] > 600
        heading = driver.find_element(By.XPATH, "//h2[contains(., 'Sparsity–fidelity frontiers')]")
        summary = heading.find_element(By.XPATH, "following-sibling::table[1]")
        assert len(summary.find_elements(By.TAG_NAME, "tr")) > 1
        assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
        driver.execute_script("arguments[0].scrollIntoView()", heading)
        shots = Path(os.environ.get("VITCLT_SCREENSHOTS") or tmp_path)
        shots.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(shots / "report_frontier.png"))
    finally:
        driver.quit()
