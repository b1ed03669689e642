"""The console of a training run: one line an epoch, no bar glued to a log record, third-party noise quiet."""

from __future__ import annotations

import configparser
import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from bundle_files import GA_BUNDLE, ROOT, workdir
from ignite.engine import Engine, Events
from test_ga_bundle import _tiny

from ppi_med.console import NVIMGCODEC_WARNING, QUIET_LOGGERS, EpochSummary, quiet_known_warnings, restore_logs
from ppi_med.engine import EpochLossAverages

LOGGING_CONF = ROOT / "bundles" / "common" / "logging.conf"

#: a log record of the bundles' format, or of MLflow's own handler
LOG_RECORD = re.compile(r"\d{4}[-/]\d\d[-/]\d\d \d\d:\d\d:\d\d")
#: what the quieted loggers and the filtered warning print
NOISE = (
    "Engine run resuming",
    "Epoch[",
    "Complete. Time taken",
    "Got new best metric",
    "Saved checkpoint",
    "Key metric:",
    "Metrics --",
    "nvImageCodec",
    "Creating initial MLflow database tables",
    "Updating database tables",
    "Loading dataset",  # the datasets' caching bars: one bar, the training one, unless verbose
)
SUMMARY_LINE = re.compile(
    r"^epoch (\d+)/(\d+)  loss [\d.]+  loss_cls [\d.]+  loss_con [\d.]+  loss_reg [\d.]+  loss_ad [\d.]+  "
    r"grad_norm [\d.]+  val_auc [\d.]+  best [\d.]+ \(epoch (\d+)(?:; selection starts at epoch \d+)?\)  [\d.]+ s$"
)


# ----- the line, on a toy trainer ----------------------------------------------------------------------------


def _trainer(terms: dict[str, float], max_epochs: int = 2) -> Engine:
    def step(engine: Engine, batch: int) -> dict[str, torch.Tensor]:
        return {k: torch.tensor(v) for k, v in terms.items()}

    trainer = Engine(step)
    EpochLossAverages().attach(trainer)
    return trainer


def _evaluator(key: str = "val_auc") -> Engine:
    """An engine that plays a validation run: its epoch follows the trainer's, and it keeps the best."""
    evaluator = Engine(lambda engine, batch: None)
    evaluator.state.key_metric_name = key
    evaluator.state.best_metric, evaluator.state.best_metric_epoch = -1, -1
    return evaluator


def _validate(trainer: Engine, evaluator: Engine, values: list[float], every: int = 1) -> None:
    @trainer.on(Events.EPOCH_COMPLETED(every=every))
    def validate(engine: Engine) -> None:
        value = values[engine.state.epoch - 1]
        evaluator.state.epoch = engine.state.epoch
        evaluator.state.metrics = {"val_auc": value / 2, evaluator.state.key_metric_name: value}
        if value > evaluator.state.best_metric:
            evaluator.state.best_metric, evaluator.state.best_metric_epoch = value, engine.state.epoch


def test_one_line_per_epoch_with_every_loss_term_the_validation_and_the_best(capsys):
    terms = {"loss": 1.5, "loss_cls": 0.5, "loss_con": 0.25, "loss_reg": 0.125, "loss_ad": 0.625, "grad_norm": 3.0}
    trainer = _trainer(terms)
    evaluator = _evaluator()
    EpochSummary(evaluator).attach(trainer)  # attached before validation, printed after it all the same
    _validate(trainer, evaluator, [0.75, 0.5])
    trainer.run(range(3), max_epochs=2)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2, lines
    for line in lines:
        assert SUMMARY_LINE.match(line), line
    assert lines[0].startswith("epoch 1/2  loss 1.5000  loss_cls 0.5000  loss_con 0.2500  loss_reg 0.1250")
    assert "loss_ad 0.6250  grad_norm 3.00  val_auc 0.7500  best 0.7500 (epoch 1)" in lines[0]
    assert "val_auc 0.5000  best 0.7500 (epoch 1)" in lines[1]  # best so far, not this epoch's


