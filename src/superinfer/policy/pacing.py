"""Prefill pacing: how many prompt tokens this step may prefill without making a decoding
stream miss its next-token deadline (RotaSched's rule 4; ``slo.py`` docstring).

Kept apart from admission and rotation because it answers a different question (how big a
batch, not whom) and carries its own state: the GPU time pacing may still cost where compute
binds.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..config import RotaConfig
from . import deadlines
from .table import RequestTable
from .types import Costs, Phase

CREDIT_MAX_S = 0.5  # pacing's cost credit at most: a burst of paced steps, not a backlog
_ROUNDING = 1 - 1e-9  # a credit of a step summed from parts is still a step


class PrefillPacer:
    def __init__(self, config: RotaConfig, table: RequestTable) -> None:
        self.config = config
        self._table = table
        self.credit_s = CREDIT_MAX_S  # GPU seconds pacing may still cost

    def affordable(self, since_s: float | None, compute_bound: bool, costs: Costs) -> bool:
        """Top up pacing's credit for the ``since_s`` seconds since the last plan, and say
        whether this step's prefill may be paced. Pacing is free unless compute binds; then
        what it costs in GPU time (``charge``) is paid from a credit that grows by
        ``pacing_cost_share`` of the elapsed time (up to CREDIT_MAX_S). Without credit,
        prefill runs unpaced and the decoding streams' TBT is served late: throughput first,
        since the GPU is what everyone waits for."""
        if since_s is not None:
            self.credit_s = min(self.credit_s + self.config.pacing_cost_share * since_s,
                                CREDIT_MAX_S)
        return not compute_bound or self.credit_s >= costs.decode_step_s * _ROUNDING

    def charge(self, budget: int, room: int, costs: Costs) -> None:
        """Pay for what pacing did to a runnable prefill where compute binds: a decode step
        ahead of it (budget 0), or a batch cut short of what the queue would fill in ``room``
        (the rest pays a forward's fixed cost again)."""
        if budget == 0:
            self.credit_s -= costs.decode_step_s
            return
        waiting = self._table.rows_in(Phase.WAITING)
        if budget < min(room, int(self._table.num_prompt_tokens[waiting].sum())):
            self.credit_s -= costs.prefill_overhead_s

    def batch_wanted(self, now_s: float, room: int, costs: Costs, compute_bound: bool,
                     late: np.ndarray) -> tuple[int, float | None]:
        """The prefill batch worth waiting for (its tokens, at most ``room``: free memory and
        the batch limit), and by when it must start (None: no waiting request can still make
        its TTFT). Every first token in a batch comes when the whole batch ends.

        Where compute binds and requests already wait past their latest start (the GPU is
        behind), throughput comes first: the batch is the one the whole queue fills, and a
        request that could make its TTFT only in a smaller batch is served late (smaller
        batches pay the prefill's fixed cost more often, so the queue behind them grows
        faster). Otherwise the batch holds the requests that can still make their TTFT and
        are not among those the fewest-late choice puts ``late``."""
        t = self._table
        waiting = t.rows_in(Phase.WAITING)
        prompts = t.num_prompt_tokens[waiting]
        deadline = deadlines.ttft_deadline(t.arrival_s[waiting], t.ttft_slo_s[waiting])
        whole = min(int(prompts.sum()), room)
        on_time = deadline - costs.prefill_s(prompts) >= now_s
        if late.size:
            on_time &= ~np.isin(waiting, late)
        if not on_time.any():
            return whole, None
        if compute_bound and not on_time.all():
            latest = deadline - costs.prefill_s(whole)
            latest = latest[latest >= now_s]
            return whole, float(latest.min()) if latest.size else None
        tokens = min(int(prompts[on_time].sum()), room)
        return tokens, float(deadline[on_time].min() - costs.prefill_s(tokens))

    def budget(self, start_s: float, bpt: int, costs: Costs, most_tokens: int, free: int,
               wanted: Callable[[], tuple[int, float | None]]) -> int | None:
        """Prefill tokens that fit in the least slack of the decoding streams. A prefill batch
        delays every decode step behind it; past this many tokens a stream's next token would
        come after its deadline. 0 means: decode first. A stream already behind its pace
        counts as no slack: only decode steps (each shorter than its TBT) let it catch up.
        (Letting prefill run unbounded once every stream was behind stalled all of them, and
        they never caught up.) A stream whose TBT the decode step nearly fills
        (``pacing_step_share``) does not count: steps earn it too little slack to pay for any
        prefill worth waiting for. Nor does one whose TBT the step will not hold once the
        waiting requests that fit ``free`` tokens have joined (``_tbt_above_joined_step``): pacing
        would only postpone that, and the queue's TTFT would pay for it.

        The batch starts at ``start_s`` (when the GPU is done with the batches in flight), and
        it can only delay tokens not launched yet, so a stream whose prefill is in flight
        counts from its expected first token: its second token is the one at risk.

        A budget short of the batch the queue would fill (``wanted()``, at most
        ``most_tokens``; only asked for when the budget is short of that) waits for decode steps
        instead, as long as they earn the resident streams the slack for the whole batch
        before a waiting request that can still make its TTFT must start: each batch pays
        the prefill's fixed cost once, and cutting the queue into the chunks the slack allows
        at once paid it over and over (throughput lost where compute binds), while the decode
        steps in between produce tokens that were due anyway."""
        t = self._table
        run = t.rows_in(Phase.RUNNING, Phase.PREFILLING, Phase.ROTATING_IN, Phase.ON_HOST)
        run = run[~np.isnan(t.first_token_s[run])]
        tbt = t.tbt_slo_s[run]
        paced_for = tbt * self.config.pacing_step_share > costs.decode_step_s
        if costs.decode_profile is not None and run.size:
            paced_for &= self._tbt_above_joined_step(costs, free, tbt)
        run = run[paced_for]
        if run.size == 0:
            return None
        deadline = deadlines.next_token_deadline(t.first_token_s[run], t.next_token_index(run),
                                                 t.tbt_slo_s[run])
        slack = deadlines.slack_s(deadline, start_s, costs)
        away = t.phase[run] == Phase.ON_HOST
        late = away & (deadline < start_s)  # not waited for: decode steps would not bring it back
        # A stream on the host may need room made and its copy to be back: a prefill now
        # delays both (past its urgency point, it counts as no slack).
        tokens = t.num_tokens[run[away]]
        slack[away] -= (deadlines.make_room_lag_s(tokens, bpt, costs) - costs.decode_step_s
                        + deadlines.transfer_s(tokens, bpt, costs.h2d_bytes_per_s))
        run, slack, away = run[~late], slack[~late], away[~late]
        if slack.size == 0:
            return None
        least = max(float(slack.min()), 0.0)
        budget = costs.prefill_tokens_within(least)
        if budget >= most_tokens:
            return budget
        tokens, must_start_by_s = wanted()
        if budget >= tokens:
            return budget
        wait_s = wait_for_slack_s(costs.prefill_s(tokens), slack, away, t.tbt_slo_s[run], costs)
        if wait_s is not None and (must_start_by_s is None
                                   or start_s + wait_s <= must_start_by_s):
            return 0
        # Below the size where the fixed cost is half the forward, wait a decode step instead
        # (it adds a TBT minus a step to every stream's slack): tiny chunks cost throughput.
        worthwhile = max(self.config.min_prefill_chunk,
                         int(costs.prefill_overhead_s / costs.prefill_s_per_token))
        return budget if budget >= worthwhile else 0

    def _tbt_above_joined_step(self, costs: Costs, free: int, tbt: np.ndarray) -> np.ndarray:
        """Whether each of ``tbt`` is above the decode step once the waiting requests that fit
        ``free`` tokens (in TTFT deadline order, as admission takes them) decode beside the
        resident streams: a burst's queue can make the step outgrow the TBT that the step of
        now is well within. From the served model's profile (``Costs.decode_step_for``). The
        step only grows with streams and KV tokens, so the exact batch, which takes a sort of
        the queue, is worked out only for a TBT between the step with none of them and the
        step with as many as could fit."""
        t = self._table
        resident = t.rows_in(Phase.RUNNING, Phase.PREFILLING, Phase.ROTATING_IN)
        streams, kv = resident.size, int(t.num_tokens[resident].sum())
        waiting = t.rows_in(Phase.WAITING)
        prompts = t.num_prompt_tokens[waiting]
        free = max(free, 0)
        most = min(waiting.size, free // max(int(prompts.min()), 1)) if waiting.size else 0
        above = tbt > costs.decode_step_for(streams + most, kv + min(free, int(prompts.sum())))
        if above.all() or not np.any(tbt > costs.decode_step_for(streams, kv)):
            return above
        order = np.argsort(deadlines.ttft_deadline(t.arrival_s[waiting], t.ttft_slo_s[waiting]),
                           kind="stable")
        prompts = prompts[order]
        joining = np.cumsum(prompts) <= free
        return tbt > costs.decode_step_for(streams + int(joining.sum()),
                                           kv + int(prompts[joining].sum()))


def wait_for_slack_s(batch_s: float, slack: np.ndarray, away: np.ndarray, tbt: np.ndarray,
                     costs: Costs) -> float | None:
    """How long decode steps take to give every stream ``batch_s`` of slack: each step earns a
    resident stream its TBT minus the step, and costs a stream on the host the step. None if
    they never do (a step as long as a TBT, or a stream on the host short of it already)."""
    short = slack < batch_s
    gain = tbt - costs.decode_step_s
    if np.any(short & (away | (gain <= 0))):
        return None
    steps = int(np.ceil(np.max((batch_s - slack[short]) / gain[short], initial=0.0)))
    wait_s = steps * costs.decode_step_s
    if away.any() and float(slack[away].min()) - wait_s < batch_s:
        return None
    return wait_s
