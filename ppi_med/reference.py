"""A linear reference for a bundle's classifier: L2 logistic regression on the preprocessed voxels.

The network's validation AUC means little on its own: a task a linear model solves from raw voxels
needs no deep network, and a network below such a model is undertrained. :func:`linear_reference`
fits an L2-regularised logistic regression on the same preprocessed volumes (the bundle's
``preprocessing``, no augmentation) of the same training records, with the regularisation strength
chosen by stratified cross-validation *inside the training part only*, and scores the validation
records once. Voxels are standardised with statistics of the training folds (inside the pipeline, so
that the internal cross-validation does not see its held-out fold either).

:class:`LinearReferenceHandler` runs it when a trainer starts and logs the result into the trainer's
MLflow run (metric ``ref_val_auc``, ``ref_test_auc`` when the bundle holds out a test part, ``ref_cv_auc``,
``ref_seconds``; params ``ref.model``, ``ref.C``,
``ref.n_features``); :class:`ppi_med.tracking.RunTracker` prints it beside the best validation AUC.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from ignite.engine import Engine, Events

from .flags import as_bool
from .tracking import log_batch

__all__ = ["REFERENCE_MODEL", "LinearReferenceHandler", "ReferenceResult", "linear_reference", "voxel_matrix"]

#: Name of the reference model, as logged (param ``ref.model``).
REFERENCE_MODEL = "l2_logistic_regression_on_preprocessed_voxels"


@dataclass(frozen=True)
class ReferenceResult:
    """Outcome of :func:`linear_reference`.

    Attributes:
        val_auc: ROC AUC on the validation records (NaN when they hold one class only).
        test_auc: ROC AUC on the held-out test records (NaN when there are none or they hold one class only).
        cv_auc: mean internal cross-validation AUC of the chosen ``C`` on the training records.
        C: the inverse regularisation strength the internal cross-validation chose.
        n_train: training records.
        n_val: validation records.
        n_features: voxels per record.
        seconds: wall time of loading, fitting and scoring.
    """

    val_auc: float
    test_auc: float
    cv_auc: float
    C: float
    n_train: int
    n_val: int
    n_features: int
    seconds: float


def voxel_matrix(
    records: Sequence[dict[str, Any]],
    preprocessing: Callable[[dict[str, Any]], dict[str, Any]],
    key: str = "image",
    workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Preprocess every record and flatten its image.

    Args:
        records: datalist records with ``key`` and ``label``.
        preprocessing: a deterministic transform of a record (e.g. the bundle's ``preprocessing``).
        key: the image key.
        workers: threads that load and preprocess (decompression and resampling release the GIL);
            ``None``: up to 4, at most the CPU count.

    Returns:
        ``(X, y)``: float32 voxels ``(n, voxels)`` and integer labels ``(n,)``.

    Raises:
        ValueError: no records, or images of different sizes after preprocessing.
    """
    if not records:
        raise ValueError("no records to build a voxel matrix from")
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        rows = list(pool.map(lambda rec: np.asarray(preprocessing(dict(rec))[key], dtype=np.float32).ravel(), records))
    sizes = {r.size for r in rows}
    if len(sizes) != 1:
        raise ValueError(f"preprocessed images differ in size ({sorted(sizes)}); the reference needs one size")
    return np.stack(rows), np.asarray([int(rec["label"]) for rec in records])


