"""The three phases of an e2e run, and the result entry each writes per server.

1. correctness: the same burst to every server; rotasched's outputs against its baseline's.
2. soak: an overload with client aborts, then the idle record must show nothing held.
3. checks: a bad per-request SLO is refused and the server still answers; /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from eval.e2e import rotator_stats as rs
from eval.e2e.log import log
from eval.e2e.outputs import compact, compare_outputs, record_counts, soak_specs
from eval.e2e.probes import check_metrics, generate_once, parse_prometheus
from eval.e2e.servers import Server
from eval.lib.http import http_request, wait_idle
from eval.lib.jsonfiles import write_jsonl
from eval.lib.progress import Budget
from eval.lib.replay import replay
from eval.lib.traces import RequestSpec, TraceRow, prompt_ids

CHECKS_S = 40.0  # post-soak requests and /metrics on every rotasched server
DRAIN_S = 30.0  # kept after a replay for the server to go idle (aborts of what was cut)
MIN_PHASE_S = 20.0  # a replay phase shorter than this is skipped
Result = dict[str, Any]


# --- correctness ----------------------------------------------------------------------------
def correctness_phase(args: argparse.Namespace, up: list[Server], specs: list[RequestSpec],
                      result: Result, budget: Budget) -> None:
    usable = budget.usable(CHECKS_S + DRAIN_S)
    limit = min(args.burst_timeout, usable)
    if usable < min(MIN_PHASE_S, args.burst_timeout):
        result["skipped"].append({"phase": "correctness", "reason": "budget"})
        log("correctness: skipped (budget)")
        return
    spread = max((s.arrival for s in specs), default=0.0)
    when = f"over {spread:.0f}s" if spread else "at once"
    log(f"correctness: {len(specs)} requests {when} to {', '.join(s.name for s in up)} "
        f"(limit {limit:.0f}s)")
    outs = asyncio.run(_bursts(args, up, specs, limit))
    for s in up:
        write_jsonl(args.out_dir / f"correctness_{s.name}.jsonl",
                    [compact(r, keep_ids=True) for r in outs[s.name]["records"]])
    for s in up:
        result["correctness"][s.name] = correctness_entry(s, outs)
        log(f"correctness: {s.name}: {_brief(result['correctness'][s.name])}")


async def _bursts(args: argparse.Namespace, up: list[Server], specs: list[RequestSpec],
                  limit: float) -> dict[str, Result]:
    end = time.monotonic() + limit

    async def one(s: Server) -> tuple[str, Result]:
        out: Result = {"offset": s.log_size()}
        out["records"] = await replay(s.url, specs, salt=args.salt, time_limit=limit,
                                      label=f"{s.name} ", vocab=s.vocab)
        out["idle"] = await asyncio.to_thread(wait_idle, s.url, args.drain_timeout)
        out["log_end"] = s.log_size()
        left = end - time.monotonic()
        if args.control and not s.plan.rotasched and left > MIN_PHASE_S:
            out["control"] = await replay(s.url, specs[::-1], salt=args.salt, time_limit=left,
                                          label=f"{s.name} reversed ", vocab=s.vocab)
            await asyncio.to_thread(wait_idle, s.url, args.drain_timeout)
        return s.name, out

    return dict(await asyncio.gather(*(one(s) for s in up)))


def correctness_entry(s: Server, outs: dict[str, Result]) -> Result:
    out = outs[s.name]
    entry: Result = {**record_counts(out["records"]), "idle_reached": out["idle"]}
    if "control" in out:
        entry["control_reversed"] = compare_outputs(out["records"], out["control"])
    if s.plan.rotasched:
        by_rank = window_rotations(s, out)
        entry["rotations_by_rank"] = by_rank
        entry["rotations"] = rs.first_rank(by_rank) or None
        rotated = (entry["rotations"] or {}).get("rotated_reqs")
        if rotated is not None and out["records"]:
            # The comparison means little unless many requests went through a rotation.
            entry["rotated_fraction"] = round(rotated / len(out["records"]), 3)
        entry["reference"] = s.plan.reference
        ref = outs.get(s.plan.reference)
        entry["compare"] = compare_outputs(ref["records"], out["records"]) if ref else None
    return entry


def window_rotations(s: Server, out: Result) -> dict[str, Result]:
    """phase_rotations of the server's log bytes [out["offset"], out["log_end"])."""
    head = s.read_log(0, out["offset"])
    during = rs.rotation_records(s.read_log(out["offset"], out["log_end"]))
    return rs.phase_rotations(rs.rotation_records(head), during, s.plan.page_size,
                              rs.rotator_host_page(head))


def _brief(entry: Result) -> str:
    text = f"{entry['complete']}/{entry['n']} complete, {entry['errors']} errors"
    if entry.get("compare"):
        c = entry["compare"]
        text += f", equal {c['n_equal']}/{c['n_compared']}"
    r = entry.get("rotations")
    if r and r.get("source") == "stats":
        text += f", rotations {r['rotations_out']} (stats records: no idle one, requests unknown)"
    elif r:
        text += (f", rotations {r['rotations_out']} over {r['rotated_reqs']} requests "
                 f"({r['multi_rotated_reqs']} several times, max {r['max_per_req']})")
    if entry.get("control_reversed"):
        c = entry["control_reversed"]
        text += f", reversed-order control equal {c['n_equal']}/{c['n_compared']}"
    return text


