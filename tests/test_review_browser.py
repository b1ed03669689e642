"""The review page as a reader uses it: a real headless Chromium (WebGL in software, SwiftShader) opens the page
served over a small real export, opens a case, sees the scan drawn with its overlay, changes the opacity, switches
the method and grades; the grade is read back from the reader's CSV. A CT export opens in NiiVue's three planes;
an OCT export B-scan first, with the en-face projection beside it to navigate by.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them). The window is 1500 x 950. Set
``PPI_MED_REVIEW_SCREENSHOTS`` to a folder to keep a screenshot of each layout there, ``review_ct.png`` and
``review_oct.png`` (the ones of ``docs/img`` are made so).
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from review_export import make_export, make_oct_export

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
        "--window-size=1500,950",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    # the page itself 1500 x 950 (the window's size is the page's plus whatever the headless shell reserves)
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 1500, "height": 950, "deviceScaleFactor": 1, "mobile": False}
    )
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


def _canvas(driver, element_id: str = "gl") -> np.ndarray:
    png = driver.find_element("id", element_id).screenshot_as_png
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def _warm(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 0] > 180) & (rgb[..., 2] < 80)  # the overlay's warm colours


def _green(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 1] > 180) & (rgb[..., 0] < 80) & (rgb[..., 2] < 80)  # the lesion's outline


def _screenshot(driver, name: str) -> None:
    folder = os.environ.get("PPI_MED_REVIEW_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / name))


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
        warm, green = _warm(before), _green(before)
        assert warm.sum() > 20 and green.sum() > 20, (warm.sum(), green.sum())
        # a CT scan keeps the three planes: NiiVue's canvas shown, the B-scan view not
        assert browser.execute_script("return document.body.dataset.layout") == "planes"
        assert browser.find_element("id", "gl").is_displayed()
        assert not browser.find_element("id", "oct-view").is_displayed()

        _set_range(browser, "opacity", 0.1)
        _wait(browser, "Math.abs(window.review.nv.volumes[1].opacity - 0.1) < 1e-6")
        time.sleep(0.5)
        after = _canvas(browser)
        assert np.abs(after - before).sum() > 1000  # the overlay faded
        assert _warm(after).sum() < warm.sum()
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
        _screenshot(browser, "review_ct.png")
    finally:
        srv.shutdown()
        srv.server_close()


def _line_row(enface: np.ndarray) -> float:
    """The height (px) of the en-face's B-scan line: the rows that are mostly its cyan."""
    cyan = (enface[..., 0] < 120) & (enface[..., 1] > 160) & (enface[..., 2] > 200)
    rows = np.flatnonzero(cyan.mean(axis=1) > 0.6)
    assert rows.size and np.ptp(rows) <= 4, rows
    return float(rows.mean())


def _bscan(driver) -> int:
    return driver.execute_script("return window.review.oct.bscan")