def linear_reference(
    train: Sequence[dict[str, Any]],
    val: Sequence[dict[str, Any]],
    preprocessing: Callable[[dict[str, Any]], dict[str, Any]],
    *,
    Cs: Sequence[float] = tuple(10.0 ** np.arange(-4, 5)),  # noqa: N803 (scikit-learn's name)
    folds: int = 5,
    seed: int = 0,
    test: Sequence[dict[str, Any]] = (),
) -> ReferenceResult:
    """Fit the L2 logistic regression on ``train`` (``C`` by internal CV) and score ``val`` (and ``test``).

    Args:
        train: training records (``image``, ``label``).
        val: validation records, scored once with the refitted model.
        preprocessing: deterministic transform giving each record's image (no augmentation).
        Cs: candidate inverse regularisation strengths.
        folds: internal cross-validation folds (fewer when a class has fewer training records).
        seed: seed of the fold assignment.
        test: held-out records, scored once like ``val`` (empty: ``test_auc`` is NaN).

    Returns:
        The :class:`ReferenceResult`.

    Raises:
        ValueError: training records of one class only, or too few for two folds.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    t0 = time.perf_counter()
    x_train, y_train = voxel_matrix(train, preprocessing)
    x_val, y_val = voxel_matrix(val, preprocessing)
    counts = np.bincount(y_train, minlength=2)
    if (counts < 2).any():
        raise ValueError(f"the linear reference needs >= 2 training records per class, got {counts.tolist()}")
    cv = StratifiedKFold(n_splits=int(min(folds, counts.min())), shuffle=True, random_state=seed)
    search = GridSearchCV(
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
        {"logisticregression__C": list(Cs)},
        scoring="roc_auc",
        cv=cv,
    )
    # one BLAS thread: the matrices are small, and BLAS threads that spin beside a busy core (a trainer, another
    # job) made the fit take minutes instead of seconds
    with threadpool_limits(limits=1), warnings.catch_warnings():
        # a nearly separable problem at large C stops lbfgs early; that C simply scores worse in the CV
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*did not converge.*")
        search.fit(x_train, y_train)
        scores = search.predict_proba(x_val)[:, 1]
        test_auc = float("nan")
        if test:
            x_test, y_test = voxel_matrix(test, preprocessing)
            if len(np.unique(y_test)) == 2:
                test_auc = float(roc_auc_score(y_test, search.predict_proba(x_test)[:, 1]))
    val_auc = float(roc_auc_score(y_val, scores)) if len(np.unique(y_val)) == 2 else float("nan")
    return ReferenceResult(
        val_auc=val_auc,
        test_auc=test_auc,
        cv_auc=float(search.best_score_),
        C=float(search.best_params_["logisticregression__C"]),
        n_train=len(y_train),
        n_val=len(y_val),
        n_features=int(x_train.shape[1]),
        seconds=time.perf_counter() - t0,
    )


class LinearReferenceHandler:
    """Compute the linear reference when a trainer starts and log it into the trainer's MLflow run.

    Attach it after the :class:`ppi_med.tracking.RunTracker` (``tracker``), whose run it logs into: the
    metrics ``ref_val_auc`` (and ``ref_test_auc`` with ``test`` records), ``ref_cv_auc``, ``ref_seconds`` and the
    params ``ref.model``, ``ref.C``, ``ref.n_features``. The result is kept in :attr:`result`.

    Args:
        train: training records.
        val: validation records.
        preprocessing: the bundle's deterministic preprocessing.
        test: held-out test records (empty: none).
        tracker: the MLflow handler of the run (``None``: nothing is logged, the result is still printed).
        seed: seed of the internal cross-validation folds.
        enabled: ``False`` skips it.
    """

    def __init__(
        self,
        train: Sequence[dict[str, Any]],
        val: Sequence[dict[str, Any]],
        preprocessing: Callable[[dict[str, Any]], dict[str, Any]],
        tracker: Any = None,
        seed: int = 0,
        enabled: bool = True,
        test: Sequence[dict[str, Any]] = (),
    ) -> None:
        self.train = list(train)
        self.val = list(val)
        self.test = list(test or ())
        self.preprocessing = preprocessing
        self.tracker = tracker
        self.seed = int(seed)
        self.enabled = as_bool(enabled, "linear_reference")
        self.result: ReferenceResult | None = None

    def attach(self, engine: Engine) -> None:
        """Run at ``Events.STARTED`` (after the tracker's own start, which opens the run)."""
        if self.enabled:
            engine.add_event_handler(Events.STARTED, self._run)

    def _run(self, engine: Engine) -> None:
        try:
            self.result = res = linear_reference(
                self.train, self.val, self.preprocessing, seed=self.seed, test=self.test
            )
        except ValueError as err:  # too few records for the reference must not stop the network's training
            warnings.warn(f"linear reference skipped: {err}", stacklevel=2)
            return
        run = getattr(self.tracker, "cur_run", None)
        if run is not None:
            log_batch(
                self.tracker.client,
                run.info.run_id,
                params={"ref.model": REFERENCE_MODEL, "ref.C": res.C, "ref.n_features": res.n_features},
                metrics={
                    "ref_val_auc": res.val_auc,
                    "ref_cv_auc": res.cv_auc,
                    "ref_seconds": res.seconds,
                    **({"ref_test_auc": res.test_auc} if self.test else {}),
                },
            )
        print(
            f"linear reference ({REFERENCE_MODEL}, C={res.C:g} by {res.n_train}-record internal CV): "
            f"val AUC {res.val_auc:.4f}"
            + (f", held-out test AUC {res.test_auc:.4f}" if self.test else "")
            + f" ({res.seconds:.1f} s)",
            flush=True,
        )
