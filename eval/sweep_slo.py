"""SLO attainment vs request rate: each system in turn on one GPU, the same requests at each rate.

Per system: start one SGLang server, wait for /health, warm it up, then for each rate replay the
trace's first N requests (arrivals at that rate), wait until the server is idle and its prefix
cache flushed, and summarize. Results go to eval/results/slo_<gpu>_<trace>.json after every
rate, so a run cut short keeps what it measured. Stdlib + aiohttp + numpy: runs on the GPU box.

    python3 eval/sweep_slo.py --trace .gpu/data/azure_llm_2023/AzureLLMInferenceTrace_conv.csv \
        --rates 12 14 16 18 20 --num 600 --cap 60000 --budget 3000
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from metrics import summarize
from replay import replay, write_jsonl
from traces import ARRIVALS, RequestSpec, load_azure, make_specs

EVAL = Path(__file__).resolve().parent
SYSTEMS: dict[str, list[str]] = {
    "fcfs": ["--schedule-policy", "fcfs"],
    "lpm": ["--schedule-policy", "lpm"],
    "hicache": ["--schedule-policy", "fcfs", "--enable-hierarchical-cache",
                "--hicache-ratio", "4"],
    "rotasched-lvf": ["--schedule-policy", "rotasched", "--rota-policy", "lvf"],
    "rotasched": ["--schedule-policy", "rotasched"],
}
# Per-rate series copied from each summary into systems -> name -> key (one value per rate).
SERIES = ("ttft_attainment", "tbt_attainment", "both_attainment", "throughput_tok_s",
          "ttft_p50", "ttft_p90", "ttft_p99", "tbt_p50", "tbt_p99", "tbt_gap_attainment",
          "errors")
STOP_MARGIN_S = 40.0  # kept free at the end of the budget to stop a server cleanly
STARTUP_GUESS_S = 150.0  # start-up on a fresh H200 until one server has been timed


def log(t0: float, msg: str) -> None:
    print(f"[{time.monotonic() - t0:6.0f}s] {msg}", flush=True)


def system_flags(name: str, ttft_slo: float, tbt_slo: float) -> list[str]:
    flags = list(SYSTEMS[name])
    if name.startswith("rotasched"):
        # The scheduler must aim at the SLOs the sweep measures.
        flags += ["--rota-ttft-slo", str(ttft_slo), "--rota-tbt-slo", str(tbt_slo)]
    return flags


def server_cmd(args: argparse.Namespace, port: int, flags: list[str]) -> list[str]:
    # Incremental streaming keeps each SSE chunk O(new tokens), so the client's JSON parsing
    # cannot become the bottleneck that skews token timestamps (the default resends all ids).
    return [sys.executable, "-m", "sglang.launch_server", "--model-path", str(args.model_path),
            "--load-format", "dummy", "--skip-tokenizer-init", "--attention-backend", "triton",
            "--sampling-backend", "pytorch", "--disable-prefill-cuda-graph",
            "--incremental-streaming-output", "--max-total-tokens", str(args.cap),
            "--host", "127.0.0.1", "--port", str(port), *flags, *args.server_extra]


def _http(url: str, method: str = "GET", timeout: float = 5.0) -> int:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return 0


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if _http(base + "/health") == 200:
            return True
        time.sleep(2)
    return False


def drain(base: str, timeout: float) -> bool:
    """Wait until the server is idle: /flush_cache only succeeds with no running or queued
    requests, and it also empties the prefix cache before the next rate."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if _http(base + "/flush_cache", "POST") == 200:
            return True
        time.sleep(1)
    return False


def stop_server(proc: subprocess.Popen) -> None:
    """Stop the server and the scheduler processes it spawned (its own process group)."""
    pgid = proc.pid  # started with start_new_session=True, so pgid == pid
    for sig, wait_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 15.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + wait_s
        while time.monotonic() < end:
            proc.poll()
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)


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
                           "summaries": [None] * n_rates, "raw": [None] * n_rates}
    out.update({k: [None] * n_rates for k in SERIES})
    return out


def save(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)


