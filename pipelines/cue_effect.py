"""How much of a site-CV study's answers the watermark alone makes: scoring every eye and its counterfactual twin.

AUC on a site where the watermark's correlation is reversed mixes two things: whether a model leans on the
watermark, and how well it reads the lesion at a site it never saw. This separates the first. Every eye of the
study's synthetic data set is rendered again from its own seed with the watermark toggled
(:func:`data_prep.synth_oct.render_with_cue`), so the pair differs in the watermark only, and every cell's model
scores both. The **cue effect** of a model is the mean, over eyes, of ``P(GA | watermark) - P(GA | none)``; 0
means the watermark changes nothing. The **flip rate** is the share of eyes whose decision (``P >= 0.5``)
the watermark changes. Only the synthetic data can do this: a real scan has no twin.

Outputs, in ``CV_DIR/cue_effect/``: ``twins/`` (the rendered twins, reused by a rerun), ``cue_effect_eyes.csv``
(one row per eye, cell and checkpoint), ``cue_effect.csv`` (per method, seed, test site), ``cue_effect.md``
(the table with mean +- sd over seeds and a paired test between methods over the same eyes), and metrics
``cue_effect_<method>`` on the study's MLflow parent run, with the files as its artifacts. A rerun moves the
earlier tables to ``cue_effect/history/<their time>/``.

CLI::

    python -m pipelines.cue_effect runs/site_cv/<stamp>            # a study made by pipelines.site_cv
    python -m pipelines.cue_effect CV_DIR --checkpoint final --no-progress
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from tqdm import tqdm

from data_prep.synth_oct import render_with_cue
from ppi_med.data import load_datalist
from ppi_med.tracking import metric_key

from .bundle_config import open_config
from .site_cv.config import SiteCVError
from .site_cv.predict import TensorCache, predict_probabilities

__all__ = ["cue_effect", "main"]


def _study(cv_dir: Path) -> dict:
    path = cv_dir / "summary.json"
    if not path.is_file():
        raise SiteCVError(f"{cv_dir} holds no site-CV study (no summary.json): run pipelines.site_cv first")
    return json.loads(path.read_text())


def _twins(datalist: Path, records: list[dict], folder: Path, progress: bool) -> list[Path]:
    """Every record's twin with its watermark toggled, rendered once into ``folder``."""
    twins = []
    for rec in tqdm(records, desc="twins", unit="eye", disable=not progress):
        cue = 1 - int(rec["cue"])
        path = folder / rec["site"] / f"{rec['subject']}_cue{cue}_img.nii.gz"
        if not path.is_file():
            path = render_with_cue(datalist, rec["subject"], cue, folder)
        twins.append(path)
    return twins


def _bundle_parts(study: dict):
    parser = open_config(study["config_file"], study.get("overrides", {}))
    return parser.get_parsed_content("network_def"), parser.get_parsed_content("common#preprocessing")


def _cell_checkpoint(attempt: Path, checkpoint: str) -> Path:
    """The checkpoint a cell scored as ``best`` or ``final`` (its ``cell.json``: DFR's refitted model for a DFR
    cell), else ``models/model_<checkpoint>.pt``."""
    record = attempt / "cell.json"
    if record.is_file():
        relative = json.loads(record.read_text()).get(f"checkpoint_{checkpoint}")
        if relative:
            return attempt / relative
    return attempt / "models" / f"model_{checkpoint}.pt"


def cue_effect(cv_dir: str | Path, checkpoint: str | None = None, progress: bool = True) -> pd.DataFrame:
    """Score every eye of a site-CV study and its watermark twin with every cell; write the tables.

    Args:
        cv_dir: the study's output folder (``pipelines.site_cv --out``).
        checkpoint: ``best`` or ``final``; default: the study's own choice.
        progress: progress bars.

    Returns:
        One row per method, seed and test site: ``effect`` (mean change of P(GA) when the watermark is
        added), ``flip_rate`` and ``n`` (eyes).

    Raises:
        SiteCVError: no study in ``cv_dir``, a datalist whose eyes carry no ``cue`` (not a synthetic data set
            with a watermark), or a cell whose checkpoint is missing.
    """
    import torch

    cv_dir = Path(cv_dir)
    study = _study(cv_dir)
    checkpoint = checkpoint or study.get("checkpoint", "best")
    if checkpoint not in ("best", "final"):
        raise SiteCVError(f"checkpoint must be 'best' or 'final', got {checkpoint!r}")
    datalist = Path(study["datalist"])
    records = [r for r in load_datalist(datalist) if r.get("site") in study["sites"]]
    if not records or any("cue" not in r or "subject" not in r for r in records):
        raise SiteCVError(
            f"{datalist}: every eye needs 'subject' and 'cue' (a data set of data_prep.synth_oct); "
            "a cue effect needs eyes that can be rendered again without their watermark"
        )
    out = cv_dir / "cue_effect"
    twins = _twins(datalist, records, out / "twins", progress)
    network, preprocessing = _bundle_parts(study)
    device = torch.device("cpu")
    # every eye, then every twin: one scoring pass per model, each volume preprocessed once for all models
    images = [str(r["image"]) for r in records] + [str(t) for t in twins]
    cache = TensorCache()
    cue = np.array([int(r["cue"]) for r in records])
    eyes = []
    cells = [c for c in study["cells"] if c.get("status") in ("trained", "reused")]
    for cell in tqdm(cells, desc="cells", unit="cell", disable=not progress):
        attempt = cv_dir / "cells" / cell["key"] / f"attempt-{cell['attempt']}"
        path = _cell_checkpoint(attempt, checkpoint)
        if not path.is_file():
            raise SiteCVError(f"cell {cell['key']} ({cell['method']}, site {cell['train_site']}): {path} is missing")
        probs = predict_probabilities(network, preprocessing, images, device, 16, {checkpoint: path}, torch, cache)
        listed, toggled = probs[checkpoint][: len(records)], probs[checkpoint][len(records) :]
        with_cue = np.where(cue == 1, listed, toggled)
        without = np.where(cue == 1, toggled, listed)
        for rec, p1, p0 in zip(records, with_cue, without):
            eyes.append(
                {
                    "method": cell["method"],
                    "train_site": cell["train_site"],
                    "seed": cell["seed"],
                    "test_site": rec["site"],
                    "subject": rec["subject"],
                    "label": int(rec["label"]),
                    "p_with_cue": float(p1),
                    "p_without_cue": float(p0),
                    "effect": float(p1 - p0),
                    "flip": bool((p1 >= 0.5) != (p0 >= 0.5)),
                }
            )
    per_eye = pd.DataFrame(eyes)
    table = (
        per_eye.groupby(["method", "train_site", "seed", "test_site"])
        .agg(effect=("effect", "mean"), flip_rate=("flip", "mean"), n=("effect", "size"))
        .reset_index()
    )
    out.mkdir(parents=True, exist_ok=True)
    _keep_earlier(out)
    per_eye.to_csv(out / "cue_effect_eyes.csv", index=False)
    table.to_csv(out / "cue_effect.csv", index=False)
    (out / "cue_effect.md").write_text(_markdown(per_eye, table, study, checkpoint))
    _log(study, out, per_eye)
    return table


