"""RotaSched: earliest-deadline-first admission with slack-funded rotation.

Each iteration:
1. Rank new requests (TTFT deadline minus prefill time: their latest start) and rotated-out
   requests (next-token deadline minus swap-in time) in one EDF order; new ones past their
   latest start go last (a late rotated-out request keeps its place so it is never starved),
   and so do the fewest with the longest prefills where the GPU cannot prefill every waiting
   request by its deadline (``_served_late``).
2. Walk that order while it fits in free device memory: new requests to the queue front,
   urgent rotated ones (within ``deadlines.make_room_lag_s`` of their key) back in, within the
   host→device budget. Rotated ones not urgent yet wait for room left over once everything
   ranked fits (never the proactive reserve); they never make room.
3. If the head does not fit, rotate out decode requests with the most slack, only those whose
   slack covers their round trip by ``slack_margin``, until the head fits; otherwise keep the
   adaptive free reserve the same way. Never more than ``link_share`` of the link's bytes
   over the time since the last plan (rotation costs the model SM time; see
   RotaConfig.link_share): a long prefill batch leaves room for more than a decode step.
   Rotations that admit new work (not an urgent return) stop where the resident streams
   could no longer earn the slack the streams on the host spend, with ``away_margin`` to spare
   (``deadlines.slack_gain``, ``deadlines.max_extra_away``), and keep one stream's KV free on
   the host for swaps. If no room can be made for a new head, urgent returns behind it still
   swap in, and streams on the host come back early into the free room it leaves idle (keeping
   the reserve) while it waits: a stream decodes only on the device.
   Bytes move only when they buy something: not when streams finishing in time free the room
   anyway, for the head and for every waiting request behind it that can still make its TTFT,
   each by its latest start (streams finishing before the head must start are no victims
   either); for a head already past its latest start (only late requests wait then), not when
   finishing streams free its room within ``late_wait_slos`` of its TTFT SLOs; and not for
   new work at all while compute binds (``policy.binding``: new work waits for the GPU, so
   room made for it would only cost link time and decode steps).
4. Bound this step's prefill tokens by the least slack of the resident streams and of the
   rotated-out ones up to their urgency point (none left, or a stream behind pace: decode
   first); the head's whole first batch must fit, since SGLang runs chunks back to back.
   A bound short of the batch the queue would fill waits for decode steps instead, while
   they earn the slack for the whole batch in time for the waiting requests that can still
   make their TTFT: each cut pays the prefill's fixed cost again. Where compute binds and
   requests are late already, the batch is the whole queue's, and requests that could make
   their TTFT only in smaller batches are served late: throughput first, since the GPU is
   what everyone waits for. For the same reason, where compute binds pacing runs only while
   its cost (decode steps ahead of a runnable prefill, batches cut short) stays within
   ``pacing_cost_share`` of the elapsed time.

Memory is counted the way SGLang's PrefillAdder counts it: a running request holds its KV plus
``new_token_ratio`` × its remaining output (``fixed_length_ratio`` × it for a fixed-length one,
where the adapter sets it); a new request needs its prompt plus its whole (clipped) output budget.
"""

from __future__ import annotations

import numpy as np

from ..config import RotaConfig
from . import deadlines
from .base import Policy
from .late import fewest_late
from .pacing import PrefillPacer
from .table import CLIP_NEW_TOKENS
from .types import Capacity, Costs, Phase, StepPlan, StepSnapshot

_WALK_DEPTH = 64  # candidates ranked per pass: admission rarely goes deeper
_ON_HOST = int(Phase.ON_HOST)  # plain int: compared per candidate in the walk
_LATE = 1e12  # added to the key of a request that can no longer make its TTFT (late_last)
_LINK_WINDOW_MAX_S = 0.1  # unused link time carried over between plans at most (burst bound)
_Queue = tuple[np.ndarray, np.ndarray]  # ranked candidate rows and their EDF keys


