"""What the rotator's stats records say about one phase of an e2e run.

The rotator logs one JSON record per line (``superinfer.adapters.sglang.stats``): ``start`` once
per scheduler process, ``stats`` every few seconds while rotating (cumulative counters), ``idle``
once per idle period (pools against their initial free sizes, per-request counts of the busy
period that just ended). Every record names its ``tp_rank`` and ``dp_rank``: a scheduler is
its TP rank (``"0"``), or under ``--dp-size`` its replica's and TP rank (``"dp1.tp0"``).
"""

from __future__ import annotations

from typing import Any

from superinfer.adapters.sglang.stats import parse_records

Record = dict[str, Any]
HOST_PAGE_TOKENS = 16  # the staging path's host page, when a log has no start record
POOL_KEYS = ("device_free", "device_total", "host_free", "host_total", "table")
RANK_KEYS = ("kind", "tp_rank", "dp_rank")


def rotation_records(text: str) -> list[Record]:
    """The stats and idle records of a log text, in order."""
    return [r for r in parse_records(text) if r["kind"] in ("stats", "idle")]


def rank_key(tp_rank: int | str, dp_rank: int | str | None) -> str:
    """A scheduler's name: its TP rank, prefixed by its DP replica's past the first (every
    replica has a TP rank 0). Records carry ints, metric labels strings."""
    return f"dp{dp_rank}.tp{tp_rank}" if int(dp_rank or 0) else str(tp_rank)


def rank_of(record: Record) -> str:
    """The scheduler that logged ``record``."""
    return rank_key(record["tp_rank"], record.get("dp_rank"))


def rank_order(rank: str) -> tuple[int, int]:
    """(DP rank, TP rank) of a ``rank_of`` key, for sorting."""
    if rank.startswith("dp"):
        dp, tp = rank[2:].split(".tp")
        return int(dp), int(tp)
    return 0, int(rank)


def rotator_ranks(text: str) -> list[int | str]:
    """Schedulers that logged a start record (the plugin is active there): TP ranks, or
    ``rank_of`` keys where a DP replica past the first logged."""
    starts = [r for r in parse_records(text) if r["kind"] == "start"]
    if all(not r.get("dp_rank") for r in starts):
        return sorted({r["tp_rank"] for r in starts})
    return sorted({rank_of(r) for r in starts}, key=rank_order)


def rotator_host_page(text: str) -> int:
    """The host tier's page size in tokens, from the first start record."""
    start = next((r for r in parse_records(text) if r["kind"] == "start"), None)
    return HOST_PAGE_TOKENS if start is None else int(start["host_page"])


