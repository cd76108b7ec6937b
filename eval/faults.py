"""The host tier's faults on a real server, each case judged by what it must show, into
eval/results/faults.json: one entry per case with ``case``, ``expected``, ``observed``,
``passed``, ``gpu`` and ``command``.

- ``tier_too_large``: ``--rota-host-kv-gb`` far past the machine's memory: the server exits at
  start with a message naming the flag, before pinning anything.
- ``pinning_failure``: a locked-memory limit (``ulimit -l``) under the tier's size: the same,
  naming the limit.
- ``d2h_copy_failure`` / ``h2d_copy_failure``: ``SUPERINFER_TEST_FAIL_COPY`` fails one
  rotation copy each way during eval.e2e_rotation's burst (Poisson arrivals at ``--burst-rate``;
  outputs against an uncapped baseline) and abort soak; asked for together, one run injects
  both (half the device time). A failed rotate-out leaves its request decoding (every output
  still equal); a failed rotate-in fails exactly that request with an error (the others
  equal). Either way the failure is logged and counted, and no page leaks.
- ``full_tier``: a host tier that holds only a few requests, through the burst and a soak of
  minutes: the tier turns rotations the policy wants away (``plans_host_full``) for a minute
  or more in all, SGLang's own admission and retraction take over, outputs stay equal, nothing
  leaks.
- ``long_soak``: at least 30 minutes against one server. Recorded as not run when
  ``--long-soak-s`` is 0 (the default here: a device session on the GPU machine is 30 minutes).

Each e2e case is one eval.e2e_rotation run (its own JSON and logs under ``--out-dir``); the
start-up cases start one server each and wait for it to exit. Stdlib only: runs on the GPU
machine.

    python -m eval.faults --out $OUT/faults.json --out-dir $OUT/faults \\
        --cases tier_too_large pinning_failure d2h_copy_failure
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from eval.lib.gpus import gpu_names
from eval.lib.jsonfiles import command_line, source_commit, write_json
from eval.lib.server import ServerProcess, sglang_command, stop_servers
from superinfer.adapters.sglang.stats import parse_records
from superinfer.env import TEST_FAIL_COPY

EVAL = Path(__file__).resolve().parent
CASES = ("tier_too_large", "pinning_failure", "d2h_copy_failure", "h2d_copy_failure",
         "full_tier", "long_soak")
COPY_CASES = ("d2h_copy_failure", "h2d_copy_failure")
FAIL_AT = 3  # the rotation copy (per direction, from 1) the injection fails
# full_tier: the soak's rate, and how long in all the tier must have been full (its length:
# --full-soak-s)
FULL_SOAK_RATE, FULL_FOR_S = 20.0, 60
Case = dict[str, Any]


def startup_case(name: str, args: argparse.Namespace, flags: list[str], expected: str,
                 needles: list[str], limit_memlock_kb: int | None = None) -> Case:
    """Start a rotasched server that must refuse to start: passed when it exits within
    ``--startup-timeout`` and its log says every one of ``needles``."""
    launcher = [sys.executable, "-m", "sglang.launch_server"]
    if limit_memlock_kb is not None:  # lower the limit for this server only
        launcher = ["bash", "-c", f'ulimit -l {limit_memlock_kb} && exec "$0" "$@"', *launcher]
    cmd = sglang_command(args.model_path, args.port, ["--schedule-policy", "rotasched", *flags],
                         launcher)
    log_path = args.out_dir / f"{name}.log"
    log_path.unlink(missing_ok=True)
    server = ServerProcess(cmd, log_path)
    deadline = time.monotonic() + args.startup_timeout
    while server.alive() and time.monotonic() < deadline:
        time.sleep(1.0)
    exited = not server.alive()
    stop_servers([server], grace_s=10.0)
    text = server.read_log()
    found = {n: n in text for n in needles}
    lines = [line for line in text.splitlines() if any(n in line for n in needles)]
    return {"case": name, "expected": expected, "command": shlex.join(cmd),
            "observed": {"exited": exited, "exit_code": server.proc.returncode,
                         "seconds": round(time.monotonic() - server.started, 1),
                         "message_found": found, "message": lines[-1][-400:] if lines else None},
            "passed": exited and all(found.values())}


def e2e_case(name: str, args: argparse.Namespace, expected: str, env: dict[str, str],
             extra: list[str]) -> tuple[Case, dict[str, Any] | None, str]:
    """One eval.e2e_rotation run (baseline and rota_p1, burst then soak on rota_p1); returns the
    case's skeleton, the run's result and the rotasched server's log."""
    out = args.out_dir / f"{name}.json"
    raw = args.out_dir / name
    cmd = [sys.executable, "-m", "eval.e2e_rotation", "--servers", "baseline", "rota_p1",
           "--soak-servers", "rota_p1", "--num", str(args.num), "--burst-rate",
           str(args.burst_rate), "--max-prompt", "1000",
           "--max-output", "128", "--model-path", str(args.model_path),
           "--budget", str(args.case_budget), "--out", str(out), "--out-dir", str(raw), *extra]
    shown = " ".join(f"{k}={v}" for k, v in env.items())
    case = {"case": name, "expected": expected,
            "command": f"{shown} {shlex.join(cmd[1:])}".strip().replace(sys.executable, "python")}
    subprocess.run(cmd, env={**os.environ, **env}, check=False, timeout=args.case_budget + 120)
    result = json.loads(out.read_text()) if out.exists() else None
    log = raw / "server_rota_p1.log"
    return case, result, log.read_text(errors="replace") if log.exists() else ""


