"""The review page as a reader uses it: a real headless Chromium (WebGL in software, SwiftShader) opens the page
served over a small real export, opens a case, sees NiiVue draw the scan, changes the opacity, switches the
method and grades; the grade is read back from the reader's CSV.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them). Set ``PPI_MED_REVIEW_SCREENSHOT``
to a PNG path to keep a screenshot of the page (the README's ``docs/img/review_page.png`` is made so).
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image
from review_export import make_export

from pipelines.review.server import make_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (CHROMIUM and DRIVER), reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)"
    ),
]


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--use-angle=swiftshader",  # WebGL2 in software: no GPU on CI
        "--enable-unsafe-swiftshader",
        "--ignore-gpu-blocklist",
        "--window-size=1400,900",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def _wait(driver, script: str, timeout: float = 30.0):
    """Poll a JavaScript expression until it is truthy; fail with the page's error otherwise."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = driver.execute_script(f"return {script}")
        if value:
            return value
        error = driver.execute_script("return window.review && window.review.error")
        assert not error, f"the page reported: {error}"
        time.sleep(0.1)
    logs = [e["message"] for e in driver.get_log("browser")]
    raise AssertionError(f"timed out waiting for {script}; browser log: {logs}")


def _canvas(driver) -> np.ndarray:
    png = driver.find_element("id", "gl").screenshot_as_png
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def _set_range(driver, element_id: str, value: float) -> None:
    driver.execute_script(
        "const el = document.getElementById(arguments[0]); el.value = arguments[1];"
        "el.dispatchEvent(new Event('input', {bubbles: true}));",
        element_id,
        str(value),
    )


def test_a_reader_opens_a_case_sees_the_overlay_and_grades_it(tmp_path, browser):
    export = make_export(tmp_path)
    srv = make_server(export, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        browser.get(srv.url)
        _wait(browser, "window.review && window.review.ready")
        assert browser.execute_script("return window.review.nv.gl instanceof WebGL2RenderingContext")
        # the reading order puts the false positive first
        first = browser.find_elements("css selector", "#cases tbody tr")[0]
        assert first.get_attribute("data-case-id") == "case2"

        browser.find_element("id", "reader").send_keys("anna")
        browser.find_element("id", "reader-start").click()
        _wait(browser, "document.getElementById('save-status').textContent.startsWith('reader anna')")
        browser.find_element("css selector", "#cases tbody tr[data-case-id='case0']").click()
        _wait(browser, "document.body.dataset.viewer === 'case0|gradient|predicted' && window.review.ready")
        nv_state = browser.execute_script(
            "const nv = window.review.nv; return {n: nv.volumes.length, names: nv.volumes.map(v => v.name),"
            " pos: Array.from(nv.frac2mm(nv.scene.crosshairPos)).slice(0, 3), slice: nv.opts.sliceType}"
        )
        assert nv_state["n"] == 3 and nv_state["names"] == ["image.nii.gz", "overlay.nii.gz", "mask.nii.gz"]
        assert nv_state["slice"] == 3  # multiplanar: the three orthogonal planes
        peak = browser.execute_script("return window.review.state.current.overlays[0].peak_ras_mm")
        assert np.allclose(nv_state["pos"], peak, atol=1.0)  # the viewer starts at the saliency peak

        time.sleep(0.5)  # NiiVue draws on the next animation frame
        before = _canvas(browser)
        # NiiVue drew the scan: many grey levels, not a blank or uniform canvas
        assert len(np.unique(before.reshape(-1, 3), axis=0)) > 50 and before.std() > 20
        warm = (before[..., 0] > 180) & (before[..., 2] < 80)  # the overlay's warm colours
        green = (before[..., 1] > 180) & (before[..., 0] < 80) & (before[..., 2] < 80)  # the lesion's outline
        assert warm.sum() > 20 and green.sum() > 20, (warm.sum(), green.sum())

        _set_range(browser, "opacity", 0.1)
        _wait(browser, "Math.abs(window.review.nv.volumes[1].opacity - 0.1) < 1e-6")
        time.sleep(0.5)
        after = _canvas(browser)
        assert np.abs(after - before).sum() > 1000  # the overlay faded
        assert ((after[..., 0] > 180) & (after[..., 2] < 80)).sum() < warm.sum()
        _set_range(browser, "opacity", 0.6)

        browser.execute_script(
            "const s = document.getElementById('overlay-select'); s.value = '1';"
            "s.dispatchEvent(new Event('change', {bubbles: true}));"
        )
        _wait(browser, "document.body.dataset.viewer === 'case0|input_x_gradient|predicted' && window.review.ready")
        browser.find_element("css selector", "#coverage input[value='partly']").click()
        browser.find_element("css selector", "#agrees input[value='yes']").click()
        browser.find_element("id", "comment").send_keys("peak beside the lesion")
        browser.find_element("id", "case-info").click()  # leaving the comment box commits it
        _wait(browser, "document.getElementById('save-status').className === 'saved'")
        path = export / "review" / "anna.csv"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            rows = list(csv.DictReader(open(path, newline=""))) if path.is_file() else []
            if rows and rows[0]["comment"] == "peak beside the lesion":
                break
            time.sleep(0.1)
        assert [(r["case_id"], r["method"], r["coverage"], r["agrees"], r["comment"]) for r in rows] == [
            ("case0", "input_x_gradient", "partly", "yes", "peak beside the lesion")
        ]
        assert (
            browser.execute_script(
                "return document.querySelector(\"#cases tr[data-case-id='case0'] td:last-child\").textContent"
            )
            == "\u2713"
        )
        if os.environ.get("PPI_MED_REVIEW_SCREENSHOT"):
            browser.save_screenshot(os.environ["PPI_MED_REVIEW_SCREENSHOT"])
    finally:
        srv.shutdown()
        srv.server_close()
