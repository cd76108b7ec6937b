"""RotaSched: earliest-deadline-first admission with slack-funded rotation.

Each iteration:
1. Rank new requests (TTFT deadline minus prefill time) and rotated-out requests (next-token
   deadline minus swap-in time) in one EDF order; those already late go last (new ones only:
   a late rotated-out request keeps its place so it is never starved).
2. Walk that order while it fits in free device memory: new requests to the queue front,
   rotated ones back in (within the per-step host→device budget; a non-urgent one may not
   eat the proactive reserve).
3. If the head does not fit, rotate out decode requests with the most slack, only those whose
   slack covers their round trip by ``slack_margin``, until the head fits; otherwise keep the
   adaptive free reserve the same way. Never more than one step's worth of device→host bytes.
"""

from __future__ import annotations

import numpy as np

from . import slo
from .base import Policy
from .types import Capacity, Costs, Phase, StepPlan

_WALK_CHUNK = 64  # candidates converted to Python at a time: admission rarely goes deeper


class SloPolicy(Policy):
    def plan(self, now_s: float, cap: Capacity, costs: Costs, max_prefill_tokens: int) -> StepPlan:
        plan = StepPlan()
        cfg = self.config
        reserve = slo.reserve_tokens(costs, cfg.reserve_window_s, cap.total_device_tokens,
                                     cfg.reserve_max_frac)
        used, blocked, blocked_wait_s = self._admit(plan, now_s, cap, costs, max_prefill_tokens, reserve)
        room = cap.free_device_tokens - used
        if blocked is not None:
            deficit, why, wait_s = blocked, "make room for the EDF head", blocked_wait_s
        else:
            deficit, why, wait_s = reserve - room, "keep the free reserve", cfg.reserve_window_s
        if deficit > 0:
            self._rotate_out(plan, deficit, now_s, cap, costs, wait_s, why)
        plan.check()
        return plan

    def _rank(self, now_s: float, cap: Capacity, costs: Costs) -> tuple[np.ndarray, np.ndarray]:
        """Candidate slots in admission order, and each one's EDF key."""
        t = self.table
        cand = t.slots_in(Phase.WAITING, Phase.ON_HOST)
        on_host = t.phase[cand] == Phase.ON_HOST
        host_deadline = slo.next_token_deadline(
            t.first_token_s[cand], t.num_output_tokens[cand], t.tbt_slo_s[cand])
        new_deadline = slo.ttft_deadline(t.arrival_s[cand], t.ttft_slo_s[cand])
        key = np.where(
            on_host,
            host_deadline - slo.transfer_s(t.num_tokens[cand], cap.bytes_per_token, costs.h2d_bytes_per_s),
            new_deadline - t.num_prompt_tokens[cand] * costs.prefill_s_per_token,
        )
        late = (~on_host) & (new_deadline < now_s) if self.config.late_last else np.zeros_like(on_host)
        order = np.lexsort((t.seq[cand], key, late))
        return cand[order], key[order]

    def _admit(self, plan: StepPlan, now_s: float, cap: Capacity, costs: Costs,
               max_prefill_tokens: int, reserve: int) -> tuple[int, int | None, float]:
        """Fill ``plan.admit``/``plan.rotate_in``. Returns (tokens used, deficit of the blocked
        head or None, how long a victim would wait for that head)."""
        t = self.table
        order, key = self._rank(now_s, cap, costs)
        free = cap.free_device_tokens
        h2d_budget = int(costs.h2d_bytes_per_s * costs.decode_step_s / cap.bytes_per_token)
        urgent_before = now_s + 2 * costs.decode_step_s
        used = prefill = h2d = 0
        for start in range(0, len(order), _WALK_CHUNK):
            chunk = order[start:start + _WALK_CHUNK].tolist()
            for i, s in enumerate(chunk):
                req_id = t.id_at(s)
                if t.phase[s] == Phase.ON_HOST:
                    need = int(t.num_tokens[s])
                    urgent = key[start + i] <= urgent_before
                    room = free - used - (0 if urgent else reserve)
                    if need > room:
                        return used, need - room, costs.decode_step_s
                    if h2d + need > h2d_budget and plan.rotate_in:
                        return used, None, 0.0  # budget spent this step; order kept
                    plan.rotate_in.append(req_id)
                    plan.reasons[req_id] = "urgent rotate-in" if urgent else "rotate-in"
                    used += need
                    h2d += need
                else:
                    need = int(t.num_prompt_tokens[s])
                    if need > free - used:
                        plan.admit.append(req_id)  # first in line, so nobody overtakes it
                        plan.reasons[req_id] = "EDF head, blocked"
                        return used, need - (free - used), need * costs.prefill_s_per_token
                    if prefill + need > max_prefill_tokens and plan.admit:
                        return used, None, 0.0
                    plan.admit.append(req_id)
                    plan.reasons[req_id] = "admit"
                    used += need
                    prefill += need
        return used, None, 0.0

    def _rotate_out(self, plan: StepPlan, deficit: int, now_s: float, cap: Capacity, costs: Costs,
                    wait_s: float, why: str) -> None:
        """Pick victims with the most slack until ``deficit`` tokens are freed (or none at all if
        the eligible victims cannot cover it: a partial rotation would only waste bandwidth)."""
        t = self.table
        run = t.slots_in(Phase.RUNNING)
        run = run[~np.isnan(t.first_token_s[run])]
        if run.size == 0:
            return
        tokens = t.num_tokens[run]
        deadline = slo.next_token_deadline(t.first_token_s[run], t.num_output_tokens[run], t.tbt_slo_s[run])
        slack = slo.slack_s(deadline, now_s, costs)
        need_slack = self.config.slack_margin * slo.round_trip_s(tokens, cap.bytes_per_token, costs, wait_s)
        ok = slack >= need_slack
        run, tokens, slack = run[ok], tokens[ok], slack[ok]
        order = np.lexsort((t.seq[run], -slack))
        freed = np.cumsum(tokens[order])
        if freed.size == 0 or freed[-1] < deficit:
            return
        d2h_budget = max(int(costs.d2h_bytes_per_s * costs.decode_step_s / cap.bytes_per_token), 1)
        limit = min(cap.free_host_tokens, max(d2h_budget, int(freed[0])))
        take = min(int(np.searchsorted(freed, deficit)) + 1, int(np.searchsorted(freed, limit, side="right")))
        for req_id in t.ids(run[order[:take]]):
            plan.rotate_out.append(req_id)
            plan.reasons[req_id] = f"rotate out: {why}"