def tier_counters(log: str) -> dict[str, int]:
    """The last stats record's cumulative counters (rank 0) from a rotasched server's log."""
    stats = [r for r in parse_records(log) if r["kind"] == "stats" and r.get("tp_rank", 0) == 0]
    last = stats[-1] if stats else {}
    keys = ("rotations_out", "rotations_in", "fallbacks", "copies_failed_d2h",
            "copies_failed_h2d", "plans_host_full", "requeued")
    return {k: int(last.get(k, 0)) for k in keys}


def host_full_seconds(log: str) -> float:
    """Seconds, between consecutive stats records of rank 0, over which the host tier turned
    away a rotation the policy wanted (``plans_host_full`` grew)."""
    stats = [r for r in parse_records(log)
             if r["kind"] == "stats" and r.get("tp_rank", 0) == 0 and "at_s" in r]
    return round(sum(b["at_s"] - a["at_s"] for a, b in itertools.pairwise(stats)
                     if b.get("plans_host_full", 0) > a.get("plans_host_full", 0)), 1)


def judge_e2e(case: Case, result: dict[str, Any] | None, log: str, *, failed_out: int = 0,
              failed_in: int = 0, host_full_s: float = 0.0) -> Case:
    """Outputs against the baseline, leaks, counters and log lines of one e2e run;
    ``host_full_s``: the least time the host tier must have been full (turned rotations away)."""
    if result is None:
        return {**case, "observed": "eval.e2e_rotation wrote no result", "passed": False}
    burst = (result.get("correctness") or {}).get("rota_p1") or {}
    compare = burst.get("compare") or {}
    counters = tier_counters(log)
    leaks = {k: result.get(k) for k in ("leaked_device_tokens", "leaked_host_tokens",
                                        "leaked_table_entries")}
    observed = {"burst": {k: burst.get(k) for k in ("n", "complete", "errors", "error_kinds")},
                "outputs": {k: compare.get(k) for k in ("n_compared", "n_equal", "n_mismatched")},
                "counters": counters, "leaks": leaks,
                "logged": {"rotate-out copy failed": log.count("rotate-out copy of"),
                           "rotate-in copy failed": log.count("rotate-in copy of")},
                "host_full_s": host_full_seconds(log), "e2e_passed": result.get("passed")}
    ok = (all(v == 0 for v in leaks.values())
          and compare.get("n_mismatched") == 0
          and burst.get("errors") == failed_in
          and compare.get("n_equal") == burst.get("n", 0) - failed_in
          and counters["copies_failed_d2h"] == failed_out
          and counters["copies_failed_h2d"] == failed_in
          and observed["logged"]["rotate-out copy failed"] == failed_out
          and observed["logged"]["rotate-in copy failed"] == failed_in
          and observed["host_full_s"] >= host_full_s
          and counters["rotations_out"] > 0)
    return {**case, "observed": observed, "passed": ok}


def copy_failure_cases(ways: list[str], args: argparse.Namespace) -> list[Case]:
    """The copy-failure cases of ``ways`` ("d2h", "h2d") from one eval.e2e_rotation run:
    asked for together, one run injects both failures (half the device time), and each
    case's entry judges that whole run, the other direction's failure expected too."""
    outcome = {"d2h": "that request stays on the device and decodes on, every output equals "
                      "the baseline's",
               "h2d": "that request fails with an error response (HTTP 500, a message), every "
                      "other output equals the baseline's"}
    name = f"{ways[0]}_copy_failure" if len(ways) == 1 else "copy_failures"
    together = (f" (one run: the {FAIL_AT}rd copy of the other direction fails too)"
                if len(ways) > 1 else "")
    case, result, log = e2e_case(name, args, "", {TEST_FAIL_COPY: ",".join(
        f"{way}:{FAIL_AT}" for way in ways)}, [])
    judged = judge_e2e(case, result, log, failed_out=int("d2h" in ways),
                       failed_in=int("h2d" in ways))
    return [{**judged, "case": f"{way}_copy_failure",
             "expected": f"the {FAIL_AT}rd rotation copy {way} fails{together}: {outcome[way]}; "
                         "the failure logged and counted; no page leaks after the abort soak"}
            for way in ways]


