"""The MLflow UI as docs/mlflow.md tells a user to use it, in a real headless Chromium against a real ``mlflow ui``.

A PPI run and a baseline run of the GA bundle are written into a fresh SQLite store by the bundle's own tracker
(``common#tracker`` of ``bundles/ga_ppi.json``, its params, tags and datalist inputs as a training run logs them),
driven through a few stand-in epochs whose losses and validation AUCs the test sets, so no network trains. Then
``mlflow ui`` serves the store on loopback and the browser goes the way the docs describe: the *Model training*
toggle, the experiment ``ga_ppi``, the metric columns, both runs selected, *Compare*.

Needs Debian's ``chromium`` and ``chromium-driver``. Set ``PPI_MED_MLFLOW_SCREENSHOTS`` to a folder to keep the
screenshots ``mlflow_runs.png`` and ``mlflow_compare.png`` there (``docs/img/`` is made so).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from bundle_files import GA_BUNDLE, workdir
from local_servers import free_ports, stop_group
from PIL import Image

from ppi_med.tracking import check_tracking_uri, log_batch, server_problem

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.server,
    pytest.mark.skipif(
        not (CHROMIUM and DRIVER), reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)"
    ),
]

VIEWPORT = (1500, 950)
#: per stand-in epoch; the runs table shows a metric's last value
PPI_VAL_AUC = [0.625, 0.75, 0.8125, 0.875]
BASELINE_VAL_AUC = [0.6875, 0.75, 0.8125, 0.75]
REF_VAL_AUC = 0.8125


def _tiny(root: Path, uri: str) -> dict:
    """The GA bundle on 2 sites x 8 small synthetic eyes, nothing cached, logging to ``uri``."""
    return {
        "default_dataset_dir": str(root / "data"),
        "dataset_dir": str(root / "data"),
        "synthetic#sites": ["A", "B"],
        "synthetic#subjects_per_site": 8,
        "synthetic#n_bscans": 4,
        "synthetic#height": 32,
        "synthetic#width": 48,
        "synthetic#cue_site": "B",
        "spatial_size": [4, 32, 48],
        "network_def#width": 4,
        "cache_rate": 0.0,
        "runs_dir": str(root / "runs"),
        "tracking_uri": uri,
    }


def _project_run(root: Path, uri: str, overrides: dict, val_auc: list[float], losses: dict[str, list[float]]) -> str:
    """A run logged by the bundle's own tracker over stand-in epochs with the given metrics; its run id."""
    from ignite.engine import Engine, Events

    from pipelines.bundle_config import open_config
    from ppi_med.engine import EpochLossAverages

    parser = open_config(GA_BUNDLE, {**_tiny(root, uri), "max_epochs": len(val_auc), **overrides})
    tracker = parser.get_parsed_content("common#tracker")
    evaluator = tracker.evaluator
    trainer = Engine(lambda engine, batch: {k: v[engine.state.epoch - 1] for k, v in losses.items()})
    EpochLossAverages().attach(trainer)  # loss, loss_cls, ... as the bundle's trainer publishes them

    @trainer.on(Events.EPOCH_COMPLETED)
    def validate(engine: Engine) -> None:  # what the bundle's evaluator leaves after an epoch's validation
        evaluator.state.epoch = engine.state.epoch
        evaluator.state.metrics = {"val_auc": val_auc[engine.state.epoch - 1]}
        best = max(range(engine.state.epoch), key=lambda i: val_auc[i])
        evaluator.state.best_metric, evaluator.state.best_metric_epoch = val_auc[best], best + 1

    run_ids = []

    @trainer.on(Events.COMPLETED)
    def reference(engine: Engine) -> None:  # the linear reference logs into the run this way
        run_ids.append(tracker.cur_run.info.run_id)
        log_batch(tracker.client, run_ids[0], metrics={"ref_val_auc": REF_VAL_AUC})

    tracker.attach(trainer)
    trainer.run([0], max_epochs=len(val_auc))
    return run_ids[0]


