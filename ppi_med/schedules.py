"""Learning-rate schedules: a one-cycle schedule that starts a new, lower cycle where PPI switches on.

The bundles train with plain cross-entropy for a warm-up and then switch PPI on. With one one-cycle schedule
over the whole run the learning rate at the switch is still about 0.8 of its peak, and the first PPI epochs
take large steps on a new objective from a model that has not settled (docs/DESIGN.md section 4.6).
:class:`PhasedOneCycleLR` runs one one-cycle schedule per phase instead: the warm-up anneals to its end, and
the PPI phase starts a second cycle whose peak is a chosen fraction of the first's. With one phase it is
exactly :class:`torch.optim.lr_scheduler.OneCycleLR` (cosine annealing, momentum cycling).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["PhasedOneCycleLR", "one_cycle_phases"]


def one_cycle_phases(
    total_epochs: int, switch_epoch: int, switch_lr_scale: float | None, steps_per_epoch: int
) -> dict[str, list]:
    """The phases of :class:`PhasedOneCycleLR` for a run whose objective changes at ``switch_epoch``.

    Args:
        total_epochs: epochs the schedule spans.
        switch_epoch: epochs before the second cycle starts (the PPI warm-up, counted from the schedule's start).
        switch_lr_scale: the second cycle's peak as a fraction of the first's; ``None`` for one cycle over the
            whole run (also when the switch falls outside the run).
        steps_per_epoch: optimiser steps per epoch.

    Returns:
        ``phase_steps`` and ``peak_scales``, the keyword arguments of :class:`PhasedOneCycleLR`.

    Raises:
        ValueError: a non-positive ``total_epochs`` or ``steps_per_epoch``, or a ``switch_lr_scale`` outside (0, 1].
    """
    if total_epochs < 1 or steps_per_epoch < 1:
        raise ValueError(f"the schedule needs epochs and steps, got {total_epochs} epochs of {steps_per_epoch} steps")
    if switch_lr_scale is not None and not 0.0 < float(switch_lr_scale) <= 1.0:
        raise ValueError(f"switch_lr_scale must lie in (0, 1] or be null, got {switch_lr_scale}")
    if switch_lr_scale is None or not 0 < switch_epoch < total_epochs:
        return {"phase_steps": [total_epochs * steps_per_epoch], "peak_scales": [1.0]}
    return {
        "phase_steps": [switch_epoch * steps_per_epoch, (total_epochs - switch_epoch) * steps_per_epoch],
        "peak_scales": [1.0, float(switch_lr_scale)],
    }


def _cos(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1.0)


class PhasedOneCycleLR(LRScheduler):
    """One-cycle learning rate (Smith and Topin 2019) restarted at phase boundaries, stepped every iteration.

    Phase ``k`` spans ``phase_steps[k]`` steps and is a one-cycle schedule with peak ``max_lr * peak_scales[k]``:
    a cosine rise from ``peak / div_factor`` to the peak over ``pct_start`` of its steps, then a cosine fall to
    ``peak / div_factor / final_div_factor``; Adam's beta1 (or SGD's momentum) cycles the other way between
    ``max_momentum`` and ``base_momentum``.

    Example::

        sched = PhasedOneCycleLR(opt, max_lr=1e-2, phase_steps=[120, 120], peak_scales=[1.0, 0.1])

    Args:
        optimizer: the optimizer (every parameter group follows the same schedule).
        max_lr: the first phase's peak learning rate.
        phase_steps: steps per phase.
        peak_scales: each phase's peak as a fraction of ``max_lr`` (default 1 for every phase).
        pct_start: share of each phase spent rising.
        div_factor: peak over a phase's starting learning rate.
        final_div_factor: starting over final learning rate of a phase.
        base_momentum: momentum at the peak.
        max_momentum: momentum at a phase's start and end.
        last_epoch: the index of the last step, for resuming (``-1`` to start).

    Raises:
        ValueError: an empty or non-positive ``phase_steps``, mismatched ``peak_scales``, a ``pct_start``
            outside (0, 1).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        max_lr: float,
        phase_steps: Sequence[int],
        peak_scales: Sequence[float] | None = None,
        pct_start: float = 0.3,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        base_momentum: float = 0.85,
        max_momentum: float = 0.95,
        last_epoch: int = -1,
    ) -> None:
        self.phase_steps = [int(n) for n in phase_steps]
        if not self.phase_steps or min(self.phase_steps) < 1:
            raise ValueError(f"every phase needs at least one step, got {list(phase_steps)}")
        self.peak_scales = [1.0] * len(self.phase_steps) if peak_scales is None else [float(s) for s in peak_scales]
        if len(self.peak_scales) != len(self.phase_steps):
            raise ValueError(f"{len(self.peak_scales)} peak scales for {len(self.phase_steps)} phases")
        if not 0.0 < pct_start < 1.0:
            raise ValueError(f"pct_start must lie in (0, 1), got {pct_start}")
        self.max_lr = float(max_lr)
        self.pct_start = float(pct_start)
        self.div_factor = float(div_factor)
        self.final_div_factor = float(final_div_factor)
        self.base_momentum = float(base_momentum)
        self.max_momentum = float(max_momentum)
        self.total_steps = sum(self.phase_steps)
        self.use_beta1 = "betas" in optimizer.defaults
        if last_epoch == -1:
            for group in optimizer.param_groups:
                group["initial_lr"] = self.max_lr / self.div_factor
        super().__init__(optimizer, last_epoch)

    def lr_and_momentum(self, step: int) -> tuple[float, float]:
        """The learning rate and momentum at global ``step`` (0-based).

        Raises:
            ValueError: a step past the schedule's end.
        """
        if step > self.total_steps:
            raise ValueError(f"tried to step {step} times; the schedule has {self.total_steps} steps")
        phase, start = 0, 0
        while phase < len(self.phase_steps) - 1 and step >= start + self.phase_steps[phase]:
            start += self.phase_steps[phase]
            phase += 1
        n, t = self.phase_steps[phase], step - start
        peak = self.max_lr * self.peak_scales[phase]
        low = peak / self.div_factor
        rise_end = self.pct_start * n - 1.0
        if t <= rise_end:
            pct = t / rise_end if rise_end > 0 else 1.0
            return _cos(low, peak, pct), _cos(self.max_momentum, self.base_momentum, pct)
        pct = (t - rise_end) / (n - 1.0 - rise_end) if n - 1.0 > rise_end else 1.0
        return _cos(peak, low / self.final_div_factor, pct), _cos(self.base_momentum, self.max_momentum, pct)

    def get_lr(self) -> list[float]:
        lr, momentum = self.lr_and_momentum(self.last_epoch)
        for group in self.optimizer.param_groups:
            if self.use_beta1:
                group["betas"] = (momentum, *group["betas"][1:])
            elif "momentum" in group:
                group["momentum"] = momentum
        return [lr for _ in self.optimizer.param_groups]
