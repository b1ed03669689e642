"""MONAI engine glue: a training iteration that runs the PPI objective, per-epoch loss averages, and the window
in which the best checkpoint is chosen."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

from .ppi import PPIConfig, PPIObjective
from .robust import RobustLoss

__all__ = ["PPIIteration", "EpochLossAverages", "SelectionWindow", "epoch_metrics"]


class PPIIteration:
    """``iteration_update`` for :class:`monai.engines.SupervisedTrainer` that trains with PPI.

    It replaces the trainer's own forward/loss/backward with :class:`~ppi_med.ppi.PPIObjective` (which
    falls back to the trainer's ``loss_function`` alone when ``enabled`` is false, and uses it as ``L_cls``
    otherwise), keeps the trainer's ``prepare_batch``, AMP (``amp``, ``amp_kwargs``) and iteration events in
    MONAI's order (``state.output`` holds the batch, then the prediction, then the loss, as each event
    fires), passes what the batch knows beyond image and label (``site``, and ``annotation`` / ``annotated``
    from :class:`ppi_med.annotations.Outlined`) to the PPI guides, and returns a dict output with the image,
    label, prediction, the total
    ``loss`` and each named term (``loss_cls``, ``loss_con``, ``loss_reg``, ``loss_ad``) as detached
    tensors: nothing in the step waits for the device (:class:`EpochLossAverages` reads them once an epoch).

    Under AMP the step runs in bfloat16 where the device supports it (its range is float32's, so the
    saliency's inner backward, which no loss scaler reaches, cannot underflow), else in float16 with the
    trainer's gradient scaler.

    Args:
        ppi: a :class:`~ppi_med.ppi.PPIConfig` or a dict of its fields (e.g. straight from a bundle).
        amp_dtype: ``"bfloat16"`` or ``"float16"`` to force the AMP precision; ``None`` chooses as above.
        robust: a comparator's loss (:class:`ppi_med.robust.RobustLoss`: GroupDRO, JTT) that replaces the
            trainer's ``loss_function`` as ``L_cls``; ``None``: the trainer's own.
        max_grad_norm: the gradient's total norm is clipped to this before each step (``None``: not clipped).
            The norm before clipping is reported every step as ``grad_norm`` either way.
    """

    def __init__(
        self,
        ppi: PPIConfig | dict[str, Any] | None = None,
        amp_dtype: str | None = None,
        robust: RobustLoss | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        self.objective = PPIObjective(ppi)
        if max_grad_norm is not None and not float(max_grad_norm) > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm}")
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        if amp_dtype not in (None, "bfloat16", "float16"):
            raise ValueError(f"amp_dtype must be 'bfloat16', 'float16' or None, got {amp_dtype!r}")
        self.amp_dtype = amp_dtype
        self.robust = robust

    @property
    def config(self) -> PPIConfig:
        return self.objective.config

    def autocast_dtype(self, device: torch.device) -> torch.dtype:
        """The precision of the AMP region on ``device``."""
        if self.amp_dtype is not None:
            return getattr(torch, self.amp_dtype)
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16

    def _clip(self, parameters: Any) -> torch.Tensor:
        """The gradient's total norm before clipping (clipped to ``max_grad_norm`` when set); no device sync."""
        with_grad = [p for p in parameters if p.grad is not None]
        if not with_grad:
            return torch.zeros(())
        norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad])
        if self.max_grad_norm is not None:  # unclipped steps leave the gradients untouched
            torch.nn.utils.clip_grads_with_norm_(with_grad, self.max_grad_norm, norm)
        return norm.detach()

    @staticmethod
    def study_fields(batchdata: Any, device: torch.device) -> dict[str, Any]:
        """What the batch knows beyond image and label, for the PPI guides: ``site``, ``annotation``, ``annotated``."""
        if not isinstance(batchdata, dict):
            return {}
        fields: dict[str, Any] = {}
        if "site" in batchdata:
            fields["sites"] = [str(s) for s in batchdata["site"]]
        for key, name in (("annotation", "annotation"), ("annotated", "annotated")):
            if key in batchdata:
                fields[name] = torch.as_tensor(batchdata[key]).as_subclass(torch.Tensor).to(device, non_blocking=True)
        return fields

    def __call__(self, engine: SupervisedTrainer, batchdata: dict[str, Any]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("the training data loader returned no data")
        # (inputs, targets) or (inputs, targets, args, kwargs), depending on the prepare_batch
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets = batch[:2]
        # MONAI's order: the output holds the batch before any event fires, then the prediction, then the loss
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        autocast = {"dtype": self.autocast_dtype(inputs.device), **(engine.amp_kwargs or {})}
        loss_function = engine.loss_function
        if self.robust is not None:
            loss_function = self.robust.for_batch(batchdata, targets) or loss_function
        with torch.autocast(device_type=inputs.device.type, enabled=bool(engine.amp), **autocast):
            out = self.objective(
                engine.network,
                inputs,
                targets,
                epoch=engine.state.epoch,
                loss_function=loss_function,
                **self.study_fields(batchdata, inputs.device),
            )
        # the PPI loss needs the saliency of the same forward, so prediction and loss are known together
        engine.state.output[Keys.PRED] = out.logits.detach()
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.state.output.update(out.terms)
        engine.state.output[Keys.LOSS] = out.terms["loss"]
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        scaled = engine.amp and engine.scaler is not None and autocast["dtype"] == torch.float16
        (engine.scaler.scale(out.loss) if scaled else out.loss).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if scaled:
            engine.scaler.unscale_(engine.optimizer)
        engine.state.output["grad_norm"] = self._clip(engine.network.parameters())
        if scaled:
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class EpochLossAverages:
    """Average the scalar loss terms of a trainer's outputs over each epoch into ``engine.state.metrics``.

    MONAI's MLflow and stats handlers log ``state.metrics`` at the end of an epoch, so attaching this first
    puts ``loss``, ``loss_cls``, ``loss_con`` ... into MLflow once per epoch.

    Args:
        keys: which output entries to average (default: every key starting with ``loss``, and ``grad_norm``).
    """

    def __init__(self, keys: list[str] | None = None) -> None:
        self.keys = keys
        self._sums: dict[str, Any] = defaultdict(float)
        self._count = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        # run before the loggers attached later
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._publish)

    def _reset(self, engine: Engine) -> None:
        self._sums.clear()
        self._count = 0

    def _update(self, engine: Engine) -> None:
        output = engine.state.output
        if not isinstance(output, dict):
            return
        keys = self.keys or [k for k in output if isinstance(k, str) and (k.startswith("loss") or k == "grad_norm")]
        for k in keys:
            if k in output:  # summed where they are (tensors stay on the device): read once an epoch
                v = output[k]
                self._sums[k] = self._sums[k] + (v.detach() if isinstance(v, torch.Tensor) else float(v))
        self._count += 1

    def _publish(self, engine: Engine) -> None:
        if self._count:
            for k, v in self._sums.items():
                engine.state.metrics[k] = float(v) / self._count


