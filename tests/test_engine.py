"""The PPI training iteration inside a real MONAI SupervisedTrainer: outputs, epoch averages, AMP precision."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from torch import nn

from ppi_med.engine import EpochLossAverages, PPIIteration, epoch_metrics
from ppi_med.ppi import PPIConfig


def _net() -> nn.Module:
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 4, 3, padding=1)
    return nn.Sequential(conv, nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def _trainer(iteration: PPIIteration, amp: bool = False, steps: int = 3) -> tuple[SupervisedTrainer, list[dict]]:
    torch.manual_seed(1)
    outline = torch.zeros(4, 1, 12, 12)
    outline[1::2, :, 3:7, 3:7] = 1  # the positives' outlines, which the default guide reads from the batch
    data = [
        {
            "image": torch.randn(4, 1, 12, 12),
            "label": torch.tensor([0, 1, 0, 1]),
            "annotation": outline,
            "annotated": torch.ones(4, dtype=torch.bool),
        }
        for _ in range(steps)
    ]
    net = _net()
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=data,
        epoch_length=steps,
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.01),
        loss_function=nn.CrossEntropyLoss(),
        iteration_update=iteration,
        amp=amp,
        decollate=False,
    )
    outputs: list[dict] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(dict(e.state.output)))
    return trainer, outputs


def test_terms_are_device_tensors_and_epoch_averages_read_them():
    trainer, outputs = _trainer(PPIIteration(PPIConfig(warmup_epochs=0)))
    EpochLossAverages().attach(trainer)
    trainer.run()
    assert len(outputs) == 3
    for out in outputs:
        for key in ("loss", "loss_cls", "loss_con", "loss_reg", "loss_ad"):
            assert isinstance(out[key], torch.Tensor) and out[key].ndim == 0 and not out[key].requires_grad
        assert float(out["loss_con"]) > 0  # the PPI terms are on
    for key in ("loss", "loss_cls", "loss_con", "loss_reg", "loss_ad"):
        expected = sum(float(o[key]) for o in outputs) / len(outputs)
        assert trainer.state.metrics[key] == pytest.approx(expected, rel=1e-6)
        assert isinstance(trainer.state.metrics[key], float)


def test_amp_runs_in_bfloat16_on_cpu_and_trains():
    iteration = PPIIteration(PPIConfig(warmup_epochs=0))
    assert iteration.autocast_dtype(torch.device("cpu")) == torch.bfloat16
    trainer, outputs = _trainer(iteration, amp=True)
    before = [p.detach().clone() for p in trainer.network.parameters()]
    trainer.run()
    assert all(torch.isfinite(o["loss"]) for o in outputs)
    assert outputs[0]["pred"].dtype == torch.bfloat16  # the forward ran under autocast
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.network.parameters()))


def test_amp_dtype_can_be_forced_and_is_checked():
    assert PPIIteration(amp_dtype="float16").autocast_dtype(torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match="amp_dtype"):
        PPIIteration(amp_dtype="fp8")


def test_events_see_the_output_of_their_own_batch_in_monai_order():
    seen: list[tuple[str, set, int]] = []
    trainer, _ = _trainer(PPIIteration(PPIConfig(warmup_epochs=0)))
    for event in (IterationEvents.FORWARD_COMPLETED, IterationEvents.LOSS_COMPLETED):
        trainer.add_event_handler(
            event, lambda e, name=event.value: seen.append((name, set(e.state.output), e.state.iteration))
        )
    trainer.run()
    assert [name for name, _, _ in seen] == ["forward_completed", "loss_completed"] * 3
    for (name, keys, it), step in zip(seen, [1, 1, 2, 2, 3, 3]):
        assert it == step  # fired during its own iteration, with that batch's output
        assert {"image", "label", "pred"} <= keys
        assert ("loss" in keys) == (name == "loss_completed")


def test_the_trainers_loss_function_is_the_classification_term():
    calls = []

    def weighted_ce(logits, y):
        calls.append(len(y))
        return nn.functional.cross_entropy(logits, y, reduction="none") * 2.0

    net = _net()
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[{"image": torch.randn(4, 1, 12, 12), "label": torch.tensor([0, 1, 0, 1])}],
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.01),
        loss_function=weighted_ce,
        iteration_update=PPIIteration(PPIConfig(enabled=False)),
        decollate=False,
    )
    trainer.run()
    out = trainer.state.output
    assert calls == [4]
    with torch.no_grad():
        expected = 2.0 * nn.functional.cross_entropy(_net()(trainer.state.output["image"]), out["label"])
    assert float(out["loss_cls"]) == pytest.approx(float(expected), rel=1e-5)


def test_epoch_metrics_take_the_evaluators_only_when_it_validated_this_epoch():
    trainer, evaluator = Engine(lambda e, b: None), Engine(lambda e, b: None)
    trainer.state.epoch, trainer.state.metrics = 4, {"loss": 0.5}
    evaluator.state.epoch, evaluator.state.metrics = 4, {"val_auc": 0.9}
    assert epoch_metrics(trainer, evaluator) == {"loss": 0.5, "val_auc": 0.9}
    evaluator.state.epoch = 3  # validated last epoch (val_interval > 1): its AUC is not this epoch's
    assert epoch_metrics(trainer, evaluator) == {"loss": 0.5}


def test_gradient_norm_is_reported_and_clipped_before_the_step():
    # SGD without momentum: the step is -lr * gradient, so the applied gradient can be read off the weights
    seen: list[float] = []

    def applied(trainer: SupervisedTrainer, store: list[float]) -> None:
        before: dict[str, torch.Tensor] = {}
        net = trainer.network

        def keep(_):
            before.update({n: p.detach().clone() for n, p in net.named_parameters()})

        def measure(_):
            step = torch.cat([(before[n] - p.detach()).flatten() for n, p in net.named_parameters()])
            store.append(float(step.norm()) / 0.01)

        trainer.add_event_handler(Events.ITERATION_STARTED, keep)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, measure)

    trainer, outputs = _trainer(PPIIteration(PPIConfig(warmup_epochs=0)))
    applied(trainer, seen)
    trainer.run()
    norms = [float(o["grad_norm"]) for o in outputs]
    assert all(n > 0 for n in norms)
    assert seen == pytest.approx(norms, rel=1e-4)  # unclipped: the step is the reported gradient

    limit = min(norms) / 2
    clipped_seen: list[float] = []
    trainer, outputs = _trainer(PPIIteration(PPIConfig(warmup_epochs=0), max_grad_norm=limit))
    applied(trainer, clipped_seen)
    trainer.run()
    assert all(float(o["grad_norm"]) > limit for o in outputs)  # the norm before clipping
    assert clipped_seen == pytest.approx([limit] * len(outputs), rel=1e-4)
    with pytest.raises(ValueError, match="max_grad_norm"):
        PPIIteration(max_grad_norm=0.0)
