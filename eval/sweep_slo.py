"""SLO attainment vs request rate: each system in turn on one GPU, the same requests at each rate.

Per system: start one SGLang server, wait for /health, warm it up, then for each rate replay the
trace's first N requests (arrivals at that rate), wait until the server is idle and its prefix
cache flushed, and summarize. Results go to eval/results/slo_<gpu>_<trace>.json after every
rate, so a run cut short keeps what it measured. Stdlib + aiohttp + numpy: runs on the GPU box.
A whole evaluation (both traces, every system, one queue per GPU) is eval.sweep_plan's job.

    python -m eval.sweep_slo --trace eval/data/azure_llm_2023/AzureLLMInferenceTrace_conv.csv \
        --rates 12 14 16 18 20 --num 600 --cap 60000 --budget 3000
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import shlex
import signal
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from eval.lib.http import wait_idle
from eval.lib.jsonfiles import command_line, source_commit, write_json, write_jsonl
from eval.lib.metrics import summarize
from eval.lib.progress import Budget, Progress
from eval.lib.replay import replay
from eval.lib.replay_server import ready_server
from eval.lib.server import add_server_run_args, sglang_command
from eval.lib.traces import ARRIVALS, RequestSpec, load_azure, make_specs, model_vocab_size
from superinfer.adapters.sglang.stats import binding_summary, parse_records
from superinfer.policy import HELD_BY

EVAL = Path(__file__).resolve().parent
SYSTEMS: dict[str, list[str]] = {
    "fcfs": ["--schedule-policy", "fcfs"],
    "lpm": ["--schedule-policy", "lpm"],
    "hicache": ["--schedule-policy", "fcfs", "--enable-hierarchical-cache",
                "--hicache-ratio", "4"],
    "rotasched-lvf": ["--schedule-policy", "rotasched", "--rota-policy", "lvf"],
    "rotasched": ["--schedule-policy", "rotasched"],
    # SGLang's mixed chunks: prefill batches carry the running streams' decode tokens
    "fcfs-mixed": ["--schedule-policy", "fcfs", "--enable-mixed-chunk"],
    "rotasched-mixed": ["--schedule-policy", "rotasched", "--enable-mixed-chunk"],
}
# Per-rate series copied from each summary into systems -> name -> key (one value per rate).
SERIES = ("ttft_attainment", "tbt_attainment", "both_attainment", "throughput_tok_s",
          "ttft_p50", "ttft_p90", "ttft_p99", "tbt_p50", "tbt_p99", "tbt_gap_attainment",
          "errors")
# The rotator's cumulative plan counters, read from each replay's last idle record.
PLAN_COUNTERS = ("rotations_out", "plans_decode_first", "plans_head_blocked", "plans_host_full",
                 *(f"plans_blocked_{why}" for why in HELD_BY), "requeued", "steps", "step_us",
                 "step_us_max")
STOP_MARGIN_S = 40.0  # kept free at the end of the budget to stop a server cleanly
STARTUP_GUESS_S = 150.0  # start-up on a fresh H200 until one server has been timed


log = Progress()


def system_flags(name: str, ttft_slo: float, tbt_slo: float) -> list[str]:
    flags = list(SYSTEMS[name])
    if name.startswith("rotasched"):
        # The scheduler must aim at the SLOs the sweep measures.
        flags += ["--rota-ttft-slo", str(ttft_slo), "--rota-tbt-slo", str(tbt_slo)]
    else:  # the plugin logs which resource binds under SGLang's own policies too
        flags += ["--rota-monitor"]
    return flags


def server_cmd(args: argparse.Namespace, port: int, flags: list[str]) -> list[str]:
    launcher = shlex.split(args.launcher) if args.launcher else None
    return sglang_command(args.model_path, port,
                          ["--max-total-tokens", str(args.cap), *flags, *args.server_extra],
                          launcher)


def warmup_specs(specs: list[RequestSpec], n: int = 16, max_output: int = 16) -> list[RequestSpec]:
    """The first requests' prompt lengths, all at once, short outputs: compiles the JIT kernels
    for prefill and decode before anything is timed."""
    return [RequestSpec(s.idx, 0.0, s.prompt_len, min(s.output_len, max_output))
            for s in specs[:n]]


def raw_info(path: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    return {"path": str(path), "records": len(records),
            "errors": sum(r["error"] is not None for r in records),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def empty_system(flags: list[str], n_rates: int) -> dict[str, Any]:
    out: dict[str, Any] = {"flags": flags, "status": "not run", "startup_s": None,
                           "summaries": [None] * n_rates, "raw": [None] * n_rates,
                           "binding": [None] * n_rates, "bound": [None] * n_rates}
    out.update({k: [None] * n_rates for k in SERIES})
    return out


def run_system(name: str, idx: int, args: argparse.Namespace, rate_specs: list[list[RequestSpec]],
               result: dict[str, Any], budget: Budget) -> None:
    """Start ``name``'s server, replay every rate, stop it; fill result['systems'][name]."""
    rates = result["rates"]
    sysres = result["systems"][name]

    def give_up(from_rate: int, status: str, reason: str) -> None:
        sysres["status"] = status
        for r in rates[from_rate:]:
            result["skipped"].append({"system": name, "rate": r, "reason": reason})
        log(f"{name}: {status}")

    timed = [s["startup_s"] for s in result["systems"].values() if s.get("startup_s")]
    startup = max(timed) if timed else STARTUP_GUESS_S
    if budget.usable(startup + rate_specs[0][-1].arrival + 10.0) < 0:
        give_up(0, "skipped: budget", "budget")
        return
    port = args.port + 10 * idx  # a fresh port per server: no wait for the last one's sockets
    server_log = args.raw_dir / f"server_{name}.log"
    sysres["server_log"] = str(server_log)
    try:
        with ready_server(name, server_cmd(args, port, sysres["flags"]), port, server_log,
                          warmup_specs(rate_specs[0]), budget, args.startup_timeout,
                          args.drain_timeout, log,
                          lambda status, reason: give_up(0, status, reason),
                          vocab=args.vocab) as ready:
            if ready is not None:
                sysres["startup_s"] = ready.startup_s
                sysres["status"] = "ok"
                replay_rates(name, args, rate_specs, result, budget, ready.base, server_log,
                             give_up)
    finally:
        write_json(args.out, result)


