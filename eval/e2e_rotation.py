"""End to end on real SGLang: rotasched's outputs are right, nothing leaks, TP ranks agree.

Starts every server at once (distinct ports, capped KV pools), then:
1. correctness: the same burst of greedy requests (conv trace lengths, outputs forced) to every
   server; each rotasched server's output ids must equal its fcfs baseline's. The baselines hold
   the whole burst at once (no rotation, no retraction). TP=2 has its own baseline: dummy weights
   are seeded per shard and the reductions differ, so TP=1 ids are no reference for it. With
   --control each baseline also serves the burst in reverse order: the determinism floor.
2. soak: an overload from the conv trace with client aborts mid-stream; when the client stops,
   every request left (queued, running, rotated out) is aborted by disconnect. Then the
   rotator's idle record must show the device and host pools back at their initial free size
   exactly and an empty table; the server must answer, refuse a bad per-request SLO with a 4xx,
   and answer again.
3. metrics: the superinfer:* Prometheus series on /metrics, rotations_out_total > 0.
Rotations, leaks and TP agreement come from the rotator's structured stats records in each
server's log (eval/e2e/rotator_stats.py). A wall-clock --budget bounds everything; what did not
fit is listed under "skipped". Results go to --out (default eval/results/e2e_h200.json) and,
with every server log, to --out-dir. Stdlib + aiohttp + numpy: runs on the GPU machine.

    python -m eval.e2e_rotation --tp2 --out-dir $OUT/e2e --budget 540 \\
        --trace eval/data/azure_llm_2023/AzureLLMInferenceTrace_conv.csv
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

from eval.e2e import rotator_stats as rs
from eval.e2e.log import log
from eval.e2e.outputs import baseline_tokens, burst_specs
from eval.e2e.phases import checks_phase, correctness_phase, soak_phase
from eval.e2e.reanalyze import reanalyze
from eval.e2e.report import new_result, overall, server_entries, summary_table
from eval.e2e.servers import (
    DP2,
    DP2_SHARED,
    EXTRA,
    SINGLE,
    TP2,
    Server,
    ServerPlan,
    plan_servers,
    server_cmd,
    server_env,
    start_servers,
    stop_all,
)
from eval.lib.gpus import gpu_names, visible_count
from eval.lib.jsonfiles import command_line, write_json
from eval.lib.progress import Budget
from eval.lib.traces import RequestSpec, TraceRow, load_azure, model_vocab_size

EVAL = Path(__file__).resolve().parent
MODULE = "eval.e2e_rotation"
DEFAULT_TRACE = Path("eval/data/azure_llm_2023/AzureLLMInferenceTrace_conv.csv")
STOP_MARGIN_S = 45.0  # kept at the end of the budget to stop the servers and write results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="Azure conv CSV")
    ap.add_argument("--model-path", type=Path, default=EVAL / "models" / "llama-3.1-8b")
    ap.add_argument("--out", type=Path, default=EVAL / "results" / "e2e_h200.json")
    ap.add_argument("--out-dir", type=Path, default=EVAL / "results" / "raw" / "e2e_h200",
                    help="server logs, raw records, progress log and a copy of --out")
    ap.add_argument("--budget", type=float, default=540.0, help="wall seconds for everything")
    ap.add_argument("--tp2", action="store_true", help="also baseline_tp2 and rota_tp2 (2 GPUs)")
    ap.add_argument("--servers", nargs="+", choices=SINGLE + TP2 + DP2 + DP2_SHARED + EXTRA,
                    default=None,
                    help="start only these (default: the four single-GPU ones, + TP=2 with --tp2)")
    ap.add_argument("--soak-servers", nargs="+", default=None,
                    help="rotasched servers to soak (default: every rotasched server up)")
    ap.add_argument("--gpus", type=int, default=None, help="GPU count (default: nvidia-smi's)")
    ap.add_argument("--baseline-gpu", choices=("auto", "0", "1"), default="auto",
                    help="auto: GPU 1 when the TP=2 pair runs (GPU 0 is full), else GPU 0")
    ap.add_argument("--cap", type=int, default=12000, help="rotasched --max-total-tokens")
    ap.add_argument("--baseline-tokens", type=int, default=None,
                    help="baseline --max-total-tokens (default: the whole burst + 4096)")
    ap.add_argument("--host-kv-gb", type=float, default=16.0)
    ap.add_argument("--mem-fraction-static", type=float, default=0.88,
                    help="SGLang 0.5.17 leaves (1 - f) x the free memory it finds at start for "
                         "activations; every KV pool is capped, so a high f is the safe one")
    ap.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True,
                    help="--enable-deterministic-inference on every server")
    ap.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                    help="baselines serve the burst again in reverse order (determinism floor)")
    ap.add_argument("--num", type=int, default=300, help="burst requests")
    ap.add_argument("--burst-rate", type=float, default=None,
                    help="send the burst as Poisson arrivals at this rate, req/s (default: all "
                         "at once)")
    ap.add_argument("--start", type=int, default=0, help="first trace row")
    ap.add_argument("--max-prompt", type=int, default=1500)
    ap.add_argument("--min-output", type=int, default=32)
    ap.add_argument("--max-output", type=int, default=256)
    ap.add_argument("--burst-timeout", type=float, default=300.0)
    ap.add_argument("--soak-num", type=int, default=2000)
    ap.add_argument("--soak-rate", type=float, default=40.0, help="req/s")
    ap.add_argument("--soak-seconds", type=float, default=60.0, help="longest arrival span")
    ap.add_argument("--soak-tail", type=float, default=10.0,
                    help="seconds after the last arrival before the client hangs up on the rest")
    ap.add_argument("--abort-frac", type=float, default=0.1)
    ap.add_argument("--abort-stall-s", type=float, default=0.5,
                    help="those of them still streaming also hang up after this many seconds "
                         "without a token (a rotated-out stream pauses; 0: never)")
    ap.add_argument("--startup-timeout", type=float, default=420.0)
    ap.add_argument("--probe-timeout", type=float, default=180.0, help="first request, s")
    ap.add_argument("--drain-timeout", type=float, default=120.0)
    ap.add_argument("--port", type=int, default=31000, help="server i uses port + 10 i (+1: NCCL)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--salt", type=int, default=1, help="token-id salt (soak: salt + 1)")
    ap.add_argument("--rota-extra", default="", help="more flags for rotasched servers")
    ap.add_argument("--server-extra", default="", help="more flags for every server")
    ap.add_argument("--launcher", default=None,
                    help="server command before its flags "
                         "(default: this python -m sglang.launch_server)")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the plan and commands, start nothing")
    ap.add_argument("--reanalyze", type=Path, default=None, metavar="DIR",
                    help="rebuild the result JSON (to --out) from a finished run's --out-dir "
                         "(server logs, progress.log, records, its JSON); starts nothing")
    args = ap.parse_args(argv)
    if not 1 <= args.min_output <= args.max_output:
        ap.error("need 1 <= --min-output <= --max-output")
    args.model_path = args.model_path.resolve()
    return args


def run_plans(orig: dict[str, Any]) -> list[ServerPlan]:
    """A finished run's server plans, from its recorded command line, for the servers it
    recorded (commands of `python -m eval.e2e_rotation` or, before that, of the script path)."""
    argv = shlex.split(orig["command"])
    start = next((i for i, a in enumerate(argv) if a == MODULE or a.endswith("e2e_rotation.py")),
                 None)
    if start is None:
        raise SystemExit(f"not a command of {MODULE}: {orig['command']}")
    args = parse_args(argv[start + 1:])
    n_gpus = args.gpus if args.gpus is not None else len(orig.get("gpu") or [])
    plans, _ = plan_servers(args, n_gpus, orig["settings"]["baseline_tokens"])
    return [p for p in plans if p.name in orig["servers"]]


def print_plan(args: argparse.Namespace, plans: list[ServerPlan], skipped: list[dict[str, str]],
               burst: list[RequestSpec], base_tokens: int) -> None:
    print(f"burst: {len(burst)} requests, {sum(s.prompt_len for s in burst)} prompt + "
          f"{sum(s.output_len for s in burst)} output tokens; baseline pool {base_tokens} tokens, "
          f"rotasched pool {args.cap} tokens")
    print(f"soak: up to {args.soak_num} requests at {args.soak_rate:g} req/s for at most "
          f"{args.soak_seconds:g}s, {args.abort_frac:.0%} aborted mid-stream; "
          f"budget {args.budget:g}s")
    for i, p in enumerate(plans):
        env = server_env(p)
        extra = " SGLANG_ENABLE_TP_MEMORY_INBALANCE_CHECK=0" if p.n_gpus > 1 else ""
        print(f"\n# {p.name} (compared with {p.reference or '-'})\n"
              f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}{extra} "
              + shlex.join(server_cmd(args, p, args.port + 10 * i, args.deterministic)))
    for s in skipped:
        print(f"\nskipped: {s}")


def run(args: argparse.Namespace, servers: list[Server], rows: list[TraceRow],
        burst: list[RequestSpec], result: dict[str, Any], budget: Budget,
        paths: list[Path]) -> None:
    start_servers(servers, args, budget)
    result["servers"] = server_entries(servers)
    save(result, paths)
    up = [s for s in servers if s.state == "up"]
    if not up:
        result["skipped"].append({"phase": "all", "reason": "no server up"})
        return
    correctness_phase(args, up, burst, result, budget)
    save(result, paths)
    wanted = args.soak_servers or [s.name for s in up]
    soak_phase(args, [s for s in up if s.plan.rotasched and s.name in wanted and s.alive()], rows,
               result, budget)
    save(result, paths)
    checks_phase(up, result, budget)  # a server that died fails its checks
    tp2 = next((s for s in up if s.name == "rota_tp2"), None)
    if tp2 is not None:
        result["tp2"] = rs.ranks_agree(rs.rotation_records(tp2.read_log()))
        log(f"tp2: ranks {result['tp2']['ranks']} identical: {result['tp2']['identical']}")


def save(result: dict[str, Any], paths: list[Path]) -> None:
    for path in paths:
        write_json(path, result)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.reanalyze is not None:
        result = reanalyze(args.reanalyze, command_line(MODULE, argv), run_plans)
        save(result, [args.out])
        print(summary_table(result), flush=True)
        print(f"results: {args.out}")
        return 0 if result["passed"] else 1
    rows = load_azure(args.trace)
    burst = burst_specs(rows, args)
    base_tokens = args.baseline_tokens or baseline_tokens(burst)
    gpus = gpu_names()
    n_gpus = (visible_count(len(gpus), os.environ.get("CUDA_VISIBLE_DEVICES"))
              if args.gpus is None else args.gpus)
    if args.dry_run:
        n_gpus = n_gpus or 2
        print(f"dry run, as on {n_gpus} GPU(s)")
        print_plan(args, *plan_servers(args, n_gpus, base_tokens), burst, base_tokens)
        return 0
    plans, skipped = plan_servers(args, n_gpus, base_tokens)
    if n_gpus == 0:
        print("no GPU found by nvidia-smi (use --gpus to override)", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log.path = args.out_dir / "progress.log"
    paths = [args.out, args.out_dir / args.out.name]
    budget = Budget(args.budget, STOP_MARGIN_S)
    result = new_result(args, gpus, base_tokens, burst, plans, skipped)
    servers = [Server(p, args.port + 10 * i, args.out_dir, args.deterministic,
                      model_vocab_size(args.model_path))
               for i, p in enumerate(plans)]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: servers get stopped
    log(f"{len(plans)} servers on {n_gpus} GPU(s) ({'; '.join(gpus) or '?'}), "
        f"budget {args.budget:g}s, logs in {args.out_dir}")
    t0 = time.monotonic()
    try:
        run(args, servers, rows, burst, result, budget, paths)
    finally:
        result["servers"] = server_entries(servers)
        log("stopping servers")
        stop_all(servers)
        result["wall_s"] = round(time.monotonic() - t0, 1)
        result.update(overall(result))
        save(result, paths)
        print(summary_table(result), flush=True)
        log(f"results: {', '.join(map(str, paths))}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