def leak_summary(idle: Record, page_size: int, host_page: int = HOST_PAGE_TOKENS) -> Record:
    """What an idle record says is still held: device (pages of ``page_size``) and host tier
    (pages of ``host_page``); a failed idle check is never clean."""
    dev = idle["device_total"] - idle["device_free"]
    host = idle["host_total"] - idle["host_free"]
    return {"device_tokens": dev, "host_tokens": host,
            "device_pages": -(-dev // page_size), "host_pages": -(-host // host_page),
            "table": idle["table"],
            "clean": dev == 0 and host == 0 and idle["table"] == 0 and not idle.get("check_error")}


def phase_rotations(before: list[Record], during: list[Record], page_size: int,
                    host_page: int = HOST_PAGE_TOKENS) -> dict[str, Record]:
    """Per TP rank (str): the rotations of one phase, from the records logged before it
    (``before``) and in it (``during``).

    rotations_out is cumulative on both kinds of record, so the last value logged before the
    phase is subtracted. With an idle record in the phase (source "idle"), rotated_reqs and the
    like come from its idle records (they count per busy period, so they are summed;
    aborted_while_rotated is cumulative) and so do the pools. A busy period that began before
    the phase also counts the requests rotated then: carried_rotations says how many rotations
    that was (0 when the server went idle in between). Without an idle record in the phase (the
    next phase came first), the rotations come from the phase's last stats record (source
    "stats"): rotations_out only, and the per-request counts, aborts, pools and leaks are unknown
    (None). Stats records come every few seconds, so rotations after the last one count in the
    next phase."""
    out = {}
    for rank in sorted({rank_of(r) for r in during}, key=rank_order):
        mine = [r for r in during if rank_of(r) == rank]
        prev = [r for r in before if rank_of(r) == rank]
        idle = [r for r in mine if r["kind"] == "idle"]
        prev_idle = [r for r in prev if r["kind"] == "idle"]
        stats = [r for r in prev + mine if r["kind"] == "stats"]
        start = prev[-1]["rotations_out"] if prev else 0
        entry: Record = {
            "source": "idle" if idle else "stats",
            "rotations_out": (idle[-1] if idle else mine[-1])["rotations_out"] - start,
            "rotated_reqs": None, "multi_rotated_reqs": None, "max_per_req": None,
            "aborted_while_rotated": None, "carried_rotations": None, "idle_checks": len(idle),
            "cumulative_in": stats[-1]["rotations_in"] if stats else 0,
            "cumulative_fallbacks": stats[-1]["fallbacks"] if stats else 0,
            "pools": None, "leaks": None,
        }
        if idle:
            first = prev_idle[-1] if prev_idle else {"rotations_out": 0,
                                                      "aborted_while_rotated": 0}
            last = idle[-1]
            entry.update(
                rotated_reqs=sum(r["rotated_reqs"] for r in idle),
                multi_rotated_reqs=sum(r["multi_rotated_reqs"] for r in idle),
                max_per_req=max(r["max_per_req"] for r in idle),
                aborted_while_rotated=(last["aborted_while_rotated"]
                                       - first["aborted_while_rotated"]),
                carried_rotations=start - first["rotations_out"],
                pools={k: last[k] for k in POOL_KEYS},
                leaks=leak_summary(last, page_size, host_page))
        out[rank] = entry
    return out


def idle_leaks(by_rank: dict[str, Record]) -> dict[str, Record] | None:
    """Per TP rank, what the phase's last idle record says is held; None unless every rank
    logged one in the phase."""
    if not by_rank or any(v["leaks"] is None for v in by_rank.values()):
        return None
    return {r: v["leaks"] for r, v in by_rank.items()}


SUMMED = ("rotations_out", "rotated_reqs", "multi_rotated_reqs", "aborted_while_rotated",
          "carried_rotations", "idle_checks", "cumulative_in", "cumulative_fallbacks")


def first_rank(by_rank: dict[str, Record]) -> Record:
    """The server's totals ({} without any entry): TP ranks make the same decisions, so one
    TP rank 0 counts them; DP replicas serve different requests, so theirs add up (counts
    summed, ``max_per_req`` the largest; pools and leaks stay per rank)."""
    if not by_rank:
        return {}
    leads = [by_rank[k] for k in sorted(by_rank, key=rank_order) if rank_order(k)[1] == 0]
    if len(leads) == 1:
        return leads[0]
    total: Record = {"source": "+".join(sorted({e["source"] for e in leads})),
                     "pools": None, "leaks": None, "replicas": len(leads)}
    for key in SUMMED:
        values = [e[key] for e in leads]
        total[key] = None if None in values else sum(values)
    per_req = [e["max_per_req"] for e in leads]
    total["max_per_req"] = None if None in per_req else max(per_req)
    return total


def ranks_agree(records: list[Record]) -> Record:
    """Whether every TP rank logged the same rotation numbers, record for record (repeats of an
    unchanged record are dropped: ranks may probe idleness a different number of times)."""
    seqs: dict[tuple[str, int], list[Record]] = {}
    for r in records:
        row = {k: v for k, v in r.items() if k not in RANK_KEYS}
        seq = seqs.setdefault((r["kind"], r["tp_rank"]), [])
        if not seq or seq[-1] != row:
            seq.append(row)
    ranks = sorted({rank for _, rank in seqs})
    result: Record = {
        "ranks": ranks, "lines": {f"{k}/TP{r}": len(v) for (k, r), v in seqs.items()},
        "identical": None, "last_lines_equal": None, "first_difference": None}
    if len(ranks) < 2:
        return result
    result["identical"] = True
    last = {key: seq[-1] for key, seq in seqs.items()}
    result["last_lines_equal"] = all(last.get((k, r)) == last.get((k, ranks[0]))
                                     for k in ("stats", "idle") for r in ranks[1:])
    for kind in ("stats", "idle"):
        ref = seqs.get((kind, ranks[0]), [])
        for r in ranks[1:]:
            other = seqs.get((kind, r), [])
            if other == ref:
                continue
            i = next((i for i, (a, b) in enumerate(zip(ref, other, strict=False)) if a != b),
                     min(len(ref), len(other)))
            result["identical"] = False
            result["first_difference"] = result["first_difference"] or {
                "kind": kind, "index": i, f"TP{ranks[0]}": _at(ref, i), f"TP{r}": _at(other, i)}
    return result


def _at(seq: list[Record], i: int) -> Record | None:
    return seq[i] if i < len(seq) else None
