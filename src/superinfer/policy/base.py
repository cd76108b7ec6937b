"""What every rotation policy offers the adapter: ``update`` with what happened, ``plan`` once
per scheduler iteration. The request table is the policy's own state; policies never call back
into the adapter (the adapter acts on the plan and reports back through events)."""

from __future__ import annotations

import abc
from collections.abc import Iterable

from ..config import RotaConfig
from .events import Event
from .table import RequestTable
from .types import Phase, ReqView, StepPlan, StepSnapshot


class Policy(abc.ABC):
    def __init__(self, config: RotaConfig) -> None:
        self.config = config
        self._table = RequestTable()

    def update(self, events: Iterable[Event]) -> None:
        """Apply events in order: the only way the request table changes."""
        for event in events:
            self._table.apply(event)

    @abc.abstractmethod
    def plan(self, snapshot: StepSnapshot) -> StepPlan:
        """Decide this iteration's admissions and rotations from the table and ``snapshot``.
        Reads the table, never writes it: the adapter reports what it did through ``update``."""

    # --- read-only queries (the adapter's, logs' and tests') --------------------------------
    @property
    def table(self) -> RequestTable:
        """The table itself, to read (tests may also stage column values); never write it
        from outside the policy otherwise."""
        return self._table

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._table

    def __len__(self) -> int:
        return len(self._table)

    def phase_of(self, req_id: str) -> Phase | None:
        return self._table.phase_of(req_id) if req_id in self._table else None

    def ids_in(self, *phases: Phase) -> list[str]:
        return self._table.ids(self._table.rows_in(*phases))

    def view(self, req_id: str) -> ReqView:
        return self._table.view(req_id)
