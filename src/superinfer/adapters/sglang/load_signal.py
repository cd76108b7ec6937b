"""SGLang's load figures, counting the requests rotated out to the host tier.

SGLang publishes each scheduler's load (running and waiting requests, KV tokens in use plus
those queued) for ``/v1/loads``, ``/get_load`` (0.5.17; the router's ``power_of_two`` policy
polls it), and the DP controller's load-aware balancing. A rotated-out request is in neither
SGLang's running batch nor its queue and holds no device KV, so without this it would vanish
from the load while it still decodes: a router would send more work to a server that is full.
Here it counts as running, and its KV as tokens the server must hold again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class RotationAwareLoad:
    """Stands in for the scheduler's ``load_inquirer``: the same answers, with the requests
    ``away()`` reports (count, KV tokens) added; everything else goes to the inner one."""

    def __init__(self, inner: Any, away: Callable[[], tuple[int, int]]) -> None:
        self._inner = inner
        self._away = away

    def get_loads(self) -> Any:
        snapshot = self._inner.get_loads()
        requests, tokens = self._away()
        if requests:
            snapshot.num_running_reqs += requests
            snapshot.num_total_tokens += tokens
            snapshot.num_active_tokens += tokens
        return snapshot

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
