"""The README's results lines, written from the files ``make results`` publishes, never typed by hand.

The block between ``<!-- results:begin -->`` and ``<!-- results:end -->`` in README.md is rendered from
``docs/results/`` (``python -m pipelines.results --publish docs``):

- ``ga_runs.csv``: GA pooled training, one row per method and seed (held-out test AUC, the largest validation
  fall after PPI switches on);
- ``comparators/sites_train.csv``: trained on the watermarked site alone (out-of-site AUC, DeLong p against
  the baseline, the watermark's pull on P(GA)), every method under ``train`` selection;
- ``lidc_pooled.csv``: LIDC, every fold held out once and pooled, one row per PPI mask, control and comparator;
- ``comparators/shortcut_<cue>_train.csv``: the digits with each cue, every method under ``train`` selection;
- ``sites_methods.csv``, once the site matrices have run (:data:`OPTIONAL`): every site trained on in turn,
  every method's pooled out-of-site AUC against the baseline.

Each line says which method measured best there. ``python -m pipelines.readme_results`` rewrites the block
after ``make results`` republishes; the test suite fails when the block and the files disagree.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

__all__ = ["BEGIN", "END", "OPTIONAL", "SOURCES", "CUES", "render_block", "update_readme", "main"]

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
#: the digits' cues the block reports, in order
CUES = ("patch", "line", "intensity", "texture")
#: the generated files the block reads, relative to the repository
SOURCES = {
    "ga": Path("docs/results/ga_runs.csv"),
    "confounded": Path("docs/results/comparators/sites_train.csv"),
    "lidc": Path("docs/results/lidc_pooled.csv"),
    **{f"digits_{cue}": Path(f"docs/results/comparators/shortcut_{cue}_train.csv") for cue in CUES},
}
#: generated files whose line the block has once they exist (studies that take many sessions to finish)
OPTIONAL = {"matrices": Path("docs/results/sites_methods.csv")}
#: the name of the project's default in each table
DEFAULT = "ppi_wbp"


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _link(key: str) -> str:
    path = {**SOURCES, **OPTIONAL}[key]
    return f"[{path.name}]({path.as_posix()})"


def _row(table: pd.DataFrame, name: str, key: str) -> pd.Series:
    if name not in table.index:
        raise KeyError(f"{ {**SOURCES, **OPTIONAL}[key] } has no row {name!r}")
    return table.loc[name]


def _ga(runs: pd.DataFrame) -> str:
    by = runs.groupby("method")["test_auc"]
    mean, sd = by.mean(), by.std()
    for name in ("baseline", DEFAULT):
        if name not in mean.index:
            raise KeyError(f"{SOURCES['ga']} has no method {name!r}")
    best = mean.idxmax()
    fall = runs[runs["method"] == DEFAULT]["switch_fall"].max()
    seeds = runs[runs["method"] == DEFAULT]["seed"].nunique()
    return (
        f"- GA, pooled training, {seeds} seeds: held-out test AUC {mean[DEFAULT]:.3f} ± {sd[DEFAULT]:.3f} with the PPI "
        f"default against {mean['baseline']:.3f} ± {sd['baseline']:.3f} without PPI; after PPI switches on, no "
        f"epoch's validation AUC falls more than {max(fall, 0.0):.3f} below its value before the switch. Best of "
        f"the {len(mean)} methods: `{best}` ({mean[best]:.3f}) ({_link('ga')})."
    )


def _best_out(sites: pd.DataFrame) -> tuple[str, pd.Series, str]:
    """The method with the best out-of-site AUC, its row, and its gain over the baseline in words."""
    best = sites["out_mean"].idxmax()
    top = sites.loc[best]
    if best == "baseline":
        return best, top, ""
    return best, top, f", {top['out_diff_baseline']:+.3f} over the baseline, DeLong {_p(top['out_p_baseline'])}"


def _confounded(sites: pd.DataFrame) -> str:
    base, ppi = _row(sites, "baseline", "confounded"), _row(sites, DEFAULT, "confounded")
    best, top, versus = _best_out(sites)
    return (
        f"- Trained on the one site whose watermark marks GA, {int(ppi['seeds'])} seeds: AUC on the other sites "
        f"{ppi['out_mean']:.3f} with PPI against {base['out_mean']:.3f} (mean over seeds; on the seed-averaged scores "
        f"{ppi['out_diff_baseline']:+.3f}, DeLong {_p(ppi['out_p_baseline'])}); the watermark's pull on P(GA) "
        f"{ppi['cue_effect']:+.3f} against {base['cue_effect']:+.3f}. Best out of site: `{best}` "
        f"({top['out_mean']:.3f}{versus}) ({_link('confounded')})."
    )


def _matrices(sites: pd.DataFrame) -> str:
    base, ppi = _row(sites, "baseline", "matrices"), _row(sites, DEFAULT, "matrices")
    best, top, versus = _best_out(sites)
    return (
        f"- Site matrices, each of the four sites trained on in turn, {int(ppi['seeds'])} seeds: pooled AUC on the "
        f"sites not trained on {ppi['out_mean']:.3f} with PPI against {base['out_mean']:.3f} (on the seed-averaged "
        f"scores {ppi['out_diff_baseline']:+.3f}, DeLong {_p(ppi['out_p_baseline'])}). Best of the {len(sites)} "
        f"methods: `{best}` ({top['out_mean']:.3f}{versus}) ({_link('matrices')})."
    )


def _lidc(pooled: pd.DataFrame) -> str:
    base = _row(pooled, "baseline", "lidc")
    ppi = pooled[pooled.index.str.startswith(DEFAULT + "_")]
    if ppi.empty:
        raise KeyError(f"{SOURCES['lidc']} has no PPI mask rows ({DEFAULT}_<mask>)")
    diff = ppi["auc"] - base["auc"]
    worst, top = diff.idxmin(), pooled["auc"].idxmax()
    return (
        f"- LIDC phantom, every patient-level fold held out once ({int(base['nodules'])} nodules): baseline "
        f"{base['auc']:.3f} [{base['ci_low']:.3f}, {base['ci_high']:.3f}]; PPI with each mask "
        f"{diff.min():+.3f} to {diff.max():+.3f} against it (the worst, `{worst}`, DeLong "
        f"{_p(pooled.loc[worst, 'p_vs_baseline'])}). Best: `{top}` ({pooled.loc[top, 'auc']:.3f}) ({_link('lidc')})."
    )


def _digits(tables: dict[str, pd.DataFrame]) -> str:
    parts = []
    for cue, table in tables.items():
        base = _row(table, "baseline", f"digits_{cue}")
        best = table["reversed_mean"].idxmax()
        top = table.loc[best]
        gain = "" if best == "baseline" else f", {top['reversed_mean'] - base['reversed_mean']:+.3f}"
        aligned = f"aligned {top['aligned_mean']:.2f} against {base['aligned_mean']:.2f}"
        parts.append(f"{cue} `{best}` ({top['reversed_mean']:.3f}{gain}; {aligned})")
    seeds = int(next(iter(tables.values()))["seeds"].max())
    return (
        f"- Digits with a cue that marks the label in training and is reversed at test, {seeds} seeds, no outlines "
        "(the PPI default leaves every digit alone, so `ppi_wbp+dfr` is DFR on a plain model): best reversed-cue AUC "
        "per cue, its gain over the "
        f"baseline and the AUC it keeps where the cue is as in training: {'; '.join(parts)} "
        "([the comparators' tables](docs/RESULTS.md#which-fix-works-here-the-comparators))."
    )


def render_block(root: Path = ROOT) -> str:
    """The block's lines (without the markers), from the source files under ``root``.

    Raises:
        FileNotFoundError: a source file is missing (named).
        KeyError: a source lacks the method the block reports (named).
    """
    for path in SOURCES.values():
        if not (root / path).is_file():
            raise FileNotFoundError(f"{path}: the README's results block is made from it; run make results first")
    read = {key: pd.read_csv(root / path) for key, path in SOURCES.items()}
    matrices = root / OPTIONAL["matrices"]
    return "\n".join(
        [
            _ga(read["ga"]),
            *([_matrices(pd.read_csv(matrices).set_index("method"))] if matrices.is_file() else []),
            _confounded(read["confounded"].set_index("method")),
            _lidc(read["lidc"].set_index("variant")),
            _digits({cue: read[f"digits_{cue}"].set_index("method") for cue in CUES}),
        ]
    )


def update_readme(readme: Path, block: str) -> bool:
    """Put ``block`` between the markers of ``readme``; returns whether the file changed.

    Raises:
        ValueError: the README lacks the markers, or has them out of order.
    """
    text = readme.read_text()
    pattern = re.compile(re.escape(BEGIN) + r"\n.*?" + re.escape(END), re.S)
    if text.count(BEGIN) != 1 or text.count(END) != 1 or not pattern.search(text):
        raise ValueError(f"{readme}: needs one {BEGIN} line followed by one {END} line")
    new = pattern.sub(lambda _: f"{BEGIN}\n{block}\n{END}", text)
    if new != text:
        readme.write_text(new)
    return new != text


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite README.md's results block from the generated files."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.readme_results", description=__doc__)
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args(argv)
    changed = update_readme(args.readme, render_block())
    print(f"{args.readme}: results block {'rewritten' if changed else 'already up to date'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
