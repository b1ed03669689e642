"""``make results``: every experiment behind ``docs/RESULTS.md``, run from scratch and logged to MLflow.

The package is split by what it does: :mod:`.profiles` (the parts, the method lists read from the registries
and the sizes of each profile), :mod:`.jobs` (the job list; :mod:`.variants` turns a method name into bundle
arguments, :mod:`.paths` names every bundle file), :mod:`.scheduler` (running jobs and resuming them),
:mod:`.data` (the data the jobs share), :mod:`.store` (the MLflow store), :mod:`.ledger` (the committed record of
finished jobs that lets the study grow across machines and days) with :mod:`.plan` (what is restored and what
runs) and :mod:`.machine`, :mod:`.report` with :mod:`.sections` (the report from the jobs' outputs) and
``templates/*.md`` (its prose), :mod:`.cli` (``python -m pipelines.results``; its module docstring describes the
study).
"""

from __future__ import annotations

from .cli import main
from .data import prepare_data
from .jobs import Job, build_jobs, portable_command
from .ledger import LEDGER, Ledger
from .paths import BUNDLES
from .plan import Plan, plan_study
from .profiles import LIDC_MASKS, PARTS, PROFILES, SALIENCIES, Profile
from .report import write_report
from .scheduler import run_jobs
from .store import EXPERIMENTS, init_store
from .variants import method_args

__all__ = [
    "BUNDLES",
    "EXPERIMENTS",
    "LEDGER",
    "LIDC_MASKS",
    "PARTS",
    "PROFILES",
    "SALIENCIES",
    "Job",
    "Ledger",
    "Plan",
    "Profile",
    "build_jobs",
    "init_store",
    "main",
    "method_args",
    "plan_study",
    "portable_command",
    "prepare_data",
    "run_jobs",
    "write_report",
]