def replay_rates(name: str, args: argparse.Namespace, rate_specs: list[list[RequestSpec]],
                 result: dict[str, Any], budget: Budget, base: str, server_log: Path,
                 give_up: Callable[[int, str, str], None]) -> None:
    """Every rate against one ready server, in order, until the budget or a drain fails."""
    rates, sysres = result["rates"], result["systems"][name]
    for i, (rate, specs) in enumerate(zip(rates, rate_specs, strict=False)):
        span = specs[-1].arrival
        left = budget.usable()
        if left < span + 10.0:
            give_up(i, f"stopped at rate {rate}: budget", "budget")
            return
        label = f"{name} @ {rate:g} req/s "
        log_offset = server_log.stat().st_size if server_log.exists() else 0
        records = asyncio.run(replay(base, specs, salt=i + 1, extra=args.extra,
                                     time_limit=min(span + args.tail, left), label=label,
                                     vocab=args.vocab))
        raw = args.raw_dir / f"{name}_rate{rate:g}.jsonl"
        write_jsonl(raw, records)
        s = summarize(records, args.ttft_slo, args.tbt_slo)
        sysres["summaries"][i] = s
        sysres["raw"][i] = raw_info(raw, records)
        for k in SERIES:
            sysres[k][i] = s[k]
        write_json(args.out, result)
        log(f"{label}n={s['n']} TTFT≤SLO {_pct(s['ttft_attainment'])} "
            f"TBT {_pct(s['tbt_attainment'])} both {_pct(s['both_attainment'])} "
            f"{s['throughput_tok_s'] or 0:.0f} tok/s TTFT p50/p99 "
            f"{s['ttft_p50'] or 0:.2f}/{s['ttft_p99'] or 0:.2f}s errors {s['errors']}")
        if not wait_idle(base, args.drain_timeout):
            give_up(i + 1, f"stopped after rate {rate}: server did not drain", "drain failed")
            return
        logged = read_replay_records(server_log, log_offset)
        binding = binding_summary(logged)
        sysres["binding"][i] = binding
        sysres.setdefault("plan_counters", [None] * len(rates))[i] = plan_counters(logged)
        sysres["bound"][i] = binding["bound"] if binding else None
        write_json(args.out, result)
        if binding:
            log(f"{label}bound: {binding['bound']} (prefill {_pct(binding['prefill_share'])}"
                f", waiting for room {_pct(binding['memory_wait_share'])}, for the GPU "
                f"{_pct(binding['compute_wait_share'])})")


