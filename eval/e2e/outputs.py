"""The e2e run's requests and what came back: the burst and soak request sets, output
comparison with the baseline, and per-phase counts."""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

from eval.lib.traces import RequestSpec, TraceRow, make_specs

Record = dict[str, Any]


# --- request sets ---------------------------------------------------------------------------
def forced(spec: RequestSpec, arrival: float, min_output: int, max_output: int) -> RequestSpec:
    output_len = min(max(spec.output_len, min_output), max_output)
    return RequestSpec(spec.idx, arrival, spec.prompt_len, output_len)


def burst_specs(rows: list[TraceRow], args: argparse.Namespace) -> list[RequestSpec]:
    """The correctness burst: trace lengths (prompts capped, outputs forced), all sent at t=0,
    or with ``--burst-rate`` as Poisson arrivals at that rate: rotasched does not rotate for a
    burst whose requests are late at once (compute binds; moving bytes buys nothing), so a
    check that needs rotations, such as eval.faults's copy failures, spreads the burst out."""
    rate = getattr(args, "burst_rate", None)
    if rate:
        specs = make_specs(rows, num=args.num, start=args.start, arrival="poisson", rate=rate,
                           seed=args.seed, max_prompt=args.max_prompt)
        return [forced(s, s.arrival, args.min_output, args.max_output) for s in specs]
    specs = make_specs(rows, num=args.num, start=args.start, max_prompt=args.max_prompt)
    return [forced(s, 0.0, args.min_output, args.max_output) for s in specs]


def soak_specs(rows: list[TraceRow], n: int, args: argparse.Namespace) -> list[RequestSpec]:
    """The soak: the trace rows after the burst's, Poisson arrivals at --soak-rate."""
    specs = make_specs(rows, num=n, start=args.start + args.num, arrival="poisson",
                       rate=args.soak_rate, seed=args.seed, max_prompt=args.max_prompt)
    return [forced(s, s.arrival, args.min_output, args.max_output) for s in specs]


def baseline_tokens(specs: list[RequestSpec]) -> int:
    """A KV pool that holds the whole burst at once: no retraction, no queueing for memory."""
    return sum(s.prompt_len + s.output_len for s in specs) + 4096


# --- what came back -------------------------------------------------------------------------
def n_ids(rec: Record) -> int:
    """Tokens received: the output ids, or n_tokens of a compact record saved without them."""
    return len(rec["output_ids"]) if "output_ids" in rec else rec["n_tokens"]


def complete(rec: Record) -> bool:
    return rec["error"] is None and not rec["aborted"] and n_ids(rec) == rec["output_len"]


def retracted(rec: Record) -> bool:
    return (rec.get("meta") or {}).get("num_retractions", 0) > 0


def compare_outputs(ref: list[Record], got: list[Record]) -> dict[str, Any]:
    """Requests (matched by idx) that completed on both sides must have equal output ids."""
    by_idx = {r["idx"]: r for r in ref}
    compared = equal = mismatched_retracted = 0
    first = None
    for r in got:
        b = by_idx.get(r["idx"])
        if b is None or not complete(r) or not complete(b):
            continue
        compared += 1
        if r["output_ids"] == b["output_ids"]:
            equal += 1
            continue
        mismatched_retracted += retracted(r) or retracted(b)
        if first is None:
            a_ids, b_ids = b["output_ids"], r["output_ids"]
            pos = next((i for i, (x, y) in enumerate(zip(a_ids, b_ids, strict=False)) if x != y),
                       min(len(a_ids), len(b_ids)))
            first = {"idx": r["idx"], "prompt_len": r["prompt_len"], "output_len": r["output_len"],
                     "position": pos, "ref_ids": b["output_ids"][pos:pos + 4],
                     "got_ids": r["output_ids"][pos:pos + 4],
                     "retractions": [(b.get("meta") or {}).get("num_retractions"),
                                     (r.get("meta") or {}).get("num_retractions")]}
    return {"n": len(got), "n_compared": compared, "n_equal": equal,
            "n_mismatched": compared - equal, "mismatched_with_retraction": mismatched_retracted,
            "first_mismatch": first}


def record_counts(records: list[Record]) -> dict[str, Any]:
    """Completed, client-aborted, failed requests (top error messages), retracted, tokens."""
    errors = Counter(_error_kind(r["error"]) for r in records if r["error"] is not None)
    return {"n": len(records), "complete": sum(map(complete, records)),
            "client_aborted": sum(bool(r["aborted"]) for r in records),
            "errors": sum(errors.values()), "error_kinds": dict(errors.most_common(5)),
            "retracted": sum(map(retracted, records)),
            "tokens": sum(map(n_ids, records))}


def _error_kind(error: str) -> str:
    return error.split(":")[0][:60]


def compact(rec: Record, keep_ids: bool) -> Record:
    """A record without token times (and without ids unless ``keep_ids``), for the raw files."""
    out = {k: rec[k] for k in ("idx", "prompt_len", "output_len", "error", "aborted", "meta")}
    out["n_tokens"] = n_ids(rec)
    if keep_ids:
        out["output_ids"] = rec["output_ids"]
    return out
