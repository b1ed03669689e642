"""The phased one-cycle schedule: equal to torch's OneCycleLR for one phase, a lower second cycle at the switch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ppi_med.schedules import PhasedOneCycleLR, one_cycle_phases


def _trace(make, steps: int) -> np.ndarray:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=0.01)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append((opt.param_groups[0]["lr"], opt.param_groups[0]["betas"][0]))
        opt.step()
        sched.step()
    return np.asarray(out)


def test_one_phase_is_torchs_one_cycle():
    ref = _trace(lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.01, total_steps=96, pct_start=0.3), 96)
    ours = _trace(lambda o: PhasedOneCycleLR(o, 0.01, [96], pct_start=0.3), 96)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)


def test_second_cycle_restarts_low_and_peaks_at_its_scale():
    trace = _trace(lambda o: PhasedOneCycleLR(o, 0.01, [60, 40], peak_scales=[1.0, 0.3]), 100)
    lr = trace[:, 0]
    assert lr[:60].max() == pytest.approx(0.01, rel=1e-3)
    assert lr[59] < 1e-5  # the warm-up cycle anneals to its end
    assert lr[60] == pytest.approx(0.003 / 25)  # the PPI cycle starts at its own low point
    assert lr[60:].max() == pytest.approx(0.003, rel=1e-2)
    assert 60 + 10 <= 60 + int(np.argmax(lr[60:])) <= 60 + 13  # peak after pct_start of the phase
    assert trace[60, 1] == pytest.approx(0.95)  # momentum cycles again


def test_resume_continues_the_same_schedule():
    def make(o):
        return PhasedOneCycleLR(o, 0.01, [30, 30], peak_scales=[1.0, 0.5])

    full = _trace(make, 60)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=0.01)
    sched = make(opt)
    for _ in range(37):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.AdamW([param], lr=0.01)
    opt2.load_state_dict(opt.state_dict())
    sched2 = make(opt2)
    sched2.load_state_dict(state)
    resumed = []
    for _ in range(37, 60):
        opt2.step()
        sched2.step()
        resumed.append(opt2.param_groups[0]["lr"])
    np.testing.assert_allclose(resumed[:-1], full[38:, 0], rtol=1e-12)


def test_phases_follow_the_switch():
    assert one_cycle_phases(24, 12, None, 10) == {"phase_steps": [240], "peak_scales": [1.0]}
    assert one_cycle_phases(24, 12, 0.3, 10) == {"phase_steps": [120, 120], "peak_scales": [1.0, 0.3]}
    # no PPI phase inside the run (a warm-up as long as the run): one cycle
    assert one_cycle_phases(24, 24, 0.3, 10)["phase_steps"] == [240]
    with pytest.raises(ValueError, match="switch_lr_scale"):
        one_cycle_phases(24, 12, 1.5, 10)
    with pytest.raises(ValueError, match="at least one step"):
        PhasedOneCycleLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), 0.1, [0])
