"""What a site-CV invocation runs: :class:`SiteCVConfig`, its checks, and the bundle overrides of the command line."""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RESERVED_OVERRIDES", "SiteCVConfig", "SiteCVError", "check_options", "parse_overrides"]


class SiteCVError(ValueError):
    """A bad request: unknown site or method, conflicting override, malformed option."""


# bundle ids that the pipeline sets per cell; the user sets them through the command's own options
RESERVED_OVERRIDES = {
    "train_sites": "--sites",
    "val_sites": "(always null: the training site is split by subject)",
    "seed": "--first-seed / --seeds",
    "test_fraction": "--test-fraction",
    "selection": "--selection",
    "oracle_sites": "--oracle-sites",
    "run_name": "(set per cell)",
    "run_tags": "(set per cell)",
    "runs_dir": "--out",
    "output_dir": "--out",
    "ckpt_dir": "--out",
    "experiment_name": "--experiment",
    "tracking_uri": "--tracking-uri",
}


@dataclass
class SiteCVConfig:
    """What one invocation runs.

    Attributes:
        config_file: the bundle config (e.g. ``bundles/ga_ppi.json``).
        meta_file: the bundle's metadata (``metadata.json`` beside the config when ``None``).
        sites: training and test sites (every site of the datalist when ``None``).
        train_sites: the sites trained on, the rows of the matrices (every one of ``sites`` when ``None``);
            e.g. only the confounded site, scored on all the others.
        methods: methods of :mod:`ppi_med.methods`: PPI variants of :mod:`ppi_med.ppi.variants` (``baseline``,
            ``ppi_wbp``, ``ppi_wbp_box``, ``ppi:mode=detached,partner=roll``, the controls ``random_mask`` and
            ``random_erasing``), the comparators ``groupdro``, ``jtt``, ``dfr``, and ``<variant>+<comparator>``
            (``ppi_wbp+dfr``). Each is applied on top of the bundle's ``ppi`` and named by its label there
            (:func:`pipelines.site_cv.methods.method_labels`).
        selection: how each cell chooses its checkpoint (the bundle's ``selection``): ``train`` (validation
            AUC on the training site's validation part), ``worst_site`` (the worst (site, label) group's accuracy
            there) or ``oracle`` (validation AUC on half of ``oracle_sites``' subjects, which are then not scored).
        oracle_sites: the sites ``oracle`` validates on (e.g. the site generated with the cue reversed).
        seeds: number of seeds.
        first_seed: the first seed (the bundle's ``seed`` when ``None``); seeds are consecutive.
        out_dir: output folder (``runs/site_cv/<time>`` when ``None``).
        tracking_uri: MLflow store (``MLFLOW_TRACKING_URI`` or the bundle's ``tracking_uri`` when ``None``).
        experiment: MLflow experiment of the parent and child runs.
        overrides: bundle overrides (``id#path -> value``) applied to every cell.
        checkpoint: ``best`` (best validation AUC) or ``final`` checkpoint for the tables.
        test_fraction: share of the training site's subjects kept as its test part (the diagonal): they
            neither train nor choose the checkpoint, which the validation part (``val_fraction``) does.
            0 scores the validation part on the diagonal, as before.
        min_steps: optimiser steps every cell gets at least: a cell whose ``max_epochs`` of its training site
            would take fewer trains for ``ceil(min_steps / steps_per_epoch)`` epochs instead (the bundle's
            one-cycle schedule and PPI warm-up scale with the epochs). 0 keeps the bundle's epochs. The default,
            360, is what the pooled GA default takes (120 training eyes in batches of 8, 24 epochs); one site's
            20 training eyes at the bundle's 24 epochs would get 72.
        shard: ``(i, n)``: run only the cells ``i, i + n, i + 2n ...`` (0-based, in the study's fixed cell
            order) and write no report; ``n`` workers with ``i = 0 .. n-1`` share the study over machines or
            GPUs against one output folder and one MLflow store, and a final run without ``shard`` reuses
            every finished cell and writes the report (it names any cell still missing, and trains it).
        bundle_logging: apply the bundle's ``logging.conf`` (the engines' INFO logs) instead of staying quiet.
        progress: show the tqdm bar.
        num_threads: CPU threads for torch during the invocation (torch's default when ``None``); on a shared
            machine with busy cores, 1 can be many times faster for small networks.
    """

    config_file: str | Path
    meta_file: str | Path | None = None
    sites: Sequence[str] | None = None
    train_sites: Sequence[str] | None = None
    methods: Sequence[str] = ("baseline", "ppi_wbp")
    selection: str = "train"
    oracle_sites: Sequence[str] | None = None
    seeds: int = 1
    first_seed: int | None = None
    out_dir: str | Path | None = None
    tracking_uri: str | None = None
    experiment: str = "ga_site_cv"
    overrides: Mapping[str, Any] = field(default_factory=dict)
    checkpoint: str = "best"
    test_fraction: float = 0.25
    min_steps: int = 360
    shard: tuple[int, int] | None = None
    bundle_logging: bool = False
    progress: bool = True
    num_threads: int | None = None


def _parse_value(text: str) -> Any:
    """A command-line value as JSON, else a Python literal, else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def parse_overrides(tokens: Sequence[str]) -> dict[str, Any]:
    """Bundle overrides from ``--id#path value`` or ``--id#path=value`` tokens.

    Args:
        tokens: the command-line words this command did not recognise (a lone ``--`` is ignored).

    Returns:
        ``{"id#path": value}``, values parsed by JSON or as Python literals where they parse.

    Raises:
        SiteCVError: a word that is not an option, an option without a value, or a reserved id.
    """
    out: dict[str, Any] = {}
    words = [t for t in tokens if t != "--"]
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--") or len(word) <= 2:
            raise SiteCVError(f"unexpected argument '{word}': bundle overrides are written --<id> <value>")
        if "=" in word:
            key, value = word[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(words):
                raise SiteCVError(f"bundle override '{word}' has no value")
            key, value = word[2:], words[i + 1]
            i += 2
        if key in RESERVED_OVERRIDES:
            raise SiteCVError(f"'--{key}' is set by the site CV for every cell; use {RESERVED_OVERRIDES[key]}")
        out[key] = _parse_value(value)
    return out


def check_options(cfg: SiteCVConfig) -> None:
    """The study's own options, checked before the bundle is read.

    Raises:
        SiteCVError: an option out of its range, no method, or a method listed twice.
    """
    if cfg.checkpoint not in ("best", "final"):
        raise SiteCVError(f"checkpoint must be 'best' or 'final', got '{cfg.checkpoint}'")
    if cfg.num_threads is not None and int(cfg.num_threads) < 1:
        raise SiteCVError(f"--num-threads must be at least 1, got {cfg.num_threads}")
    if int(cfg.seeds) < 1:
        raise SiteCVError(f"--seeds must be at least 1, got {cfg.seeds}")
    if not cfg.methods:
        raise SiteCVError("no method given")
    if len(set(cfg.methods)) != len(cfg.methods):
        raise SiteCVError(f"a method is listed twice in {list(cfg.methods)}")
    if not 0.0 <= cfg.test_fraction < 1.0:
        raise SiteCVError(f"--test-fraction must lie in [0, 1), got {cfg.test_fraction}")
    if int(cfg.min_steps) < 0:
        raise SiteCVError(f"--min-steps must be >= 0, got {cfg.min_steps}")
