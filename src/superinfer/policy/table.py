"""The policy's view of every live request, stored as numpy columns.

Why columns: the planner must rank thousands of requests every scheduler iteration within a
fraction of a millisecond; one vectorized pass over arrays does that, a Python loop does not.
Only ``apply`` changes it, from the events of policy/events.py (arrival, prefill done, decode
step, rotation, host-tier report, finish); each is O(1) except a decode step (one fancy-index
add) and the per-step in-flight and kept-copy counts (one vector write each).
"""

from __future__ import annotations

import numpy as np

from . import events as ev
from .types import Phase, ReqView, TierReport

_ALLOWED = {  # phase transitions; anything else is a bug in the caller
    Phase.WAITING: {Phase.PREFILLING, Phase.RUNNING},
    Phase.PREFILLING: {Phase.RUNNING, Phase.WAITING},
    Phase.RUNNING: {Phase.ROTATING_OUT, Phase.WAITING},
    Phase.ROTATING_OUT: {Phase.ON_HOST, Phase.RUNNING},
    Phase.ON_HOST: {Phase.ROTATING_IN, Phase.WAITING},
    Phase.ROTATING_IN: {Phase.RUNNING, Phase.ON_HOST},
}
CLIP_NEW_TOKENS = 4096  # mirrors SGLang's SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION default
_FLOAT_COLS = ("arrival_s", "ttft_slo_s", "tbt_slo_s", "first_token_s", "resident_since_s",
               "rotated_at_s")
_INT_COLS = ("phase", "num_prompt_tokens", "num_tokens", "num_output_tokens", "max_new_tokens",
             "seq", "tokens_in_flight", "host_tokens", "fixed_length")


