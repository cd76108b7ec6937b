"""LVF: the reference code's rule, reproduced for ablation (no SLO arithmetic at all).

- Trigger: the next step of every running request plus the whole prompt of every waiting
  request does not fit, and free memory is below the fixed budget B, and the host tier is
  under 95% full.
- Victims: decode requests, longest resident on the device first, while the freed tokens stay
  below B.
- Queue: one FIFO of new requests (by arrival) and rotated-out ones (by rotation time); new
  prompts wait while the host tier is over 90% full; admission stops at the first misfit.
"""

from __future__ import annotations

import numpy as np

from .base import Policy
from .types import Phase, StepPlan, StepSnapshot


class LvfPolicy(Policy):
    def plan(self, snapshot: StepSnapshot) -> StepPlan:
        cap, max_prefill_tokens = snapshot.capacity, snapshot.max_prefill_tokens
        plan = StepPlan()
        t = self._table
        away = t.rows_in(Phase.ON_HOST, Phase.ROTATING_OUT)
        host_total = cap.free_host_tokens + int(t.num_tokens[away].sum())
        host_used_frac = 1.0 - cap.free_host_tokens / host_total if host_total else 1.0
        running = t.rows_in(Phase.RUNNING)
        resident = t.rows_in(Phase.RUNNING, Phase.PREFILLING)
        reserved = int(t.decode_reservation(resident, cap.new_token_ratio,
                                            cap.fixed_length_ratio).sum())
        free = cap.available_device_tokens - reserved
        self._fifo(plan, free, host_used_frac > 0.90, max_prefill_tokens)
        waiting = t.rows_in(Phase.WAITING)
        demand = running.size + int(t.num_prompt_tokens[waiting].sum())
        budget = self.config.lvf_budget_tokens
        wants_room = demand > free and free < budget
        plan.host_full = wants_room and host_used_frac >= 0.95
        if wants_room and not plan.host_full:
            decode = running[~np.isnan(t.first_token_s[running])
                             & (t.max_new_tokens[running] - t.num_output_tokens[running] > 2)]
            order = np.lexsort((t.seq[decode], t.resident_since_s[decode]))
            freed = 0
            for s in decode[order].tolist():
                n = int(t.num_tokens[s])
                if freed + n > budget:
                    break
                if freed + n > cap.free_host_tokens:
                    plan.host_full = True
                    break
                req_id = t.id_at(s)
                plan.rotate_out.append(req_id)
                plan.reasons[req_id] = "lvf: longest resident"
                freed += n
        plan.check()
        return plan

    def _fifo(self, plan: StepPlan, free: int, defer_new: bool, max_prefill_tokens: int) -> None:
        t = self._table
        cand = t.rows_in(Phase.WAITING, Phase.ON_HOST)
        on_host = t.phase[cand] == Phase.ON_HOST
        key = np.where(on_host, t.rotated_at_s[cand], t.arrival_s[cand])
        used = prefill = 0
        for s in cand[np.lexsort((t.seq[cand], key))].tolist():
            req_id = t.id_at(s)
            if t.phase[s] == Phase.ON_HOST:
                need = int(t.num_tokens[s])
                if need > free - used:
                    return
                plan.rotate_in.append(req_id)
            else:
                if defer_new:
                    continue
                need = int(t.num_prompt_tokens[s])
                plan.admit.append(req_id)
                if need > free - used or prefill + need > max_prefill_tokens:
                    return
                prefill += need
            plan.reasons[req_id] = "lvf: fifo"
            used += need