class SelectionWindow:
    """Choose the best checkpoint only among the epochs from ``first_epoch`` on.

    A PPI run trains with plain cross-entropy during its warm-up; if a warm-up epoch scored best on
    validation, the "PPI" checkpoint would be a model PPI never touched (seen on GA: the best epoch of half
    the PPI runs fell in the warm-up). When the trainer starts ``first_epoch``, this forgets the best so far,
    both the evaluator's record and the key-metric :class:`monai.handlers.CheckpointSaver`'s, so the next
    validation writes ``model_best.pt`` afresh. Bundles give the baseline the same window, so methods are
    compared on checkpoints chosen alike.

    Args:
        saver: the evaluator's key-metric checkpoint saver.
        evaluator: the validation engine (its ``best_metric`` is reset).
        first_epoch: the first epoch (1-based) that may be chosen; 1 or less: every epoch.
    """

    def __init__(self, saver: Any, evaluator: Engine, first_epoch: int) -> None:
        self.saver = saver
        self.evaluator = evaluator
        self.first_epoch = int(first_epoch)

    def attach(self, engine: Engine) -> None:
        if self.first_epoch > 1:
            engine.add_event_handler(Events.EPOCH_STARTED(once=self.first_epoch), self._forget)

    def _forget(self, engine: Engine) -> None:
        # the saver's public resume hook: an empty list of saved checkpoints
        self.saver.load_state_dict({"_saved": []})
        self.evaluator.state.best_metric = -1
        self.evaluator.state.best_metric_epoch = -1


def epoch_metrics(trainer: Engine, evaluator: Engine | None = None) -> dict[str, Any]:
    """The metrics of the trainer's current epoch: its own, and the evaluator's when it validated in this epoch.

    An evaluator that did not run this epoch (``val_interval`` > 1) still holds the last validation's metrics;
    they are not this epoch's. MONAI's evaluator takes the trainer's epoch as its own when it runs.
    """
    merged = dict(trainer.state.metrics)
    if evaluator is not None and evaluator.state.epoch == trainer.state.epoch:
        merged.update(evaluator.state.metrics)
    return merged