def test_a_baseline_shows_the_terms_it_has_and_epochs_without_validation_show_none(capsys):
    trainer = _trainer({"loss": 0.5, "loss_cls": 0.5, "grad_norm": 1.0}, max_epochs=4)
    evaluator = _evaluator()
    EpochSummary(evaluator).attach(trainer)
    _validate(trainer, evaluator, [0.0, 0.6, 0.0, 0.9], every=2)
    trainer.run(range(2), max_epochs=4)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[0] for line in lines] == ["epoch 1/4", "epoch 2/4", "epoch 3/4", "epoch 4/4"]
    assert all("loss_con" not in line and "loss_ad" not in line for line in lines)
    assert "val_auc" not in lines[0] and "val_auc" not in lines[2]  # the evaluator holds epoch 2's metrics then
    assert "val_auc 0.6000  best 0.6000 (epoch 2)" in lines[1]


def test_the_best_before_the_selection_window_says_when_selection_starts(capsys):
    trainer = _trainer({"loss": 0.5}, max_epochs=3)
    evaluator = _evaluator()
    EpochSummary(evaluator, first_epoch=3).attach(trainer)
    _validate(trainer, evaluator, [0.9, 0.8, 0.7])
    trainer.run(range(1), max_epochs=3)
    lines = capsys.readouterr().out.splitlines()
    assert "best 0.9000 (epoch 1; selection starts at epoch 3)" in lines[1]
    assert "best 0.9000 (epoch 1)  " in lines[2]  # the window itself (the evaluator's reset is SelectionWindow's)


def test_another_key_metric_is_shown_with_val_auc_beside_it(capsys):
    trainer = _trainer({"loss": 0.5}, max_epochs=1)
    evaluator = _evaluator(key="val_worst_group_acc")
    EpochSummary(evaluator).attach(trainer)
    _validate(trainer, evaluator, [0.8])
    trainer.run(range(1), max_epochs=1)
    assert "val_worst_group_acc 0.8000  val_auc 0.4000  best 0.8000 (epoch 1)" in capsys.readouterr().out


def test_verbose_takes_command_line_strings_and_rejects_others():
    assert EpochSummary(verbose="true").verbose and not EpochSummary(verbose="false").verbose
    with pytest.raises(ValueError, match="verbose must be true or false, got 'loud'"):
        EpochSummary(verbose="loud")


# ----- what is quieted, and how verbose brings it back -------------------------------------------------------


def test_logging_conf_quiets_exactly_the_loggers_the_console_knows():
    conf = configparser.ConfigParser(interpolation=None)
    conf.read(LOGGING_CONF)
    names = [k.strip() for k in conf["loggers"]["keys"].split(",")]
    quiet = {conf[f"logger_{n}"]["qualname"]: conf[f"logger_{n}"]["level"] for n in names if n != "root"}
    assert set(quiet) == set(QUIET_LOGGERS), f"{LOGGING_CONF} and ppi_med.console.QUIET_LOGGERS differ"
    assert all(logging.getLevelName(level) >= logging.WARNING for level in quiet.values()), quiet
    # nvImageCodec's notice is itself a WARNING
    assert quiet["monai.data.nvimgcodec_pydicom_plugin"] == "ERROR"
    assert conf["logger_root"]["level"] == "INFO"  # the project's own records and MONAI's summary stay
    for link in (
        "bundles/logging.conf",
        "bundles/ga_ppi/configs/logging.conf",
        "bundles/lidc_ppi/configs/logging.conf",
    ):
        assert (ROOT / link).resolve() == LOGGING_CONF.resolve(), f"{link} is not the shared logging.conf"


@pytest.fixture
def saved_levels():
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_verbose_sets_the_quieted_loggers_back_to_info_when_attached(saved_levels):
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    EpochSummary(verbose=False).attach(Engine(lambda e, b: None))
    assert all(logging.getLogger(n).level == logging.WARNING for n in QUIET_LOGGERS)
    EpochSummary(verbose=True).attach(Engine(lambda e, b: None))
    assert all(logging.getLogger(n).level == logging.INFO for n in QUIET_LOGGERS)
    restore_logs(["alembic"])  # by name too
    assert logging.getLogger("alembic").level == logging.INFO


