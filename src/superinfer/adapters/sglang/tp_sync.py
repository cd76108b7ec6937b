"""What the TP ranks agree on every scheduler iteration, in one collective.

Under tensor parallelism each TP rank runs its own scheduler process with its own rotation
adapter, and all of them must make the same plan, or their KV caches drift apart. So every
iteration they agree on three things:

* the clock: rank 0's ``time.monotonic()``, so deadlines and ages read the same everywhere;
* the cost model: rank 0's ``CostModel`` replaces every rank's, so the policy sees the same
  estimates on every rank (each rank times its own work and would otherwise plan differently);
* how many KV copies are done, per direction: each rank moves its own KV shard at its own pace,
  and a copy counts as done only once it is done on every rank. Every rank submits the same
  copies in the same order and its mover reports them done in that order, so the agreed count is
  the minimum over ranks of each rank's count of finished-but-unconfirmed copies; a rank that is
  ahead keeps the rest pending and counts them again next iteration.

All of it travels in one ``all_gather_object`` over the CPU (gloo) group of the TP ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from ...policy.costs import CostModel


@dataclass(frozen=True, slots=True)
class Agreement:
    now_s: float
    costs: CostModel  # rank 0's
    done_d2h: int  # min over ranks
    done_h2d: int


class TpAgreement:
    """Agrees across the ranks of a TP group (SGLang's ``scheduler.tp_cpu_group``) on the clock,
    the cost model and the done copy counts. With no group (tp_size == 1) it returns its inputs
    and makes no torch.distributed call. Every rank must call ``agree`` once per iteration."""

    def __init__(self, group: object | None) -> None:
        self._group = group
        self._world = dist.get_world_size(group) if group is not None else 1
        self._rank = dist.get_rank(group) if group is not None else 0

    def agree(self, now_s: float, costs: CostModel, done_d2h: int, done_h2d: int) -> Agreement:
        if self._group is None:
            return Agreement(now_s, costs, done_d2h, done_h2d)
        views: list = [None] * self._world
        dist.all_gather_object(views, (now_s, costs, done_d2h, done_h2d), group=self._group)
        # Rank 0 keeps its own object: the gathered one is an equal copy, but the caller may
        # hold references to the original.
        agreed_costs = costs if self._rank == 0 else views[0][1]
        return Agreement(
            now_s=views[0][0],
            costs=agreed_costs,
            done_d2h=min(v[2] for v in views),
            done_h2d=min(v[3] for v in views),
        )