def test_an_oct_volume_opens_b_scan_first_with_the_en_face_to_navigate(tmp_path, browser):
    from selenium.webdriver import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
    from selenium.webdriver.common.keys import Keys

    export = make_oct_export(tmp_path)
    srv = make_server(export, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        browser.get(srv.url)
        _wait(browser, "window.review && window.review.ready")
        browser.find_element("id", "reader").send_keys("anna")
        browser.find_element("id", "reader-start").click()
        _wait(browser, "document.getElementById('save-status').textContent.startsWith('reader anna')")
        browser.find_element("css selector", "#cases tbody tr[data-case-id='A-000']").click()
        _wait(browser, "document.body.dataset.viewer === 'A-000|gradient|predicted' && window.review.ready")
        assert browser.execute_script("return document.body.dataset.layout") == "bscan"
        assert not browser.find_element("id", "gl").is_displayed()
        bscan, enface = browser.find_element("id", "bscan"), browser.find_element("id", "enface")
        assert bscan.is_displayed() and enface.is_displayed()

        # the B-scan is the large view, drawn at the aspect of the voxel spacing (V B-scans x H depth x W lateral)
        image = nib.load(export / "A-000" / "image.nii.gz")
        n_v, n_h, n_w = image.shape
        dv, dh, dw = (float(z) for z in image.header.get_zooms())
        b, e = bscan.size, enface.size
        assert b["width"] * b["height"] > 2 * e["width"] * e["height"], (b, e)
        assert b["width"] / b["height"] == pytest.approx((n_w * dw) / (n_h * dh), rel=0.02)
        assert e["width"] / e["height"] == pytest.approx((n_w * dw) / (n_v * dv), rel=0.03)

        # it starts at the B-scan holding the saliency peak
        saliency = np.asarray(nib.load(export / "A-000" / "gradient_pred.nii.gz").dataobj)
        peak = int(np.unravel_index(np.argmax(saliency), saliency.shape)[0])
        assert _bscan(browser) == peak
        assert browser.find_element("id", "bscan-number").text == f"{peak + 1} / {n_v}"
        time.sleep(0.3)
        shown = _canvas(browser, "bscan")
        assert len(np.unique(shown.reshape(-1, 3), axis=0)) > 50 and shown.std() > 20  # an image, not a blank
        assert _warm(shown).sum() > 100 and _green(shown).sum() > 50, (_warm(shown).sum(), _green(shown).sum())
        en = _canvas(browser, "enface")
        assert _warm(en).sum() > 50 and _green(en).sum() > 20
        row_height = e["height"] / n_v
        assert _line_row(en) == pytest.approx((peak + 0.5) * row_height, abs=2)

        # the slider steps through the B-scans; the number and the en-face line follow
        target = 2 if peak > 4 else n_v - 3
        _set_range(browser, "bscan-slider", target)
        assert _bscan(browser) == target
        assert browser.find_element("id", "bscan-number").text == f"{target + 1} / {n_v}"
        time.sleep(0.2)
        assert _line_row(_canvas(browser, "enface")) == pytest.approx((target + 0.5) * row_height, abs=2)
        assert np.abs(_canvas(browser, "bscan") - shown).mean() > 1  # another B-scan is drawn

        # the mouse wheel over the B-scan: one notch, one B-scan further down
        ActionChains(browser).scroll_from_origin(ScrollOrigin.from_element(bscan), 0, 100).perform()
        _wait(browser, f"window.review.oct.bscan === {target + 1}", timeout=5)
        ActionChains(browser).scroll_from_origin(ScrollOrigin.from_element(bscan), 0, -100).perform()
        _wait(browser, f"window.review.oct.bscan === {target}", timeout=5)

        # a click on the en-face picks the B-scan of that row
        pick = n_v - 2
        offset = round((pick + 0.5) * row_height - e["height"] / 2)
        ActionChains(browser).move_to_element_with_offset(enface, 0, offset).click().perform()
        _wait(browser, f"window.review.oct.bscan === {pick}", timeout=5)
        time.sleep(0.2)
        assert _line_row(_canvas(browser, "enface")) == pytest.approx((pick + 0.5) * row_height, abs=2)
        # the arrow keys step too (outside the form's fields)
        ActionChains(browser).send_keys(Keys.ARROW_UP).perform()
        _wait(browser, f"window.review.oct.bscan === {pick - 1}", timeout=5)

        # 'to peak' returns; opacity and outline act on both views
        browser.find_element("id", "to-peak").click()
        assert _bscan(browser) == peak
        _set_range(browser, "opacity", 0.1)
        time.sleep(0.2)
        assert _warm(_canvas(browser, "bscan")).sum() < _warm(shown).sum() / 2
        browser.find_element("id", "outline").click()
        time.sleep(0.2)
        assert _green(_canvas(browser, "bscan")).sum() == 0 and _green(_canvas(browser, "enface")).sum() == 0
        browser.find_element("id", "outline").click()
        _set_range(browser, "opacity", 0.6)

        # the other method, and a grade, as in the three-plane layout
        browser.execute_script(
            "const s = document.getElementById('overlay-select'); s.value = '1';"
            "s.dispatchEvent(new Event('change', {bubbles: true}));"
        )
        _wait(browser, "document.body.dataset.viewer === 'A-000|input_x_gradient|predicted' && window.review.ready")
        other = np.asarray(nib.load(export / "A-000" / "input_x_gradient_pred.nii.gz").dataobj)
        assert _bscan(browser) == int(np.unravel_index(np.argmax(other), other.shape)[0])
        browser.find_element("css selector", "#coverage input[value='yes']").click()
        browser.find_element("css selector", "#agrees input[value='yes']").click()
        _wait(browser, "document.getElementById('save-status').className === 'saved'")
        path = export / "review" / "anna.csv"
        deadline = time.monotonic() + 10
        rows = []
        while time.monotonic() < deadline:
            rows = list(csv.DictReader(open(path, newline=""))) if path.is_file() else []
            if rows and rows[0]["agrees"] == "yes":
                break
            time.sleep(0.1)
        assert [(r["case_id"], r["method"], r["coverage"], r["agrees"]) for r in rows] == [
            ("A-000", "input_x_gradient", "yes", "yes")
        ]
        browser.find_element("id", "case-info").click()
        time.sleep(0.3)
        _screenshot(browser, "review_oct.png")
    finally:
        srv.shutdown()
        srv.server_close()
