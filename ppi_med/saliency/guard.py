"""The guard WBP and LRP run their traced forward under: every call outside a layer with a rule is checked.

Rules attach to layers, so an operation called inside some container's ``forward`` (``torch.tanh(h)``,
``torch.special.expit(h)``, ``h * h``, ``F.layer_norm(...)``) would be differentiated by autograd instead of
getting the method's rule, silently. :class:`ForwardGuard` is a :class:`torch.overrides.TorchFunctionMode`:
it sees every torch function, tensor method and operator the forward calls, and checks those made outside a
layer with a rule against the allow-list :data:`ppi_med.saliency.rules.FUNCTIONS`. Calls whose result carries
no gradient (shapes, comparisons, indices) and calls on parameters and constants alone are not on the input's
path and pass. The first refused call is raised as :class:`UnsupportedOperationError` when the model's
forward returns, naming the operation and the module whose forward made it (raised there because an
exception inside ``__torch_function__`` of an operator such as ``h ** 2`` reaches the caller as Python's
"unsupported operand" ``TypeError``).

Cost: two Python hooks per module and one mode dispatch per call; the check itself runs only for the few
calls made outside the layers (residual adds, concatenations, reshapes).
"""

from __future__ import annotations

from torch import nn
from torch.overrides import TorchFunctionMode, resolve_name

from .rules import UnsupportedOperationError, operation_problem

__all__ = ["ForwardGuard"]


def _carries_grad(out: object) -> bool:
    if isinstance(out, (tuple, list)):
        return any(getattr(o, "requires_grad", False) for o in out)
    return getattr(out, "requires_grad", False)


class ForwardGuard(TorchFunctionMode):
    """Refuse an operation called outside every layer with a rule, when the model's forward returns.

    Use as a context manager around the traced forward, after the method's own hooks are registered (so that
    a layer's rule, run in its forward hook, counts as inside the layer). :meth:`remove` detaches its hooks.

    Args:
        model: the traced model.
        ruled: qualified names of the modules with a rule (inside them the rule governs every call).
        method: the method's name for the message, e.g. ``"WBP"``.
    """

    def __init__(self, model: nn.Module, ruled: set[str], method: str) -> None:
        super().__init__()
        self.method = method
        self.stack: list[tuple[str, str]] = []  # (qualified name, type) of the modules the forward is in
        self.depth = 0  # how many layers with a rule the forward is inside
        self.found: str | None = None  # the first call that escapes the rules
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(
                module.register_forward_pre_hook(self._push(name, type(module).__name__, name in ruled))
            )
            self.handles.append(module.register_forward_hook(self._pop(name in ruled)))

    def _push(self, name: str, kind: str, ruled: bool):
        def hook(module, inputs):
            self.stack.append((name, kind))
            self.depth += ruled

        return hook

    def _pop(self, ruled: bool):
        def hook(module, inputs, output):
            self.stack.pop()
            self.depth -= ruled
            if not self.stack and self.found is not None:
                found, self.found = self.found, None
                raise UnsupportedOperationError(found)

        return hook

    def remove(self) -> None:
        """Detach the guard's module hooks."""
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0 and self.stack and self.found is None and _carries_grad(out):
            why = operation_problem(func, args, kwargs)
            if why is not None:
                name, kind = self.stack[-1]
                where = f"'{name}' ({kind})" if name else f"the model ({kind})"
                self.found = (
                    f"{self.method}: {resolve_name(func) or func} is called as a function in the forward of {where}, "
                    f"{why}; autograd would differentiate it instead of applying {self.method}'s rule. Use a layer "
                    "with a rule (nn.Tanh(), nn.Sigmoid(), nn.GELU(), nn.LayerNorm(...)) in that forward, or register "
                    "a rule for the calling module's type with ppi_med.saliency.register_rule"
                )
        return out