def test_only_the_nvimgcodec_warning_is_filtered():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_warnings()
        quiet_known_warnings()  # idempotent: one filter
        for text in (f"{NVIMGCODEC_WARNING}. Falling back to default pydicom decoders.", "something else failed"):
            warnings.warn_explicit(text, UserWarning, "image_reader.py", 1, module="monai.data.image_reader")
        # the same words from elsewhere are not this warning
        warnings.warn_explicit(NVIMGCODEC_WARNING, UserWarning, "other.py", 1, module="other")
        warnings.warn_explicit(
            NVIMGCODEC_WARNING, RuntimeWarning, "image_reader.py", 1, module="monai.data.image_reader"
        )
        ours = [f for f in warnings.filters if f[1] is not None and f[1].pattern.startswith("NvImgCodec")]
    assert [(str(w.message), w.category) for w in caught] == [
        ("something else failed", UserWarning),
        (NVIMGCODEC_WARNING, UserWarning),
        (NVIMGCODEC_WARNING, RuntimeWarning),
    ]
    assert len(ours) == 1


# ----- the GA bundle, end to end -----------------------------------------------------------------------------


def _command(tmp_path: Path, epochs: int) -> list[str]:
    """A seconds-long GA run on tests/test_ga_bundle.py's tiny data set."""
    return [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", str(GA_BUNDLE), *_tiny(tmp_path),
        "--batch_size", "4", "--max_epochs", str(epochs), "--ppi#warmup_epochs", "1",
        "--runs_dir", str(tmp_path / "runs"), "--tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
    ]  # fmt: skip


def _console(tmp_path: Path, epochs: int, *overrides: str) -> str:
    """What a user sees: stdout and stderr in one stream, in the order written (as ``make run | tee`` has it)."""
    done = subprocess.run(
        _command(tmp_path, epochs) + list(overrides),
        cwd=workdir(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-4000:]
    return done.stdout


def _pieces(out: str) -> list[str]:
    """The console's lines as a terminal shows them (a carriage return starts the line again), none glued."""
    pieces = [p for p in re.split(r"[\r\n]", out) if p.strip()]
    glued = [p for p in pieces if "%|" in p and (LOG_RECORD.search(p) or re.search(r"epoch \d|best ", p))]
    assert not glued, f"a progress bar and a line share a line: {glued}"
    return pieces


@pytest.mark.slow
def test_the_ga_bundle_prints_one_line_an_epoch_and_nothing_glued(tmp_path):
    out = _console(tmp_path, 3)
    pieces = _pieces(out)
    noise = [p for p in pieces if any(n in p for n in NOISE)]
    assert not noise, noise
    lines = [m for m in map(SUMMARY_LINE.match, pieces) if m]
    assert [(int(m[1]), int(m[2])) for m in lines] == [(1, 3), (2, 3), (3, 3)], out[-3000:]
    best_epoch = int(re.search(r"^best val_auc: [\d.]+ \(epoch (\d+)\)$", out, re.M).group(1))
    assert int(lines[-1][3]) == best_epoch  # the last line's best is the one the run ends with
    assert re.search(r"^ref_val_auc: [\d.]+ ", out, re.M)
    assert "open it with: mlflow ui --backend-store-uri sqlite:///" in out
    # without the bars, the whole run fits a screen
    assert len([p for p in pieces if "%|" not in p]) <= 30, out


@pytest.mark.slow
def test_verbose_brings_the_engine_logs_back(tmp_path):
    pieces = _pieces(_console(tmp_path, 2, "--verbose", "true"))  # validation logs while the bar is closed
    for engine in ("SupervisedTrainer", "SupervisedEvaluator"):
        resumed = [p for p in pieces if f"ignite.engine.engine.{engine} - INFO - Engine run resuming" in p]
        assert resumed and all(LOG_RECORD.match(p) for p in resumed), pieces
    assert any("ignite.engine.engine.SupervisedEvaluator - INFO - Got new best metric of val_auc" in p for p in pieces)
    assert any(p.startswith("Loading dataset") for p in pieces)
    assert [p.split("  ")[0] for p in pieces if SUMMARY_LINE.match(p)] == ["epoch 1/2", "epoch 2/2"]
