"""The goals set for the models, each with the figure of the report that measures it and whether it is met."""

from __future__ import annotations

from ..templates import render

__all__ = ["goals_section"]


def goals_section(goals: dict) -> list[str]:
    """The goals table from the figures the other sections left in ``goals``; empty where none measured.

    Args:
        goals: ``ga_<method>``, ``ga_reference``, ``ga_switch_fall``, ``lidc_<variant>``, ``confounded``,
            ``digits`` and ``wbp_tp_<model>`` figures (each left by the section that measures it).
    """
    rows = []

    def row(goal: str, figure: str, met: bool | None) -> None:
        rows.append(f"| {goal} | {figure} | {'n/a' if met is None else 'met' if met else '**not met**'} |")

    base, ref, ppi = goals.get("ga_baseline"), goals.get("ga_reference"), goals.get("ga_ppi_wbp")
    if base is not None and ref is not None:
        row("GA baseline test AUC >= 0.90 and >= the linear reference", f"{base:.3f} (reference {ref:.3f})",
            base >= 0.90 and base >= ref)  # fmt: skip
    if base is not None and ppi is not None:
        row("GA: the default PPI's test AUC >= the baseline's - 0.01 (no harm)",
            f"{ppi:.3f} against {base:.3f} ({ppi - base:+.3f})", ppi >= base - 0.01)  # fmt: skip
    fall = goals.get("ga_switch_fall")
    if fall is not None:
        worst, seeds = fall
        row("GA: after PPI switches on, no validation epoch more than 0.05 below the warm-up's last",
            f"largest fall {worst:.3f} over {seeds} seeds", worst <= 0.05)  # fmt: skip
    lidc = goals.get("lidc_baseline")
    if lidc is not None:
        auc, lo, hi, n, patients = lidc
        row("LIDC held-out AUC >= 0.85", f"{auc:.3f} [{lo:.3f}, {hi:.3f}], {n} nodules of {patients} patients",
            auc >= 0.85)  # fmt: skip
        # PPI's masks; PPI+DFR is a comparator (DFR's refit on a PPI model), tabled with the others
        settings = {
            k[len("lidc_") :]: v[0] - auc for k, v in goals.items() if k.startswith("lidc_ppi_") and "+" not in k
        }
        if settings:
            name, diff = min(settings.items(), key=lambda kv: kv[1])
            row("LIDC: no PPI setting more than 0.01 below the baseline's pooled AUC",
                f"worst `{name}` {diff:+.3f}", diff >= -0.01)  # fmt: skip
    payoff = goals.get("confounded")
    if payoff is not None:
        row("Trained on the watermarked site alone: out-of-site AUC >= the baseline's + 0.10 (DeLong p < 0.05)",
            f"{payoff['out_diff']:+.3f} (p = {payoff['out_p']:.2g})",
            payoff["out_diff"] >= 0.10 and payoff["out_p"] < 0.05)  # fmt: skip
        row("... the watermark's pull on P(GA) at most half the baseline's",
            f"{payoff['cue']:+.3f} against {payoff['cue_base']:+.3f}",
            payoff["cue"] <= 0.5 * payoff["cue_base"])  # fmt: skip
        own, own_base = payoff["own"], payoff["own_base"]
        row("... the site's own held-out eyes within 0.02 of the baseline (or above)",
            f"{own:.3f} against {own_base:.3f}", own >= own_base - 0.02)  # fmt: skip
    for cue, (gain, free) in sorted(goals.get("digits", {}).items()):
        goal = f"Digits, cue `{cue}`, every training digit outlined: the default gains >= 0.30 reversed-cue AUC"
        row(f"{goal}, cue-free AUC within 0.02", f"{gain:+.3f}, cue-free {free:+.3f}", gain >= 0.30 and free >= -0.02)
    tp = goals.get("wbp_tp_ppi_wbp")
    if tp is not None:
        share, pointing, n = tp
        row("WBP of the PPI model on true positives: share inside the lesion >= 0.3, pointing >= 0.8",
            f"{share:.3f}, {pointing:.3f} ({n} eyes)", share >= 0.3 and pointing >= 0.8)  # fmt: skip
    if not rows:
        return []
    return [*render("goals", "intro"), *rows, ""]