def read_replay_records(server_log: Path, offset: int, settle_s: float = 1.0
                        ) -> list[dict[str, Any]]:
    """The stats records the server logged from ``offset`` on: the replay that began there. The
    scheduler logs its last ones on going idle, so this waits ``settle_s`` after the server
    reported idle."""
    time.sleep(settle_s)
    with open(server_log, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return parse_records(text)


def plan_counters(records: list[dict[str, Any]]) -> dict[str, int] | None:
    """The rotator's cumulative counters at the replay's last idle record (rank 0), None for a
    server that does not rotate; one replay's own counts are the difference to the last one."""
    idle = [r for r in records if r["kind"] == "idle" and r.get("tp_rank", 0) == 0]
    if not idle:
        return None
    return {k: idle[-1][k] for k in PLAN_COUNTERS if k in idle[-1]}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", type=Path, required=True, help="Azure CSV")
    ap.add_argument("--trace-name", default=None,
                    help="name in the output file (default: azure_<conv|code> from the CSV)")
    ap.add_argument("--gpu", default="h200", help="name in the output file")
    ap.add_argument("--model-path", type=Path, default=EVAL / "models" / "llama-3.1-8b")
    ap.add_argument("--rates", type=float, nargs="+", default=[12, 14, 16, 18, 20])
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--num", type=int, default=None,
                       help="first N requests at every rate (default 600)")
    group.add_argument("--duration", type=float, default=None,
                       help="instead of --num: rate x duration requests per rate")
    ap.add_argument("--arrival", choices=ARRIVALS, default="poisson",
                    help="poisson/gamma: synthetic gaps; trace: the CSV's, rescaled to the rate")
    ap.add_argument("--cv", type=float, default=1.0, help="gamma arrivals: gap CV")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-prompt", type=int, default=None)
    ap.add_argument("--max-output", type=int, default=None)
    ap.add_argument("--cap", type=int, default=60000, help="--max-total-tokens for every system")
    ap.add_argument("--systems", nargs="+", choices=list(SYSTEMS),
                    default=[s for s in SYSTEMS if not s.endswith("-mixed")])
    ap.add_argument("--ttft-slo", type=float, default=1.0, help="seconds")
    ap.add_argument("--tbt-slo", type=float, default=0.1, help="seconds")
    add_server_run_args(ap)
    ap.add_argument("--extra-json", default=None, help="merged into every request body")
    ap.add_argument("--out", type=Path, default=None,
                    help="default eval/results/slo_<gpu>_<trace>.json")
    ap.add_argument("--raw-dir", type=Path, default=None,
                    help="default eval/results/raw/<gpu>_<trace>")
    ap.add_argument("--merge", action="store_true",
                    help="keep other systems' results from an existing --out (same rates)")
    args = ap.parse_args(argv)
    if args.trace_name is None:
        args.trace_name = "azure_" + args.trace.stem.split("_")[-1]
    if args.num is None and args.duration is None:
        args.num = 600
    tag = f"{args.gpu}_{args.trace_name}"
    args.out = args.out or EVAL / "results" / f"slo_{tag}.json"
    args.raw_dir = args.raw_dir or EVAL / "results" / "raw" / tag
    args.extra = json.loads(args.extra_json) if args.extra_json else None
    args.vocab = model_vocab_size(args.model_path)
    return args


def initial_result(args: argparse.Namespace, rate_specs: list[list[RequestSpec]]
                   ) -> dict[str, Any]:
    result: dict[str, Any] = {
        "rates": args.rates, "num_requests": [len(s) for s in rate_specs],
        "trace": args.trace_name, "trace_path": str(args.trace), "gpu": args.gpu,
        "model_path": str(args.model_path), "cap_tokens": args.cap,
        "ttft_slo": args.ttft_slo, "tbt_slo": args.tbt_slo, "arrival": args.arrival,
        "cv": args.cv, "seed": args.seed, "max_prompt": args.max_prompt,
        "max_output": args.max_output, "server_extra": args.server_extra,
        "command": command_line("eval.sweep_slo"), "commit": source_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "budget_s": None if math.isinf(args.budget) else args.budget,
        "skipped": [], "systems": {},
    }
    if args.merge and args.out.exists():
        old = json.loads(args.out.read_text())
        if old["rates"] != args.rates or old["num_requests"] != result["num_requests"]:
            raise SystemExit(f"--merge: {args.out} has other rates or request counts")
        result["systems"] = {k: v for k, v in old["systems"].items() if k not in args.systems}
        result["skipped"] = [s for s in old["skipped"] if s["system"] not in args.systems]
        result["merged_commands"] = old.get("merged_commands", []) + [old["command"]]
    for name in args.systems:
        result["systems"][name] = empty_system(system_flags(name, args.ttft_slo, args.tbt_slo),
                                               len(args.rates))
    return result


def main() -> None:
    args = parse_args()
    # A SIGTERM (e.g. the command's time limit) unwinds normally, so servers are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    budget = Budget(args.budget, STOP_MARGIN_S)
    rows = load_azure(args.trace)
    rate_specs = [make_specs(rows, num=args.num or math.ceil(rate * args.duration),
                             arrival=args.arrival, rate=rate, cv=args.cv, seed=args.seed,
                             max_prompt=args.max_prompt, max_output=args.max_output)
                  for rate in args.rates]
    args.raw_dir.mkdir(parents=True, exist_ok=True)
    result = initial_result(args, rate_specs)
    write_json(args.out, result)
    log(f"{len(args.systems)} systems x {len(args.rates)} rates, "
        f"{result['num_requests']} requests, results -> {args.out}")
    for idx, name in enumerate(args.systems):
        run_system(name, idx, args, rate_specs, result, budget)
    result["wall_s"] = time.monotonic() - budget.start
    write_json(args.out, result)
    log(f"done; skipped {len(result['skipped'])} (system, rate) points -> {args.out}")


if __name__ == "__main__":
    main()
