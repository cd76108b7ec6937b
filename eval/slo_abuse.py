"""Can one client jump the queue by asking for a tight per-request SLO? (issue 15, item 4)

One rotasched server per ``--rota-request-slo`` mode; on each, the same requests three ways:

- ``baseline``: the trace's first N requests at ``--rate`` (near the knee): "everyone else".
- ``abuse``: the same, plus an abusive client sending ``--abuse-frac`` (30%) extra requests
  (the trace's next rows, Poisson at that fraction of the rate, over the same span), each with
  ``custom_params: {"ttft_slo": --abuse-ttft-slo}`` (the tightest value; ``--abuse-tbt-slo``
  adds a TBT override too).
- ``honest``: the same extra requests without ``custom_params``: what the extra load alone
  costs, so the abuse's own effect is ``honest - abuse``.

Reported per mode: everyone else's TTFT attainment in each run (the abusive client's requests
are left out), the drop from ``baseline`` to ``abuse`` in points, how much of it the extra
load alone explains (``baseline`` to ``honest``), the rest (``honest`` to ``abuse``: the abuse's
own effect; the goal: at most 5 points in every protecting mode), and what the abusive client
got (served, refused with 400). Near the knee the extra 30% load alone costs tens of points, so
the drop from ``baseline`` says little about the abuse.

The abusive SLO must be tight but reachable (the default: 0.3 s against the server's 1 s): one no
request can meet (0.001 s) is late at once, and rotasched serves late requests after those that
can still make it (README's rule 1), so such an abuse defeats itself.

Modes: ``clamp`` (the default), ``reject``, ``off``, and ``unprotected`` (clamp with a floor of
1e-6 x the server's SLO, i.e. the behavior before the floor existed): the control that shows
the run can see an abuse at all. Results go to --out after every run,
so a run cut short keeps what it measured; raw records to --raw-dir. Stdlib + aiohttp + numpy.

    python -m eval.slo_abuse --rate 22 --num 300 --cap 60000 --budget 540 \\
        --modes clamp unprotected --server-extra --cuda-graph-max-bs 128 --rota-host-kv-gb 64
    python -m eval.slo_abuse ... --modes reject off --merge     # a second device call, same --out
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from eval.lib.http import wait_idle
from eval.lib.jsonfiles import command_line, write_json, write_jsonl
from eval.lib.metrics import Record, summarize
from eval.lib.progress import Budget, Progress
from eval.lib.replay import replay
from eval.lib.replay_server import ready_server
from eval.lib.server import add_server_run_args
from eval.lib.traces import (
    ARRIVALS,
    RequestSpec,
    TraceRow,
    load_azure,
    make_specs,
    model_vocab_size,
)
from eval.sweep_slo import raw_info, server_cmd, warmup_specs

EVAL = Path(__file__).resolve().parent
MODULE = "eval.slo_abuse"
DEFAULT_TRACE = Path("eval/data/azure_llm_2023/AzureLLMInferenceTrace_conv.csv")
# Server flags per mode, beside --schedule-policy rotasched and the SLOs.
MODES: dict[str, list[str]] = {
    "clamp": ["--rota-request-slo", "clamp"],
    "unprotected": ["--rota-request-slo", "clamp", "--rota-min-request-slo-ratio", "1e-06"],
    "reject": ["--rota-request-slo", "reject"],
    "off": ["--rota-request-slo", "off"],
}
CONTROL = "unprotected"  # expected to fail the goal: it shows the abuse is visible at all
RUNS = ("baseline", "abuse", "honest")
GOAL_POINTS = 5.0  # the abuse may cost everyone else at most this much beyond the extra load
STOP_MARGIN_S = 40.0
STARTUP_GUESS_S = 150.0

log = Progress()


# --- request sets (pure) -----------------------------------------------------------------------

@dataclass(frozen=True)
class RequestSets:
    """Everyone else's requests and the extra client's (distinct ``idx``, so distinct prompts)."""

    others: list[RequestSpec]
    extra: list[RequestSpec]


def build_request_sets(rows: list[TraceRow], *, num: int, rate: float, abuse_frac: float = 0.3,
                       arrival: str = "poisson", cv: float = 1.0, seed: int = 0,
                       max_prompt: int | None = None,
                       max_output: int | None = None) -> RequestSets:
    """The first ``num`` rows at ``rate``; the extra client: the next ``round(abuse_frac *
    num)`` rows at ``abuse_frac * rate`` (its own arrival draw), so it adds ``abuse_frac`` of
    the load over about the same span, with the trace's own length mix."""
    if num < 1 or rate <= 0 or abuse_frac < 0:
        raise ValueError(f"need num >= 1, rate > 0, abuse_frac >= 0; got {num}, {rate}, "
                         f"{abuse_frac}")
    common = {"arrival": arrival, "cv": cv, "max_prompt": max_prompt, "max_output": max_output}
    others = make_specs(rows, num=num, rate=rate, seed=seed, **common)
    n_extra = round(abuse_frac * num)
    if n_extra == 0:
        return RequestSets(others, [])
    if len(rows) < num + n_extra:
        raise ValueError(f"the trace has {len(rows)} rows; {num} + {n_extra} needed")
    extra = make_specs(rows, num=n_extra, start=num, rate=abuse_frac * rate, seed=seed + 1,
                       **common)
    return RequestSets(others, extra)


