"""Radiologist review of exported saliency overlays in the browser, and the readers' grades summarised.

``python -m pipelines.review EXPORT_DIR`` serves a page over an export folder of :mod:`ppi_med.export`: the case
list of ``index.csv``, each case's scan with its overlay (an OCT volume B-scan first beside its en-face
projection, any other scan in NiiVue's three planes), and a grade form whose answers are saved to
``EXPORT_DIR/review/<reader>.csv`` on every change. ``python -m pipelines.review --summarise EXPORT_DIR`` folds
the grades into agreement figures per method and logs them to MLflow. See :mod:`pipelines.review.server`,
:mod:`pipelines.review.grades` and :mod:`pipelines.review.agreement`.
"""

from __future__ import annotations

from .agreement import cohen_kappa, summarise, summarise_export
from .cases import Case, ReviewInputError, load_cases
from .grades import COVERAGE, GRADE_COLUMNS, GradeError, GradeStore
from .server import ReviewServer, ReviewSetupError, make_server

__all__ = [
    "COVERAGE",
    "GRADE_COLUMNS",
    "Case",
    "GradeError",
    "GradeStore",
    "ReviewInputError",
    "ReviewServer",
    "ReviewSetupError",
    "cohen_kappa",
    "load_cases",
    "make_server",
    "summarise",
    "summarise_export",
]
