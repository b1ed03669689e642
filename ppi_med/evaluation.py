"""Saliency quality: deletion of the top-k salient voxels (figure 2.4) and localisation against ground-truth
masks (figure 2.6), per method, with a driver that writes CSV and plots and logs them to MLflow.

Deletion: the ``k`` voxels with the largest saliency (signed: the strongest evidence *for* the target class;
summed over channels, all channels of a voxel deleted together) are set to the image's minimum (the
default; ``zero``, ``mean`` or a number also possible) in the preprocessed input the model sees, and the
drop of the target class's probability ``p(x) - p(x_deleted)`` is recorded. ``k`` is a count or, below 1, a
fraction of the voxels (for small inputs). A good map gives a steep early drop. A random ranking is the
reference curve.

Localisation (on cases whose mask is not empty, in the original image's grid: the map is mapped back with
:func:`ppi_med.cases.to_original_grid` and compared with the expert mask as drawn):

- ``share_inside``: positive saliency inside the mask / all positive saliency (``nan`` if the map has no
  positive part); its chance level is the mask's volume fraction (``mask_fraction``);
- ``pointing_hit``: whether the voxel of maximum saliency (the first one in C order on ties) lies in the
  mask, or within ``tolerance`` of it (mm when the voxel spacing is given, else voxels);
- ``dice_fixed``: Dice of ``s+ / max(s+) > threshold`` (0.5) with the mask; ``dice_best``: the best Dice over
  the thresholds 0.05, 0.10, ..., 0.95, and that threshold.

Bundle run id ``evaluate_saliency`` (``bundles/common/saliency.json``, merged over either bundle)::

    python -m monai.bundle run evaluate_saliency \
        --config_file "['bundles/ga_ppi.json','bundles/common/saliency.json']" \
        --checkpoint runs/<run>/models/model_best.pt [--eval_run_id <mlflow run id>] [--eval_ks "[100,1000]"]

Its ids: ``checkpoint`` (shared with ``export``), ``eval_dir`` (default: a new ``runs/saliency-eval-...``),
``eval_methods`` (all five), ``eval_ks`` (100 ... 10000), ``eval_target`` (``label``), ``eval_fill``
(``min``), ``eval_tolerance_mm`` (0), ``eval_run_id`` (``null``: a new run ``saliency-eval-...`` in the
bundle's experiment; else the training run to add the scores to), ``eval_datalist`` (``@validate#datalist``),
and ``evaluate_saliency_job``, the call itself (its ``spec`` is the
:class:`~ppi_med.saliency_spec.SaliencySpec`, the one export takes too). MLflow: the bundle's ``tracking_uri``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import ndimage as ndi
from torch import nn

from .atomic import atomic_open, atomic_path, atomic_write_json
from .cases import find_loader
from .image_grid import ensure_new, read_source
from .masks import read_case_mask
from .saliency_spec import SaliencySpec

__all__ = [
    "DEFAULT_KS",
    "DEFAULT_THRESHOLDS",
    "resolve_k",
    "delete_topk",
    "deletion_probabilities",
    "share_inside",
    "pointing_hit",
    "dice_at",
    "best_dice",
    "localisation",
    "evaluate_saliency",
    "plot_deletion",
    "plot_localisation",
    "log_to_mlflow",
]

DEFAULT_KS = (100, 500, 1000, 5000, 10000)
DEFAULT_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))
RANDOM = "random"


# -- deletion ----------------------------------------------------------------------------------------------


def resolve_k(k: float, n_voxels: int) -> int:
    """A deletion size as a voxel count: ``k >= 1`` is a count, ``0 < k < 1`` a fraction (at least 1 voxel).

    Raises:
        ValueError: ``k <= 0`` or more voxels than the input has.
    """
    if k <= 0:
        raise ValueError(f"deletion size k must be > 0, got {k}")
    count = max(1, round(k * n_voxels)) if k < 1 else int(k)
    if count != k and k >= 1:
        raise ValueError(f"deletion size k = {k} must be a whole number of voxels or a fraction below 1")
    if count > n_voxels:
        raise ValueError(f"cannot delete k = {count} voxels from an input of {n_voxels}; use smaller k or fractions")
    return count


def _fill_values(x: torch.Tensor, fill: str | float) -> torch.Tensor:
    """One fill value per sample, shape ``(N, 1, ..., 1)``."""
    flat = x.reshape(x.shape[0], -1)
    if fill == "min":
        v = flat.min(dim=1).values
    elif fill == "zero":
        v = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    elif fill == "mean":
        v = flat.mean(dim=1)
    elif isinstance(fill, (int, float)) and not isinstance(fill, bool):
        v = torch.full((x.shape[0],), float(fill), dtype=x.dtype, device=x.device)
    else:
        raise ValueError(f"fill must be 'min', 'zero', 'mean' or a number, got {fill!r}")
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def delete_topk(x: torch.Tensor, saliency: torch.Tensor, k: float, fill: str | float = "min") -> torch.Tensor:
    """``x`` with its ``k`` most salient voxels replaced by ``fill``.

    Args:
        x: inputs ``(N, C, *spatial)``.
        saliency: maps of the shape of ``x`` (or ``(N, 1, *spatial)``); voxels are ranked by the saliency
            summed over channels, largest first.
        k: a count or a fraction (see :func:`resolve_k`).
        fill: ``min`` (each image's minimum), ``zero``, ``mean`` or a number.

    Returns:
        A new tensor.

    Raises:
        ValueError: mismatched shapes, bad ``k`` or ``fill``.
    """
    if saliency.shape[0] != x.shape[0] or saliency.shape[2:] != x.shape[2:]:
        raise ValueError(f"saliency {tuple(saliency.shape)} does not match the input {tuple(x.shape)}")
    n, spatial = x.shape[0], x.shape[2:]
    count = resolve_k(k, math.prod(spatial))
    scores = saliency.sum(dim=1).reshape(n, -1)
    idx = scores.topk(count, dim=1).indices
    drop = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True).reshape(n, 1, *spatial)
    return torch.where(drop, _fill_values(x, fill), x)


def deletion_probabilities(
    model: nn.Module,
    x: torch.Tensor,
    saliency: torch.Tensor,
    target: int | torch.Tensor,
    ks: Sequence[float],
    fill: str | float = "min",
) -> torch.Tensor:
    """The target class's softmax probability before and after each deletion.

    Args:
        model: the classifier (run as it is: put it in eval mode first).
        x: inputs ``(N, C, *spatial)``.
        saliency: their maps.
        target: one class, or one per sample.
        ks: deletion sizes (counts or fractions).
        fill: see :func:`delete_topk`.

    Returns:
        ``(N, 1 + len(ks))``: column 0 the original probability, then one per ``k``.
    """
    t = torch.as_tensor(target, device=x.device).long().expand(x.shape[0])
    out = []
    with torch.no_grad():
        for i in range(x.shape[0]):
            xi, si = x[i : i + 1], saliency[i : i + 1]
            batch = torch.cat([xi] + [delete_topk(xi, si, k, fill) for k in ks])
            p = torch.softmax(model(batch).float(), dim=1)[:, t[i]]
            out.append(p.cpu())
    return torch.stack(out)


# -- localisation ------------------------------------------------------------------------------------------


def _check_pair(saliency: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s, m = np.asarray(saliency, dtype=np.float64), np.asarray(mask) > 0.5
    if s.shape != m.shape:
        raise ValueError(f"saliency {s.shape} and mask {m.shape} are on different grids")
    return s, m


def share_inside(saliency: np.ndarray, mask: np.ndarray) -> float:
    """Positive saliency inside the mask over all positive saliency (``nan`` without positive saliency)."""
    s, m = _check_pair(saliency, mask)
    pos = np.clip(s, 0, None)
    total = pos.sum()
    return float(pos[m].sum() / total) if total > 0 else float("nan")


def pointing_hit(
    saliency: np.ndarray, mask: np.ndarray, tolerance: float = 0.0, spacing: Sequence[float] | None = None
) -> bool:
    """Whether the saliency maximum lies in the mask, or within ``tolerance`` of it.

    Args:
        saliency: the map.
        mask: the ground truth (> 0.5 is inside).
        tolerance: allowed distance from the mask (mm with ``spacing``, else voxels).
        spacing: voxel size per axis.

    Raises:
        ValueError: an empty mask, or the arrays differ in shape.
    """
    s, m = _check_pair(saliency, mask)
    if not m.any():
        raise ValueError("pointing game needs a non-empty mask")
    peak = np.unravel_index(int(np.argmax(s)), s.shape)
    if m[peak]:
        return True
    if tolerance <= 0:
        return False
    dist = ndi.distance_transform_edt(~m, sampling=spacing)
    return bool(dist[peak] <= tolerance + 1e-9)


def dice_at(saliency: np.ndarray, mask: np.ndarray, threshold: float) -> float:
    """Dice of ``s+ / max(s+) > threshold`` with the mask (0 when the map has no positive part).

    Raises:
        ValueError: an empty mask, or the arrays differ in shape.
    """
    s, m = _check_pair(saliency, mask)
    if not m.any():
        raise ValueError("Dice needs a non-empty mask")
    pos = np.clip(s, 0, None)
    peak = pos.max()
    if peak <= 0:
        return 0.0
    region = pos / peak > threshold
    return float(2.0 * np.logical_and(region, m).sum() / (region.sum() + m.sum()))


def best_dice(
    saliency: np.ndarray, mask: np.ndarray, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> tuple[float, float]:
    """The best :func:`dice_at` over ``thresholds`` and the (lowest) threshold that gives it."""
    scores = [dice_at(saliency, mask, t) for t in thresholds]
    i = int(np.argmax(scores))
    return scores[i], float(thresholds[i])


def localisation(
    saliency: np.ndarray,
    mask: np.ndarray,
    *,
    threshold: float = 0.5,
    tolerance: float = 0.0,
    spacing: Sequence[float] | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> dict[str, float]:
    """Every localisation score of one map against one non-empty mask (see the module's docstring)."""
    best, best_t = best_dice(saliency, mask, thresholds)
    m = np.asarray(mask) > 0.5
    return {
        "share_inside": share_inside(saliency, mask),
        "mask_fraction": float(m.mean()),
        "pointing_hit": float(pointing_hit(saliency, mask, tolerance, spacing)),
        "dice_fixed": dice_at(saliency, mask, threshold),
        "dice_best": best,
        "best_threshold": best_t,
    }


# -- plots -------------------------------------------------------------------------------------------------


def plot_deletion(deletion: pd.DataFrame, path: str | Path) -> Path:
    """Mean (+- standard error) probability drop against k, one curve per method."""
    from matplotlib.figure import Figure

    path = ensure_new(path)
    fig = Figure(figsize=(6.0, 4.2))
    ax = fig.subplots()
    markers = "os^Dvx<>"
    for i, (method, g) in enumerate(deletion.groupby("method", sort=False)):
        stats = g.groupby("n_deleted")["drop"].agg(["mean", "sem"]).reset_index()
        # distinct markers and shrinking sizes keep coinciding curves (WBP = input x gradient on ReLU nets) visible
        style = (
            {"color": "grey", "linestyle": "--"}
            if method == RANDOM
            else {"marker": markers[i % len(markers)], "markersize": max(9 - 1.5 * i, 3)}
        )
        ax.errorbar(stats["n_deleted"], stats["mean"], yerr=stats["sem"].fillna(0), label=method, capsize=2, **style)
    ax.set_xscale("log")
    ax.set_xlabel("voxels deleted (most salient first)")
    ax.set_ylabel("drop of the target class probability")
    ax.set_title("Deletion of the top-k salient voxels")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, overwrite=False) as tmp:
        fig.savefig(tmp, dpi=100, format=path.suffix.lstrip(".") or "png")  # by the name, not the temporary one
    return path


def plot_localisation(summary: pd.DataFrame, path: str | Path) -> Path:
    """Grouped bars of the localisation scores per method."""
    from matplotlib.figure import Figure

    path = ensure_new(path)
    metrics = ["share_inside", "pointing_acc", "dice_fixed", "dice_best"]
    rows = summary[summary["n_localised"] > 0]
    fig = Figure(figsize=(7.0, 4.2))
    ax = fig.subplots()
    width = 0.8 / max(len(rows), 1)
    x = np.arange(len(metrics))
    for i, (_, r) in enumerate(rows.iterrows()):
        ax.bar(x + i * width, [r[m] for m in metrics], width, label=r["method"])
    if len(rows):
        ax.axhline(
            float(rows["mask_fraction"].iloc[0]),
            color="grey",
            linestyle="--",
            linewidth=1,
            label="mask volume fraction (chance share)",
        )
    ax.set_xticks(x + width * (len(rows) - 1) / 2, metrics)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title("Localisation against the ground-truth masks")
    if len(rows):
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no case with a non-empty mask", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    with atomic_path(path, overwrite=False) as tmp:
        fig.savefig(tmp, dpi=100, format=path.suffix.lstrip(".") or "png")  # by the name, not the temporary one
    return path


# -- MLflow ------------------------------------------------------------------------------------------------


def log_to_mlflow(
    summary: pd.DataFrame,
    files: Sequence[Path],
    *,
    tracking_uri: str | None,
    experiment_name: str,
    run_id: str | None = None,
    run_name: str | None = None,
    params: Mapping[str, Any] | None = None,
    artifact_path: str = "saliency_eval",
) -> str:
    """Log the summary as metrics and the files as artifacts, into ``run_id`` or a new run of the experiment.

    Metrics are ``saliency/<method>/<score>`` (e.g. ``saliency/wbp/drop_k1000``, ``saliency/wbp/dice_best``)
    and ``saliency/<method>/deletion_drop`` with the number of deleted voxels as its step (MLflow's chart of
    it is the deletion curve). A new run gets ``params`` as parameters; an existing one keeps its parameters
    (they cannot change) and gets the configuration as the artifact ``config.json`` only.

    Returns:
        The run id.

    Raises:
        ValueError: ``run_id`` is not a run of that tracking store.
    """
    from mlflow import MlflowClient

    from .tracking import ensure_experiment, flatten_params, git_commit

    client = MlflowClient(tracking_uri=tracking_uri)
    created = run_id is None
    if created:
        exp_id = ensure_experiment(client, experiment_name)
        run = client.create_run(exp_id, run_name=run_name, tags={"kind": "saliency_eval", "git_commit": git_commit()})
        run_id = run.info.run_id
        for k, v in flatten_params(params or {}).items():
            client.log_param(run_id, k, v[:500])
    else:
        _check_run(tracking_uri, run_id)
    drop_cols = [c for c in summary.columns if c.startswith("drop_k")]
    # the curve's step is the voxel count (or the k's rank when the ks are fractions)
    steps = {c: int(c[6:]) if c[6:].isdigit() else i for i, c in enumerate(drop_cols)}
    for _, r in summary.iterrows():
        method = r["method"]
        for col, value in r.items():
            if col == "method" or value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            client.log_metric(run_id, f"saliency/{method}/{col}", float(value))
            if col in steps:
                client.log_metric(run_id, f"saliency/{method}/deletion_drop", float(value), step=steps[col])
    for f in files:
        client.log_artifact(run_id, str(f), artifact_path)
    if created:
        client.set_terminated(run_id)
    return run_id


def _check_run(tracking_uri: str | None, run_id: str) -> None:
    """Raise ValueError if ``run_id`` is not a run of the store."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        client.get_run(run_id)
    except MlflowException as err:
        raise ValueError(f"MLflow run {run_id} not found in {client.tracking_uri}: {err}") from err


# -- driver ------------------------------------------------------------------------------------------------


def evaluate_saliency(
    spec: SaliencySpec,
    out_dir: str | Path,
    *,
    ks: Sequence[float] = DEFAULT_KS,
    fill: str | float = "min",
    threshold: float = 0.5,
    tolerance: float = 0.0,
    random_reference: bool = True,
    tracking_uri: str | None = None,
    experiment_name: str = "saliency_eval",
    run_id: str | None = None,
    run_name: str | None = None,
    log_mlflow: bool = True,
    seed: int = 0,
) -> pd.DataFrame:
    """Deletion and localisation for every method of ``spec`` over its records; CSV, plots and MLflow.

    Writes into ``out_dir`` (refusing existing files): ``deletion.csv`` (one row per case, method and k),
    ``localisation.csv`` (one row per case with a non-empty mask and method), ``summary.csv`` (one row per
    method: ``drop_k<k>`` means, ``share_inside``, ``mask_fraction``, ``pointing_acc``, ``dice_fixed``,
    ``dice_best``, case counts), ``deletion_curves.png``, ``localisation.png`` and ``config.json``.

    Args:
        spec: the network, preprocessing, records, checkpoint, methods to compare, the one target (the class
            explained: ``label``, ``predicted`` or a class index), device, method options and record keys
            (:class:`ppi_med.saliency_spec.SaliencySpec`).
        out_dir: the output folder.
        ks: deletion sizes, counts or fractions.
        fill: the deletion value, see :func:`delete_topk`.
        threshold: the fixed threshold of ``dice_fixed``.
        tolerance: the pointing game's tolerance (mm).
        random_reference: add a random ranking to the deletion curves.
        tracking_uri: MLflow store (``None``: MLflow's default).
        experiment_name: experiment of a new run.
        run_id: log into this existing run instead of a new one.
        run_name: name of a new run.
        log_mlflow: log at all.
        seed: seed of the random reference.

    Returns:
        The summary table.

    Raises:
        FileExistsError: an output exists.
        ValueError: bad options (several targets, a bad fill, an unknown MLflow run) or cases (named).
    """
    target = spec.single_target()
    methods = list(spec.method_names)
    if random_reference and RANDOM in methods:
        raise ValueError(f"a method named '{RANDOM}' would be mixed up with the random reference: rename it")
    _fill_values(torch.zeros(1, 1), fill)  # validates fill before any work
    if log_mlflow and run_id:
        _check_run(tracking_uri, run_id)
    out_dir = Path(out_dir)
    names = [
        "deletion.csv",
        "localisation.csv",
        "summary.csv",
        "deletion_curves.png",
        "localisation.png",
        "config.json",
    ]
    paths = {n: ensure_new(out_dir / n) for n in names}
    records = spec.records()
    pipeline = spec.pipeline()
    network = pipeline.network
    loader = find_loader(spec.preprocessing, spec.image_key)
    gen = torch.Generator().manual_seed(seed)

    deletion_rows: list[dict] = []
    loc_rows: list[dict] = []
    for case in pipeline.cases(records, desc="saliency evaluation", progress=spec.progress):
        cls = case.target(target)
        n_vox = math.prod(case.x.shape[2:])
        counts = [resolve_k(k, n_vox) for k in ks]
        maps = {name: pipeline.saliency(case, m, cls) for name, m in spec.named_methods.items()}
        if random_reference:
            maps[RANDOM] = torch.rand(case.x.shape, generator=gen).to(case.x.device)
        for m, s in maps.items():
            probs = deletion_probabilities(network, case.x, s.detach(), cls, counts, fill)[0]
            for k, c, p in zip(ks, counts, probs[1:].tolist()):
                deletion_rows.append(
                    {
                        "case_id": case.id,
                        "method": m,
                        "target_class": cls,
                        "k": k,
                        "n_deleted": c,
                        "prob_before": float(probs[0]),
                        "prob_after": p,
                        "drop": float(probs[0]) - p,
                    }
                )
        if not case.record.get(spec.mask_key):
            continue
        image = read_source(case.record[spec.image_key], loader)
        mask = read_case_mask(
            case.record, image_key=spec.image_key, mask_key=spec.mask_key, image=image, loader=loader, case=case.id
        )
        if not mask.any():  # an empty mask has nothing to localise
            continue
        for m in methods:
            arr = pipeline.on_source_grid(case, maps[m], image.shape, image.affine)
            scores = localisation(arr, mask, threshold=threshold, tolerance=tolerance, spacing=image.spacing)
            loc_rows.append({"case_id": case.id, "method": m, "target_class": cls, **scores})

    deletion = pd.DataFrame(deletion_rows)
    loc = pd.DataFrame(
        loc_rows,
        columns=[
            "case_id",
            "method",
            "target_class",
            "share_inside",
            "mask_fraction",
            "pointing_hit",
            "dice_fixed",
            "dice_best",
            "best_threshold",
        ],
    )
    summary = _summarise(deletion, loc, list(methods) + ([RANDOM] if random_reference else []), ks)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, df in (("deletion.csv", deletion), ("localisation.csv", loc), ("summary.csv", summary)):
        with atomic_open(paths[name], "w", newline="", overwrite=False) as fh:
            df.to_csv(fh, index=False)
    plot_deletion(deletion, paths["deletion_curves.png"])
    plot_localisation(summary[summary["method"] != RANDOM], paths["localisation.png"])
    config = {
        "methods": list(methods),
        "ks": list(ks),
        "target": target,
        "fill": fill,
        "threshold": threshold,
        "tolerance_mm": tolerance,
        "random_reference": random_reference,
        "checkpoint": spec.checkpoint or "",
        "n_cases": len(records),
        "n_localised": int(loc["case_id"].nunique()) if len(loc) else 0,
        "seed": seed,
    }
    atomic_write_json(paths["config.json"], config, indent=2, overwrite=False)
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"), flush=True)
    if log_mlflow:
        rid = log_to_mlflow(
            summary,
            list(paths.values()),
            tracking_uri=tracking_uri,
            experiment_name=experiment_name,
            run_id=run_id,
            run_name=run_name,
            params=config,
        )
        print(f"saliency evaluation logged to MLflow run {rid}; files in {out_dir}", flush=True)
    return summary


def _summarise(deletion: pd.DataFrame, loc: pd.DataFrame, methods: list[str], ks: Sequence[float]) -> pd.DataFrame:
    rows = []
    for m in methods:
        d = deletion[deletion["method"] == m]
        row: dict[str, Any] = {"method": m, "n_cases": int(d["case_id"].nunique())}
        for k in ks:
            row[f"drop_k{_k_name(k)}"] = float(d.loc[d["k"] == k, "drop"].mean())
        lm = loc[loc["method"] == m]
        row["n_localised"] = int(len(lm))
        for col, name in (
            ("share_inside", "share_inside"),
            ("mask_fraction", "mask_fraction"),
            ("pointing_hit", "pointing_acc"),
            ("dice_fixed", "dice_fixed"),
            ("dice_best", "dice_best"),
        ):
            row[name] = float(lm[col].mean()) if len(lm) and lm[col].notna().any() else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def _k_name(k: float) -> str:
    return str(int(k)) if k >= 1 else f"{k:g}".replace("0.", "p")