def abuse_extra(ttft_slo: float, tbt_slo: float | None = None) -> dict[str, Any]:
    """The abusive client's addition to each request body."""
    custom: dict[str, Any] = {"ttft_slo": ttft_slo}
    if tbt_slo is not None:
        custom["tbt_slo"] = tbt_slo
    return {"sampling_params": {"custom_params": custom}}


def run_requests(sets: RequestSets, run: str, abusive: dict[str, Any]
                 ) -> tuple[list[RequestSpec], list[dict[str, Any] | None]]:
    """What one run sends, by arrival, with each request's body extra (None: none)."""
    if run == "baseline":
        tagged = [(s, None) for s in sets.others]
    elif run in ("abuse", "honest"):
        mine = abusive if run == "abuse" else None
        tagged = [(s, None) for s in sets.others] + [(s, mine) for s in sets.extra]
    else:
        raise ValueError(f"run must be one of {RUNS}, got {run!r}")
    tagged.sort(key=lambda t: (t[0].arrival, t[0].idx))
    return [s for s, _ in tagged], [e for _, e in tagged]


def split_records(records: list[Record], extra_idx: set[int]
                  ) -> tuple[list[Record], list[Record]]:
    """(everyone else's records, the extra client's)."""
    others = [r for r in records if r["idx"] not in extra_idx]
    return others, [r for r in records if r["idx"] in extra_idx]


def refused_400(rec: Record) -> bool:
    """Answered 400: plainly (HTTP 400), or streamed (HTTP 200, then an abort whose
    finish_reason carries status_code 400, as SGLang streams a request the scheduler refused)."""
    reason = rec["meta"].get("finish_reason")
    streamed = isinstance(reason, dict) and reason.get("status_code") == 400
    return streamed or (rec["error"] or "").startswith("HTTP 400")


def summarize_run(records: list[Record], extra_idx: set[int], ttft_slo: float,
                  tbt_slo: float) -> dict[str, Any]:
    others, extra = split_records(records, extra_idx)
    return {"others": summarize(others, ttft_slo, tbt_slo),
            "extra": summarize(extra, ttft_slo, tbt_slo) if extra else None,
            "others_refused_400": sum(map(refused_400, others)),
            "extra_refused_400": sum(map(refused_400, extra))}


# --- the report (pure) -------------------------------------------------------------------------

