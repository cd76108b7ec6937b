"""Rotasched behind the SGLang router (issue 16): several servers, one router in front, the
same requests through each routing policy, each system's servers back to back.

Per system: start ``--servers`` SGLang servers (server k on GPU k mod the GPU count, each with
``--mem-fraction-static``: two servers on one GPU split it; one wave per GPU at a time), wait
until every one is healthy, warmed up and idle; then per routing policy start ``python -m
sglang_router.launch_router`` in front of them and replay the trace at every rate through it,
waiting for every server to drain after each rate; with ``--direct``, also the rate over the
server count straight to server 0 (what one server sees under a perfectly even split, while
the others idle). Every entry has the SLO sweep's fields (TTFT / TBT / both-SLO attainment,
throughput) and a ``setup`` string. For rotasched, after the first routing policy's rates, the
router checks (``abort_checks``): the highest rate again with ``--abort-frac`` of the requests
dropped mid-stream, then each server drained, its pools as they started and its ``/metrics``
complete. Results go to ``--out`` after every replay, so a run cut short keeps what it
measured. Needs ``sglang-router`` (PyPI) beside SGLang.

    python -m eval.scaleout --trace eval/data/azure_llm_2023/AzureLLMInferenceTrace_conv.csv \\
        --rates 22 --num 300 --servers 2 --mem-fraction-static 0.6 --cap 30000 \\
        --policies round_robin power_of_two --systems lpm rotasched --budget 540 \\
        --out eval/results/scaleout.json --server-extra --rota-host-kv-gb 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shlex
import signal
import sys
import time
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from eval.e2e.outputs import record_counts
from eval.e2e.probes import check_metrics, parse_prometheus
from eval.e2e.rotator_stats import leak_summary
from eval.lib.gpus import gpu_names
from eval.lib.http import http_request, wait_healthy, wait_idle
from eval.lib.jsonfiles import command_line, source_commit, write_json, write_jsonl
from eval.lib.metrics import summarize
from eval.lib.progress import Budget, Progress
from eval.lib.replay import replay
from eval.lib.server import ServerProcess, add_server_run_args, sglang_command, stop_servers
from eval.lib.traces import RequestSpec, load_azure, make_specs, model_vocab_size
from eval.sweep_slo import SYSTEMS, system_flags, warmup_specs
from superinfer.adapters.sglang.stats import parse_records

EVAL = Path(__file__).resolve().parent
POLICIES = ("round_robin", "cache_aware", "power_of_two", "random")
FIELDS = ("ttft_attainment", "tbt_attainment", "both_attainment", "throughput_tok_s",
          "ttft_p50", "ttft_p99", "tbt_p99", "errors")
STOP_MARGIN_S = 40.0
ROUTER_METRICS_OFFSET = 50  # the router's Prometheus port, from its own

log = Progress()


def server_cmds(args: argparse.Namespace, system: str, ports: list[int]) -> list[list[str]]:
    """One SGLang command per server of ``system``: its GPU, port, share of GPU memory; every
    system with ``--enable-metrics`` (the router checks read ``/metrics``, which SGLang serves
    only with it), so the systems compared run alike."""
    launcher = shlex.split(args.launcher) if args.launcher else None
    flags = system_flags(system, args.ttft_slo, args.tbt_slo)
    return [sglang_command(args.model_path, port,
                           ["--max-total-tokens", str(args.cap), "--base-gpu-id",
                            str(k % args.gpus), "--mem-fraction-static",
                            str(args.mem_fraction_static), "--nccl-port", str(port + 1),
                            "--enable-metrics", *flags, *args.server_extra], launcher)
            for k, port in enumerate(ports)]


def router_cmd(args: argparse.Namespace, urls: list[str], policy: str, port: int) -> list[str]:
    """The router in front of ``urls``; its Prometheus port (29000 by default) moves with its
    own, so routers started one after another (or runs side by side) never collide."""
    launcher = shlex.split(args.router_launcher) if args.router_launcher else [
        sys.executable, "-m", "sglang_router.launch_router"]
    return [*launcher, "--worker-urls", *urls, "--policy", policy, "--host", "127.0.0.1",
            "--port", str(port), "--prometheus-port", str(port + ROUTER_METRICS_OFFSET)]


def setup_text(args: argparse.Namespace) -> str:
    per_gpu = math.ceil(args.servers / args.gpus)
    return (f"{args.servers} servers on {args.gpus} GPU(s) ({per_gpu} per GPU, "
            f"--mem-fraction-static {args.mem_fraction_static} each), dp size 1 each, "
            f"KV cap {args.cap} tokens each, behind sglang-router")


def server_log(args: argparse.Namespace, system: str, k: int) -> Path:
    return args.raw_dir / f"server_{system}_{k}.log"


def start_servers(args: argparse.Namespace, system: str, stack: ExitStack,
                  warmup: list[RequestSpec], budget: Budget) -> list[str] | None:
    """Every server of ``system`` healthy, warmed up, idle (their bases), or None if one is not;
    they stop when ``stack`` closes. Servers start one wave per GPU at a time: a server that
    shares its GPU sizes its KV pool from the memory it finds free, so it starts only once the
    one before it on that GPU holds its own (two at once: the later one finds no room)."""
    ports = [args.port + 10 * k for k in range(args.servers)]
    cmds = server_cmds(args, system, ports)
    bases = [f"http://127.0.0.1:{p}" for p in ports]
    started = time.monotonic()
    for wave in range(0, args.servers, args.gpus):
        servers = [ServerProcess(cmds[k], server_log(args, system, k))
                   for k in range(wave, min(wave + args.gpus, args.servers))]
        stack.callback(stop_servers, servers, 30.0)
        for s in servers:
            log(f"{system}: starting: {' '.join(s.cmd)}")
        for base, s in zip(bases[wave:], servers, strict=False):
            if not wait_healthy(base, s.alive, min(args.startup_timeout, budget.usable())):
                log(f"{system}: {base} did not start, see {s.log_path}")
                return None
    for k, base in enumerate(bases):
        warm = asyncio.run(replay(base, warmup, salt=-1 - k, time_limit=120.0, progress=False,
                                  vocab=args.vocab))
        errors = sum(r["error"] is not None for r in warm)
        if errors or not wait_idle(base, args.drain_timeout):
            log(f"{system}: {base} failed its warm-up ({errors} errors) or did not drain")
            return None
    log(f"{system}: {len(bases)} servers up in {time.monotonic() - started:.0f}s")
    return bases


def start_router(args: argparse.Namespace, bases: list[str], policy: str, stack: ExitStack,
                 tag: str, nth: int) -> str | None:
    port = args.router_port + nth  # a fresh port per router: no wait for the last one's socket
    router = ServerProcess(router_cmd(args, bases, policy, port),
                           args.raw_dir / f"router_{tag}_{policy}.log")
    base = f"http://127.0.0.1:{port}"
    log(f"router ({policy}): starting: {' '.join(router.cmd)}")
    if not wait_healthy(base, router.alive, args.router_timeout):
        log(f"router ({policy}) not healthy, see {router.log_path}")
        stop_servers([router], 10.0)
        return None
    stack.callback(stop_servers, [router], 10.0)
    return base


def run_one(args: argparse.Namespace, url: str, bases: list[str], specs: list[RequestSpec],
            entry: dict[str, Any], budget: Budget, salt: int) -> bool:
    """Replay ``specs`` at ``url``, then wait for every server to drain; fill ``entry``.
    False if the budget or a drain stops the run."""
    span = specs[-1].arrival
    left = budget.usable()
    if left < span + 10.0:
        entry["status"] = "skipped: budget"
        return False
    label = f"{entry['system']} via {entry['routing']} @ {entry['rate']:g} req/s "
    records = asyncio.run(replay(url, specs, salt=salt, time_limit=min(span + args.tail, left),
                                 label=label, vocab=args.vocab))
    raw = args.raw_dir / f"{entry['system']}_{entry['routing']}_rate{entry['rate']:g}.jsonl"
    write_jsonl(raw, records)
    s = summarize(records, args.ttft_slo, args.tbt_slo)
    entry.update({k: s[k] for k in FIELDS}, n=s["n"], status="ok", raw=str(raw))
    log(f"{label}TTFT≤SLO {100 * (s['ttft_attainment'] or 0):.1f}% TBT "
        f"{100 * (s['tbt_attainment'] or 0):.1f}% both {100 * (s['both_attainment'] or 0):.1f}% "
        f"{s['throughput_tok_s'] or 0:.0f} tok/s errors {s['errors']}")
    drained = all(wait_idle(b, args.drain_timeout) for b in bases)
    if not drained:
        entry["status"] = "ok, then a server did not drain"
    return drained


def run_system(args: argparse.Namespace, system: str, rate_specs: dict[float, list[RequestSpec]],
               direct_specs: dict[float, list[RequestSpec]], result: dict[str, Any],
               budget: Budget) -> None:
    first = rate_specs[args.rates[0]]
    with ExitStack() as servers:
        bases = start_servers(args, system, servers, warmup_specs(first), budget)
        if bases is None:
            result["skipped"].append({"system": system, "reason": "servers failed to start"})
            return
        salt = 1
        for policy in args.policies:
            with ExitStack() as routed:
                url = start_router(args, bases, policy, routed, system,
                                   args.systems.index(system) * len(args.policies)
                                   + args.policies.index(policy))
                if url is None:
                    result["skipped"].append({"system": system, "routing": policy,
                                              "reason": "router failed to start"})
                    continue
                for rate in args.rates:
                    entry = new_entry(args, system, policy, rate)
                    result["entries"].append(entry)
                    ok = run_one(args, url, bases, rate_specs[rate], entry, budget, salt)
                    salt += 1
                    write_json(args.out, result)
                    if not ok:
                        return
                if (args.abort_frac > 0 and system.startswith("rotasched")
                        and policy == args.policies[0]):
                    check = abort_check(args, system, url, bases, rate_specs[args.rates[-1]],
                                        budget, salt)
                    salt += 1
                    result["abort_checks"].append(check)
                    write_json(args.out, result)
        if args.direct:
            for rate in args.rates:
                entry = new_entry(args, system, "direct", rate / args.servers)
                entry["setup"] = "one of the servers above, alone at rate / servers (no router)"
                result["entries"].append(entry)
                ok = run_one(args, bases[0], bases, direct_specs[rate], entry, budget, salt)
                salt += 1
                write_json(args.out, result)
                if not ok:
                    return


def abort_check(args: argparse.Namespace, system: str, url: str, bases: list[str],
                specs: list[RequestSpec], budget: Budget, salt: int) -> dict[str, Any]:
    """Issue 16's router checks: the highest rate again through the router, ``--abort-frac``
    of the requests dropped by the client mid-stream (a rotated-out one among them, when the
    server rotated); then every server must drain, its last idle record must find its pools
    as they started (nothing leaked) and its ``/metrics`` must export every superinfer series
    with the rotations it counted."""
    check: dict[str, Any] = {"system": system, "routing": args.policies[0],
                             "rate": args.rates[-1], "abort_frac": args.abort_frac,
                             "abort_stall_s": args.abort_stall_s}
    span = specs[-1].arrival
    if budget.usable() < span + 10.0:
        return {**check, "status": "skipped: budget"}
    logs = [server_log(args, system, k) for k in range(len(bases))]
    offsets = [p.stat().st_size if p.exists() else 0 for p in logs]
    records = asyncio.run(replay(url, specs, salt=salt, abort_frac=args.abort_frac,
                                 seed=args.seed, abort_stall_s=args.abort_stall_s,
                                 time_limit=min(span + args.tail,
                                                                budget.usable()),
                                 label=f"{system} abort check ", vocab=args.vocab))
    servers = []
    for base, path, offset in zip(bases, logs, offsets, strict=True):
        idle = wait_idle(base, args.drain_timeout)
        with open(path, "rb") as f:
            f.seek(offset)
            logged = parse_records(f.read().decode(errors="replace"))
        last = [r for r in logged if r["kind"] == "idle"]
        status, text = http_request(base + "/metrics", timeout=30)
        metrics = (check_metrics(parse_prometheus(text)) if status == 200
                   else {"ok": False, "status": status})
        leaks = leak_summary(last[-1], 1) if idle and last else None
        servers.append({"url": base, "idle": idle, "leaks": leaks,
                        "aborted_while_rotated": last[-1].get("aborted_while_rotated")
                        if last else None,
                        "metrics_status": status, "metrics_ok": bool(metrics.get("ok")),
                        "metrics_missing": metrics.get("missing")})
    passed = all(s["idle"] and s["leaks"] is not None and s["leaks"]["clean"]
                 and s["metrics_ok"] for s in servers)
    counts = record_counts(records)
    log(f"{system} abort check via {args.policies[0]}: {counts['client_aborted']} of "
        f"{counts['n']} aborted by the client; "
        + "; ".join(f"{s['url']}: idle {'yes' if s['idle'] else 'NO'}, leaks "
                    f"{'none' if s['leaks'] and s['leaks']['clean'] else s['leaks']}, "
                    f"metrics {'ok' if s['metrics_ok'] else 'NOT ok'} (HTTP {s['metrics_status']})"
                    for s in servers)
        + f": {'passed' if passed else 'FAILED'}")
    return {**check, "status": "ok", **{k: counts[k] for k in ("n", "complete",
                                                               "client_aborted", "errors")},
            "servers": servers, "passed": passed}


def report(entries: list[dict[str, Any]], servers: int, baseline: str = "lpm"
           ) -> list[dict[str, Any]]:
    """Per (routing policy, rate): rotasched against ``baseline`` behind the same policy, and
    issue 16's goal: its TTFT gain within 10 points of the gain one server shows at the matching
    per-server rate (the ``direct`` entries), TBT attainment within 2 points of the baseline's,
    throughput within 5%."""
    done = {(e["routing"], e["system"], round(e["rate"], 6)): e for e in entries
            if e["status"].startswith("ok")}

    def gain(routing: str, rate: float) -> float | None:
        mine, base = (done.get((routing, s, round(rate, 6))) for s in ("rotasched", baseline))
        return None if not (mine and base) else 100 * (mine["ttft_attainment"]
                                                       - base["ttft_attainment"])

    out = []
    for (routing, system, rate), e in sorted(done.items()):
        base = done.get((routing, baseline, rate))
        if routing == "direct" or system != "rotasched" or base is None:
            continue
        routed, single = gain(routing, rate), gain("direct", rate / servers)
        row = {"routing": routing, "rate": rate, "ttft_gain_points": round(routed, 2),
               "single_server_gain_points": None if single is None else round(single, 2),
               "tbt_diff_points": round(100 * (e["tbt_attainment"] - base["tbt_attainment"]), 2),
               "throughput_ratio": round(e["throughput_tok_s"] / base["throughput_tok_s"], 4)
               if base["throughput_tok_s"] else None}
        row["goal_met"] = (single is not None and routed >= single - 10
                           and row["tbt_diff_points"] >= -2
                           and (row["throughput_ratio"] or 0) >= 0.95)
        out.append(row)
    return out


def new_entry(args: argparse.Namespace, system: str, routing: str, rate: float) -> dict[str, Any]:
    return {"routing": routing, "system": system, "rate": rate, "setup": setup_text(args),
            "commit": source_commit(), "status": "not run", **dict.fromkeys(FIELDS)}


SAME_RUN = ("setup", "trace_path", "model_path", "num", "ttft_slo", "tbt_slo", "server_extra")


def kept_from(path: Path, result: dict[str, Any], systems: list[str]) -> None:
    """``--append``: carry the entries, checks and skips of the systems not run now over from
    an earlier result of the same setup and requests; refuse one that differs."""
    if not path.exists():
        return
    old = json.loads(path.read_text())
    differ = [k for k in SAME_RUN if old.get(k) != result[k]]
    if differ or old.get("seed", 0) != result["seed"]:
        raise SystemExit(f"--append: {path} is another run ({', '.join(differ) or 'seed'} "
                         "differ); give another --out")
    for key in ("entries", "abort_checks", "skipped"):
        result[key] = [e for e in old.get(key, []) if e.get("system") not in systems]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", type=Path, required=True, help="Azure CSV")
    ap.add_argument("--model-path", type=Path, default=EVAL / "models" / "llama-3.1-8b")
    ap.add_argument("--rates", type=float, nargs="+", required=True,
                    help="total request rates through the router, req/s")
    ap.add_argument("--num", type=int, default=300, help="requests per rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--gpus", type=int, default=None, help="default: nvidia-smi's count")
    ap.add_argument("--mem-fraction-static", type=float, default=0.42,
                    help="each server's share of its GPU's memory")
    ap.add_argument("--cap", type=int, default=60000, help="--max-total-tokens per server")
    ap.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=["lpm", "rotasched"])
    ap.add_argument("--policies", nargs="+", choices=POLICIES,
                    default=["round_robin", "cache_aware"])
    ap.add_argument("--direct", action=argparse.BooleanOptionalAction, default=True,
                    help="also rate / servers straight to one server")
    ap.add_argument("--abort-frac", type=float, default=0.1,
                    help="after each rotasched system's first routing policy: the highest rate "
                         "again through the router with this share of requests dropped "
                         "mid-stream, then each server's leaks and /metrics (0: no check)")
    ap.add_argument("--abort-stall-s", type=float, default=0.5,
                    help="those of them still streaming also hang up after this many seconds "
                         "without a token (a rotated-out stream pauses; 0: never)")
    ap.add_argument("--ttft-slo", type=float, default=1.0)
    ap.add_argument("--tbt-slo", type=float, default=0.1)
    ap.add_argument("--router-port", type=int, default=30900)
    ap.add_argument("--router-timeout", type=float, default=60.0)
    ap.add_argument("--router-launcher", default=None,
                    help="router command before its flags "
                         "(default: this python -m sglang_router.launch_router)")
    ap.add_argument("--gpu", default=None, help="name in the output (default: nvidia-smi's)")
    ap.add_argument("--out", type=Path, default=EVAL / "results" / "scaleout.json")
    ap.add_argument("--raw-dir", type=Path, default=Path("/tmp/scaleout"))
    ap.add_argument("--append", action="store_true",
                    help="keep --out's entries of the systems not run now (same setup and "
                         "requests): one system per device call")
    add_server_run_args(ap)
    args = ap.parse_args(argv)
    if args.servers < 1 or args.num < 1 or min(args.rates) <= 0:
        ap.error("--servers, --num and --rates must be positive")
    if not 0 <= args.abort_frac < 1:
        ap.error("--abort-frac must be at least 0 and under 1")
    if not 0 < args.mem_fraction_static < 1:
        ap.error("--mem-fraction-static must be in (0, 1)")
    names = gpu_names()
    args.gpus = args.gpus or max(len(names), 1)
    args.gpu = args.gpu or (", ".join(names) or None)
    args.vocab = model_vocab_size(args.model_path)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    budget = Budget(args.budget, STOP_MARGIN_S)
    rows = load_azure(args.trace)
    specs_at = {rate: make_specs(rows, num=args.num, arrival="poisson", rate=rate, seed=args.seed)
                for rate in args.rates}
    # the same requests at rate / servers: what one server of an even split receives
    direct = {rate: make_specs(rows, num=max(1, args.num // args.servers), arrival="poisson",
                               rate=rate / args.servers, seed=args.seed) for rate in args.rates}
    args.raw_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "setup": setup_text(args), "gpu": args.gpu, "servers": args.servers, "gpus": args.gpus,
        "trace_path": str(args.trace), "model_path": str(args.model_path), "num": args.num,
        "ttft_slo": args.ttft_slo, "tbt_slo": args.tbt_slo, "server_extra": args.server_extra,
        "seed": args.seed,
        "command": command_line("eval.scaleout", argv), "commit": source_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "entries": [], "abort_checks": [], "skipped": []}
    if args.append:
        kept_from(args.out, result, args.systems)
    write_json(args.out, result)
    log(f"{len(args.systems)} systems x {len(args.policies)} routing policies x "
        f"{len(args.rates)} rates; {result['setup']}; results -> {args.out}")
    for system in args.systems:
        run_system(args, system, specs_at, direct, result, budget)
    result["wall_s"] = round(time.monotonic() - budget.start, 1)
    result["report"] = report(result["entries"], args.servers)
    write_json(args.out, result)
    for row in result["report"]:
        log(f"rotasched vs lpm via {row['routing']} @ {row['rate']:g} req/s: TTFT "
            f"{row['ttft_gain_points']:+.1f} points (one server: {row['single_server_gain_points']}"
            f"), TBT {row['tbt_diff_points']:+.1f}, throughput x{row['throughput_ratio']}: "
            f"goal {'met' if row['goal_met'] else 'missed'}")
    log(f"done: {sum(e['status'] == 'ok' for e in result['entries'])} entries -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
