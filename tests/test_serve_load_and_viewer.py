"""The service under mixed load, and its web viewer in a real browser (Debian's headless chromium)."""

from __future__ import annotations

from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from kdray.serving.loadtest import run_load

pytestmark = pytest.mark.integration


def _images(ws: Path, per_dataset: int = 3) -> list[Path]:
    found = []
    for folder in sorted((ws / "data" / "synthetic").glob("*/images")):
        found += sorted(folder.rglob("*.png"))[:per_dataset]
    return found


def test_sixteen_clients_for_twelve_seconds_mixing_predict_and_explain(served):
    result = run_load(
        served.url,
        [p.read_bytes() for p in _images(served.workspace)],
        seconds=12,
        clients=16,
        token=served.token,
    )
    print(result.summary())
    assert not result.errors, result.summary()
    assert len(result.latencies_ms.get("predict", [])) > 100
    assert {"explain?methods=feature_maps,gradcam", "explain?methods=shap&model=both"} <= set(
        result.latencies_ms
    )


def test_viewer_asks_for_the_token_then_shows_every_explanation(served, browser, tmp_path):
    browser.get(served.url + "/")
    wait = WebDriverWait(browser, 60)
    token = wait.until(lambda d: d.find_element(By.ID, "token-field"))
    wait.until(lambda d: token.is_displayed())  # the API answered 401: the viewer asks
    field = browser.find_element(By.ID, "token")
    field.send_keys(served.token)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", field)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#dataset option")) == 3)

    image = next(p for p in _images(served.workspace) if "brain_tumor" in str(p))
    Select(browser.find_element(By.ID, "dataset")).select_by_value("brain_tumor")
    browser.find_element(By.ID, "file").send_keys(str(image))
    wait.until(lambda d: d.find_element(By.ID, "status").text.startswith(("Done", "4", "5")))
    status = browser.find_element(By.ID, "status")
    assert status.text == f"Done: brain_tumor, {image.name}", status.text

    bars = browser.find_elements(By.CSS_SELECTOR, "#probs-student .prob, #probs-teacher .prob")
    assert len(bars) == 8
    overlays = browser.find_elements(
        By.CSS_SELECTOR, ".maps .stack img.heat, .strip .stack img.heat"
    )
    assert len(overlays) == 2 + 2 + 4 + 4  # Grad-CAM and SHAP x 2 models, feature maps x blocks
    rendered = browser.execute_script(
        "return [...document.querySelectorAll('.stack img')].map(i => i.complete && i.naturalWidth > 0)"
    )
    assert rendered and all(rendered)
    times = [t.text for t in browser.find_elements(By.CSS_SELECTOR, ".maps .time")]
    assert len(times) == 4 and all(t.endswith(" ms") for t in times)
    before = browser.execute_script(
        "return getComputedStyle(document.querySelector('.stack .heat')).opacity"
    )
    browser.execute_script(
        "const s = document.getElementById('opacity'); s.value = 10; "
        "s.dispatchEvent(new Event('input'))"
    )
    after = browser.execute_script(
        "return getComputedStyle(document.querySelector('.stack .heat')).opacity"
    )
    assert float(before) > 0.5 and abs(float(after) - 0.1) < 1e-6
    shot = tmp_path / "viewer.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 20_000
    print(f"screenshot: {shot}")