def _points(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else 100 * (a - b)


def mode_report(mode: str, runs: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    """One mode's headline from its run summaries (``summarize_run``; None: not run)."""
    def others(run: str, key: str) -> float | None:
        s = runs.get(run)
        return None if s is None else s["others"][key]

    ttft = {run: others(run, "ttft_attainment") for run in RUNS}
    beyond = _points(ttft["honest"], ttft["abuse"])
    abuse = runs.get("abuse")
    extra = abuse["extra"] if abuse is not None else None
    return {
        "mode": mode,
        "control": mode == CONTROL,
        "others_ttft_attainment": ttft,
        "others_tbt_attainment": {run: others(run, "tbt_attainment") for run in RUNS},
        "others_errors": {run: others(run, "errors") for run in RUNS},
        "drop_points": _points(ttft["baseline"], ttft["abuse"]),
        "load_drop_points": _points(ttft["baseline"], ttft["honest"]),  # extra load alone
        "abuse_beyond_load_points": beyond,  # the abuse's own effect: what the goal judges
        "abuser_ttft_attainment": None if extra is None else extra["ttft_attainment"],
        "abuser_errors": None if extra is None else extra["errors"],
        "abuser_refused_400": None if abuse is None else abuse["extra_refused_400"],
        "goal_points": GOAL_POINTS,
        "met": None if beyond is None else beyond <= GOAL_POINTS,
    }


def report(result: dict[str, Any]) -> dict[str, Any]:
    """Per mode, and overall: did every protecting mode that ran keep the abuse's own effect
    within the goal, and did the control (no floor) show a larger one than the default (the
    run can see an abuse at all)."""
    modes = {m: mode_report(m, r["runs"]) for m, r in result["modes"].items()}
    protecting = [r for r in modes.values() if not r["control"] and r["met"] is not None]
    control, default = modes.get(CONTROL), modes.get("clamp")
    visible = None
    key = "abuse_beyond_load_points"
    if control and default and None not in (control[key], default[key]):
        visible = control[key] > default[key]
    return {"modes": modes,
            "protected_met": all(r["met"] for r in protecting) if protecting else None,
            "control_beyond_load_points": control[key] if control else None,
            "abuse_visible_in_control": visible}


def table(rep: dict[str, Any]) -> str:
    """The report as text lines: one per mode."""
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:5.1f}"

    def pts(x: float | None) -> str:
        return "-" if x is None else f"{x:+5.1f}"

    lines = [f"{'mode':<12} {'others TTFT %: baseline':>24} {'abuse':>6} {'honest':>6} | "
             f"{'drop':>5} {'load':>5} {'beyond':>6} | abuser TTFT % / errors / 400s | goal"]
    for r in rep["modes"].values():
        t = r["others_ttft_attainment"]
        met = {None: "-", True: "met", False: "MISSED"}[r["met"]]
        if r["control"]:
            met += " (control)"
        errors = "-" if r["abuser_errors"] is None else r["abuser_errors"]
        refused = "-" if r["abuser_refused_400"] is None else r["abuser_refused_400"]
        lines.append(f"{r['mode']:<12} {pct(t['baseline']):>24} {pct(t['abuse']):>6} "
                     f"{pct(t['honest']):>6} | {pts(r['drop_points']):>5} "
                     f"{pts(r['load_drop_points']):>5} {pts(r['abuse_beyond_load_points']):>6} | "
                     f"{pct(r['abuser_ttft_attainment'])} / {errors} / {refused} | {met}")
    lines.append(f"abuse beyond the extra load within {GOAL_POINTS:g} points in every protecting "
                 f"mode: {rep['protected_met']}; control "
                 f"{pts(rep['control_beyond_load_points']).strip()} points, "
                 f"abuse visible in control: {rep['abuse_visible_in_control']}")
    return "\n".join(lines)


# --- running it --------------------------------------------------------------------------------

def mode_flags(mode: str, ttft_slo: float, tbt_slo: float) -> list[str]:
    return ["--schedule-policy", "rotasched", "--rota-ttft-slo", str(ttft_slo),
            "--rota-tbt-slo", str(tbt_slo), *MODES[mode]]


def run_mode(mode: str, idx: int, args: argparse.Namespace, sets: RequestSets,
             result: dict[str, Any], budget: Budget) -> None:
    """Start ``mode``'s server, replay every run, stop it; fill result['modes'][mode]."""
    entry = result["modes"][mode]
    extra_idx = {s.idx for s in sets.extra}
    abusive = abuse_extra(args.abuse_ttft_slo, args.abuse_tbt_slo)

    def give_up(from_run: int, status: str, reason: str) -> None:
        entry["status"] = status
        for run in args.runs[from_run:]:
            result["skipped"].append({"mode": mode, "run": run, "reason": reason})
        log(f"{mode}: {status}")

    timed = [m["startup_s"] for m in result["modes"].values() if m.get("startup_s")]
    startup = max(timed) if timed else STARTUP_GUESS_S
    spans = {run: run_requests(sets, run, abusive)[0][-1].arrival for run in args.runs}
    if budget.usable(startup + spans[args.runs[0]] + 10.0) < 0:
        give_up(0, "skipped: budget", "budget")
        return
    port = args.port + 10 * idx
    server_log = args.raw_dir / f"server_{mode}.log"
    entry["server_log"] = str(server_log)
    try:
        with ready_server(mode, server_cmd(args, port, entry["flags"]), port, server_log,
                          warmup_specs(sets.others), budget, args.startup_timeout,
                          args.drain_timeout, log,
                          lambda status, reason: give_up(0, status, reason),
                          vocab=args.vocab) as ready:
            if ready is None:
                return
            entry["startup_s"] = ready.startup_s
            entry["status"] = "ok"
            for i, run in enumerate(args.runs):
                left = budget.usable()
                if left < spans[run] + 10.0:
                    give_up(i, f"stopped before run {run}: budget", "budget")
                    return
                specs, extras = run_requests(sets, run, abusive)
                label = f"{mode} {run} "
                records = asyncio.run(replay(ready.base, specs, salt=i + 1, extras=extras,
                                             time_limit=min(spans[run] + args.tail, left),
                                             label=label, vocab=args.vocab))
                raw = args.raw_dir / f"{mode}_{run}.jsonl"
                write_jsonl(raw, records)
                entry["runs"][run] = summarize_run(records, extra_idx, args.ttft_slo,
                                                   args.tbt_slo)
                entry["raw"][run] = raw_info(raw, records)
                result["report"] = report(result)
                write_json(args.out, result)
                s = entry["runs"][run]["others"]
                log(f"{label}others n={s['n']} TTFT≤SLO "
                    f"{100 * (s['ttft_attainment'] or 0):.1f}% errors {s['errors']}")
                if not wait_idle(ready.base, args.drain_timeout):
                    give_up(i + 1, f"stopped after run {run}: server did not drain",
                            "drain failed")
                    return
    finally:
        result["report"] = report(result)
        write_json(args.out, result)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="Azure CSV (conv)")
    ap.add_argument("--trace-name", default=None,
                    help="name in the output file (default: azure_<conv|code> from the CSV)")
    ap.add_argument("--gpu", default="h200", help="name in the output file")
    ap.add_argument("--model-path", type=Path, default=EVAL / "models" / "llama-3.1-8b")
    ap.add_argument("--rate", type=float, default=22.0,
                    help="everyone else's rate, req/s: near rotasched's knee")
    ap.add_argument("--num", type=int, default=300, help="everyone else's requests per run")
    ap.add_argument("--abuse-frac", type=float, default=0.3,
                    help="the extra client's requests, as a fraction of --num (and of --rate)")
    ap.add_argument("--abuse-ttft-slo", type=float, default=0.3,
                    help="the TTFT SLO the abusive client asks for, s: tight but reachable (one "
                         "no request can meet is served late, after everyone, by rotasched)")
    ap.add_argument("--abuse-tbt-slo", type=float, default=None,
                    help="also ask for this TBT SLO, s (default: no TBT override)")
    ap.add_argument("--arrival", choices=ARRIVALS, default="poisson")
    ap.add_argument("--cv", type=float, default=1.0, help="gamma arrivals: gap CV")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-prompt", type=int, default=None)
    ap.add_argument("--max-output", type=int, default=None)
    ap.add_argument("--cap", type=int, default=60000, help="--max-total-tokens")
    ap.add_argument("--modes", nargs="+", choices=list(MODES),
                    default=["clamp", CONTROL, "reject", "off"],
                    help="in this order, as the budget allows")
    ap.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    ap.add_argument("--ttft-slo", type=float, default=1.0, help="the server's, s")
    ap.add_argument("--tbt-slo", type=float, default=0.1, help="the server's, s")
    add_server_run_args(ap)
    ap.add_argument("--out", type=Path, default=None,
                    help="default eval/results/slo_abuse_<gpu>_<trace>.json")
    ap.add_argument("--raw-dir", type=Path, default=None,
                    help="default eval/results/raw/slo_abuse_<gpu>_<trace>")
    ap.add_argument("--merge", action="store_true",
                    help="keep other modes' results from an existing --out (same requests)")
    args = ap.parse_args(argv)
    if args.trace_name is None:
        args.trace_name = "azure_" + args.trace.stem.split("_")[-1]
    tag = f"{args.gpu}_{args.trace_name}"
    args.out = args.out or EVAL / "results" / f"slo_abuse_{tag}.json"
    args.raw_dir = args.raw_dir or EVAL / "results" / "raw" / f"slo_abuse_{tag}"
    args.vocab = model_vocab_size(args.model_path)
    return args