class MlflowUI:
    """``mlflow ui --backend-store-uri URI`` as docs/mlflow.md runs it, on a free loopback port, one worker.

    The process starts at once and :meth:`ready` waits for it, so the caller can work meanwhile. A port taken by
    another process between choosing and binding it (a busy machine) gets the server restarted on another one.
    """

    def __init__(self, root: Path, uri: str) -> None:
        self.root, self.uri = root, uri
        self.proc: subprocess.Popen | None = None
        self._start()

    def _start(self) -> None:
        self.url = f"http://127.0.0.1:{free_ports()[0]}"
        cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", self.uri, "--host", "127.0.0.1"]
        with open(self.root / "ui.log", "w") as log:
            self.proc = subprocess.Popen(
                [*cmd, "--port", self.url.rsplit(":", 1)[1], "--workers", "1"],
                cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def ready(self, timeout: float = 120.0, tries: int = 3) -> str:
        """The UI's URL once it answers ``/health``."""
        deadline = time.monotonic() + timeout
        while server_problem(self.url, timeout=1.0) is not None:
            if self.proc.poll() is not None:
                log = (self.root / "ui.log").read_text()
                assert "address already in use" in log and tries > 1, f"mlflow ui exited: {log[-3000:]}"
                tries -= 1
                self._start()
            assert time.monotonic() < deadline, f"mlflow ui did not answer /health within {timeout:.0f} s"
            time.sleep(0.2)
        return self.url

    def stop(self) -> None:
        stop_group(self.proc)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,1100"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    # the page's own size, whatever the headless window's frame takes
    width, height = VIEWPORT
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    yield driver
    driver.quit()


def _screenshot(driver, path: Path) -> None:
    driver.save_screenshot(str(path))
    assert Image.open(path).size == VIEWPORT
    keep = os.environ.get("PPI_MED_MLFLOW_SCREENSHOTS")
    if keep:
        shutil.copyfile(path, Path(keep) / path.name)


def test_a_user_finds_a_ppi_and_a_baseline_run_and_compares_them(tmp_path, browser, monkeypatch):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    root = workdir(tmp_path)
    monkeypatch.chdir(root)  # a bundle runs from the folder that holds bundles/
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    check_tracking_uri(uri)  # the store's tables exist before the UI's process opens it
    wait = WebDriverWait(browser, 30)

    def click_text(text: str, within: str = "") -> None:
        wait.until(ec.element_to_be_clickable((By.XPATH, f"{within}//*[normalize-space(text())='{text}']"))).click()

    ui = MlflowUI(root, uri)
    try:
        # the runs are logged while the UI's process starts
        ppi_id = _project_run(
            root,
            uri,
            {"ppi#warmup_epochs": 1},
            PPI_VAL_AUC,
            {
                "loss": [0.70, 0.90, 0.72, 0.61],
                "loss_cls": [0.70, 0.62, 0.53, 0.46],
                "loss_con": [0.0, 0.21, 0.14, 0.10],
                "loss_reg": [0.0, 0.05, 0.04, 0.04],
                "loss_ad": [0.0, 0.02, 0.01, 0.01],
            },
        )
        base_id = _project_run(
            root,
            uri,
            {"ppi#enabled": False},
            BASELINE_VAL_AUC,
            {"loss": [0.70, 0.55, 0.46, 0.40], "loss_cls": [0.70, 0.55, 0.46, 0.40]},
        )
        client = mlflow.MlflowClient(tracking_uri=uri)
        runs = {run_id: client.get_run(run_id) for run_id in (ppi_id, base_id)}
        names = {run_id: run.info.run_name for run_id, run in runs.items()}
        assert names[ppi_id].startswith("ga-ppi_wbp-") and names[base_id].startswith("ga-baseline-")
        training = {
            run_id: next(i.dataset for i in run.inputs.dataset_inputs if i.tags[0].value == "training")
            for run_id, run in runs.items()
        }
        url = ui.ready()

        # the home page; the sidebar's toggle switches from the GenAI views to model training
        browser.get(url)
        click_text("Model training")
        click_text("Experiments")
        click_text("ga_ppi")
        # the experiment opens on its runs table: one row per run (ag-grid renders a row in two containers)
        rows = f"//div[@role='row' and (@row-id='{ppi_id}' or @row-id='{base_id}')]"
        wait.until(lambda d: len(d.find_elements(By.XPATH, rows)) >= 2)
        for button in browser.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
            if button.is_displayed():  # the MLflow Assistant's side panel, which narrows the table
                button.click()
        table = browser.find_element(By.CSS_SELECTOR, "[role='grid']").text
        assert names[ppi_id] in table and names[base_id] in table
        # the Dataset column names the datalist and its training part's digest, the same for both runs
        assert training[ppi_id].digest == training[base_id].digest
        for run_id in (ppi_id, base_id):
            row = f"//div[@role='row' and @row-id='{run_id}']"
            cell = browser.find_element(By.XPATH, f"{row}//div[@col-id='attributes.`Dataset`']")
            assert f"synthetic-oct-ga ({training[run_id].digest})" in cell.text and "Training" in cell.text
        # its link opens the run's inputs: each part's rows, digest, source and columns
        cell.find_element(By.XPATH, ".//button[starts-with(normalize-space(.), 'synthetic-oct-ga')]").click()
        details = "//*[normalize-space(text())='Data details for']"
        wait.until(ec.visibility_of_element_located((By.XPATH, details)))
        drawer = browser.find_element(By.TAG_NAME, "body").text.split("Data details for", 1)[1]
        assert "2 datasets used" in drawer and "Validation" in drawer  # training and validation
        assert f"Digest: {training[base_id].digest}" in drawer and "Path: data/datalist.json" in drawer
        assert f"num rows: {json.loads(training[base_id].profile)['num_rows']}" in drawer
        browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
        wait.until(ec.invisibility_of_element_located((By.XPATH, details)))

        # Columns: untick Source and Models (empty for a bundle's runs), tick the metrics val_auc and ref_val_auc
        click_text("Columns")
        chooser = "//*[@data-component-id='mlflow.experiment_page.runs_table.column_selector']"
        for column in ("Source", "Models", "val_auc", "ref_val_auc"):
            click_text(column, chooser)
        browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
        wait.until(ec.invisibility_of_element_located((By.XPATH, chooser)))

        def cell(run_id: str, column: str) -> str:
            found = browser.find_elements(
                By.XPATH, f"//div[@role='row' and @row-id='{run_id}']//div[@col-id='{column}']"
            )
            return found[0].text if found else ""

        expected = {
            (ppi_id, "val_auc"): PPI_VAL_AUC[-1],
            (base_id, "val_auc"): BASELINE_VAL_AUC[-1],
            (ppi_id, "ref_val_auc"): REF_VAL_AUC,
            (base_id, "ref_val_auc"): REF_VAL_AUC,
        }
        wait.until(lambda d: all(cell(run_id, f"metrics.`{key}`") for run_id, key in expected))
        shown = {(run_id, key): float(cell(run_id, f"metrics.`{key}`")) for run_id, key in expected}
        assert shown == pytest.approx(expected)
        assert not cell(ppi_id, "attributes.`Source`") and not cell(ppi_id, "attributes.`Models`")
        browser.execute_script("document.activeElement.blur()")  # no focus ring on the Columns button
        _screenshot(browser, tmp_path / "mlflow_runs.png")

        # tick both runs' boxes, Compare
        for run_id in (ppi_id, base_id):
            browser.find_element(
                By.XPATH, f"//div[@role='row' and @row-id='{run_id}']//input[contains(@class, 'ag-checkbox-input')]"
            ).click()
        click_text("Compare")
        wait.until(ec.url_contains("/compare-runs"))
        title = "//*[normalize-space(text())='Comparing 2 Runs from 1 Experiment']"
        wait.until(ec.visibility_of_element_located((By.XPATH, title)), "no compare page of 2 runs")
        # fold the plots away; the parameters and metrics that differ (the first two "Show diff only" switches)
        click_text("Visualizations")
        for i in (1, 2):
            switch = f"(//label[normalize-space(.)='Show diff only'])[{i}]"
            label = wait.until(ec.element_to_be_clickable((By.XPATH, switch)))
            browser.find_element(By.ID, label.get_attribute("for")).click()
        wait.until(ec.invisibility_of_element_located((By.XPATH, "//a[normalize-space(text())='ref_val_auc']")))

        def beside(label_xpath: str) -> list[str]:
            """The texts on the same line as the label, right of it, left to right: a row of the compare tables."""
            label = wait.until(ec.visibility_of_element_located((By.XPATH, label_xpath)))
            return browser.execute_script(
                """const r = arguments[0].getBoundingClientRect(), mid = (r.top + r.bottom) / 2;
                return Array.from(document.querySelectorAll('body *'))
                  .filter(e => e.children.length === 0 && e.textContent.trim())
                  .map(e => [e, e.getBoundingClientRect()])
                  .filter(([e, q]) => q.height > 0 && Math.abs((q.top + q.bottom) / 2 - mid) < 4 && q.left > r.right)
                  .sort((a, b) => a[1].left - b[1].left).map(([e, q]) => e.textContent.trim());""",
                label,
            )

        # the tables settle after the switches fold rows away; until then another row can share the line
        run_names = "//*[normalize-space(text())='Run Name:']"
        try:
            wait.until(lambda d: sorted(beside(run_names)) == sorted(names.values()))
        except TimeoutException:
            pass  # the assertion below shows what the line holds
        columns = beside(run_names)
        assert sorted(columns) == sorted(names.values())
        order = [next(run_id for run_id, name in names.items() if name == c) for c in columns]
        params = "//*[normalize-space(text())='Parameters']/following::*"
        assert beside(f"({params}[normalize-space(text())='method'])[1]") == [
            runs[run_id].data.tags["method"] for run_id in order
        ]
        assert beside(f"({params}[normalize-space(text())='ppi.enabled'])[1]") == [
            "True" if run_id == ppi_id else "False" for run_id in order
        ]
        # with "Show diff only" the parameter table holds just what the two runs set differently
        text = browser.find_element(By.TAG_NAME, "body").text
        shown_params = text.split("Parameters\nShow diff only\n", 1)[1].split("\nMetrics", 1)[0].splitlines()
        assert [line.split()[0] for line in shown_params] == [
            "checkpoint_from_epoch", "method", "ppi.enabled", "ppi.warmup_epochs"
        ]  # fmt: skip
        # the metrics that differ: the last val_auc of each (ref_val_auc, the same for both, is left out)
        last = {ppi_id: PPI_VAL_AUC[-1], base_id: BASELINE_VAL_AUC[-1]}
        shown = [float(v) for v in beside("//a[normalize-space(text())='val_auc']")]
        assert shown == pytest.approx([last[run_id] for run_id in order], abs=5e-4)  # 3 decimals shown
        browser.execute_script(
            "arguments[0].scrollIntoView({block: 'start'})",
            browser.find_element(By.XPATH, "//*[normalize-space(text())='Run Name:']"),
        )
        _screenshot(browser, tmp_path / "mlflow_compare.png")
    finally:
        ui.stop()
