"""The command line of site CV: ``python -m pipelines.site_cv`` and the ``ppi-med-site-cv`` script.

Any ``--<id> <value>`` that is not an option of the command is passed to the bundle as an override (the value is
read as JSON or a Python literal when it parses as one, e.g. ``false``, ``[4,32,48]``, otherwise kept as a string),
as ``python -m monai.bundle run`` does.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ppi_med.robust import SELECTIONS
from ppi_med.tracking import TrackingServerError

from .config import SiteCVConfig, SiteCVError, parse_overrides
from .methods import split_methods
from .study import run_site_cv, run_site_cv_shard

__all__ = ["build_parser", "main"]


def _method_list(text: str) -> list[str]:
    try:
        return split_methods(text)
    except SiteCVError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _comma_list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got '{text}'")
    return items


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (unknown ``--id value`` pairs are bundle overrides, see :func:`parse_overrides`)."""
    p = argparse.ArgumentParser(
        prog="python -m pipelines.site_cv",
        description=(
            "Site-wise cross-validation of a MONAI bundle (table 2.3): train on each site, test on the "
            "held-out subjects of that site and on every other site, for the baseline and PPI methods, with "
            "DeLong tests of every PPI-vs-baseline cell; logged to MLflow (a parent run, one child per cell). "
            "Any other --<id> <value> is passed to the bundle as an override, e.g. --max_epochs 3 "
            "--synthetic#subjects_per_site 20 --network_def#width 8."
        ),
        allow_abbrev=False,
    )
    p.add_argument(
        "--config_file", "--config-file", default="bundles/ga_ppi.json", help="bundle config (default: %(default)s)"
    )
    p.add_argument(
        "--meta_file", "--meta-file", default=None, help="bundle metadata (default: metadata.json beside the config)"
    )
    p.add_argument(
        "--sites", type=_comma_list, default=None, help="comma-separated sites (default: all sites of the datalist)"
    )
    p.add_argument(
        "--train-sites",
        type=_comma_list,
        default=None,
        help="comma-separated sites to train on, each scored on every site (default: all of --sites)",
    )
    p.add_argument(
        "--methods",
        type=_method_list,
        default=["baseline", "ppi_wbp"],
        help="comma-separated methods: baseline, ppi_<saliency>[_<mask>][_<guide>][_<fill>][_<control>] (e.g. "
        "ppi_wbp, ppi_gradcam, ppi_wbp_box, ppi_wbp_partner_zero), any of them or ppi followed by "
        ":<field>=<value>,... for other PPIConfig fields (e.g. ppi:mode=detached,partner=roll), the controls "
        "random_mask and random_erasing, the comparators groupdro, jtt and dfr, and <PPI method>+<comparator> "
        "(e.g. ppi_wbp+dfr: DFR on the PPI model); each is named by its label on the bundle's ppi "
        "(default: baseline,ppi_wbp)",
    )
    p.add_argument(
        "--selection",
        choices=SELECTIONS,
        default="train",
        help="checkpoint selection of every cell: train (validation AUC on the training site's validation part), "
        "worst_site (accuracy of its worst site x label group; no cue labels needed) or oracle (validation AUC on "
        "half of --oracle-sites' subjects, not scored then; an oracle, labelled so in the tables) (default: train)",
    )
    p.add_argument(
        "--oracle-sites", type=_comma_list, default=None, help="comma-separated sites --selection oracle validates on"
    )
    p.add_argument(
        "--seeds", type=int, default=1, help="number of seeds; each seed also draws its own split (default: 1)"
    )
    p.add_argument("--first-seed", type=int, default=None, help="first seed (default: the bundle's seed)")
    p.add_argument(
        "--checkpoint",
        choices=("best", "final"),
        default="best",
        help="checkpoint scored: best validation AUC (chosen on the diagonal's subjects) or final (default: best)",
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.25,
        help="share of the training site's subjects kept for the diagonal, apart from the checkpoint-selection "
        "part (default: %(default)s; 0: the diagonal is the selection part)",
    )
    p.add_argument(
        "--min-steps",
        type=int,
        default=360,
        help="optimiser steps every cell gets at least; a small site trains for more epochs (default: %(default)s, "
        "what the pooled GA default takes; 0: the bundle's max_epochs)",
    )
    p.add_argument(
        "--shard",
        default=None,
        help="i/n: run only every n-th cell from the i-th (0-based) and no report, so n workers (machines, GPUs, "
        "a SLURM array) share one study in one --out; then run once without --shard to gather the report",
    )
    p.add_argument("--out", default=None, help="output folder; rerun into it to resume (default: runs/site_cv/<time>)")
    p.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or the bundle's)"
    )
    p.add_argument("--experiment", default="ga_site_cv", help="MLflow experiment (default: %(default)s)")
    p.add_argument("--bundle-logging", action="store_true", help="apply the bundle's logging.conf (engine INFO logs)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's own); 1 is often much faster on a busy shared CPU",
    )
    return p


def _parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise SiteCVError(f"--shard must look like i/n (e.g. 0/4), got '{text}'") from None
    if not (count >= 1 and 0 <= index < count):
        raise SiteCVError(f"--shard must be i/n with 0 <= i < n, got '{text}'")
    return index, count


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``ppi-med-site-cv``).

    Args:
        argv: arguments (``sys.argv[1:]`` when ``None``).

    Returns:
        0 on success, 2 on a bad request (message on stderr).
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        overrides = parse_overrides(extra)
        cfg = SiteCVConfig(
            config_file=args.config_file,
            meta_file=args.meta_file,
            sites=args.sites,
            train_sites=args.train_sites,
            methods=args.methods,
            selection=args.selection,
            oracle_sites=args.oracle_sites,
            seeds=args.seeds,
            first_seed=args.first_seed,
            out_dir=args.out,
            tracking_uri=args.tracking_uri,
            experiment=args.experiment,
            overrides=overrides,
            checkpoint=args.checkpoint,
            test_fraction=args.test_fraction,
            min_steps=args.min_steps,
            shard=_parse_shard(args.shard),
            bundle_logging=args.bundle_logging,
            num_threads=args.num_threads,
            progress=not args.no_progress,
        )
        if cfg.shard is None:
            run_site_cv(cfg)
        else:
            cells = run_site_cv_shard(cfg)
            trained = int((cells["status"] == "trained").sum()) if len(cells) else 0
            print(
                f"shard {args.shard}: {len(cells)} cells ({trained} trained, {len(cells) - trained} reused) in "
                f"{cfg.out_dir}; when every shard is done, run the same command without --shard for the report"
            )
    except (SiteCVError, FileNotFoundError, TrackingServerError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    return 0