# What must match for --merge to put two invocations' modes side by side.
SAME_REQUESTS = ("trace", "rate", "num", "num_extra", "abuse_frac", "abuse_ttft_slo",
                 "abuse_tbt_slo", "arrival", "cv", "seed", "ttft_slo", "tbt_slo", "cap")


def initial_result(args: argparse.Namespace, sets: RequestSets) -> dict[str, Any]:
    result: dict[str, Any] = {
        "trace": args.trace_name, "trace_path": str(args.trace), "gpu": args.gpu,
        "model_path": str(args.model_path), "cap": args.cap, "rate": args.rate,
        "num": len(sets.others), "num_extra": len(sets.extra), "abuse_frac": args.abuse_frac,
        "abuse_ttft_slo": args.abuse_ttft_slo, "abuse_tbt_slo": args.abuse_tbt_slo,
        "arrival": args.arrival, "cv": args.cv, "seed": args.seed,
        "max_prompt": args.max_prompt, "max_output": args.max_output,
        "ttft_slo": args.ttft_slo, "tbt_slo": args.tbt_slo, "runs_order": args.runs,
        "server_extra": args.server_extra, "goal_points": GOAL_POINTS,
        "command": command_line(MODULE),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "budget_s": None if math.isinf(args.budget) else args.budget,
        "skipped": [], "modes": {},
    }
    if args.merge and args.out.exists():
        old = json.loads(args.out.read_text())
        if any(old.get(k) != result[k] for k in SAME_REQUESTS):
            raise SystemExit(f"--merge: {args.out} replayed other requests or SLOs")
        result["modes"] = {k: v for k, v in old["modes"].items() if k not in args.modes}
        result["skipped"] = [s for s in old["skipped"] if s["mode"] not in args.modes]
        result["merged_commands"] = old.get("merged_commands", []) + [old["command"]]
    for mode in args.modes:
        result["modes"][mode] = {"flags": mode_flags(mode, args.ttft_slo, args.tbt_slo),
                                 "status": "not run", "startup_s": None,
                                 "runs": dict.fromkeys(RUNS), "raw": dict.fromkeys(RUNS)}
    result["report"] = report(result)
    return result


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: servers are stopped
    budget = Budget(args.budget, STOP_MARGIN_S)
    sets = build_request_sets(load_azure(args.trace), num=args.num, rate=args.rate,
                              abuse_frac=args.abuse_frac, arrival=args.arrival, cv=args.cv,
                              seed=args.seed, max_prompt=args.max_prompt,
                              max_output=args.max_output)
    args.raw_dir.mkdir(parents=True, exist_ok=True)
    result = initial_result(args, sets)
    write_json(args.out, result)
    log(f"{len(args.modes)} modes x {len(args.runs)} runs: {len(sets.others)} requests at "
        f"{args.rate:g} req/s + {len(sets.extra)} extra; results -> {args.out}")
    for idx, mode in enumerate(args.modes):
        run_mode(mode, idx, args, sets, result, budget)
    result["wall_s"] = time.monotonic() - budget.start
    result["report"] = report(result)
    write_json(args.out, result)
    log("\n" + table(result["report"]))


if __name__ == "__main__":
    main()
