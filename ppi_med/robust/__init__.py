"""The established fixes PPI is compared with: GroupDRO, JTT and DFR, and the model-selection rules.

docs/DESIGN.md section 9 has each method's equations, defaults and the property its test checks.
"""

from __future__ import annotations

from .config import COMPARATORS, SELECTIONS, RobustConfig
from .dfr import DFRHandler, balanced_draws, fit_last_layer, last_linear, penultimate_features
from .groupdro import GroupDRO
from .groups import CaseIdd, GroupIndex, batch_groups, record_group
from .jtt import JTT, JTTHandler, training_errors
from .loss import RobustLoss
from .selection import WorstGroupAccuracy, check_selection, oracle_records, validation_metrics, worst_group_accuracy

__all__ = [
    "COMPARATORS",
    "CaseIdd",
    "SELECTIONS",
    "DFRHandler",
    "GroupDRO",
    "GroupIndex",
    "JTT",
    "JTTHandler",
    "RobustConfig",
    "RobustLoss",
    "WorstGroupAccuracy",
    "balanced_draws",
    "batch_groups",
    "check_selection",
    "fit_last_layer",
    "last_linear",
    "oracle_records",
    "penultimate_features",
    "record_group",
    "training_errors",
    "validation_metrics",
    "worst_group_accuracy",
]
