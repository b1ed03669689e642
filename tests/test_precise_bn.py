"""Precise batch norm: running statistics become the training data's average, nothing else changes."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine
from torch import nn

from ppi_med.precise_bn import PreciseBatchNorm, recompute_batch_norm


def _batches(n_batches: int = 4, size: int = 8, shift: float = 3.0) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randn(size, 5, generator=g) * 2.0 + shift} for _ in range(n_batches)]


def test_statistics_are_the_average_over_the_data_and_weights_stay():
    net = nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 2))
    net.eval()
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    batches = _batches()
    seen = recompute_batch_norm(net, batches, "cpu")
    bn = net[0]
    data = torch.cat([b["image"] for b in batches])
    assert seen == 32
    torch.testing.assert_close(bn.running_mean, data.mean(0))
    # the cumulative average of each batch's unbiased variance
    torch.testing.assert_close(bn.running_var, torch.stack([b["image"].var(0) for b in batches]).mean(0))
    assert not net.training and bn.momentum == 0.1
    for k, v in net.state_dict().items():
        if k in weights:
            torch.testing.assert_close(v, weights[k])


def test_stale_statistics_are_replaced_and_evaluation_follows_the_data():
    net = nn.Sequential(nn.BatchNorm1d(5))
    # statistics from another distribution, as a lagging running average leaves them
    net[0].running_mean.fill_(-10.0)
    net[0].running_var.fill_(100.0)
    batches = _batches(shift=3.0)
    recompute_batch_norm(net, batches, "cpu")
    net.eval()
    out = net(torch.cat([b["image"] for b in batches]))
    assert out.mean().abs() < 0.05 and (out.std(0) - 1).abs().max() < 0.1


def test_handler_runs_at_epoch_end_and_empty_loader_is_refused():
    net = nn.Sequential(nn.BatchNorm1d(5))
    batches = _batches()
    trainer = Engine(lambda engine, batch: None)
    PreciseBatchNorm(net, batches, "cpu").attach(trainer)
    trainer.run([0, 1], max_epochs=1)
    torch.testing.assert_close(net[0].running_mean, torch.cat([b["image"] for b in batches]).mean(0))

    off = nn.Sequential(nn.BatchNorm1d(5))
    # "--precise_bn false" on the command line arrives as a string
    PreciseBatchNorm(off, batches, "cpu", enabled="false").attach(trainer)
    trainer.run([0], max_epochs=1)
    assert torch.equal(off[0].running_mean, torch.zeros(5))

    before = net[0].running_mean.clone()
    with pytest.raises(ValueError, match="empty loader"):
        recompute_batch_norm(net, [], "cpu")
    torch.testing.assert_close(net[0].running_mean, before)


def test_a_misspelt_switch_is_refused():
    with pytest.raises(ValueError, match="precise_bn must be true or false, got 'flase'"):
        PreciseBatchNorm(nn.BatchNorm1d(2), [], "cpu", enabled="flase")
