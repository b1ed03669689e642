"""The goals set for the models, each with the figure of the report that measures it and whether it is met."""

from __future__ import annotations

from ..templates import render

__all__ = ["goals_section"]


def goals_section(goals: dict) -> list[str]:
    """The goals table from the figures the other sections left in ``goals``; empty where none measured.

    Args:
        goals: ``ga_<method>``, ``ga_reference``, ``lidc_<variant>`` and ``wbp_tp_<model>`` figures.
    """
    rows = []

    def row(goal: str, figure: str, met: bool | None) -> None:
        rows.append(f"| {goal} | {figure} | {'n/a' if met is None else 'met' if met else '**not met**'} |")

    base, ref, ppi = goals.get("ga_baseline"), goals.get("ga_reference"), goals.get("ga_ppi_wbp")
    if base is not None and ref is not None:
        row("GA baseline test AUC >= 0.90 and >= the linear reference", f"{base:.3f} (reference {ref:.3f})",
            base >= 0.90 and base >= ref)  # fmt: skip
    if base is not None and ppi is not None:
        row("GA PPI-WBP at or above the baseline", f"{ppi:.3f} against {base:.3f}", ppi >= base)
    lidc = goals.get("lidc_baseline")
    if lidc is not None:
        auc, lo, hi, n, patients = lidc
        row("LIDC held-out AUC >= 0.85", f"{auc:.3f} [{lo:.3f}, {hi:.3f}], {n} nodules of {patients} patients",
            auc >= 0.85)  # fmt: skip
    tp = goals.get("wbp_tp_ppi_wbp")
    if tp is not None:
        share, pointing, n = tp
        row("WBP of the PPI model on true positives: share inside the lesion >= 0.3, pointing >= 0.8",
            f"{share:.3f}, {pointing:.3f} ({n} eyes)", share >= 0.3 and pointing >= 0.8)  # fmt: skip
    if not rows:
        return []
    return [*render("goals", "intro"), *rows, ""]