class SloPolicy(Policy):
    _last_plan_s: float | None = None

    def __init__(self, config: RotaConfig) -> None:
        super().__init__(config)
        self.pacer = PrefillPacer(config, self._table)

    def _since_last_plan_s(self, now_s: float) -> float | None:
        """Seconds since the last plan (None for the first), and this plan is the last now."""
        last, self._last_plan_s = self._last_plan_s, now_s
        return None if last is None else max(now_s - last, 0.0)

    @staticmethod
    def _link_window_s(since_s: float | None, costs: Costs) -> float:
        """Seconds of link time this plan may spend a share of: since the last plan, at least
        a decode step, at most _LINK_WINDOW_MAX_S."""
        since = costs.decode_step_s if since_s is None else since_s
        return min(max(since, costs.decode_step_s), max(_LINK_WINDOW_MAX_S, costs.decode_step_s))

    def _link_tokens(self, bytes_per_s: float, window_s: float, cap: Capacity) -> int:
        """KV tokens one direction may move in this plan: ``link_share`` of the window."""
        return deadlines.link_tokens(self.config.link_share, bytes_per_s, window_s,
                                     cap.bytes_per_token)

    def plan(self, snapshot: StepSnapshot) -> StepPlan:
        now_s, cap, costs = snapshot.now_s, snapshot.capacity, snapshot.costs
        max_prefill_tokens, gpu_free_at_s = snapshot.max_prefill_tokens, snapshot.gpu_free_at_s
        plan = StepPlan()
        cfg = self.config
        t = self._table
        resident = t.rows_in(Phase.RUNNING, Phase.PREFILLING, Phase.ROTATING_IN)
        leaving = t.rows_in(Phase.ROTATING_OUT)
        # KV on its way out is as good as free: counting it again as a deficit next step would
        # pick new victims for room that is already coming (one step or more: the copy waits
        # for the forward in flight).
        free = (cap.available_device_tokens + int(t.num_tokens[leaving].sum())
                - int(t.decode_reservation(resident, cap.new_token_ratio,
                                           cap.fixed_length_ratio).sum()))
        since_s = self._since_last_plan_s(now_s)
        budget = None
        room = 0  # prefill tokens free memory and the batch limit allow (when paced)
        compute_bound = snapshot.bound == "compute"
        late = self._chosen_late(now_s, costs)  # one choice for the ranking and for pacing
        if cfg.prefill_pacing and self.pacer.affordable(since_s, compute_bound, costs):
            start_s = max(now_s, gpu_free_at_s or now_s)
            room = min(max_prefill_tokens, max(free, 0))
            budget = self.pacer.budget(
                start_s, cap.bytes_per_token, costs, room, free,
                lambda: self.pacer.batch_wanted(now_s, room, costs, compute_bound, late))
        reserve = deadlines.reserve_tokens(costs, cfg.reserve_window_s, cap.total_device_tokens,
                                     cfg.reserve_max_frac)
        window = self._link_window_s(since_s, costs)
        batch_limit = (max_prefill_tokens if budget is None
                       else min(max_prefill_tokens, max(budget, 1)))
        used, deficit, wait_s, urgent, queue = self._admit(plan, now_s, free, cap, costs,
                                                           batch_limit, reserve, window, late)
        if budget and plan.admit:
            # SGLang chunks a prompt longer than its chunk limit and then runs every chunk
            # back to back, decode waiting: so the head's whole first batch must fit, or a
            # decode step comes first (each adds a TBT minus a step to every stream's slack).
            head = min(int(t.num_prompt_tokens[t.row(plan.admit[0])]), max_prefill_tokens)
            if head > budget:
                budget = 0
        if compute_bound and plan.admit and budget is not None:
            self.pacer.charge(budget, room, costs)
        plan.prefill_token_budget = budget
        blocked_new = deficit is not None and not urgent
        why = "bring back an urgent stream" if urgent else "make room for the EDF head"
        plan.room_needed = blocked_new
        needed_by_s: float | None = None  # when the room must be there (None: now)
        if blocked_new:
            needed_by_s = self._latest_start_s(plan.admit[-1], costs)
            if needed_by_s < now_s:  # late: no request that can make its TTFT waits
                needed_by_s = now_s + cfg.late_wait_slos * self._ttft_slo_s(plan.admit[-1])
                queue = None  # nobody behind it can make theirs: its own room is the test
        elif deficit is None:
            deficit, wait_s = reserve - (free - used), cfg.reserve_window_s
            needed_by_s = now_s + wait_s
            why = "keep the free reserve"
        held_by = None
        if needed_by_s is not None and deficit > 0 and (
                compute_bound
                or (self._room_comes_in_time(queue, free - used, now_s, cap, costs)
                    if queue is not None
                    else self._freed_by(needed_by_s, now_s, cap, costs) >= deficit)):
            # Moving bytes would buy nothing: the GPU, not memory, holds new work back; or the
            # room comes in time anyway.
            deficit = 0
            held_by = "compute" if compute_bound else "room_comes"
        if deficit > 0:
            held_by = self._rotate_out(plan, deficit, now_s, cap, costs, wait_s, why, window,
                                       grows_away=not urgent, keep_until_s=needed_by_s)
        plan.head_blocked = blocked_new and not plan.rotate_out
        if plan.head_blocked:
            plan.held_by = held_by
            # The new head waits (no room can be made for it now), but a rotated-out stream due
            # now must not wait behind it: it can still swap with a resident that has slack.
            self._returns_past_head(plan, now_s, free - used, reserve, cap, costs, window)
        plan.check()
        return plan

    def _rank(self, now_s: float, cap: Capacity, costs: Costs, depth: int,
              late: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The first ``depth`` candidate rows in admission order, and their EDF keys (the rows
        ``late``, chosen to go late, rank behind every request that can still make its TTFT).

        Only the head of the order is ever walked, so it is selected in O(n) with
        ``argpartition`` and only that part is sorted (ties by arrival order, so every TP rank
        gets the same order)."""
        t = self._table
        cand = t.rows_in(Phase.WAITING, Phase.ON_HOST)
        on_host = t.phase[cand] == Phase.ON_HOST
        new_deadline = deadlines.ttft_deadline(t.arrival_s[cand], t.ttft_slo_s[cand])
        key = np.where(on_host, self._return_key(cand, cap, costs),
                       new_deadline - costs.prefill_s(t.num_prompt_tokens[cand]))
        if self.config.late_last:
            # A new request's key is its latest start: past it, its first token comes late
            # whatever happens now, and at the head it would block those behind it that can
            # still make it.
            past = (~on_host) & (key < now_s)
            if late.size:
                past |= np.isin(cand, late)
            key = key + np.where(past, _LATE, 0.0)
        if depth < len(cand):
            head = np.argpartition(key, depth)[:depth]
            cand, key = cand[head], key[head]
        order = np.lexsort((t.seq[cand], key))
        return cand[order], key[order]

    def _chosen_late(self, now_s: float, costs: Costs) -> np.ndarray:
        """The waiting rows that can still make their TTFT alone but go late so that the most
        make theirs (``_served_late``)."""
        t = self._table
        rows = t.rows_in(Phase.WAITING)
        if not (self.config.late_last and self.config.fewest_late):
            return rows[:0]
        latest_s = (deadlines.ttft_deadline(t.arrival_s[rows], t.ttft_slo_s[rows])
                    - costs.prefill_s(t.num_prompt_tokens[rows]))
        rows = rows[latest_s >= now_s]
        return rows[self._served_late(rows, now_s, costs)]

    def _served_late(self, rows: np.ndarray, now_s: float, costs: Costs) -> np.ndarray:
        """Which of these waiting requests (each can still make its TTFT alone) go late so that
        the most of them make it (``late.fewest_late``). Prefill gets the GPU time the decoding
        streams' pace leaves it, and no batch's fixed cost but the first is counted (the test
        errs toward keeping requests on time)."""
        t = self._table
        work = t.num_prompt_tokens[rows] * costs.prefill_s_per_token
        streams = t.rows_in(Phase.RUNNING)
        if streams.size:  # their pace takes a decode step per TBT: prefill gets the rest
            work = work / deadlines.prefill_time_share(costs.decode_step_s,
                                                       float(t.tbt_slo_s[streams].min()))
        deadline = deadlines.ttft_deadline(t.arrival_s[rows], t.ttft_slo_s[rows])
        return fewest_late(deadline, t.seq[rows], work, now_s + costs.prefill_overhead_s)

    def _admit(self, plan: StepPlan, now_s: float, free: int, cap: Capacity, costs: Costs,
               max_prefill_tokens: int, reserve: int, window_s: float,
               late: np.ndarray) -> tuple[int, int | None, float, bool, _Queue | None]:
        """Fill ``plan.admit``/``plan.rotate_in``. Returns (tokens used, deficit of the blocked
        head or None, how long a victim would wait for that head, whether the head is a
        rotated-out stream that must come back now, and for a blocked new head the ranked
        candidates from it on with their keys). ``late``: the rows the fewest-late choice puts
        behind (``_rank``).

        New requests and urgent returns go in EDF order. A rotated-out stream that is not
        urgent yet yields to both and only takes room left once everything ranked fits:
        taking it earlier blocks a newcomer, whose room then comes from a rotation, and the
        two swap again and again (seen in eval/sim_policy.py on the code trace)."""
        t = self._table
        depth = _WALK_DEPTH
        order, key = self._rank(now_s, cap, costs, depth, late)
        h2d_budget = self._link_tokens(costs.h2d_bytes_per_s, window_s, cap)
        used = prefill = h2d = 0
        walked: set[int] = set()
        deferred: list[int] = []
        while True:
            # From the decision to its token, a rotated-out request that must make room waits for
            # the victims' copy (behind the forward in flight), its own copy, its decode step.
            urgent_lag = deadlines.make_room_lag_s(t.num_tokens[order], cap.bytes_per_token, costs)
            for i, s in enumerate(order.tolist()):
                # A deeper ranking need not keep the last one as its prefix (equal keys across
                # the cut): skip what this walk has taken or passed over already.
                if s in walked:
                    continue
                walked.add(s)
                req_id = t.id_at(s)
                if t.phase[s] == _ON_HOST:
                    if key[i] > now_s + urgent_lag[i]:
                        deferred.append(s)
                        continue
                    need = self._return_need(s, cap)
                    if need > free - used:
                        return used, need - (free - used), costs.decode_step_s, True, None
                    if h2d + t.num_tokens[s] > h2d_budget and plan.rotate_in:
                        return used, None, 0.0, False, None  # budget spent; order kept
                    h2d += self._take_return(plan, s, "urgent rotate-in")
                else:
                    prompt = int(t.num_prompt_tokens[s])
                    need = prompt + int(min(t.max_new_tokens[s], CLIP_NEW_TOKENS))
                    if need > free - used:
                        plan.admit.append(req_id)  # first in line, so nobody overtakes it
                        plan.reasons[req_id] = "EDF head, blocked"
                        return (used, need - (free - used), costs.prefill_s(prompt), False,
                                (order[i:], key[i:]))
                    if prefill + prompt > max_prefill_tokens and plan.admit:
                        return used, None, 0.0, False, None
                    plan.admit.append(req_id)
                    plan.reasons[req_id] = "admit"
                    prefill += prompt
                used += need
            if len(order) < depth:
                break
            depth *= 4  # everything ranked so far fit: look deeper
            order, key = self._rank(now_s, cap, costs, depth, late)
        for s in deferred:  # room to spare: bring streams back early, never past the reserve
            need = self._return_need(s, cap)
            if (need > free - used - reserve
                    or (h2d + t.num_tokens[s] > h2d_budget and plan.rotate_in)):
                break
            h2d += self._take_return(plan, s, "rotate-in")
            used += need
        return used, None, 0.0, False, None

    def _returns_past_head(self, plan: StepPlan, now_s: float, room: int, reserve: int,
                           cap: Capacity, costs: Costs, window_s: float) -> None:
        """Bring back streams on the host past a blocked new head. ``room``: the free device
        tokens the walk left (its own returns already counted).

        First those due now, in deadline order, making room for the first that does not fit:
        the walk stopped at the head before reaching them. Then, if no room had to be made
        (``early_returns``), the others ahead of their deadlines, first fit in deadline order
        into the room the head leaves idle, keeping the free reserve: on the device they
        decode and earn slack for the next rotation; left on the host while the head waited,
        they cost a loaded GPU whose time goes to decoding up to 5% of its throughput
        (eval/README.md, "Early returns")."""
        t = self._table
        away = t.rows_in(Phase.ON_HOST)
        # The walk's own returns (a few, not all away): left out here, their tokens already move.
        coming = np.array([t.row(r) for r in plan.rotate_in], dtype=away.dtype)
        away = away[~np.isin(away, coming)]
        if away.size == 0:
            return
        key = self._return_key(away, cap, costs)
        order = np.lexsort((t.seq[away], key))
        away, key = away[order], key[order]
        due = key <= now_s + deadlines.make_room_lag_s(t.num_tokens[away], cap.bytes_per_token,
                                                       costs)
        h2d_budget = self._link_tokens(costs.h2d_bytes_per_s, window_s, cap)
        h2d = int(t.num_tokens[coming].sum())
        for s in away[due].tolist():
            need = self._return_need(s, cap)
            if need > room:
                self._rotate_out(plan, need - room, now_s, cap, costs, costs.decode_step_s,
                                 "bring back an urgent stream", window_s, grows_away=False)
                return
            if h2d + t.num_tokens[s] > h2d_budget and plan.rotate_in:
                return
            h2d += self._take_return(plan, s, "urgent rotate-in")
            room -= need
        if not self.config.early_returns:
            return
        for s in away[~due].tolist():
            need = self._return_need(s, cap)
            if need > room - reserve:
                continue  # a later one may fit: this one comes back when due, made room for
            if h2d + t.num_tokens[s] > h2d_budget and plan.rotate_in:
                return
            h2d += self._take_return(plan, s, "rotate-in: room the blocked head leaves idle")
            room -= need

    def _return_key(self, rows: np.ndarray, cap: Capacity, costs: Costs) -> np.ndarray:
        """EDF key of rotated-out streams: the next token's deadline minus the copy back."""
        t = self._table
        deadline = deadlines.next_token_deadline(t.first_token_s[rows], t.next_token_index(rows),
                                                 t.tbt_slo_s[rows])
        return deadline - deadlines.transfer_s(t.num_tokens[rows], cap.bytes_per_token,
                                               costs.h2d_bytes_per_s)

    def _take_return(self, plan: StepPlan, row: int, why: str) -> int:
        """Plan a rotated-out stream's return; returns the tokens it moves host→device."""
        req_id = self._table.id_at(row)
        plan.rotate_in.append(req_id)
        plan.reasons[req_id] = why
        return int(self._table.num_tokens[row])

    def _return_need(self, row: int, cap: Capacity) -> int:
        """Device tokens a rotated-out stream takes back: its KV and SGLang's reservation."""
        t = self._table
        reserve = t.decode_reservation(np.array([row]), cap.new_token_ratio, cap.fixed_length_ratio)
        return int(t.num_tokens[row]) + int(reserve[0])

    def _ttft_slo_s(self, req_id: str) -> float:
        return float(self._table.ttft_slo_s[self._table.row(req_id)])

    def _latest_start_s(self, req_id: str, costs: Costs) -> float:
        """When a waiting request's prefill must start to make its TTFT deadline."""
        t = self._table
        row = t.row(req_id)
        return float(deadlines.ttft_deadline(t.arrival_s[row], t.ttft_slo_s[row])
                     - costs.prefill_s(float(t.num_prompt_tokens[row])))

    def _finish_s(self, rows: np.ndarray, now_s: float, costs: Costs) -> np.ndarray:
        """When these decoding streams should be done, from their remaining output (an upper
        bound for a stream that may stop early at an end-of-sequence token)."""
        t = self._table
        remaining = t.max_new_tokens[rows] - t.num_output_tokens[rows] - t.tokens_in_flight[rows]
        return deadlines.finish_s(np.maximum(remaining, 0), now_s, costs)

    def _freed_by(self, by_s: float, now_s: float, cap: Capacity, costs: Costs) -> int:
        """Device tokens the resident decoding streams free by finishing before ``by_s``."""
        finish_s, freed = self._frees_over_time(now_s, cap, costs)
        return int(freed[np.searchsorted(finish_s, by_s, side="right")])

    def _frees_over_time(self, now_s: float, cap: Capacity,
                         costs: Costs) -> tuple[np.ndarray, np.ndarray]:
        """When the resident decoding streams finish (ascending) and the device tokens freed
        by then: ``freed[searchsorted(finish_s, t, "right")]`` is what is free by ``t``."""
        t = self._table
        run = t.rows_in(Phase.RUNNING)
        run = run[~np.isnan(t.first_token_s[run])]
        finish_s = self._finish_s(run, now_s, costs)
        frees = t.num_tokens[run] + t.decode_reservation(run, cap.new_token_ratio,
                                                         cap.fixed_length_ratio)
        order = np.argsort(finish_s, kind="stable")
        return finish_s[order], np.concatenate(([0], np.cumsum(frees[order])))

    def _room_comes_in_time(self, queue: _Queue, room: int, now_s: float, cap: Capacity,
                            costs: Costs) -> bool:
        """Whether streams finishing free the room of the blocked EDF head and of every waiting
        request ranked behind it (``queue``: the walk's candidates from the head on, and their
        keys) that can still make its TTFT, each by its latest start: only then does a rotation
        buy nothing. (The head's room alone was not enough: a burst queued behind a head that
        waited for finishes, and the requests behind it were then left without the time a
        rotation takes.)"""
        t = self._table
        rows, key = queue
        # waiting requests that can still make it (late ones carry _LATE in their key)
        new = (t.phase[rows] == Phase.WAITING) & (key >= now_s) & (key < now_s + _LATE / 2)
        new[0] = True  # the head, by the caller's own test
        rows, latest_s = rows[new], key[new]
        demand = np.cumsum(t.num_prompt_tokens[rows]
                           + np.minimum(t.max_new_tokens[rows], CLIP_NEW_TOKENS))
        finish_s, freed = self._frees_over_time(now_s, cap, costs)
        return bool(np.all(demand <= room + freed[np.searchsorted(finish_s, latest_s,
                                                                    side="right")]))

    def _rotate_out(self, plan: StepPlan, deficit: int, now_s: float, cap: Capacity, costs: Costs,
                    wait_s: float, why: str, window_s: float, grows_away: bool,
                    keep_until_s: float | None = None) -> str | None:
        """Pick victims with the most slack until ``deficit`` tokens are freed (or none at all if
        the eligible victims cannot cover it: a partial rotation would only waste bandwidth).
        ``grows_away``: the room is for new work, so the streams away from the device grow in
        number: ``_away_room`` bounds them, and one stream's KV stays free on the host.
        Streams that finish by ``keep_until_s`` are no victims: their room comes anyway.
        Returns why nobody was picked (a HELD_BY reason), None if somebody was."""
        t = self._table
        run = t.rows_in(Phase.RUNNING)
        if run.size == 0:
            return "no_victims"
        largest = int(t.num_tokens[run].max())
        # Decoding, and not about to finish: a request that finishes in the step in flight
        # is released by SGLang itself.
        run = run[~np.isnan(t.first_token_s[run])
                  & (t.max_new_tokens[run] - t.num_output_tokens[run] > 2)]
        if keep_until_s is not None:
            run = run[self._finish_s(run, now_s, costs) > keep_until_s]
        if run.size == 0:
            return "no_victims"
        tokens, out = t.num_tokens[run], t.out_tokens(run)
        deadline = deadlines.next_token_deadline(t.first_token_s[run], t.next_token_index(run),
                                                 t.tbt_slo_s[run])
        slack = deadlines.slack_s(deadline, now_s, costs)
        # Enough for the round trip (with margin) and, since its return may need room made in
        # turn, the lead time of an urgent return.
        need_slack = (self.config.slack_margin
                      * deadlines.round_trip_s(tokens, cap.bytes_per_token, costs, wait_s,
                                               out_tokens=out)
                      + deadlines.make_room_lag_s(tokens, cap.bytes_per_token, costs))
        ok = slack >= need_slack
        run, tokens, out, slack = run[ok], tokens[ok], out[ok], slack[ok]
        frees = tokens + t.decode_reservation(run, cap.new_token_ratio, cap.fixed_length_ratio)
        if frees.sum() < deficit:
            return "no_victims"
        if len(run) > _WALK_DEPTH:  # most-slack head first: usually covers the deficit
            head = np.argpartition(-slack, _WALK_DEPTH)[:_WALK_DEPTH]
            if frees[head].sum() >= deficit:
                run, out, slack, frees = run[head], out[head], slack[head], frees[head]
        order = np.lexsort((t.seq[run], -slack))
        run, out = run[order], out[order]
        freed = np.cumsum(frees[order])
        d2h_budget = max(self._link_tokens(costs.d2h_bytes_per_s, window_s, cap), 1)
        moved = np.cumsum(out)  # copied to the host: what a kept host copy lacks
        host_room = cap.free_host_tokens
        if grows_away:
            # Keep room on the host for one more stream: a return that must make room swaps
            # with a resident, whose copy lands before the returning one's host pages are free.
            host_room -= largest
        fits = (moved <= max(d2h_budget, int(moved[0]))) & (moved <= host_room)
        need = int(np.searchsorted(freed, deficit)) + 1
        take = min(need, int(fits.sum()))
        plan.host_full = bool(np.any(moved[:need] > host_room))
        if grows_away and take > self._away_room(costs):
            return "away_bound"  # the streams on the host could not all come back on time
        if take == 0:
            return "host_full"  # the first victim's copy alone is more than the host has free
        for req_id in t.ids(run[:take]):
            plan.rotate_out.append(req_id)
            plan.reasons[req_id] = f"rotate out: {why}"
        return None

    def _away_room(self, costs: Costs) -> int:
        """How many more decoding streams may leave the device to make room for new work."""
        t = self._table
        resident = t.rows_in(Phase.RUNNING)
        resident = resident[~np.isnan(t.first_token_s[resident])]
        away = len(t.rows_in(Phase.ROTATING_OUT, Phase.ON_HOST, Phase.ROTATING_IN))
        if resident.size == 0:
            return 0
        gain = deadlines.slack_gain(float(t.tbt_slo_s[resident].min()), costs.decode_step_s,
                                    deadlines.prefill_share(costs))
        return deadlines.max_extra_away(len(resident), away, gain / self.config.away_margin)
