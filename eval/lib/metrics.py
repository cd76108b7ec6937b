"""SLO metrics, defined once here and used by every script and test.

A record (one request, as written by eval.lib.replay) has ``send`` and ``token_times`` on one clock
(seconds), ``error`` (None or a message) and ``aborted`` (the client hung up on purpose).
Token k = 0 is the first output token.

- TTFT = token_times[0] - send. TTFT attainment: fraction of requests with TTFT <= ttft_slo.
- TBT attainment: fraction of requests whose every token k arrived by
  token_times[0] + k * tbt_slo, i.e. the stream never falls behind a reader paced at the SLO
  from its first token (an early token banks slack for later ones).
- Both: fraction of requests meeting the TTFT and the TBT condition.
- A request with an error (refused, cut short, timed out) is a miss for all three, whatever
  tokens it delivered. A client-aborted request is judged on the tokens it received.
- Per-token TBT gaps: token_times[k] - token_times[k-1] over every delivered token of every
  request; p50/p99 and the fraction of gaps <= tbt_slo (the paper's per-token TBT statistics).
  Tokens that arrive in one stream chunk have a gap of 0.
- Output tokens/s: every delivered token over the makespan (first send to last token).
- TTFT p50/p90/p99: over requests that received a first token (failures show up in ``errors``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import numpy as np

Record = dict[str, Any]


def ttft(rec: Record) -> float | None:
    times = rec["token_times"]
    return times[0] - rec["send"] if times else None


def meets_ttft(rec: Record, ttft_slo: float) -> bool:
    t = ttft(rec)
    return rec["error"] is None and t is not None and t <= ttft_slo


def meets_tbt(rec: Record, tbt_slo: float) -> bool:
    times = rec["token_times"]
    if rec["error"] is not None or not times:
        return False
    first = times[0]
    return all(t <= first + k * tbt_slo for k, t in enumerate(times))


def gaps(rec: Record) -> list[float]:
    times = rec["token_times"]
    return [b - a for a, b in itertools.pairwise(times)]


def _pct(values: Iterable[float], q: float) -> float | None:
    arr = np.asarray(list(values), dtype=float)
    return float(np.percentile(arr, q)) if arr.size else None


def summarize(records: list[Record], ttft_slo: float, tbt_slo: float) -> dict[str, Any]:
    """All metrics of one replay (see the module docstring for the definitions)."""
    n = len(records)
    ttfts = [t for t in map(ttft, records) if t is not None]
    all_gaps = np.asarray([g for r in records for g in gaps(r)], dtype=float)
    n_ttft = sum(meets_ttft(r, ttft_slo) for r in records)
    n_tbt = sum(meets_tbt(r, tbt_slo) for r in records)
    n_both = sum(meets_ttft(r, ttft_slo) and meets_tbt(r, tbt_slo) for r in records)
    tokens = sum(len(r["token_times"]) for r in records)
    ends = [r["token_times"][-1] for r in records if r["token_times"]]
    sends = [r["send"] for r in records if r["send"] is not None]
    duration = max(ends) - min(sends) if ends and sends else 0.0

    def frac(k: int) -> float | None:
        return k / n if n else None

    return {
        "n": n,
        "errors": sum(r["error"] is not None for r in records),
        "aborted": sum(bool(r.get("aborted")) for r in records),
        "ttft_slo": ttft_slo,
        "tbt_slo": tbt_slo,
        "ttft_attainment": frac(n_ttft),
        "tbt_attainment": frac(n_tbt),
        "both_attainment": frac(n_both),
        "ttft_p50": _pct(ttfts, 50),
        "ttft_p90": _pct(ttfts, 90),
        "ttft_p99": _pct(ttfts, 99),
        "ttft_mean": float(np.mean(ttfts)) if ttfts else None,
        "tbt_p50": _pct(all_gaps, 50),
        "tbt_p99": _pct(all_gaps, 99),
        "tbt_gap_attainment": float(np.mean(all_gaps <= tbt_slo)) if all_gaps.size else None,
        "output_tokens": tokens,
        "duration_s": duration,
        "throughput_tok_s": tokens / duration if duration > 0 else None,
    }


def slo_goal(result: dict[str, Any], ours: str = "rotasched",
             baselines: tuple[str, ...] = ("fcfs", "lpm", "hicache")) -> dict[str, Any] | None:
    """The evaluation's headline check: at the lowest rate where the best baseline's TTFT
    attainment is below 50%, ours against that baseline: TTFT points gained (goal >= 50), TBT
    points (goal >= -2) and throughput change (goal >= -5%). Baselines are SGLang's own
    policies: rotasched-lvf (the reference rule) wins TTFT only by missing TBT for most streams.
    None if no rate of the sweep has every baseline below 50% or a value is missing."""
    systems = result["systems"]
    present = [b for b in baselines if b in systems]
    if ours not in systems or not present:
        return None
    for i, rate in enumerate(result["rates"]):
        ttfts = {b: systems[b]["ttft_attainment"][i] for b in present}
        if any(v is None for v in ttfts.values()) or max(ttfts.values()) >= 0.5:
            continue
        best = max(present, key=lambda b: ttfts[b])
        mine, theirs = systems[ours], systems[best]
        keys = ("ttft_attainment", "tbt_attainment", "throughput_tok_s")
        values = [s[k][i] for s in (mine, theirs) for k in keys]
        if any(v is None for v in values):
            return None
        ttft_gain = 100 * (mine["ttft_attainment"][i] - theirs["ttft_attainment"][i])
        tbt_diff = 100 * (mine["tbt_attainment"][i] - theirs["tbt_attainment"][i])
        tput = mine["throughput_tok_s"][i] / theirs["throughput_tok_s"][i] - 1
        return {"rate": rate, "best_baseline": best, "ttft_points": ttft_gain,
                "tbt_points": tbt_diff,
                "throughput_change": tput,
                "met": ttft_gain >= 50 and tbt_diff >= -2 and tput >= -0.05}
    return None
