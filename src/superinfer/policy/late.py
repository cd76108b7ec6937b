"""Whom to serve late when the GPU cannot prefill every waiting request by its deadline
(RotaSched's rule 1: the fewest late). Pure arithmetic on deadlines and prefill times, so the
rule can be read and tested without a request table.
"""

from __future__ import annotations

import heapq

import numpy as np

HORIZON = 256  # waiting requests weighed, earliest deadlines first


def fewest_late(deadline_s: np.ndarray, seq: np.ndarray, work_s: np.ndarray,
                start_s: float) -> np.ndarray:
    """Which requests go late so that the most of the others make their deadlines, where each
    one's prefill takes ``work_s`` back to back from ``start_s`` (one bool per request).

    Moore-Hodgson: in deadline order, whenever the prefills so far end past the current
    request's deadline, the longest of them goes late (the latest arrival, highest ``seq``,
    among equals). In a burst, deadline order alone serves the long prompts first and the
    short ones behind them all miss; this serves the most requests on time per GPU second.
    Only the HORIZON earliest deadlines are weighed: a queue that long is decided again at
    every plan, and requests further out are judged when they come nearer."""
    late = np.zeros(deadline_s.size, dtype=bool)
    if deadline_s.size < 2:
        return late
    order = np.lexsort((seq, deadline_s))[:HORIZON]
    work = work_s[order]
    done = start_s + np.cumsum(work)
    over = np.flatnonzero(done > deadline_s[order])
    if over.size == 0:
        return late
    first = int(over[0])  # the prefix before it is on time as it stands
    # the longest (then the latest arrival) on top; plain floats: this loop runs per plan
    items = list(zip((-work).tolist(), (-seq[order]).tolist(), range(order.size), strict=True))
    due = deadline_s[order].tolist()
    kept = items[:first]
    heapq.heapify(kept)
    done_s = float(done[first - 1]) if first else start_s
    for j in range(first, order.size):
        heapq.heappush(kept, items[j])
        done_s -= items[j][0]
        if done_s > due[j]:
            neg_work, _, longest = heapq.heappop(kept)
            done_s += neg_work
            late[order[longest]] = True
    return late
