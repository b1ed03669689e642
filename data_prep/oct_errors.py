"""The error every OCT ingestion step raises for a bad input file or entry."""

from __future__ import annotations

from pathlib import Path

__all__ = ["OCTInputError"]


class OCTInputError(ValueError):
    """A problem with one input file or entry; the message starts with the file's path.

    Attributes:
        path: The offending file (or CSV / folder).
        problem: What is wrong with it.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")
