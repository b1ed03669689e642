"""Site-CV tables as text: a matrix as aligned plain text or Markdown, a method's title, its file-name form."""

from __future__ import annotations

import math
import re

import pandas as pd

__all__ = ["file_stem", "format_matrix", "format_value", "markdown_matrix", "method_title"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_.+=,-]")


def file_stem(method: str) -> str:
    """A method's label as it appears in a file name: every character but letters, digits and ``_.+=,-`` becomes
    ``-`` (``ppi_wbp:mode=detached`` -> ``ppi_wbp-mode=detached``; the names of the grammar's defaults are kept)."""
    return _UNSAFE.sub("-", method)


def method_title(method: str) -> str:
    """A human title in the words of table 2.3: ``No PPI`` for the baseline, ``With PPI`` for a PPI method; a
    control or comparator (``random_erasing``, ``groupdro``, ``ppi_wbp+dfr``) by its name."""
    if method == "baseline":
        return "No PPI (baseline)"
    return f"With PPI ({method})" if method.startswith("ppi_") and "+" not in method else method


def format_value(value: float, digits: int = 3, p_value: bool = False) -> str:
    """A table entry: ``digits`` decimals, ``n/a`` when undefined, ``< 0.001`` for a small p-value."""
    if value is None or not math.isfinite(float(value)):
        return "n/a"
    if p_value and value < 10 ** (-digits):
        return f"<{10 ** (-digits):.{digits}f}"
    return f"{value:.{digits}f}"


def format_matrix(df: pd.DataFrame, title: str, digits: int = 3, p_value: bool = False) -> str:
    """A right-aligned plain-text table with the title in the corner cell, as in table 2.3.

    Args:
        df: the matrix (rows training sites).
        title: text of the top-left cell.
        digits: decimals shown.
        p_value: show values below ``10**-digits`` as ``<0.001``.

    Returns:
        The table, lines joined by newlines.
    """
    header = [title, *map(str, df.columns)]
    rows = [[str(r), *(format_value(v, digits, p_value) for v in df.loc[r])] for r in df.index]
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(header))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)))
    return "\n".join(lines)


def markdown_matrix(df: pd.DataFrame, title: str, digits: int = 3, p_value: bool = False) -> str:
    """The matrix as a Markdown table, the title in the corner cell, diagonal values in bold."""
    header = f"| {title} | " + " | ".join(map(str, df.columns)) + " |"
    align = "| --- | " + " | ".join("---:" for _ in df.columns) + " |"
    lines = [header, align]
    for r in df.index:
        cells = []
        for c in df.columns:
            text = format_value(df.loc[r, c], digits, p_value)
            cells.append(f"**{text}**" if str(r) == str(c) else text)
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