def run_system(name: str, idx: int, args: argparse.Namespace, rate_specs: list[list[RequestSpec]],
               result: dict[str, Any], t0: float) -> None:
    """Start ``name``'s server, replay every rate, stop it; fill result['systems'][name]."""
    rates = result["rates"]
    sysres = result["systems"][name]
    deadline = t0 + args.budget

    def skip_rest(from_rate: int, reason: str) -> None:
        for r in rates[from_rate:]:
            result["skipped"].append({"system": name, "rate": r, "reason": reason})

    timed = [s["startup_s"] for s in result["systems"].values() if s.get("startup_s")]
    startup = max(timed) if timed else STARTUP_GUESS_S
    if time.monotonic() + startup + rate_specs[0][-1].arrival + 10.0 + STOP_MARGIN_S > deadline:
        sysres["status"] = "skipped: budget"
        skip_rest(0, "budget")
        log(t0, f"{name}: skipped, not enough budget left to start a server")
        return
    port = args.port + 10 * idx  # a fresh port per server: no wait for the last one's sockets
    base = f"http://127.0.0.1:{port}"
    cmd = server_cmd(args, port, sysres["flags"])
    server_log = args.raw_dir / f"server_{name}.log"
    sysres["server_log"] = str(server_log)
    log(t0, f"{name}: starting: {' '.join(cmd)}")
    started = time.monotonic()
    with open(server_log, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        up_limit = min(args.startup_timeout, deadline - time.monotonic() - STOP_MARGIN_S)
        if not wait_healthy(base, proc, up_limit):
            state = "exited" if proc.poll() is not None else "not healthy in time"
            sysres["status"] = f"server failed to start ({state}), see {server_log}"
            skip_rest(0, "server failed")
            log(t0, f"{name}: {sysres['status']}")
            return
        warm = asyncio.run(replay(base, warmup_specs(rate_specs[0]), salt=-1, time_limit=120.0,
                                  progress=False))
        warm_errors = sum(r["error"] is not None for r in warm)
        sysres["startup_s"] = time.monotonic() - started
        log(t0, f"{name}: up in {sysres['startup_s']:.0f}s (warm-up errors: {warm_errors})")
        if not drain(base, args.drain_timeout):
            sysres["status"] = "server busy after warm-up"
            skip_rest(0, "drain failed")
            log(t0, f"{name}: {sysres['status']}")
            return
        sysres["status"] = "ok"
        for i, (rate, specs) in enumerate(zip(rates, rate_specs)):
            span = specs[-1].arrival
            left = deadline - time.monotonic() - STOP_MARGIN_S
            if left < span + 10.0:
                sysres["status"] = f"stopped at rate {rate}: budget"
                skip_rest(i, "budget")
                log(t0, f"{name}: out of budget before rate {rate}")
                return
            label = f"{name} @ {rate:g} req/s "
            records = asyncio.run(replay(base, specs, salt=i + 1, extra=args.extra,
                                         time_limit=min(span + args.tail, left), label=label))
            raw = args.raw_dir / f"{name}_rate{rate:g}.jsonl"
            write_jsonl(raw, records)
            s = summarize(records, args.ttft_slo, args.tbt_slo)
            sysres["summaries"][i] = s
            sysres["raw"][i] = raw_info(raw, records)
            for k in SERIES:
                sysres[k][i] = s[k]
            save(args.out, result)
            log(t0, f"{label}n={s['n']} TTFT≤SLO {_pct(s['ttft_attainment'])} "
                    f"TBT {_pct(s['tbt_attainment'])} both {_pct(s['both_attainment'])} "
                    f"{s['throughput_tok_s'] or 0:.0f} tok/s TTFT p50/p99 "
                    f"{s['ttft_p50'] or 0:.2f}/{s['ttft_p99'] or 0:.2f}s errors {s['errors']}")
            if not drain(base, args.drain_timeout):
                sysres["status"] = f"stopped after rate {rate}: server did not drain"
                skip_rest(i + 1, "drain failed")
                log(t0, f"{name}: {sysres['status']}")
                return
    finally:
        stop_server(proc)
        save(args.out, result)


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
    ap.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS))
    ap.add_argument("--ttft-slo", type=float, default=1.0, help="seconds")
    ap.add_argument("--tbt-slo", type=float, default=0.1, help="seconds")
    ap.add_argument("--budget", type=float, default=math.inf,
                    help="total wall seconds; remaining work is skipped and recorded")
    ap.add_argument("--tail", type=float, default=60.0,
                    help="seconds after the last arrival before unfinished requests are cut")
    ap.add_argument("--startup-timeout", type=float, default=400.0)
    ap.add_argument("--drain-timeout", type=float, default=120.0)
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--server-extra", nargs=argparse.REMAINDER, default=[],
                    help="flags appended to every server command (must come last)")
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
        "command": shlex.join(["python3", *sys.argv]),
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
    t0 = time.monotonic()
    rows = load_azure(args.trace)
    rate_specs = [make_specs(rows, num=args.num or math.ceil(rate * args.duration),
                             arrival=args.arrival, rate=rate, cv=args.cv, seed=args.seed,
                             max_prompt=args.max_prompt, max_output=args.max_output)
                  for rate in args.rates]
    args.raw_dir.mkdir(parents=True, exist_ok=True)
    result = initial_result(args, rate_specs)
    save(args.out, result)
    log(t0, f"{len(args.systems)} systems x {len(args.rates)} rates, "
            f"{result['num_requests']} requests, results -> {args.out}")
    for idx, name in enumerate(args.systems):
        run_system(name, idx, args, rate_specs, result, t0)
    result["wall_s"] = time.monotonic() - t0
    save(args.out, result)
    log(t0, f"done; skipped {len(result['skipped'])} (system, rate) points -> {args.out}")


if __name__ == "__main__":
    main()
