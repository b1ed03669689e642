"""The README's results lines, written from the files the studies generate, never typed by hand.

The block between ``<!-- results:begin -->`` and ``<!-- results:end -->`` in README.md is rendered from:

- ``docs/img/switch_on_average.csv`` (``python -m pipelines.switch_on``, GA pooled: the default and the baseline
  per seed, held-out test AUC and the largest fall after the switch-on);
- ``docs/confounded/default-average/sites_train.csv`` (``python -m pipelines.comparisons`` over the confounded
  study: trained on the watermarked site D alone, out-of-site AUC, DeLong p, the watermark's pull on P(GA)).

``python -m pipelines.readme_results`` rewrites the block after a study republishes those files; the test suite
fails when the block and the files disagree.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

__all__ = ["BEGIN", "END", "SOURCES", "render_block", "update_readme", "main"]

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
#: the generated files the block reads, relative to the repository
SOURCES = {
    "switch_on": Path("docs/img/switch_on_average.csv"),
    "confounded": Path("docs/confounded/default-average/sites_train.csv"),
}
#: the groups of the switch-on table that the block compares
DEFAULT_GROUP = "default (x prime on GA eyes, weight average 2)"
BASELINE_GROUP = "baseline, weight average 2"


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def render_block(root: Path = ROOT) -> str:
    """The block's lines (without the markers), from the source files under ``root``.

    Raises:
        FileNotFoundError: a source file is missing (named).
        KeyError: a source lacks the group or method the block reports (named).
    """
    for path in SOURCES.values():
        if not (root / path).is_file():
            raise FileNotFoundError(f"{path}: the README's results block is made from it; regenerate it first")
    runs = pd.read_csv(root / SOURCES["switch_on"])
    groups = {}
    for name in (DEFAULT_GROUP, BASELINE_GROUP):
        rows = runs[runs["group"] == name]
        if rows.empty:
            raise KeyError(f"{SOURCES['switch_on']} has no group {name!r}")
        groups[name] = rows
    ppi, base = groups[DEFAULT_GROUP], groups[BASELINE_GROUP]
    sites = pd.read_csv(root / SOURCES["confounded"]).set_index("method")
    for method in ("baseline", "ppi_wbp"):
        if method not in sites.index:
            raise KeyError(f"{SOURCES['confounded']} has no method {method!r}")
    cb, cp = sites.loc["baseline"], sites.loc["ppi_wbp"]
    return "\n".join(
        [
            f"- GA, pooled training, {len(ppi)} seeds: held-out test AUC {ppi['test_auc'].mean():.3f} ± "
            f"{ppi['test_auc'].std():.3f} with the PPI default against {base['test_auc'].mean():.3f} ± "
            f"{base['test_auc'].std():.3f} without PPI; after PPI switches on, no epoch's validation AUC falls more "
            f"than {max(ppi['largest_fall'].max(), 0.0):.3f} below its value before the switch "
            f"([{SOURCES['switch_on'].name}]({SOURCES['switch_on'].as_posix()})).",
            f"- Trained on the one site whose watermark marks GA, {int(cp['seeds'])} seeds: AUC on the other sites "
            f"{cp['out_mean']:.3f} with PPI against {cb['out_mean']:.3f} (mean over seeds; on the seed-averaged scores "
            f"{cp['out_diff_baseline']:+.3f}, DeLong {_p(cp['out_p_baseline'])}); the watermark's pull on P(GA) "
            f"{cp['cue_effect']:+.3f} against "
            f"{cb['cue_effect']:+.3f} ([sites_train.csv]({SOURCES['confounded'].as_posix()})).",
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
