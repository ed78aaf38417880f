"""The report with its frontiers in a real headless Chromium: every figure decodes, the summary table shows.

Skips when Chromium, chromedriver or selenium is missing. Set VITCLT_SCREENSHOTS=<dir> to keep the screenshot.
"""

import os
from pathlib import Path

import pytest

from tests.test_browser_chromium import driver, js_errors  # noqa: F401  (driver is a fixture)
from tests.test_report_frontier import evaluated  # noqa: F401  (the module fixture: a sweep's eval)

By = pytest.importorskip("selenium.webdriver.common.by").By


def test_report_with_frontiers_renders_in_chromium(driver, evaluated, tmp_path):  # noqa: F811
    _, report = evaluated
    driver.set_window_size(1280, 1400)
    driver.get(report.as_uri())
    images = driver.find_elements(By.TAG_NAME, "img")
    assert images and all(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", im)
                          for im in images)
    frontier = driver.find_element(By.CSS_SELECTOR, 'img[alt="sparsity-fidelity frontiers"]')
    assert frontier.size["width"] > 600
    heading = driver.find_element(By.XPATH, "//h2[contains(., 'Sparsity–fidelity frontiers')]")
    summary = heading.find_element(By.XPATH, "following-sibling::table[1]")
    assert len(summary.find_elements(By.TAG_NAME, "tr")) > 1
    assert js_errors(driver) == []
    driver.execute_script("arguments[0].scrollIntoView()", heading)
    shots = Path(os.environ.get("VITCLT_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(shots / "report_frontier.png"))
