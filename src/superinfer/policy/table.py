"""The policy's view of every live request, stored as numpy columns.

Why columns: the planner must rank thousands of requests every scheduler iteration within a
fraction of a millisecond; one vectorized pass over arrays does that, a Python loop does not.
The adapter keeps the table true by reporting events (arrival, prefill done, decode step,
rotation, finish); each event is O(1) except ``advance``, which is one fancy-index add.
"""

from __future__ import annotations

import numpy as np

from .types import Phase, ReqView

_ALLOWED = {  # phase transitions; anything else is a bug in the caller
    Phase.WAITING: {Phase.PREFILLING, Phase.RUNNING},
    Phase.PREFILLING: {Phase.RUNNING, Phase.WAITING},
    Phase.RUNNING: {Phase.ROTATING_OUT, Phase.WAITING},
    Phase.ROTATING_OUT: {Phase.ON_HOST, Phase.RUNNING},
    Phase.ON_HOST: {Phase.ROTATING_IN, Phase.WAITING},
    Phase.ROTATING_IN: {Phase.RUNNING, Phase.ON_HOST},
}
CLIP_NEW_TOKENS = 4096  # mirrors SGLang's SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION default
_FLOAT_COLS = ("arrival_s", "ttft_slo_s", "tbt_slo_s", "first_token_s", "resident_since_s", "rotated_at_s")
_INT_COLS = ("phase", "num_prompt_tokens", "num_tokens", "num_output_tokens", "max_new_tokens", "seq",
             "tokens_in_flight", "host_tokens")


