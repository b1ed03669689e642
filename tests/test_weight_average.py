"""The weight average: validated in place of the raw weights, which training keeps stepping."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events
from torch import nn

from ppi_med.weight_average import WeightAverage


def _state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _stepping_trainer(net: nn.Module) -> Engine:
    """A trainer whose every iteration adds the batch's value to every weight (train mode: BN stats move too)."""

    def step(engine: Engine, batch: float) -> None:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(batch)
        net.train()
        net(torch.randn(5, 3))

    return Engine(step)


def test_the_average_follows_the_exponential_rule_and_the_horizon_is_in_epochs() -> None:
    net = _net()
    start = [p.detach().clone() for p in net.parameters()]
    average = WeightAverage(net, epochs=2, steps_per_epoch=5)
    assert average.decay == pytest.approx(1 - 1 / 10)
    trainer = _stepping_trainer(net)
    average.attach(trainer)
    seen = {}
    trainer.add_event_handler(
        Events.EPOCH_COMPLETED, lambda e: seen.update(weights=[p.clone() for p in net.parameters()])
    )
    trainer.run([1.0] * 5, max_epochs=1)
    # after n steps of +1 each from w0: avg = w0 + sum_k (1 - d) d^(n - k) k, k = 1..n
    d, n = average.decay, 5
    shift = sum((1 - d) * d ** (n - k) * k for k in range(1, n + 1))
    for got, w0 in zip(seen["weights"], start):
        torch.testing.assert_close(got, w0 + shift)


def test_swap_in_and_out_restore_the_raw_weights_exactly() -> None:
    net = _net()
    average = WeightAverage(net, epochs=1, steps_per_epoch=4)
    trainer = _stepping_trainer(net)
    average.attach(trainer)
    during, after = {}, {}
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: during.update(_state(net)))
    average.restore.attach(trainer)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: after.update(_state(net)))
    raw = {}
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: raw.update(_state(net)))
    trainer.run([0.5, -0.25, 1.0, 0.125], max_epochs=1)
    for name, value in raw.items():
        torch.testing.assert_close(after[name], value)  # training goes on from its own weights
    assert not torch.equal(during["0.weight"], after["0.weight"])  # validation saw the average
    torch.testing.assert_close(average.average["0.weight"], during["0.weight"])


def test_it_restarts_at_start_epoch_and_resumes_from_its_state() -> None:
    net = _net()
    average = WeightAverage(net, epochs=1, steps_per_epoch=2, start_epoch=2)
    trainer = _stepping_trainer(net)
    average.attach(trainer)
    average.restore.attach(trainer)
    at_start = {}
    trainer.add_event_handler(
        Events.EPOCH_STARTED(once=2), lambda e: at_start.update({k: v.clone() for k, v in average.average.items()})
    )
    before = {}
    trainer.add_event_handler(Events.EPOCH_STARTED(once=2), lambda e: before.update(_state(net)))
    trainer.run([3.0, 3.0], max_epochs=2)
    torch.testing.assert_close(at_start["0.weight"], before["0.weight"])  # the average began again there

    copy = WeightAverage(_net(), epochs=1, steps_per_epoch=2)
    copy.load_state_dict(average.state_dict())
    for name, value in average.average.items():
        assert torch.equal(copy.average[name], value)


def test_off_attaches_nothing_and_bad_settings_are_refused() -> None:
    net = _net()
    trainer = _stepping_trainer(net)
    for off in (None, 0):
        average = WeightAverage(net, epochs=off, steps_per_epoch=3)
        average.attach(trainer)
        average.restore.attach(trainer)
    assert not trainer._event_handlers.get(Events.EPOCH_COMPLETED)
    # from the command line the setting arrives as text
    assert not WeightAverage(net, epochs="null", steps_per_epoch=3).enabled
    assert WeightAverage(net, epochs="2", steps_per_epoch=3).decay == pytest.approx(1 - 1 / 6)
    with pytest.raises(ValueError, match="horizon in epochs"):
        WeightAverage(net, epochs="two", steps_per_epoch=3)
    with pytest.raises(ValueError, match="horizon in epochs"):
        WeightAverage(net, epochs=-1, steps_per_epoch=3)
    with pytest.raises(ValueError, match="one step an epoch"):
        WeightAverage(net, epochs=2, steps_per_epoch=0)