# --- soak -----------------------------------------------------------------------------------
def soak_phase(args: argparse.Namespace, targets: list[Server], rows: list[TraceRow],
               result: Result, budget: Budget) -> None:
    usable = budget.usable(CHECKS_S + DRAIN_S) - args.soak_tail
    span = min(args.soak_seconds, usable)
    if not targets or usable < min(MIN_PHASE_S, args.soak_seconds):
        reason = "no rotasched server up" if not targets else "budget"
        result["skipped"].append({"phase": "soak", "reason": reason})
        log(f"soak: skipped ({reason})")
        return
    specs = soak_specs(rows, max(1, min(args.soak_num, int(args.soak_rate * span))), args)
    limit = specs[-1].arrival + args.soak_tail
    if span < args.soak_seconds:
        result["skipped"].append({"phase": "soak", "reason": f"budget: {span:.0f}s of arrivals, "
                                                             f"not {args.soak_seconds:g}s"})
    names = ", ".join(s.name for s in targets)
    log(f"soak: {len(specs)} requests at {args.soak_rate:g} req/s to {names}, "
        f"{args.abort_frac:.0%} aborted mid-stream, all left cut at {limit:.0f}s")
    outs = asyncio.run(_soaks(args, targets, specs, limit))
    for s in targets:
        out = outs[s.name]
        write_jsonl(args.out_dir / f"soak_{s.name}.jsonl",
                    [compact(r, keep_ids=False) for r in out["records"]])
        entry = result["soak"][s.name] = soak_entry(s, out)
        leaks = entry["leaks"] or {}
        rot = rs.first_rank(entry["rotations_by_rank"])
        log(f"soak: {s.name}: {entry['complete']}/{len(specs)} complete, "
            f"{entry['client_aborted']} aborted by the client, {entry['errors']} cut or failed, "
            f"{rot.get('rotations_out', '?')} rotations, "
            f"{rot.get('aborted_while_rotated', '?')} aborted while rotated out, "
            f"idle {'yes' if out['idle'] else 'NO'}, leaks "
            + (", ".join(f"TP{r} device {v['device_tokens']} tok host {v['host_tokens']} tok table "
                         f"{v['table']}" for r, v in leaks.items()) or "unknown"))


def soak_entry(s: Server, out: Result) -> Result:
    by_rank = window_rotations(s, out)
    return {**record_counts(out["records"]), "idle_reached": out["idle"],
            "rotations_by_rank": by_rank, "leaks": rs.idle_leaks(by_rank) if out["idle"] else None}


async def _soaks(args: argparse.Namespace, targets: list[Server], specs: list[RequestSpec],
                 limit: float) -> dict[str, Result]:
    async def one(s: Server) -> tuple[str, Result]:
        out: Result = {"offset": s.log_size()}
        out["records"] = await replay(s.url, specs, salt=args.salt + 1, time_limit=limit,
                                      abort_frac=args.abort_frac, seed=args.seed,
                                      abort_stall_s=args.abort_stall_s,
                                      label=f"{s.name} soak ", vocab=s.vocab)
        out["idle"] = await asyncio.to_thread(wait_idle, s.url, args.drain_timeout)
        out["log_end"] = s.log_size()
        return s.name, out

    return dict(await asyncio.gather(*(one(s) for s in targets)))


# --- checks ---------------------------------------------------------------------------------
def post_checks(s: Server) -> Result:
    """A normal request, a bad per-request SLO (plain and streamed), a normal request again."""
    ids = prompt_ids(10**6, 64, salt=-2, vocab=s.vocab)
    bad = {"ttft_slo": -1}
    first = generate_once(s.url, ids, 16)
    refused = generate_once(s.url, ids, 8, bad)
    refused_stream = generate_once(s.url, ids, 8, bad, stream=True)
    second = generate_once(s.url, ids, 16)
    ok = [c["status"] == 200 and c["n_ids"] == 16 for c in (first, second)]
    return {"normal_before": first, "bad_slo": refused, "bad_slo_stream": refused_stream,
            "normal_after": second, "bad_slo_4xx": 400 <= refused["status"] < 500,
            "alive": s.alive(), "passed": all(ok) and 400 <= refused["status"] < 500 and s.alive()}


def checks_phase(up: list[Server], result: Result, budget: Budget) -> None:
    rota = [s for s in up if s.plan.rotasched]
    if budget.usable() < 15:
        result["skipped"].append({"phase": "checks", "reason": "budget"})
        log("checks: skipped (budget)")
        return
    with ThreadPoolExecutor(max(1, len(rota))) as ex:
        checks = list(ex.map(post_checks, rota))
    for s, c in zip(rota, checks, strict=False):
        status, text = http_request(s.url + "/metrics", timeout=30)
        m = (check_metrics(parse_prometheus(text)) if status == 200
             else {"ok": False, "status": status})
        result["checks"][s.name], result["metrics"][s.name] = c, m
        streamed = c["bad_slo_stream"]
        log(f"checks: {s.name}: normal {c['normal_before']['status']}/"
            f"{c['normal_after']['status']}, bad SLO -> HTTP {c['bad_slo']['status']} (streamed: "
            f"HTTP {streamed['status']}, {streamed['finish_reason'] or streamed['error']}), "
            f"metrics {'ok' if m['ok'] else 'NOT ok'}")