def run_case(name: str, args: argparse.Namespace) -> Case:
    """A case other than the copy failures (those go through ``copy_failure_cases``)."""
    if name == "tier_too_large":
        return startup_case(
            name, args, ["--rota-host-kv-gb", "1000000"],
            "exits at start, before pinning, with a message naming --rota-host-kv-gb, the size "
            "asked and what is available", ["--rota-host-kv-gb", "HostTierSizeError"])
    if name == "pinning_failure":
        return startup_case(
            name, args, ["--rota-host-kv-gb", "2"],
            "with `ulimit -l 65536` (64 MiB locked) and a 2 GB tier: exits at start with a "
            "message naming the locked-memory limit", ["ulimit -l", "HostTierSizeError"],
            limit_memlock_kb=65536)
    if name == "long_soak":
        return {"case": name, "command": None, "passed": None,
                "expected": "30+ minutes of bursts and aborts against one server; RSS, pinned "
                            "bytes, table size, host-tier use and device-pool free size sampled "
                            "every minute and back at their starting values at every idle check",
                "observed": "not run: a device session on this GPU machine is 30 minutes in "
                            "all (and a machine is returned after 30 minutes held), so a 30-minute "
                            "soak against one server does not fit"}
    if name == "full_tier":
        soak_s = args.full_soak_s
        case, result, log = e2e_case(
            name, args,
            f"a 0.5 GB host tier (a few requests) through the burst and a {soak_s:g}-second "
            f"soak at {FULL_SOAK_RATE:g} req/s with client aborts: the tier turns rotations the "
            f"policy wants away for {FULL_FOR_S} s or more in all (SGLang's own admission and "
            "retraction take over), outputs equal, no request lost, no page leaks",
            {}, ["--host-kv-gb", "0.5", "--soak-rate", str(FULL_SOAK_RATE), "--soak-num",
                 str(int(FULL_SOAK_RATE * soak_s)), "--soak-seconds", str(soak_s)])
        return judge_e2e(case, result, log, host_full_s=FULL_FOR_S)
    raise ValueError(f"unknown case {name!r}; cases: {', '.join(CASES)}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    ap.add_argument("--model-path", type=Path, default=EVAL / "models" / "llama-3.1-8b")
    ap.add_argument("--out", type=Path, default=EVAL / "results" / "faults.json")
    ap.add_argument("--out-dir", type=Path, default=Path("/tmp/faults"),
                    help="server logs and each e2e run's JSON and records")
    ap.add_argument("--num", type=int, default=100, help="burst requests per e2e case")
    ap.add_argument("--burst-rate", type=float, default=20.0,
                    help="the burst's Poisson arrival rate, req/s: spread enough that memory, "
                         "not compute, binds, so requests rotate and the injected copies fail "
                         "where outputs are compared (all at once, no request rotates)")
    ap.add_argument("--case-budget", type=float, default=420.0,
                    help="wall seconds for each e2e case (eval.e2e_rotation --budget)")
    ap.add_argument("--full-soak-s", type=float, default=180.0,
                    help=f"full_tier's soak, seconds (at least {FULL_FOR_S}: the tier must be "
                         "full that long in all)")
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    ap.add_argument("--port", type=int, default=32000)
    args = ap.parse_args(argv)
    if args.full_soak_s < FULL_FOR_S:
        ap.error(f"--full-soak-s must be at least {FULL_FOR_S} (the tier must be full that long)")
    args.model_path = args.model_path.resolve()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    doc = json.loads(args.out.read_text()) if args.out.exists() else {"cases": []}
    gpu = ", ".join(gpu_names()) or None
    pending = list(dict.fromkeys(args.cases))
    while pending:
        name = pending.pop(0)
        print(f"[faults] {name} ...", flush=True)
        if name in COPY_CASES:  # both directions in one run when both are asked for
            ways = [c[:3] for c in (name, *pending) if c in COPY_CASES]
            pending = [c for c in pending if c not in COPY_CASES]
            entries = copy_failure_cases(ways, args)
        else:
            entries = [run_case(name, args)]
        for entry in entries:
            entry = {**entry, "gpu": gpu, "commit": source_commit(),
                     "date": time.strftime("%Y-%m-%d")}
            doc["cases"] = [c for c in doc["cases"] if c["case"] != entry["case"]] + [entry]
            doc.get("not_run", {}).pop(entry["case"], None)
            print(f"[faults] {entry['case']}: passed={entry['passed']} "
                  f"{json.dumps(entry['observed'])[:300]}", flush=True)
        doc["command"] = command_line("eval.faults", argv)
        write_json(args.out, doc)


if __name__ == "__main__":
    main()
