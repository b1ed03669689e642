"""Site-wise cross-validation of a MONAI bundle: train on each site, test on every site, DeLong-test PPI vs baseline.

For every training site X, method and seed, the bundle is trained in-process (``monai.bundle.ConfigWorkflow``)
with ``train_sites=[X]`` and ``val_sites=None``, so X's subjects are split (stratified, subject-level, by the
bundle's ``seed`` and ``val_fraction``) into a training part and a held-out part; every method of a seed sees
the same split. The best checkpoint (best validation AUC; ``--checkpoint final`` for the last epoch's) then
scores X's held-out part (the diagonal of the matrix) and every volume of every other site, with the
bundle's own ``preprocessing`` and ``network``. The tables are those of table 2.3 of the method's text (see
:mod:`pipelines.site_cv.tables`), with DeLong's paired test of each PPI method against the baseline in every cell
and on all off-diagonal cases pooled.

Methods: those of :mod:`ppi_med.methods`: a PPI variant of :mod:`ppi_med.ppi.variants` (``baseline``,
``ppi_wbp``, ``ppi_gradcam``, ``ppi_wbp_box``, ``ppi_wbp_partner_zero``, ``ppi:mode=detached,partner=roll``, the
controls ``random_mask`` and ``random_erasing``), a comparator (``groupdro``, ``jtt``, ``dfr``) or
``<variant>+<comparator>`` (``ppi_wbp+dfr``). A method sets only the ``ppi`` fields it names, on the bundle's own
``ppi``, and is named everywhere (tables, files, cell keys, MLflow) by its label: the fields in which the
configuration it trains differs from the bundle's ``ppi`` (:mod:`pipelines.site_cv.methods`). Two methods that train
the same configuration are refused.

MLflow: one parent run per invocation in ``--experiment``; each trained cell is the bundle's own run, made a
child of the parent through the ``mlflow.parentRunId`` tag, named ``cv-<method>-<site>-s<seed>-<key>``, with
``auc_<site>`` (best checkpoint) and ``auc_final_<site>`` logged into it for every test site.

Resuming: a cell is keyed by a hash of the bundle file, the datalist, the bundle overrides, the method, the
site and the seed; its checkpoints, predictions and record live in ``OUT/cells/<key>/attempt-<n>/``. A
cell whose record, checkpoints and predictions exist and whose MLflow run is FINISHED in the current
tracking store is reused, not retrained; a failed or unfinished attempt is kept and a new attempt made
beside it. An earlier report in OUT is moved to ``OUT/history/<time>/``, never deleted. Studies run apart (each
with methods of its own, in other stores or on other machines) merge into one report with
``python -m pipelines.site_cv.merge`` (:mod:`~pipelines.site_cv.merge`).

Output in OUT: ``summary.md``, ``summary.json``, ``cells.csv``, ``predictions.csv``, the matrices as CSV and
JSON (``auc_<method>``, ``pvalue_<method>_vs_baseline``, ...), ``pooled_offdiag.csv``, and the figures
``heatmap_auc_<method>.png``, ``heatmap_pvalue.png``, ``roc_<method>.png`` (a label's characters other than
letters, digits and ``_.+=,-`` are written ``-`` in file names).

Modules: :mod:`~pipelines.site_cv.config` (what an invocation runs), :mod:`~pipelines.site_cv.methods` (methods,
their overrides and labels), :mod:`~pipelines.site_cv.study` (the study and its loop over cells),
:mod:`~pipelines.site_cv.cells` (one cell: train, score, reuse), :mod:`~pipelines.site_cv.predict` (scoring a
model), :mod:`~pipelines.site_cv.tables` (AUC matrices, DeLong tests), :mod:`~pipelines.site_cv.text`,
:mod:`~pipelines.site_cv.figures` and :mod:`~pipelines.site_cv.report` (the report),
:mod:`~pipelines.site_cv.cli` (the command line).

CLI::

    python -m pipelines.site_cv --config_file bundles/ga_ppi.json --methods baseline,ppi_wbp \\
        --max_epochs 3 --synthetic#subjects_per_site 20

Any ``--<id> <value>`` that is not an option of this command is passed to the bundle as an override (the
value is read as JSON or a Python literal when it parses as one, e.g. ``false``, ``[4,32,48]``, otherwise
kept as a string), as ``python -m monai.bundle run`` does.
"""

from __future__ import annotations

from .cells import CELL_FORMAT, cell_key
from .cli import build_parser, main
from .config import RESERVED_OVERRIDES, SiteCVConfig, SiteCVError, parse_overrides
from .merge import merge_studies
from .methods import method_labels, method_overrides, split_methods
from .study import SiteCVResult, one_class_sites, run_site_cv, run_site_cv_shard, study_overrides
from .tables import SiteCVTables, site_cv_tables

__all__ = [
    "CELL_FORMAT",
    "RESERVED_OVERRIDES",
    "SiteCVConfig",
    "SiteCVError",
    "SiteCVResult",
    "SiteCVTables",
    "build_parser",
    "cell_key",
    "main",
    "method_labels",
    "merge_studies",
    "method_overrides",
    "one_class_sites",
    "parse_overrides",
    "run_site_cv",
    "run_site_cv_shard",
    "site_cv_tables",
    "split_methods",
    "study_overrides",
]
