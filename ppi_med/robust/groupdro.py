"""Group distributionally robust optimisation: minimise the worst group's loss, groups known."""

from __future__ import annotations

import torch

from .groups import GroupIndex

__all__ = ["GroupDRO"]


class GroupDRO:
    """Online GroupDRO (Sagawa, Koh, Hashimoto and Liang 2020, "Distributionally robust neural networks for
    group shifts", Algorithm 1).

    The group weights ``q`` follow an exponentiated-gradient ascent on the groups' losses,
    ``q_g <- q_g exp(eta (L_g + C / sqrt(n_g)))`` renormalised, and the model descends ``sum_g q_g L_g``; the
    weight of a group that stays worst rises towards 1. ``q`` is state that lives across steps (and is saved
    with the checkpoint through :meth:`state_dict`).

    Example::

        dro = GroupDRO(GroupIndex(["A/0", "A/1", "B/0", "B/1"]), step_size=0.01)
        loss = dro.loss(F.cross_entropy(logits, y, reduction="none"), ["A/0", "B/1", ...])

    Args:
        groups: the training groups.
        step_size: ``eta``.
        adjustment: ``C`` (0: none).
    """

    def __init__(self, groups: GroupIndex, step_size: float = 0.01, adjustment: float = 0.0) -> None:
        self.groups = groups
        self.step_size = float(step_size)
        self.adjustment = float(adjustment)
        self.q = torch.full((len(groups),), 1.0 / len(groups))

    def loss(self, per_sample: torch.Tensor, names: list[str]) -> torch.Tensor:
        """The robust loss of one batch, updating ``q`` from the groups present in it.

        Args:
            per_sample: ``(N,)`` losses with graph.
            names: each sample's group.
        """
        g = self.groups.indices(names, per_sample.device)
        onehot = torch.nn.functional.one_hot(g, len(self.groups)).to(per_sample.dtype)
        counts = onehot.sum(dim=0)
        group_loss = (onehot * per_sample[:, None]).sum(dim=0) / counts.clamp_min(1)
        bonus = self.adjustment / self.groups.counts.to(per_sample.device).clamp_min(1).sqrt()
        present = (counts > 0).to(per_sample.dtype)
        q = self.q.to(per_sample.device, per_sample.dtype)
        # a group absent from the batch keeps its weight (its loss is not known this step)
        q = q * torch.exp(self.step_size * (group_loss.detach() + bonus) * present)
        self.q = (q / q.sum()).detach()
        return (self.q * group_loss).sum()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"q": self.q.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        q = torch.as_tensor(state["q"], dtype=torch.float32)
        if q.shape != (len(self.groups),):
            raise ValueError(f"GroupDRO state has {q.numel()} group weights, the study {len(self.groups)} groups")
        self.q = q
