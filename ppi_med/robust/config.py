"""What a comparator method is: :class:`RobustConfig`, and the names that spell every method of the project."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["COMPARATORS", "SELECTIONS", "RobustConfig"]

#: the comparators of PPI (docs/DESIGN.md section 9): ``erm`` is plain training, the others change it
COMPARATORS = ("erm", "groupdro", "jtt", "dfr")
#: how the checkpoint is chosen (docs/DESIGN.md section 9.4)
SELECTIONS = ("train", "worst_site", "oracle")


@dataclass
class RobustConfig:
    """Settings of the group-robust comparators; with ``method="erm"`` nothing changes.

    Attributes:
        method: ``erm``, ``groupdro`` (Sagawa et al. 2020), ``jtt`` (Liu et al. 2021) or ``dfr`` (Kirichenko
            et al. 2022). ``dfr`` retrains the last layer of whatever the rest of the configuration trained, so
            with PPI on it is ``ppi+dfr``.
        step_size: GroupDRO's step size ``eta`` of the exponentiated-gradient update of the group weights.
        adjustment: GroupDRO's generalisation adjustment ``C``: group ``g``'s loss counts as
            ``L_g + C / sqrt(n_g)`` in the weight update (``n_g``: its training records).
        groupdro_weight_decay: the strong L2 GroupDRO needs (its paper: without it the worst group is
            memorised and its weight carries no signal); replaces the bundle's ``weight_decay`` for ``groupdro``.
        jtt_epochs: JTT's ``T``: epochs of ERM whose model's training errors form the error set; the network,
            optimiser and learning-rate schedule then start again from their initial state.
        upweight: JTT's ``lambda``: the weight of an error-set record in the retraining loss.
        dfr_c: inverse L2 strength of DFR's logistic regression on the frozen features.
        dfr_draws: group-balanced subsets DFR fits on (their coefficients averaged).
    """

    method: str = "erm"
    step_size: float = 0.01
    adjustment: float = 0.0
    groupdro_weight_decay: float = 0.1
    jtt_epochs: int = 6
    upweight: float = 6.0
    dfr_c: float = 1.0
    dfr_draws: int = 10

    def __post_init__(self) -> None:
        if self.method not in COMPARATORS:
            raise ValueError(f"robust method must be one of {COMPARATORS}, got '{self.method}'")
        if self.step_size <= 0 or self.adjustment < 0 or self.groupdro_weight_decay < 0:
            raise ValueError(
                "robust step_size must be > 0, adjustment and groupdro_weight_decay >= 0, got "
                f"{self.step_size}, {self.adjustment}, {self.groupdro_weight_decay}"
            )
        if self.jtt_epochs < (1 if self.method == "jtt" else 0) or self.upweight < 1:
            raise ValueError(f"robust jtt_epochs and upweight must be >= 1, got {self.jtt_epochs}, {self.upweight}")
        if self.dfr_c <= 0 or self.dfr_draws < 1:
            raise ValueError(f"robust dfr_c must be > 0 and dfr_draws >= 1, got {self.dfr_c}, {self.dfr_draws}")

    @property
    def restart_epoch(self) -> int:
        """The epoch after which training starts again (JTT's ``T``; 0 for the others)."""
        return self.jtt_epochs if self.method == "jtt" else 0

    def weight_decay(self, base: float) -> float:
        """The optimiser's weight decay: GroupDRO's own, else ``base``."""
        return self.groupdro_weight_decay if self.method == "groupdro" else base

    def method_name(self, ppi_method: str) -> str:
        """The run's method name given the PPI part's (``baseline``, ``ppi_wbp`` ...).

        ``groupdro`` and ``jtt`` name themselves (they replace the training loss); ``dfr`` follows what it
        retrains: ``dfr`` after the baseline, ``<ppi method>+dfr`` after PPI.
        """
        if self.method == "erm":
            return ppi_method
        if self.method == "dfr":
            return "dfr" if ppi_method == "baseline" else f"{ppi_method}+dfr"
        return self.method if ppi_method == "baseline" else f"{ppi_method}+{self.method}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