class RequestTable:
    def __init__(self, capacity: int = 1024) -> None:
        self._row_of: dict[str, int] = {}
        self._ids: list[str | None] = [None] * capacity
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self._next_seq = 0  # arrival sequence number: the deterministic tie-breaker
        for name in _FLOAT_COLS:
            setattr(self, name, np.full(capacity, np.nan))
        for name in _INT_COLS:
            setattr(self, name, np.full(capacity, -1, dtype=np.int64))

    # --- events -------------------------------------------------------------------------------
    def apply(self, event: ev.Event) -> None:
        """Bring the table up to date with one event (see policy/events.py)."""
        match event:
            case ev.Arrived():
                self.add(event.req_id, event.arrival_s, event.num_prompt_tokens, event.ttft_slo_s,
                         event.tbt_slo_s, event.max_new_tokens, event.fixed_length)
            case ev.Requeued():
                if self.phase_of(event.req_id) is not Phase.WAITING:
                    self.set_phase(event.req_id, Phase.WAITING, event.now_s)
                self.set_counts(event.req_id, 0, event.num_output_tokens)
                self.num_prompt_tokens[self._row_of[event.req_id]] = event.num_prompt_tokens
            case ev.PrefillLaunched():
                self.prefill_launched(event.req_id, event.now_s, event.first_token_s)
            case ev.PrefillChunked():
                if self.phase_of(event.req_id) is Phase.WAITING:
                    self.set_phase(event.req_id, Phase.PREFILLING, event.now_s)
            case ev.PrefillDone():
                self.prefill_done(event.req_id, event.num_tokens, event.now_s)
                self.set_counts(event.req_id, event.num_tokens, event.num_output_tokens)
            case ev.Decoded():
                self.advance(event.req_ids)
            case ev.Finished():
                if event.req_id in self._row_of:
                    self.remove(event.req_id)
            case ev.InFlight():
                self.set_in_flight(event.counts)
            case ev.RotationStarted():
                if event.to_host:
                    self.set_counts(event.req_id, event.num_tokens, event.num_output_tokens)
                phase = Phase.ROTATING_OUT if event.to_host else Phase.ROTATING_IN
                self.set_phase(event.req_id, phase, event.now_s)
            case TierReport():
                self._tier_report(event)
            case _:
                raise TypeError(f"not a policy event: {event!r}")

    def _tier_report(self, report: TierReport) -> None:
        """Copies that landed move their requests on (a failed rotate-out back to running; a
        failed rotate-in is finished by the adapter); unknown ids (finished meanwhile) are
        skipped. Kept-copy sizes are set afresh, so a dropped copy reads as 0."""
        landed = ((report.finished_out, Phase.ON_HOST), (report.finished_in, Phase.RUNNING),
                  (report.failed_out, Phase.RUNNING))
        for req_ids, new in landed:
            for req_id in req_ids:
                if req_id in self._row_of:
                    self.set_phase(req_id, new, report.now_s)
        self.host_tokens[:] = 0
        for req_id, num_tokens in report.host_tokens.items():
            if req_id in self._row_of:
                self.host_tokens[self._row_of[req_id]] = num_tokens

    def add(self, req_id: str, arrival_s: float, num_prompt_tokens: int, ttft_slo_s: float,
            tbt_slo_s: float, max_new_tokens: int = 1 << 20, fixed_length: bool = False) -> None:
        if req_id in self._row_of:
            raise KeyError(f"request {req_id!r} is already in the table")
        if not self._free:
            self._grow()
        row = self._free.pop()
        self._row_of[req_id] = row
        self._ids[row] = req_id
        self.phase[row] = Phase.WAITING
        self.arrival_s[row] = arrival_s
        self.ttft_slo_s[row] = ttft_slo_s
        self.tbt_slo_s[row] = tbt_slo_s
        self.num_prompt_tokens[row] = num_prompt_tokens
        self.num_tokens[row] = 0
        self.num_output_tokens[row] = 0
        self.tokens_in_flight[row] = 0
        self.host_tokens[row] = 0
        self.max_new_tokens[row] = max_new_tokens
        self.fixed_length[row] = fixed_length
        self.first_token_s[row] = np.nan
        self.resident_since_s[row] = np.nan
        self.rotated_at_s[row] = np.nan
        self.seq[row] = self._next_seq
        self._next_seq += 1

    def remove(self, req_id: str) -> None:
        row = self._row_of.pop(req_id)
        self._ids[row] = None
        self.phase[row] = -1
        self._free.append(row)

    def set_phase(self, req_id: str, new: Phase, now_s: float) -> None:
        row = self._row_of[req_id]
        old = Phase(int(self.phase[row]))
        if new not in _ALLOWED[old]:
            raise ValueError(f"request {req_id!r}: illegal transition {old.name} -> {new.name}")
        self.phase[row] = new
        if new is Phase.RUNNING and old is not Phase.ROTATING_OUT:
            self.resident_since_s[row] = now_s
        elif new is Phase.ROTATING_OUT:
            self.rotated_at_s[row] = now_s

    def prefill_launched(self, req_id: str, now_s: float, first_token_s: float | None) -> None:
        """A batch holding this request's prefill was launched. ``first_token_s``: when its
        first token is expected, if this is the prompt's last chunk. Until the result comes
        back, that estimate paces the stream, so the very next batch already respects it."""
        row = self._row_of[req_id]
        if self.phase[row] == Phase.WAITING:
            self.set_phase(req_id, Phase.PREFILLING, now_s)
        if first_token_s is not None and self.num_output_tokens[row] == 0:
            self.first_token_s[row] = first_token_s

    def set_in_flight(self, counts: dict[str, int]) -> None:
        """Tokens launched but not reported yet, per request (the rest: none). Set afresh from
        the scheduler's unprocessed batches every iteration, so no count can drift."""
        self.tokens_in_flight[:] = 0
        if counts:
            row_of = self._row_of
            rows = np.array([row_of[r] for r in counts], dtype=np.int64)
            self.tokens_in_flight[rows] = np.fromiter(counts.values(), dtype=np.int64,
                                                      count=len(counts))

    def prefill_done(self, req_id: str, num_tokens: int, now_s: float) -> None:
        """The prefill produced the first output token: the TBT pace starts now (replacing the
        launch-time estimate)."""
        row = self._row_of[req_id]
        if np.isnan(self.first_token_s[row]) or self.num_output_tokens[row] == 0:
            self.first_token_s[row] = now_s
            self.num_output_tokens[row] = 1
        self.num_tokens[row] = num_tokens
        if self.phase[row] != Phase.RUNNING:
            self.set_phase(req_id, Phase.RUNNING, now_s)

    def advance(self, req_ids: tuple[str, ...] | list[str]) -> None:
        """One decode step produced one token for each of ``req_ids``."""
        row_of = self._row_of
        rows = np.array([row_of[r] for r in req_ids], dtype=np.int64)
        self.num_output_tokens[rows] += 1
        self.num_tokens[rows] += 1

    def set_counts(self, req_id: str, num_tokens: int, num_output_tokens: int) -> None:
        """Resynchronize with the scheduler's own counts (e.g. after a retraction)."""
        row = self._row_of[req_id]
        self.num_tokens[row] = num_tokens
        self.num_output_tokens[row] = num_output_tokens

    def out_tokens(self, rows: np.ndarray) -> np.ndarray:
        """Tokens a rotate-out of ``rows`` would copy to the host."""
        return self.num_tokens[rows] - self.host_tokens[rows]

    def next_token_index(self, rows: np.ndarray) -> np.ndarray:
        """Index of the first output token not yet launched: the one a new batch can delay."""
        return np.maximum(self.num_output_tokens[rows] + self.tokens_in_flight[rows], 1)

    # --- queries ------------------------------------------------------------------------------
    def __contains__(self, req_id: str) -> bool:
        return req_id in self._row_of

    def all_ids(self) -> list[str]:
        return list(self._row_of)

    def __len__(self) -> int:
        return len(self._row_of)

    def decode_reservation(self, rows: np.ndarray, ratio: float,
                           fixed_ratio: float | None = None) -> np.ndarray:
        """Tokens SGLang's admission keeps free for these requests' future output: the
        remaining output (clipped like SGLang's CLIP_MAX_NEW_TOKENS) times ``ratio``, or times
        ``fixed_ratio`` for a request of fixed output length when that is given."""
        remaining = np.minimum(self.max_new_tokens[rows] - self.num_output_tokens[rows],
                               CLIP_NEW_TOKENS)
        if fixed_ratio is not None:
            ratio = np.where(self.fixed_length[rows] > 0, fixed_ratio, ratio)
        return np.maximum(remaining, 0) * ratio

    def rows_in(self, *phases: Phase) -> np.ndarray:
        mask = self.phase == int(phases[0])
        for p in phases[1:]:
            mask |= self.phase == int(p)
        return np.flatnonzero(mask)

    def row(self, req_id: str) -> int:
        return self._row_of[req_id]

    def id_at(self, row: int) -> str:
        return self._ids[row]  # type: ignore[return-value]

    def ids(self, rows: np.ndarray) -> list[str]:
        return [self._ids[s] for s in rows.tolist()]  # type: ignore[misc]

    def phase_of(self, req_id: str) -> Phase:
        return Phase(int(self.phase[self._row_of[req_id]]))

    def view(self, req_id: str) -> ReqView:
        s = self._row_of[req_id]
        first = float(self.first_token_s[s])
        return ReqView(
            req_id=req_id, phase=Phase(int(self.phase[s])), arrival_s=float(self.arrival_s[s]),
            ttft_slo_s=float(self.ttft_slo_s[s]), tbt_slo_s=float(self.tbt_slo_s[s]),
            num_prompt_tokens=int(self.num_prompt_tokens[s]), num_tokens=int(self.num_tokens[s]),
            num_output_tokens=int(self.num_output_tokens[s]),
            max_new_tokens=int(self.max_new_tokens[s]),
            first_token_s=None if np.isnan(first) else first,
            resident_since_s=float(self.resident_since_s[s]),
            rotated_at_s=float(self.rotated_at_s[s]),
        )

    def _grow(self) -> None:
        old = len(self._ids)
        for name in _FLOAT_COLS:
            setattr(self, name, np.concatenate([getattr(self, name), np.full(old, np.nan)]))
        for name in _INT_COLS:
            col = getattr(self, name)
            setattr(self, name, np.concatenate([col, np.full(old, -1, dtype=np.int64)]))
        self._ids.extend([None] * old)
        self._free.extend(range(2 * old - 1, old - 1, -1))
