"""RotaSched's decision core: pure Python + numpy, no torch, no SGLang."""

from __future__ import annotations

from ..config import RotaConfig
from . import events
from .base import Policy
from .costs import CostModel
from .lvf import LvfPolicy
from .slo import SloPolicy
from .table import RequestTable
from .types import (
    HELD_BY,
    Capacity,
    Costs,
    Phase,
    ReqView,
    StepPlan,
    StepSnapshot,
    TierReport,
    Transfer,
)

_POLICIES: dict[str, type[Policy]] = {"slo": SloPolicy, "lvf": LvfPolicy}


def create_policy(config: RotaConfig) -> Policy:
    return _POLICIES[config.policy](config)


__all__ = ["HELD_BY", "Capacity", "CostModel", "Costs", "LvfPolicy", "Phase", "Policy", "ReqView",
           "RequestTable", "SloPolicy", "StepPlan", "StepSnapshot", "TierReport", "Transfer",
           "create_policy", "events"]