_FILES = ("cue_effect.md", "cue_effect.csv", "cue_effect_eyes.csv")


def _keep_earlier(out: Path) -> None:
    """Move an earlier run's tables to ``history/<their time>/``, so a rerun overwrites nothing."""
    old = [out / name for name in _FILES if (out / name).is_file()]
    if not old:
        return
    base = out / "history" / time.strftime("%Y%m%d-%H%M%S", time.localtime(old[0].stat().st_mtime))
    dest, k = base, 1
    while dest.exists():
        k += 1
        dest = base.with_name(f"{base.name}-{k}")
    dest.mkdir(parents=True)
    for path in old:
        path.rename(dest / path.name)


def _markdown(per_eye: pd.DataFrame, table: pd.DataFrame, study: dict, checkpoint: str) -> str:
    sites = sorted(table.test_site.unique())
    seeds = sorted(per_eye.seed.unique())
    lines = [
        f"Cue effect ({checkpoint} checkpoint): the mean change of P(GA) when the watermark is added to the same "
        f"eye (its twin rendered from the same seed), over every eye of each test site, mean ± sd over seeds "
        f"{', '.join(str(s) for s in seeds)}; flip rate: share of eyes whose decision (P >= 0.5) the watermark "
        "changes.",
        "",
        "| method | trained on | " + " | ".join(sites) + " | all eyes | flip rate |",
        "| --- | --- | " + " | ".join("---:" for _ in sites) + " | ---: | ---: |",
    ]
    for (method, train), g in per_eye.groupby(["method", "train_site"], sort=False):
        cells = []
        for site in [*sites, None]:
            sub = g if site is None else g[g.test_site == site]
            by_seed = sub.groupby("seed")["effect"].mean()
            sd = f" ± {by_seed.std(ddof=1):.3f}" if len(by_seed) > 1 else ""
            cells.append(f"{by_seed.mean():+.3f}{sd}")
        flip = g.groupby("seed")["flip"].mean().mean()
        lines.append(f"| {method} | {train} | " + " | ".join(cells) + f" | {flip:.2f} |")
    methods = list(dict.fromkeys(per_eye.method))
    by_seed = per_eye.groupby(["method", "seed"])["effect"].mean().unstack("seed")
    lines += [
        "",
        "Per seed (each seed is a model trained on its own split; all eyes), and a paired t-test over seeds "
        f"against `{methods[0]}`:",
        "",
        "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | difference | p |",
        "| --- | " + " | ".join("---:" for _ in seeds) + " | ---: | ---: |",
    ]
    for method in methods:
        row, ref = by_seed.loc[method], by_seed.loc[methods[0]]
        diff, p = "", ""
        if method != methods[0]:
            pair = pd.concat([row, ref], axis=1).dropna()
            diff = f"{(pair.iloc[:, 0] - pair.iloc[:, 1]).mean():+.3f}"
            p = f"{stats.ttest_rel(pair.iloc[:, 0], pair.iloc[:, 1]).pvalue:.2g}" if len(pair) > 1 else "n/a"
        lines.append(f"| {method} | " + " | ".join(f"{row[s]:+.3f}" for s in seeds) + f" | {diff} | {p} |")
    return "\n".join(lines) + "\n"


def _log(study: dict, out: Path, per_eye: pd.DataFrame) -> None:
    """Metrics and files on the study's MLflow parent run, when it has one."""
    run_id, uri = study.get("parent_run_id"), study.get("tracking_uri")
    if not run_id or not uri:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for method, g in per_eye.groupby("method"):
        client.log_metric(run_id, metric_key(f"cue_effect_{method}"), float(g.groupby("seed")["effect"].mean().mean()))
    for name in ("cue_effect.md", "cue_effect.csv", "cue_effect_eyes.csv"):
        client.log_artifact(run_id, str(out / name), artifact_path="cue_effect")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.cue_effect", description=__doc__.splitlines()[0])
    ap.add_argument("cv_dir", type=Path, help="output folder of a pipelines.site_cv study on synthetic GA data")
    ap.add_argument("--checkpoint", choices=("best", "final"), help="default: the study's own")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        cue_effect(args.cv_dir, args.checkpoint, progress=not args.no_progress)
    except SiteCVError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print((args.cv_dir / "cue_effect" / "cue_effect.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
