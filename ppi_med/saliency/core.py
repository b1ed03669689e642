"""Pieces every saliency method shares: target checks, the tracer protocol, buffer protection."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = [
    "Tracer",
    "Switch",
    "Reroute",
    "RerouteInPlace",
    "as_target",
    "class_score",
    "frozen_buffers",
    "input_requiring_grad",
    "plain",
    "score_gradient",
]


def as_target(target: int | torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """One class index per sample as a LongTensor, checked against the number of classes.

    Args:
        target: an int (same class for the whole batch) or a tensor of shape ``(N,)``.
        logits: the model output, shape ``(N, M)``.

    Raises:
        ValueError: wrong shape, non-integer classes, or a class outside ``[0, M)``.
    """
    if logits.ndim != 2:
        raise ValueError(f"saliency needs class logits of shape (N, M); the model returned {tuple(logits.shape)}")
    n, m = logits.shape
    t = torch.as_tensor(target, device=logits.device)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got dtype {t.dtype}")
    t = t.long()
    if t.ndim == 0:
        t = t.expand(n)
    t = t.reshape(-1)
    if t.numel() != n:
        raise ValueError(f"target has {t.numel()} entries for a batch of {n}")
    bad = (t < 0) | (t >= m)
    if bool(bad.any()):
        raise ValueError(f"target class {int(t[bad][0])} is out of range for a model with {m} outputs")
    return t


def class_score(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of each sample's target logit (samples are independent, so one backward serves all)."""
    return logits.gather(1, target[:, None]).sum()


def plain(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a plain tensor: subclasses such as MONAI's MetaTensor turn the outputs of custom autograd
    functions into views, which in-place activations then refuse to modify."""
    return x if type(x) is torch.Tensor else x.as_subclass(torch.Tensor)


def input_requiring_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` (as a plain tensor) when it already takes part in a graph, else a detached leaf that requires grad."""
    x = plain(x)
    return x if x.requires_grad else x.detach().requires_grad_(True)


@contextlib.contextmanager
def frozen_buffers(model: nn.Module) -> Iterator[None]:
    """Restore every buffer (batch-norm running statistics, counters) on exit.

    A saliency forward in training mode would otherwise update the running statistics a second time.
    """
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, copy in saved:
                # through .data: the graph of a training-mode batch norm keeps the running stats as saved
                # inputs (unused by its backward), and a tracked in-place write would invalidate it; always
                # copied, since comparing first would make the step wait for the device
                b.data.copy_(copy)


def score_gradient(
    logits: torch.Tensor,
    target: torch.Tensor,
    wrt: torch.Tensor,
    *,
    create_graph: bool = False,
    retain_graph: bool | None = None,
) -> torch.Tensor:
    """Gradient of the targets' logits (summed over the batch) with respect to ``wrt``, leaving ``.grad`` alone.

    ``retain_graph`` defaults to ``create_graph``: a differentiable map needs the forward graph kept.
    """
    (grad,) = torch.autograd.grad(
        class_score(logits, target),
        wrt,
        create_graph=create_graph,
        retain_graph=create_graph if retain_graph is None else retain_graph,
    )
    return grad


class Switch:
    """Which backward the rerouting nodes of one tracer take; read at backward time."""

    def __init__(self, on: bool = False) -> None:
        self.on = on


class Reroute(torch.autograd.Function):
    """Identity on a layer's output ``y``; backward exact, or (switch on) ``grad * slope`` straight to its input.

    WBP switches it on only for its own backward, so the same forward also gives a training loss its exact
    gradient; LRP's nodes are always on. The slope is a differentiable tensor, so ``create_graph`` works.
    """

    @staticmethod
    def forward(ctx, y, v, slope, switch):  # noqa: D102
        # an undefined gradient stays undefined: materialised, it would be a tensor of zeros carried (and in a
        # differentiable map recorded and differentiated again) through every node behind
        ctx.set_materialize_grads(False)
        ctx.switch = switch
        ctx.save_for_backward(slope)
        # a clone, not a view: models add residuals in place on these outputs
        return y.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        if grad is None:
            return None, None, None, None
        if ctx.switch.on:
            (slope,) = ctx.saved_tensors
            return None, grad * slope, None, None
        return grad, None, None, None


class RerouteInPlace(Reroute):
    """:class:`Reroute` on ``y`` itself instead of a copy, for a layer whose own backward does not keep its
    output (batch norm keeps its input and statistics): the residual add that may follow then writes into
    ``y`` as it would without the tracer."""

    @staticmethod
    def forward(ctx, y, v, slope, switch):  # noqa: D102
        ctx.set_materialize_grads(False)
        ctx.switch = switch
        ctx.save_for_backward(slope)
        ctx.mark_dirty(y)
        return y


class Tracer:
    """A saliency method split around the model's forward pass.

    Entering attaches whatever hooks the method needs; the caller runs the forward itself (so the same
    forward can also serve the classification loss); :meth:`saliency` then turns the logits into a map the
    shape of the input. Leaving removes every hook.
    """

    #: whether the saliency can be kept in the autograd graph (``create_graph=True``)
    differentiable: bool = True

    #: whether an ordinary backward of the traced forward's outputs must reach the input too. A caller whose
    #: input is a leaf made only for the saliency (the PPI step) sets it to ``False``, and WBP then leaves the
    #: input gradient of the layers that read the input to the saliency's own backward
    input_gradient: bool = True

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> Tracer:
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def attribute(
        self, inputs: torch.Tensor, target: int | torch.Tensor, *, create_graph: bool = False
    ) -> torch.Tensor:
        """The whole map in one call, as every method offers it: the traced forward, then :meth:`saliency`.

        The model's parameters, gradients and buffers are left as they were.

        Args:
            inputs: the input batch (2D or 3D images, channels first).
            target: an int or a LongTensor of one class per sample.
            create_graph: keep the map differentiable (methods with ``differentiable`` only).

        Returns:
            A tensor of the shape of ``inputs``.

        Raises:
            ValueError: ``create_graph`` for a post-hoc method, or a bad target.
        """
        if create_graph and not self.differentiable:
            raise ValueError(f"{type(self).__name__} is post-hoc only: create_graph=True is not supported")
        xg = input_requiring_grad(inputs)
        with torch.enable_grad():
            with frozen_buffers(self.model), self:
                logits = self.model(xg)
            return self.saliency(logits, xg, target, create_graph=create_graph)

    def saliency(
        self,
        logits: torch.Tensor,
        x: torch.Tensor,
        target: int | torch.Tensor,
        *,
        create_graph: bool = False,
        retain_graph: bool | None = None,
    ) -> torch.Tensor:
        """Saliency of ``target`` for input ``x`` from the traced forward's ``logits``.

        Args:
            logits: output of the forward run inside this tracer, shape ``(N, M)``.
            x: the input of that forward; it must require grad.
            target: class per sample (int or ``(N,)`` LongTensor).
            create_graph: keep the map in the graph so a loss on it trains the model.
            retain_graph: keep the forward graph for a later backward (defaults to ``create_graph``).

        Returns:
            A tensor shaped like ``x``; detached unless ``create_graph``.
        """
        raise NotImplementedError
