"""Rotation counters and the structured stats record the scheduler logs.

Every record is one log line: ``STATS_PREFIX`` followed by a JSON object. Tools (the eval
scripts, an operator's log pipeline) read records with ``parse_records``, never by matching
the wording of a log message. Four kinds:

- ``start``: once per scheduler process (policy, host tier size and page, mover, data path);
- ``stats``: every few seconds while requests rotate (cumulative counters, tier gauges, the
  policy's cost estimates under ``costs``);
- ``idle``: once per idle period (pools back at their initial free sizes, per-request counts
  for the busy period that just ended, the cumulative plan counters: a replay that never
  rotates logs no ``stats`` record);
- ``binding``: every few seconds while busy and once on going idle, under rotasched or
  ``--rota-monitor``: seconds of prefill, decode and idle GPU time, of requests waiting for
  room or for the GPU, and the bound they add up to (``policy.binding``), with ``wall_s``.

Every record carries ``tp_rank`` and ``dp_rank``. This module imports nothing from SGLang.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from ...policy.binding import BindingTimes
from ...policy.types import Costs

STATS_PREFIX = "superinfer-stats "
KINDS = ("start", "stats", "idle", "binding")


@dataclass(slots=True)
class RotationStats:
    """Cumulative counters of one scheduler process (what the adapter decided and did)."""

    rotations_out: int = 0
    rotations_in: int = 0
    fallbacks: int = 0  # rotate-outs skipped because the host tier had no room
    aborted_while_rotated: int = 0
    plans_decode_first: int = 0  # plans that held waiting prefill back for a decode step
    plans_head_blocked: int = 0  # plans where the new EDF head waited for room
    plans_host_full: int = 0  # plans that wanted a rotation the host tier had no room for
    # plans_head_blocked by why no rotation made the head's room (policy.types.HELD_BY)
    plans_blocked_compute: int = 0
    plans_blocked_room_comes: int = 0
    plans_blocked_no_victims: int = 0
    plans_blocked_away_bound: int = 0
    plans_blocked_host_full: int = 0
    requeued: int = 0  # requests SGLang retracted (back in its waiting queue to recompute)
    # The rotator's own CPU time in the scheduler loop: a step (plan included) delays every
    # batch behind it, and a long queue in a burst makes plans dearer.
    steps: int = 0
    step_us: int = 0
    step_us_max: int = 0

    def count_blocked(self, held_by: str | None) -> None:
        """One plan whose blocked head got no room made, by why (None: not counted)."""
        if held_by is not None:
            name = f"plans_blocked_{held_by}"
            setattr(self, name, getattr(self, name) + 1)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def cost_fields(costs: Costs) -> dict[str, float]:
    """The policy's current cost estimates, in readable units: what its deadlines and bounds
    were computed from, to set against the simulator's profile of the same GPU."""
    return {"decode_step_ms": round(costs.decode_step_s * 1e3, 3),
            "prefill_us_per_token": round(costs.prefill_s_per_token * 1e6, 3),
            "prefill_overhead_ms": round(costs.prefill_overhead_s * 1e3, 3),
            "d2h_gb_per_s": round(costs.d2h_bytes_per_s / 1e9, 2),
            "h2d_gb_per_s": round(costs.h2d_bytes_per_s / 1e9, 2),
            "arrivals_per_s": round(costs.arrival_rate_per_s, 2),
            "mean_prompt_tokens": round(costs.mean_prompt_tokens, 1)}


def format_record(kind: str, tp_rank: int, dp_rank: int, fields: dict[str, Any]) -> str:
    """The log line of one record; ``fields`` must be JSON-serializable."""
    if kind not in KINDS:
        raise ValueError(f"unknown stats record kind {kind!r}; expected one of {KINDS}")
    body = {"kind": kind, "tp_rank": tp_rank, "dp_rank": dp_rank, **fields}
    return STATS_PREFIX + json.dumps(body, sort_keys=True, separators=(",", ":"))


def binding_summary(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The ``binding`` records among ``records`` added up (every rank's: under TP each rank
    saw the same steps, so the shares and the bound are those of one), as
    ``BindingTimes.as_dict``; None if there is none."""
    found = [r for r in records if r.get("kind") == "binding"]
    if not found:
        return None
    total = BindingTimes()
    for r in found:
        total.add(BindingTimes.from_dict(r))
    return total.as_dict()


def parse_records(text: str) -> list[dict[str, Any]]:
    """Every complete record in a log text, in order (a torn last line is skipped)."""
    records = []
    for line in text.splitlines():
        pos = line.find(STATS_PREFIX)
        if pos < 0:
            continue
        try:
            body = json.loads(line[pos + len(STATS_PREFIX):])
        except json.JSONDecodeError:
            continue
        if isinstance(body, dict) and body.get("kind") in KINDS:
            records.append(body)
    return records
