"""What every rotation policy offers the adapter: a request table kept current through events,
and ``plan`` once per scheduler iteration. Policies never call back into the adapter."""

from __future__ import annotations

import abc

from ..config import RotaConfig
from .table import RequestTable
from .types import Capacity, Costs, StepPlan


class Policy(abc.ABC):
    def __init__(self, config: RotaConfig) -> None:
        self.config = config
        self.table = RequestTable()

    @abc.abstractmethod
    def plan(self, now_s: float, cap: Capacity, costs: Costs, max_prefill_tokens: int,
             gpu_free_at_s: float | None = None) -> StepPlan:
        """Decide this iteration's admissions and rotations. Reads the table, never writes it:
        the adapter reports what it actually did through the table's events.
        ``gpu_free_at_s``: when the batches already launched are expected to be done."""