class RequestTable:
    def __init__(self, capacity: int = 1024) -> None:
        self._slot_of: dict[str, int] = {}
        self._ids: list[str | None] = [None] * capacity
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self._next_seq = 0  # arrival sequence number: the deterministic tie-breaker
        for name in _FLOAT_COLS:
            setattr(self, name, np.full(capacity, np.nan))
        for name in _INT_COLS:
            setattr(self, name, np.full(capacity, -1, dtype=np.int64))

    # --- events -------------------------------------------------------------------------------
    def add(self, req_id: str, arrival_s: float, num_prompt_tokens: int, ttft_slo_s: float,
            tbt_slo_s: float, max_new_tokens: int = 1 << 20) -> None:
        if req_id in self._slot_of:
            raise KeyError(f"request {req_id!r} is already in the table")
        if not self._free:
            self._grow()
        slot = self._free.pop()
        self._slot_of[req_id] = slot
        self._ids[slot] = req_id
        self.phase[slot] = Phase.WAITING
        self.arrival_s[slot] = arrival_s
        self.ttft_slo_s[slot] = ttft_slo_s
        self.tbt_slo_s[slot] = tbt_slo_s
        self.num_prompt_tokens[slot] = num_prompt_tokens
        self.num_tokens[slot] = 0
        self.num_output_tokens[slot] = 0
        self.tokens_in_flight[slot] = 0
        self.host_tokens[slot] = 0
        self.max_new_tokens[slot] = max_new_tokens
        self.first_token_s[slot] = np.nan
        self.resident_since_s[slot] = np.nan
        self.rotated_at_s[slot] = np.nan
        self.seq[slot] = self._next_seq
        self._next_seq += 1

    def remove(self, req_id: str) -> None:
        slot = self._slot_of.pop(req_id)
        self._ids[slot] = None
        self.phase[slot] = -1
        self._free.append(slot)

    def set_phase(self, req_id: str, new: Phase, now_s: float) -> None:
        slot = self._slot_of[req_id]
        old = Phase(int(self.phase[slot]))
        if new not in _ALLOWED[old]:
            raise ValueError(f"request {req_id!r}: illegal transition {old.name} -> {new.name}")
        self.phase[slot] = new
        if new is Phase.RUNNING and old is not Phase.ROTATING_OUT:
            self.resident_since_s[slot] = now_s
        elif new is Phase.ROTATING_OUT:
            self.rotated_at_s[slot] = now_s

    def prefill_launched(self, req_id: str, now_s: float, first_token_s: float | None) -> None:
        """A batch holding this request's prefill was launched. ``first_token_s``: when its
        first token is expected, if this is the prompt's last chunk. Until the result comes
        back, that estimate paces the stream, so the very next batch already respects it."""
        slot = self._slot_of[req_id]
        if self.phase[slot] == Phase.WAITING:
            self.set_phase(req_id, Phase.PREFILLING, now_s)
        if first_token_s is not None and self.num_output_tokens[slot] == 0:
            self.first_token_s[slot] = first_token_s

    def set_in_flight(self, counts: dict[str, int]) -> None:
        """Tokens launched but not reported yet, per request (the rest: none). Set afresh from
        the scheduler's unprocessed batches every iteration, so no count can drift."""
        self.tokens_in_flight[:] = 0
        if counts:
            slot_of = self._slot_of
            slots = np.array([slot_of[r] for r in counts], dtype=np.int64)
            self.tokens_in_flight[slots] = np.fromiter(counts.values(), dtype=np.int64, count=len(counts))

    def prefill_done(self, req_id: str, num_tokens: int, now_s: float) -> None:
        """The prefill produced the first output token: the TBT pace starts now (replacing the
        launch-time estimate)."""
        slot = self._slot_of[req_id]
        if np.isnan(self.first_token_s[slot]) or self.num_output_tokens[slot] == 0:
            self.first_token_s[slot] = now_s
            self.num_output_tokens[slot] = 1
        self.num_tokens[slot] = num_tokens
        if self.phase[slot] != Phase.RUNNING:
            self.set_phase(req_id, Phase.RUNNING, now_s)

    def set_prompt_tokens(self, req_id: str, num_prompt_tokens: int) -> None:
        """A retracted request re-enters the queue and must prefill prompt plus output."""
        self.num_prompt_tokens[self._slot_of[req_id]] = num_prompt_tokens

    def advance(self, req_ids: list[str]) -> None:
        """One decode step produced one token for each of ``req_ids``."""
        slot_of = self._slot_of
        slots = np.array([slot_of[r] for r in req_ids], dtype=np.int64)
        self.num_output_tokens[slots] += 1
        self.num_tokens[slots] += 1

    def set_counts(self, req_id: str, num_tokens: int, num_output_tokens: int) -> None:
        """Resynchronize with the scheduler's own counts (e.g. after a retraction)."""
        slot = self._slot_of[req_id]
        self.num_tokens[slot] = num_tokens
        self.num_output_tokens[slot] = num_output_tokens

    def set_host_tokens(self, req_id: str, num_tokens: int) -> None:
        """How many of a running request's first KV tokens are still valid on the host (a kept
        copy): its next rotate-out moves only the rest."""
        self.host_tokens[self._slot_of[req_id]] = num_tokens

    def out_tokens(self, slots: np.ndarray) -> np.ndarray:
        """Tokens a rotate-out of ``slots`` would copy to the host."""
        return self.num_tokens[slots] - self.host_tokens[slots]

    def next_token_index(self, slots: np.ndarray) -> np.ndarray:
        """Index of the first output token not yet launched: the one a new batch can delay."""
        return np.maximum(self.num_output_tokens[slots] + self.tokens_in_flight[slots], 1)

    # --- queries ------------------------------------------------------------------------------
    def __contains__(self, req_id: str) -> bool:
        return req_id in self._slot_of

    def all_ids(self) -> list[str]:
        return list(self._slot_of)

    def __len__(self) -> int:
        return len(self._slot_of)

    def decode_reservation(self, slots: np.ndarray, ratio: float) -> np.ndarray:
        """Tokens SGLang's admission keeps free for these requests' future output: the
        remaining output (clipped like SGLang's CLIP_MAX_NEW_TOKENS) times ``ratio``."""
        remaining = np.minimum(self.max_new_tokens[slots] - self.num_output_tokens[slots], CLIP_NEW_TOKENS)
        return np.maximum(remaining, 0) * ratio

    def slots_in(self, *phases: Phase) -> np.ndarray:
        mask = self.phase == int(phases[0])
        for p in phases[1:]:
            mask |= self.phase == int(p)
        return np.flatnonzero(mask)

    def slot(self, req_id: str) -> int:
        return self._slot_of[req_id]

    def id_at(self, slot: int) -> str:
        return self._ids[slot]  # type: ignore[return-value]

    def ids(self, slots: np.ndarray) -> list[str]:
        return [self._ids[s] for s in slots.tolist()]  # type: ignore[misc]

    def phase_of(self, req_id: str) -> Phase:
        return Phase(int(self.phase[self._slot_of[req_id]]))

    def view(self, req_id: str) -> ReqView:
        s = self._slot_of[req_id]
        first = float(self.first_token_s[s])
        return ReqView(
            req_id=req_id, phase=Phase(int(self.phase[s])), arrival_s=float(self.arrival_s[s]),
            ttft_slo_s=float(self.ttft_slo_s[s]), tbt_slo_s=float(self.tbt_slo_s[s]),
            num_prompt_tokens=int(self.num_prompt_tokens[s]), num_tokens=int(self.num_tokens[s]),
            num_output_tokens=int(self.num_output_tokens[s]),
            max_new_tokens=int(self.max_new_tokens[s]),
            first_token_s=None if np.isnan(first) else first,
            resident_since_s=float(self.resident_since_s[s]), rotated_at_s=float(self.rotated_at_s[s]),
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
