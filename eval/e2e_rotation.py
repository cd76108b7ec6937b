"""End to end on real SGLang: rotasched's outputs are right, nothing leaks, TP ranks agree.

Starts every server at once (distinct ports, capped KV pools), then:
1. correctness: the same burst of greedy requests (conv trace lengths, outputs forced) to every
   server; each rotasched server's output ids must equal its fcfs baseline's. The baselines hold
   the whole burst at once (no rotation, no retraction). TP=2 has its own baseline: dummy weights
   are seeded per shard and the reductions differ, so TP=1 ids are no reference for it. With
   --control each baseline also serves the burst in reverse order: the determinism floor.
2. soak: an overload from the conv trace with client aborts mid-stream; when the client stops,
   every request left (queued, running, rotated out) is aborted by disconnect. Then the
   rotator's idle-check line must show the device and host pools back at their initial free
   size exactly and an empty table; the server must answer, refuse a bad per-request SLO with a
   4xx, and answer again.
3. metrics: the superinfer:* Prometheus series on /metrics, rotations_out_total > 0.
A wall-clock --budget bounds everything; what did not fit is listed under "skipped". Results go to
--out (default eval/results/e2e_h200.json) and, with every server log, to --out-dir.
Stdlib + aiohttp + numpy: runs on the GPU machine.

    python3 eval/e2e_rotation.py --tp2 --out-dir $OUT/e2e --budget 540 \\
        --trace .gpu/data/azure_llm_2023/AzureLLMInferenceTrace_conv.csv
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from replay import read_jsonl, replay, write_jsonl
from traces import RequestSpec, TraceRow, load_azure, make_specs, prompt_ids

EVAL = Path(__file__).resolve().parent
DEFAULT_TRACE = Path(".gpu/data/azure_llm_2023/AzureLLMInferenceTrace_conv.csv")
HOST_PAGE_TOKENS = 16  # host page of the staging paths; the direct path's is the --page-size
STOP_MARGIN_S = 45.0  # kept at the end of the budget to stop the servers and write results
CHECKS_S = 40.0  # post-soak requests and /metrics on every rotasched server
DRAIN_S = 30.0  # kept after a replay for the server to go idle (aborts of what was cut)
MIN_PHASE_S = 20.0  # a replay phase shorter than this is skipped
STARTUP_GUESS_S = 150.0  # a server start on the H200 (no retry with less budget left)
STRAGGLER_S = 180.0  # once one server is healthy, the others get this long (not the full timeout)
DETERMINISM_WORDS = ("determinis", "batch_invariant", "batch invariant")
STATS_MARK = "rotasched stats:"
IDLE_MARK = "rotasched idle check:"
ROTATOR_MARK = "rotasched: policy="
HOST_PAGE_RE = re.compile(r"(\d+)-token pages")
STATS_KEYS = ("out", "in", "d2h", "h2d", "fallbacks", "away", "host_used")
IDLE_KEYS = ("device_free", "device_total", "host_free", "host_total", "table", "rotations_out",
             "rotated_reqs", "multi_rotated_reqs", "max_per_req", "aborted_while_rotated")
SUPERINFER_SERIES = ("superinfer:rotations_out_total", "superinfer:rotations_in_total",
                     "superinfer:bytes_d2h_total", "superinfer:bytes_h2d_total",
                     "superinfer:host_tier_tokens_used", "superinfer:requests_rotated_out")
FIELD_RE = re.compile(r"(\w+)=(-?\d+(?:\.\d+)?)")
TP_RE = re.compile(r"\bTP(\d+)\b")
METRIC_RE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{([^}]*)\})?\s+(\S+)")
LABEL_RE = re.compile(r'(\w+)="([^"]*)"')
LOG_TIME_RE = re.compile(rb"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)")  # SGLang's log prefix
PROGRESS_RE = re.compile(r"\[(\d\d:\d\d:\d\d) \+\s*-?\d+s\] (.*)")  # Progress's prefix
ROTATION_NOTE = ("rotations_by_rank 'source': 'idle' when the phase has an idle-check line (all "
                 "fields), 'stats' when it has none (the server went on to the next phase without "
                 "logging one): rotations_out then comes from the cumulative 'rotasched stats' "
                 "lines (every 5 s, so a lower bound) and per-request counts, aborts and pools are "
                 "null; headline sums with any null are null.")
Record = dict[str, Any]


# --- progress and budget --------------------------------------------------------------------
class Progress:
    """Timestamped progress lines on stdout, copied to a file once one is set."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.path: Path | None = None

    def __call__(self, msg: str) -> None:
        line = f"[{datetime.now():%H:%M:%S} +{time.monotonic() - self.t0:4.0f}s] {msg}"
        print(line, flush=True)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(line + "\n")


log = Progress()


@dataclass
class Budget:
    deadline: float

    def usable(self, reserve: float = 0.0) -> float:
        """Seconds left for work after ``reserve`` and the stop margin."""
        return self.deadline - time.monotonic() - STOP_MARGIN_S - reserve


# --- the servers ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerPlan:
    """One server to start: its flags, GPUs (indices), and the baseline it is compared with."""

    name: str
    flags: tuple[str, ...]
    gpus: tuple[int, ...]
    page_size: int
    rotasched: bool
    reference: str | None = None

    @property
    def tp(self) -> int:
        return len(self.gpus)


SINGLE = ("baseline", "rota_p1", "rota_p16", "rota_p1_noradix")
TP2 = ("baseline_tp2", "rota_tp2")
# Not run by default: 64-token pages, where --rota-mover auto picks the direct path (Llama-3.1-8B),
# and kept host copies (--rota-keep-host-copy) or write-through on 16-token pages.
EXTRA = ("rota_p64", "rota_p16_keep", "rota_p16_wt")


def plan_servers(args: argparse.Namespace, n_gpus: int, baseline_tokens: int
                 ) -> tuple[list[ServerPlan], list[dict[str, str]]]:
    """The servers to start, and those skipped (with the reason)."""
    names = list(args.servers or (SINGLE + TP2 if args.tp2 else SINGLE))
    skipped = []
    if n_gpus < 2 and any(n in TP2 for n in names):
        skipped = [{"server": n, "reason": f"needs 2 GPUs, found {n_gpus}"}
                   for n in names if n in TP2]
        names = [n for n in names if n not in TP2]
    tp2 = any(n in TP2 for n in names)
    # Next to the TP=2 pair, GPU 0 cannot also hold a baseline sized for the whole burst.
    base_gpu = (1 if tp2 else 0) if args.baseline_gpu == "auto" else int(args.baseline_gpu)
    fcfs = ("--schedule-policy", "fcfs", "--page-size", "1",
            "--max-total-tokens", str(baseline_tokens))
    rota = ("--max-total-tokens", str(args.cap), "--enable-metrics", "--rota-host-kv-gb",
            f"{args.host_kv_gb:g}", *shlex.split(args.rota_extra))
    p1 = ("--schedule-policy", "rotasched", "--page-size", "1")
    table = {
        "baseline": ServerPlan("baseline", fcfs, (base_gpu,), 1, False),
        "rota_p1": ServerPlan("rota_p1", (*p1, *rota), (0,), 1, True, "baseline"),
        "rota_p16": ServerPlan("rota_p16", ("--scheduler-policy", "rotasched", "--page-size", "16",
                                            *rota), (0,), 16, True, "baseline"),
        "rota_p1_noradix": ServerPlan("rota_p1_noradix", (*p1, "--disable-radix-cache", *rota),
                                      (0,), 1, True, "baseline"),
        "rota_p64": ServerPlan("rota_p64", ("--schedule-policy", "rotasched", "--page-size", "64",
                                            *rota), (0,), 64, True, "baseline"),
        "rota_p16_keep": ServerPlan("rota_p16_keep", ("--schedule-policy", "rotasched", "--page-size", "16",
                                                      "--rota-keep-host-copy", *rota), (0,), 16, True,
                                    "baseline"),
        "rota_p16_wt": ServerPlan("rota_p16_wt", ("--schedule-policy", "rotasched", "--page-size", "16",
                                                  "--rota-write-through", *rota), (0,), 16, True, "baseline"),
        "baseline_tp2": ServerPlan("baseline_tp2", ("--tp-size", "2", *fcfs), (0, 1), 1, False),
        "rota_tp2": ServerPlan("rota_tp2", ("--tp-size", "2", *p1, *rota), (0, 1), 1, True,
                               "baseline_tp2"),
    }
    return [table[n] for n in names], skipped


def server_cmd(args: argparse.Namespace, plan: ServerPlan, port: int,
               deterministic: bool) -> list[str]:
    launcher = (shlex.split(args.launcher) if args.launcher
                else [sys.executable, "-m", "sglang.launch_server"])
    cmd = [*launcher, "--model-path", str(args.model_path), "--load-format", "dummy",
           "--skip-tokenizer-init", "--attention-backend", "triton",
           "--sampling-backend", "pytorch",
           "--disable-prefill-cuda-graph", "--incremental-streaming-output", "--random-seed", "1",
           "--mem-fraction-static", f"{args.mem_fraction_static:g}", "--host", "127.0.0.1",
           "--port", str(port), "--nccl-port", str(port + 1), *plan.flags]
    if deterministic:
        cmd.append("--enable-deterministic-inference")
    return cmd + shlex.split(args.server_extra)


def visible_devices(gpus: tuple[int, ...], inherited: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for GPU indices, relative to an inherited setting if there is one."""
    if inherited:
        pool = [g.strip() for g in inherited.split(",") if g.strip()]
        return ",".join(pool[i] for i in gpus)
    return ",".join(str(i) for i in gpus)


def visible_count(n_gpus: int, inherited: str | None) -> int:
    """GPUs this process may use: nvidia-smi's count, narrowed by an inherited setting."""
    return min(n_gpus, len([g for g in inherited.split(",") if g.strip()])) if inherited else n_gpus


def server_env(plan: ServerPlan) -> dict[str, str]:
    gpus = visible_devices(plan.gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES=gpus)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # each server makes its own
    if plan.tp > 1:
        # GPU 0 also holds the single-GPU servers: SGLang would refuse the unequal free memory.
        env["SGLANG_ENABLE_TP_MEMORY_INBALANCE_CHECK"] = "0"
    return env


@dataclass
class Server:
    """A running (or failed) server and its start attempts."""

    plan: ServerPlan
    base_port: int
    out_dir: Path
    deterministic: bool
    port: int = 0
    state: str = "not started"  # starting, healthy, up, failed
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    launched_s: float = 0.0
    startup_s: float | None = None
    cmd: list[str] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def launch(self, args: argparse.Namespace) -> None:
        n = len(self.attempts)
        self.port = self.base_port + 5 * n  # a retry never waits for the last attempt's ports
        self.log_path = self.out_dir / f"server_{self.name}{f'.retry{n}' if n else ''}.log"
        self.cmd = server_cmd(args, self.plan, self.port, self.deterministic)
        with open(self.log_path, "ab") as f:
            self.proc = subprocess.Popen(self.cmd, stdout=f, stderr=subprocess.STDOUT,
                                         env=server_env(self.plan), start_new_session=True)
        self.launched_s = time.monotonic()
        self.state = "starting"
        # Servers run in their own sessions: if this script is killed outright they outlive it,
        # and `kill -- -PGID` with a group id from this file ends one.
        with open(self.out_dir / "server_pids.txt", "a") as f:
            f.write(f"{self.name} {self.proc.pid}\n")

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path and self.log_path.exists() else 0

    def read_log(self, start: int = 0, end: int | None = None) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(start)
            data = f.read() if end is None else f.read(max(0, end - start))
        return data.decode("utf-8", "replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def stop_servers(servers: list[Server], grace_s: float = 20.0) -> None:
    """SIGTERM every server's process group, SIGKILL what is left after ``grace_s``."""
    groups = [s.proc for s in servers if s.proc is not None]
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        live = [p for p in groups if _group_alive(p)]
        for p in live:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + wait_s
        while live and time.monotonic() < end:
            time.sleep(0.5)
            live = [p for p in live if _group_alive(p)]
        if not live:
            return


def _group_alive(proc: subprocess.Popen) -> bool:
    proc.poll()  # reap the leader, or its zombie keeps the group alive
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    return True


def failure_text(log_tail: str) -> str:
    """The part of a failed server's log that says why: its last traceback, else error lines."""
    i = log_tail.rfind("Traceback (most recent call last)")
    if i >= 0:
        return log_tail[i:]
    return "\n".join(line for line in log_tail.splitlines() if "error" in line.lower())


def blames_determinism(log_tail: str) -> bool:
    text = failure_text(log_tail).lower()
    return any(w in text for w in DETERMINISM_WORDS)


def start_servers(servers: list[Server], args: argparse.Namespace, budget: Budget) -> None:
    """Start all at once; a failed one is retried once (without deterministic inference if that
    is what its error names). Healthy servers then must answer a first request."""
    for s in servers:
        s.launch(args)
        log(f"{s.name}: starting on GPU {','.join(map(str, s.plan.gpus))}: {shlex.join(s.cmd)}")
    first_healthy: float | None = None
    while pending := [s for s in servers if s.state == "starting"]:
        for s in pending:
            deadline = s.launched_s + args.startup_timeout
            if first_healthy is not None:  # a hung server must not eat the others' budget
                deadline = min(deadline, max(first_healthy, s.launched_s) + STRAGGLER_S)
            if s.proc.poll() is not None:
                _start_failed(s, f"exited with code {s.proc.returncode}", args, budget)
            elif http_request(s.url + "/health", timeout=3)[0] == 200:
                s.state = "healthy"
                s.startup_s = time.monotonic() - s.launched_s
                first_healthy = first_healthy or time.monotonic()
                log(f"{s.name}: healthy after {s.startup_s:.0f}s")
            elif time.monotonic() > deadline or budget.usable() < 0:
                _start_failed(s, "not healthy in time", args, budget)
        time.sleep(2)
    healthy = [s for s in servers if s.state == "healthy"]
    with ThreadPoolExecutor(max(1, len(healthy))) as ex:
        probes = list(ex.map(lambda s: generate_once(s.url, prompt_ids(0, 32, salt=-1), 4,
                                                     timeout=args.probe_timeout), healthy))
    for s, p in zip(healthy, probes):
        s.state = "up" if p["status"] == 200 and p["n_ids"] == 4 else "failed"
        if s.state == "failed":
            s.attempts.append({"deterministic": s.deterministic, "reason": f"first request: {p}",
                               "log": str(s.log_path)})
            stop_servers([s], grace_s=5.0)  # its GPU memory goes back to the others
        log(f"{s.name}: {s.state} (first request: HTTP {p['status']}, {p['n_ids']} tokens)")


def _start_failed(s: Server, reason: str, args: argparse.Namespace, budget: Budget) -> None:
    tail = s.read_log(max(0, s.log_size() - 20000))
    s.attempts.append({"deterministic": s.deterministic, "reason": reason, "log": str(s.log_path),
                       "error": failure_text(tail)[-3000:]})
    stop_servers([s], grace_s=5.0)
    if len(s.attempts) >= 2 or budget.usable(STARTUP_GUESS_S) < 0:
        s.state = "failed"
        log(f"{s.name}: FAILED ({reason}), see {s.log_path}")
        return
    if s.deterministic and blames_determinism(tail):
        s.deterministic = False
    how = "" if s.deterministic else " without deterministic inference"
    log(f"{s.name}: {reason}; retrying once{how}")
    s.launch(args)


# --- HTTP -----------------------------------------------------------------------------------
def http_request(url: str, body: dict[str, Any] | None = None,
                 timeout: float = 10.0) -> tuple[int, str]:
    """Status (0 when unreachable) and body text; POSTs ``body`` as JSON when given."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as e:
        return 0, f"{type(e).__name__}: {e}"


def generate_once(url: str, ids: list[int], n: int, custom_params: dict[str, Any] | None = None,
                  stream: bool = False, timeout: float = 60.0) -> dict[str, Any]:
    """One greedy /generate request: HTTP status, tokens received, finish reason or error."""
    params: dict[str, Any] = {"max_new_tokens": n, "ignore_eos": True, "temperature": 0}
    if custom_params is not None:
        params["custom_params"] = custom_params
    status, text = http_request(url + "/generate", {"input_ids": ids, "sampling_params": params,
                                                    "stream": stream}, timeout)
    return {"status": status, **parse_generate_body(text, stream)}


def parse_generate_body(text: str, stream: bool) -> dict[str, Any]:
    """Token count, finish reason and error of a /generate answer (JSON, or SSE when streamed)."""
    events = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
    try:
        chunks = ([json.loads(e) for e in events if e and e != "[DONE]"] if stream and events
                  else [json.loads(text)])
    except ValueError:
        return {"n_ids": 0, "finish_reason": None, "error": text[:300]}
    chunks = [c for c in chunks if isinstance(c, dict)]
    meta = [c.get("meta_info") or {} for c in chunks]
    counts = [m["completion_tokens"] for m in meta if isinstance(m.get("completion_tokens"), int)]
    error = next((c["error"] for c in chunks if "error" in c), None)
    n_ids = counts[-1] if counts else sum(len(c.get("output_ids") or []) for c in chunks)
    return {"n_ids": n_ids, "finish_reason": meta[-1].get("finish_reason") if meta else None,
            "error": error if error is None or isinstance(error, str) else json.dumps(error)[:300]}


def wait_idle(url: str, timeout: float) -> bool:
    """Poll /flush_cache until it succeeds. SGLang flushes only when fully idle, and SuperInfer's
    is_fully_idle hook adds "nothing rotated out", so success means every request is gone; the
    hook logs the idle check (pool sizes before the flush) on that first idle call at the latest."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if http_request(url + "/flush_cache", {}, timeout=10)[0] == 200:
            return True
        time.sleep(1.0)
    return False


# --- the rotator's log lines ----------------------------------------------------------------
def parse_rota_lines(text: str) -> list[dict[str, Any]]:
    """Every complete 'rotasched stats' and 'rotasched idle check' line, in order: kind,
    rank (the TPn tag of SGLang's log prefix; 0 without one) and the numbers."""
    out = []
    for line in text.splitlines():
        for kind, mark, keys in (("stats", STATS_MARK, STATS_KEYS), ("idle", IDLE_MARK, IDLE_KEYS)):
            pos = line.find(mark)
            if pos < 0:
                continue
            values = {k: float(v) if "." in v else int(v)
                      for k, v in FIELD_RE.findall(line[pos + len(mark):])}
            if all(k in values for k in keys):
                tag = TP_RE.search(line[:pos])
                out.append({"kind": kind, "rank": int(tag.group(1)) if tag else 0,
                            **{k: values[k] for k in keys}})
    return out


def rotator_ranks(text: str) -> list[int]:
    """TP ranks that logged the Rotator's start line (the plugin is active there)."""
    ranks = set()
    for line in text.splitlines():
        pos = line.find(ROTATOR_MARK)
        if pos >= 0:
            tag = TP_RE.search(line[:pos])
            ranks.add(int(tag.group(1)) if tag else 0)
    return sorted(ranks)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def rotator_host_page(text: str) -> int:
    """The host tier's page size from the Rotator's start line (16 in logs that predate it)."""
    for line in text.splitlines():
        if ROTATOR_MARK in line:
            found = HOST_PAGE_RE.search(line)
            return int(found.group(1)) if found else HOST_PAGE_TOKENS
    return HOST_PAGE_TOKENS


def leak_summary(idle: dict[str, Any], page_size: int, host_page: int = HOST_PAGE_TOKENS
                 ) -> dict[str, Any]:
    """What an idle check says is still held: device (pages of ``page_size``) and host tier
    (pages of ``host_page``)."""
    dev = idle["device_total"] - idle["device_free"]
    host = idle["host_total"] - idle["host_free"]
    return {"device_tokens": dev, "host_tokens": host, "device_pages": _ceil_div(dev, page_size),
            "host_pages": _ceil_div(host, host_page), "table": idle["table"],
            "clean": dev == 0 and host == 0 and idle["table"] == 0}


def phase_rotations(before: list[dict[str, Any]], during: list[dict[str, Any]],
                    page_size: int, host_page: int = HOST_PAGE_TOKENS) -> dict[str, dict[str, Any]]:
    """Per TP rank (str): the rotations of one phase, from the rotator's lines logged before it
    (``before``) and in it (``during``).

    rotations_out counts on both kinds of line (stats: ``out``, idle check: ``rotations_out``) and
    is cumulative, so the last value logged before the phase is subtracted. With an idle check
    in the phase (source "idle"), rotated_reqs and the like come from its idle checks (they count
    per busy period, so they are summed; aborted_while_rotated is cumulative) and so do the pools.
    A busy period that began before the phase also counts the requests rotated then:
    carried_rotations says how many rotations that was (0 when the server went idle in between).
    Without an idle check in the phase (the server never logged one: the next phase came first),
    the rotations come from the phase's last stats line (source "stats"): rotations_out only,
    and the per-request counts, aborts, pools and leaks are unknown (None). Stats lines come every
    few seconds, so rotations after the last one count in the next phase."""
    out = {}
    for rank in sorted({x["rank"] for x in during}):
        mine = [x for x in during if x["rank"] == rank]
        prev = [x for x in before if x["rank"] == rank]
        idle = [x for x in mine if x["kind"] == "idle"]
        prev_idle = [x for x in prev if x["kind"] == "idle"]
        stats = [x for x in prev + mine if x["kind"] == "stats"]
        start = _rotations_out(prev[-1]) if prev else 0
        entry: dict[str, Any] = {
            "source": "idle" if idle else "stats",
            "rotations_out": _rotations_out(mine[-1] if not idle else idle[-1]) - start,
            "rotated_reqs": None, "multi_rotated_reqs": None, "max_per_req": None,
            "aborted_while_rotated": None, "carried_rotations": None, "idle_checks": len(idle),
            "cumulative_in": stats[-1]["in"] if stats else 0,
            "cumulative_fallbacks": stats[-1]["fallbacks"] if stats else 0,
            "pools": None, "leaks": None,
        }
        if idle:
            first = prev_idle[-1] if prev_idle else {"rotations_out": 0,
                                                      "aborted_while_rotated": 0}
            last = idle[-1]
            entry.update(
                rotated_reqs=sum(x["rotated_reqs"] for x in idle),
                multi_rotated_reqs=sum(x["multi_rotated_reqs"] for x in idle),
                max_per_req=max(x["max_per_req"] for x in idle),
                aborted_while_rotated=(last["aborted_while_rotated"]
                                       - first["aborted_while_rotated"]),
                carried_rotations=start - first["rotations_out"],
                pools={k: last[k] for k in ("device_free", "device_total", "host_free",
                                            "host_total", "table")},
                leaks=leak_summary(last, page_size, host_page))
        out[str(rank)] = entry
    return out


def _rotations_out(line: dict[str, Any]) -> int:
    """The cumulative rotations-out counter of a stats or idle-check line."""
    return line["out"] if line["kind"] == "stats" else line["rotations_out"]


def idle_leaks(by_rank: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]] | None:
    """Per TP rank, what the phase's last idle check says is held; None unless every rank
    logged one in the phase."""
    if not by_rank or any(v["leaks"] is None for v in by_rank.values()):
        return None
    return {r: v["leaks"] for r, v in by_rank.items()}


def first_rank(by_rank: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The lowest TP rank's entry ({} without any): totals count one rank, as TP=1 does."""
    return by_rank[min(by_rank, key=int)] if by_rank else {}


def ranks_agree(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether every TP rank logged the same rotation numbers, line for line (repeats of an
    unchanged line are dropped: ranks may probe idleness a different number of times)."""
    seqs: dict[tuple[str, int], list[tuple]] = {}
    for x in lines:
        row = tuple(v for k, v in x.items() if k not in ("kind", "rank"))
        seq = seqs.setdefault((x["kind"], x["rank"]), [])
        if not seq or seq[-1] != row:
            seq.append(row)
    ranks = sorted({r for _, r in seqs})
    result: dict[str, Any] = {
        "ranks": ranks, "lines": {f"{k}/TP{r}": len(v) for (k, r), v in seqs.items()},
        "identical": None, "last_lines_equal": None, "first_difference": None}
    if len(ranks) < 2:
        return result
    result["identical"] = True
    last = {key: seq[-1] for key, seq in seqs.items()}
    result["last_lines_equal"] = all(last.get((k, r)) == last.get((k, ranks[0]))
                                     for k in ("stats", "idle") for r in ranks[1:])
    for kind, keys in (("stats", STATS_KEYS), ("idle", IDLE_KEYS)):
        ref = seqs.get((kind, ranks[0]), [])
        for r in ranks[1:]:
            other = seqs.get((kind, r), [])
            if other == ref:
                continue
            i = next((i for i, (a, b) in enumerate(zip(ref, other)) if a != b),
                     min(len(ref), len(other)))
            result["identical"] = False
            result["first_difference"] = result["first_difference"] or {
                "kind": kind, "index": i, f"TP{ranks[0]}": _row(ref, i, keys),
                f"TP{r}": _row(other, i, keys)}
    return result


def _row(seq: list[tuple], i: int, keys: tuple[str, ...]) -> dict[str, Any] | None:
    return dict(zip(keys, seq[i])) if i < len(seq) else None


# --- output comparison ----------------------------------------------------------------------
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
            pos = next((i for i, (x, y) in enumerate(zip(a_ids, b_ids)) if x != y),
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


# --- Prometheus -----------------------------------------------------------------------------
def parse_prometheus(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples of a Prometheus text exposition: name -> [(labels, value)]."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        m = METRIC_RE.match(line)
        if m is None:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out.setdefault(m.group(1), []).append((dict(LABEL_RE.findall(m.group(2) or "")), value))
    return out


def check_metrics(series: dict[str, list[tuple[dict[str, str], float]]]) -> dict[str, Any]:
    """Every superinfer:* series present (with rank 0's), and rotations_out_total > 0; the ranks
    that export them are listed (every TP rank's rotator publishes its own)."""
    missing = [n for n in SUPERINFER_SERIES if n not in series]
    ranks = sorted({lab["tp_rank"] for n in SUPERINFER_SERIES for lab, _ in series.get(n, [])
                    if "tp_rank" in lab})
    values = {n: {lab.get("tp_rank", "?"): v for lab, v in series.get(n, [])}
              for n in SUPERINFER_SERIES}
    rotations = sum(values["superinfer:rotations_out_total"].values())
    sglang_series = sum(n.startswith("sglang:") for n in series)
    return {"missing": missing, "tp_ranks": ranks, "values": values, "sglang_series": sglang_series,
            "ok": not missing and rotations > 0 and "0" in ranks}


# --- request sets ---------------------------------------------------------------------------
def forced(spec: RequestSpec, arrival: float, min_output: int, max_output: int) -> RequestSpec:
    output_len = min(max(spec.output_len, min_output), max_output)
    return RequestSpec(spec.idx, arrival, spec.prompt_len, output_len)


def burst_specs(rows: list[TraceRow], args: argparse.Namespace) -> list[RequestSpec]:
    """The correctness burst: trace lengths (prompts capped, outputs forced), all sent at t=0."""
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


# --- phases ---------------------------------------------------------------------------------
def correctness_phase(args: argparse.Namespace, up: list[Server], specs: list[RequestSpec],
                      result: dict[str, Any], budget: Budget) -> None:
    usable = budget.usable(CHECKS_S + DRAIN_S)
    limit = min(args.burst_timeout, usable)
    if usable < min(MIN_PHASE_S, args.burst_timeout):
        result["skipped"].append({"phase": "correctness", "reason": "budget"})
        log("correctness: skipped (budget)")
        return
    log(f"correctness: {len(specs)} requests at once to {', '.join(s.name for s in up)} "
        f"(limit {limit:.0f}s)")
    outs = asyncio.run(_bursts(args, up, specs, limit))
    for s in up:
        write_jsonl(args.out_dir / f"correctness_{s.name}.jsonl",
                    [compact(r, keep_ids=True) for r in outs[s.name]["records"]])
    for s in up:
        result["correctness"][s.name] = correctness_entry(s, outs)
        log(f"correctness: {s.name}: {_brief(result['correctness'][s.name])}")


async def _bursts(args: argparse.Namespace, up: list[Server], specs: list[RequestSpec],
                  limit: float) -> dict[str, dict[str, Any]]:
    end = time.monotonic() + limit

    async def one(s: Server) -> tuple[str, dict[str, Any]]:
        out: dict[str, Any] = {"offset": s.log_size()}
        out["records"] = await replay(s.url, specs, salt=args.salt, time_limit=limit,
                                      label=f"{s.name} ")
        out["idle"] = await asyncio.to_thread(wait_idle, s.url, args.drain_timeout)
        out["log_end"] = s.log_size()
        left = end - time.monotonic()
        if args.control and not s.plan.rotasched and left > MIN_PHASE_S:
            out["control"] = await replay(s.url, specs[::-1], salt=args.salt, time_limit=left,
                                          label=f"{s.name} reversed ")
            await asyncio.to_thread(wait_idle, s.url, args.drain_timeout)
        return s.name, out

    return dict(await asyncio.gather(*(one(s) for s in up)))


def correctness_entry(s: Server, outs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out = outs[s.name]
    entry: dict[str, Any] = {**record_counts(out["records"]), "idle_reached": out["idle"]}
    if "control" in out:
        entry["control_reversed"] = compare_outputs(out["records"], out["control"])
    if s.plan.rotasched:
        by_rank = window_rotations(s, out)
        entry["rotations_by_rank"] = by_rank
        entry["rotations"] = first_rank(by_rank) or None
        rotated = (entry["rotations"] or {}).get("rotated_reqs")
        if rotated is not None and out["records"]:
            # The comparison means little unless many requests went through a rotation.
            entry["rotated_fraction"] = round(rotated / len(out["records"]), 3)
        entry["reference"] = s.plan.reference
        ref = outs.get(s.plan.reference)
        entry["compare"] = compare_outputs(ref["records"], out["records"]) if ref else None
    return entry


def window_rotations(s: Server, out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """phase_rotations of the server's log bytes [out["offset"], out["log_end"])."""
    head = s.read_log(0, out["offset"])
    during = parse_rota_lines(s.read_log(out["offset"], out["log_end"]))
    return phase_rotations(parse_rota_lines(head), during, s.plan.page_size, rotator_host_page(head))


def _brief(entry: dict[str, Any]) -> str:
    text = f"{entry['complete']}/{entry['n']} complete, {entry['errors']} errors"
    if entry.get("compare"):
        c = entry["compare"]
        text += f", equal {c['n_equal']}/{c['n_compared']}"
    r = entry.get("rotations")
    if r and r.get("source") == "stats":
        text += f", rotations {r['rotations_out']} (stats lines: no idle check, requests unknown)"
    elif r:
        text += (f", rotations {r['rotations_out']} over {r['rotated_reqs']} requests "
                 f"({r['multi_rotated_reqs']} several times, max {r['max_per_req']})")
    if entry.get("control_reversed"):
        c = entry["control_reversed"]
        text += f", reversed-order control equal {c['n_equal']}/{c['n_compared']}"
    return text


def soak_phase(args: argparse.Namespace, targets: list[Server], rows: list[TraceRow],
               result: dict[str, Any], budget: Budget) -> None:
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
        rot = first_rank(entry["rotations_by_rank"])
        log(f"soak: {s.name}: {entry['complete']}/{len(specs)} complete, "
            f"{entry['client_aborted']} aborted by the client, {entry['errors']} cut or failed, "
            f"{rot.get('rotations_out', '?')} rotations, "
            f"{rot.get('aborted_while_rotated', '?')} aborted while rotated out, "
            f"idle {'yes' if out['idle'] else 'NO'}, leaks "
            + (", ".join(f"TP{r} device {v['device_tokens']} tok host {v['host_tokens']} tok table "
                         f"{v['table']}" for r, v in leaks.items()) or "unknown"))


def soak_entry(s: Server, out: dict[str, Any]) -> dict[str, Any]:
    by_rank = window_rotations(s, out)
    return {**record_counts(out["records"]), "idle_reached": out["idle"],
            "rotations_by_rank": by_rank, "leaks": idle_leaks(by_rank) if out["idle"] else None}


async def _soaks(args: argparse.Namespace, targets: list[Server], specs: list[RequestSpec],
                 limit: float) -> dict[str, dict[str, Any]]:
    async def one(s: Server) -> tuple[str, dict[str, Any]]:
        out: dict[str, Any] = {"offset": s.log_size()}
        out["records"] = await replay(s.url, specs, salt=args.salt + 1, time_limit=limit,
                                      abort_frac=args.abort_frac, seed=args.seed,
                                      label=f"{s.name} soak ")
        out["idle"] = await asyncio.to_thread(wait_idle, s.url, args.drain_timeout)
        out["log_end"] = s.log_size()
        return s.name, out

    return dict(await asyncio.gather(*(one(s) for s in targets)))


def post_checks(s: Server) -> dict[str, Any]:
    """A normal request, a bad per-request SLO (plain and streamed), a normal request again."""
    ids = prompt_ids(10**6, 64, salt=-2)
    bad = {"ttft_slo": -1}
    first = generate_once(s.url, ids, 16)
    refused = generate_once(s.url, ids, 8, bad)
    refused_stream = generate_once(s.url, ids, 8, bad, stream=True)
    second = generate_once(s.url, ids, 16)
    ok = [c["status"] == 200 and c["n_ids"] == 16 for c in (first, second)]
    return {"normal_before": first, "bad_slo": refused, "bad_slo_stream": refused_stream,
            "normal_after": second, "bad_slo_4xx": 400 <= refused["status"] < 500,
            "alive": s.alive(), "passed": all(ok) and 400 <= refused["status"] < 500 and s.alive()}


def checks_phase(up: list[Server], result: dict[str, Any], budget: Budget) -> None:
    rota = [s for s in up if s.plan.rotasched]
    if budget.usable() < 15:
        result["skipped"].append({"phase": "checks", "reason": "budget"})
        log("checks: skipped (budget)")
        return
    with ThreadPoolExecutor(max(1, len(rota))) as ex:
        checks = list(ex.map(post_checks, rota))
    for s, c in zip(rota, checks):
        status, text = http_request(s.url + "/metrics", timeout=30)
        m = (check_metrics(parse_prometheus(text)) if status == 200
             else {"ok": False, "status": status})
        result["checks"][s.name], result["metrics"][s.name] = c, m
        streamed = c["bad_slo_stream"]
        log(f"checks: {s.name}: normal {c['normal_before']['status']}/"
            f"{c['normal_after']['status']}, bad SLO -> HTTP {c['bad_slo']['status']} (streamed: "
            f"HTTP {streamed['status']}, {streamed['finish_reason'] or streamed['error']}), "
            f"metrics {'ok' if m['ok'] else 'NOT ok'}")


# --- results --------------------------------------------------------------------------------
def final_leaks(result: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
    """Per rotasched server: what its last idle check says is held (after the soak if it was
    soaked, else after the burst), per TP rank; None when unknown (never idle, no line)."""
    corr = {n: c for n, c in result["correctness"].items() if "reference" in c}
    out: dict[str, dict[str, Any] | None] = {}
    for name in [*corr, *(n for n in result["soak"] if n not in corr)]:
        soak = result["soak"].get(name)
        if soak is not None:
            out[name] = soak["leaks"] or None
        else:
            c = corr[name]
            out[name] = idle_leaks(c["rotations_by_rank"]) if c["idle_reached"] else None
    return out


def _worst(values: list[int]) -> int:
    return max(values, key=abs)


def _total(values: list[int | None]) -> int | None:
    """The sum, or None when any is unknown."""
    return None if any(v is None for v in values) else sum(values)


def overall(result: dict[str, Any]) -> dict[str, Any]:
    """The headline fields from the per-phase entries."""
    rota = {n: c for n, c in result["correctness"].items() if "reference" in c}
    rot = [c.get("rotations") or {} for c in rota.values()]
    cmps = [c.get("compare") for c in rota.values()]
    equal = bool(cmps) and all(c is not None and 0 < c["n_compared"] == c["n_equal"] for c in cmps)
    controls = [c["control_reversed"] for c in result["correctness"].values()
                if "control_reversed" in c]
    leaks = final_leaks(result)
    known = [v for lk in leaks.values() if lk for v in lk.values()]
    unknown = not known or any(lk is None for lk in leaks.values())
    tp2 = rota.get("rota_tp2")
    tp2_ran = bool(tp2 and tp2.get("compare") and tp2["compare"]["n_compared"] > 0)
    tp2_same = (result.get("tp2") or {}).get("identical")
    checks_ok = bool(result["checks"]) and all(c["passed"] for c in result["checks"].values())
    metrics_ok = bool(result["metrics"]) and all(m["ok"] for m in result["metrics"].values())
    head: dict[str, Any] = {
        "rotations": sum(r.get("rotations_out", 0) for r in rot),
        "rotated_requests": _total([r.get("rotated_reqs", 0) for r in rot]),
        "multi_rotated_requests": _total([r.get("multi_rotated_reqs", 0) for r in rot]),
        "rotations_source": {n: r.get("source") for n, r in zip(rota, rot)},
        "soak_aborted_while_rotated": _total([
            first_rank(e.get("rotations_by_rank") or {}).get("aborted_while_rotated", 0)
            for e in result["soak"].values()]),
        "outputs_equal": equal,
        "outputs_compared": {n: f"{c['n_equal']}/{c['n_compared']} of {c['n']}" if c else None
                             for n, c in zip(rota, cmps)},
        "control_outputs_equal": (all(c["n_equal"] == c["n_compared"] for c in controls)
                                  if controls else None),
        "leak_source": {n: "soak" if n in result["soak"] else "correctness" for n in leaks},
        "tp2_ran": tp2_ran,
        "tp2_identical_decisions": tp2_same,
        "bad_slo_status": {n: c["bad_slo"]["status"] for n, c in result["checks"].items()},
        "checks_ok": checks_ok,
        "metrics_ok": metrics_ok,
    }
    for key in ("device_pages", "host_pages", "device_tokens", "host_tokens", "table"):
        name = "leaked_table_entries" if key == "table" else f"leaked_{key}"
        head[name] = None if unknown else _worst([v[key] for v in known])
    no_leaks = not unknown and all(v["clean"] for v in known)
    head["passed"] = (equal and head["rotations"] > 0 and no_leaks and checks_ok and metrics_ok
                      and (not tp2_ran or tp2_same is True))
    return head


def new_result(args: argparse.Namespace, gpus: list[str], base_tokens: int,
               burst: list[RequestSpec], plans: list[ServerPlan],
               skipped: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "command": shlex.join(["python3", *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "gpu": gpus, "deterministic_requested": args.deterministic, "budget_s": args.budget,
        "settings": {"trace": str(args.trace), "model_path": str(args.model_path),
                     "burst_requests": len(burst), "burst_tokens": sum(s.prompt_len + s.output_len
                                                                       for s in burst),
                     "max_prompt": args.max_prompt,
                     "output_range": [args.min_output, args.max_output],
                     "cap_tokens": args.cap, "baseline_tokens": base_tokens,
                     "host_kv_gb": args.host_kv_gb, "mem_fraction_static": args.mem_fraction_static,
                     "soak_rate": args.soak_rate, "soak_num": args.soak_num,
                     "soak_seconds": args.soak_seconds, "abort_frac": args.abort_frac,
                     "rota_extra": args.rota_extra, "server_extra": args.server_extra,
                     "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)},
        "notes": [
            "leaked_*_pages: device pages of the server's --page-size tokens, host-tier pages of "
            "the rotator's host page (its start line: 16 tokens, or --page-size on the direct "
            "path); leaked_*_tokens: the same in tokens. The worst (largest "
            "magnitude) over every rotasched server's last idle check: after the soak if it was "
            "soaked, else after the burst (leak_source).",
            "rota_tp2 is compared with baseline_tp2: dummy weights are seeded per shard and TP "
            "reductions differ, so TP=1 output ids are no reference for TP=2.",
            f"baselines hold the whole burst ({base_tokens} tokens) so they never retract; "
            "'retracted' counts requests SGLang itself retracted (meta_info.num_retractions).",
            ROTATION_NOTE,
        ],
        "servers": {p.name: {"gpus": list(p.gpus), "flags": list(p.flags), "state": "not started"}
                    for p in plans},
        "correctness": {}, "soak": {}, "checks": {}, "metrics": {}, "tp2": None,
        "skipped": list(skipped),
    }


def server_entries(servers: list[Server]) -> dict[str, dict[str, Any]]:
    out = {}
    for s in servers:
        text = s.read_log() if s.plan.rotasched else ""
        out[s.name] = {"state": s.state, "gpus": list(s.plan.gpus), "port": s.port,
                       "deterministic": s.deterministic, "startup_s": s.startup_s,
                       "command": shlex.join(s.cmd), "log": str(s.log_path), "attempts": s.attempts,
                       "alive_at_end": s.alive(),
                       "rotator_ranks": rotator_ranks(text) if s.plan.rotasched else None}
    return out


def save(result: dict[str, Any], paths: list[Path]) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(path)


def summary_table(result: dict[str, Any]) -> str:
    head = ("server", "state", "det", "complete", "equal", "rot_out", "rot_reqs", "multi", "max",
            "leak dev/host/table", "bad SLO", "metrics")
    rows = [head]
    leaks = final_leaks(result)
    for name, srv in result["servers"].items():
        c = result["correctness"].get(name, {})
        cmp_, rot = c.get("compare"), c.get("rotations")
        held = leaks.get(name)
        leak = "/".join(str(_worst([v[k] for v in held.values()]))
                        for k in ("device_tokens", "host_tokens", "table")) if held else "-"
        chk, met = result["checks"].get(name), result["metrics"].get(name)
        rows.append((name, srv.get("state", "?"), "y" if srv.get("deterministic") else "n",
                     f"{c['complete']}/{c['n']}" if c else "-",
                     f"{cmp_['n_equal']}/{cmp_['n_compared']}" if cmp_ else "-",
                     *(("?" if rot[k] is None else str(rot[k])) if rot else "-"
                       for k in ("rotations_out", "rotated_reqs", "multi_rotated_reqs",
                                 "max_per_req")),
                     leak, str(chk["bad_slo"]["status"]) if chk else "-",
                     ("ok" if met["ok"] else "FAIL") if met else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    keys = ("rotations", "rotated_requests", "multi_rotated_requests", "outputs_equal",
            "control_outputs_equal", "leaked_device_pages", "leaked_host_pages", "tp2_ran",
            "tp2_identical_decisions", "passed")
    lines.append(", ".join(f"{k}={result.get(k)}" for k in keys))
    lines += [f"skipped: {s}" for s in result["skipped"]]
    return "\n".join(lines)


# --- re-analysis of a finished run ----------------------------------------------------------
def log_time(line: bytes) -> datetime | None:
    m = LOG_TIME_RE.match(line)
    return datetime.strptime(m.group(1).decode(), "%Y-%m-%d %H:%M:%S") if m else None


def first_log_time(path: Path) -> datetime | None:
    if not path.exists():
        return None
    with open(path, "rb") as f:
        return next((t for t in map(log_time, f) if t is not None), None)


def window_offsets(data: bytes, start: datetime, end: datetime) -> tuple[int, int]:
    """Byte offsets [offset, log_end) of a server log's lines stamped in [start, end] (whole
    seconds; a line without a stamp goes with the one before it)."""
    pos, when, first, last = 0, None, None, 0
    for line in data.splitlines(keepends=True):
        when = log_time(line) or when
        if first is None and when is not None and when >= start:
            first = pos
        pos += len(line)
        if when is not None and when <= end:
            last = pos
    first = pos if first is None else first
    return first, max(first, last)


def progress_events(text: str, anchor: datetime) -> list[tuple[datetime, str]]:
    """progress.log's lines as (time, message). They carry the time of day only: the first goes
    on the day that puts it nearest ``anchor``, each later one on its predecessor's day (the next
    day when its time of day is earlier)."""
    out: list[tuple[datetime, str]] = []
    for line in text.splitlines():
        m = PROGRESS_RE.match(line)
        if m is None:
            continue
        clock = datetime.strptime(m.group(1), "%H:%M:%S").time()
        if out:
            when = datetime.combine(out[-1][0].date(), clock)
            when += timedelta(days=1) if when < out[-1][0] else timedelta()
        else:
            when = min((datetime.combine(anchor.date() + timedelta(days=d), clock)
                        for d in (-1, 0, 1)), key=lambda w: abs(w - anchor))
        out.append((when, m.group(2)))
    return out


def phase_window(events: list[tuple[datetime, str]], phase: str,
                 name: str) -> tuple[datetime, datetime] | None:
    """A server's window in a phase: from the phase's first progress line to the line on that
    server's result (logged once every server of the phase is done and idle, or given up)."""
    start = next((t for t, msg in events if msg.startswith(f"{phase}: ")), None)
    end = next((t for t, msg in events if msg.startswith(f"{phase}: {name}: ")), None)
    return None if start is None or end is None else (start, end)


def original_result(run_dir: Path) -> Path:
    """The run's own result JSON in its --out-dir: e2e_h200.json, else the only one there."""
    default = run_dir / "e2e_h200.json"
    if default.exists():
        return default
    found = [p for p in sorted(run_dir.glob("*.json"))
             if {"command", "correctness"} <= set(json.loads(p.read_text()))]
    if len(found) != 1:
        raise SystemExit(f"{run_dir}: no single result JSON (found {[p.name for p in found]})")
    return found[0]


def run_plans(orig: dict[str, Any]) -> list[ServerPlan]:
    """The run's server plans, from its recorded command line, for the servers it recorded."""
    argv = shlex.split(orig["command"])
    script = next((i for i, a in enumerate(argv) if a.endswith(Path(__file__).name)), None)
    if script is None:
        raise SystemExit(f"not a command of {Path(__file__).name}: {orig['command']}")
    args = parse_args(argv[script + 1:])
    n_gpus = args.gpus if args.gpus is not None else len(orig.get("gpu") or [])
    plans, _ = plan_servers(args, n_gpus, orig["settings"]["baseline_tokens"])
    return [p for p in plans if p.name in orig["servers"]]


def reanalyze(run_dir: Path, command: str) -> dict[str, Any]:
    """The result JSON of a finished run, rebuilt from its --out-dir without starting a server:
    each phase's rotations (server windows from progress.log, rotator lines from the server
    logs), the output comparisons (correctness_*.jsonl), the soak counts and leaks (soak_*.jsonl
    and the soak's idle check), TP=2 rank agreement and the headline fields. What the directory
    does not hold comes from the run's own JSON: command, date, GPUs, settings, servers, whether
    a server went idle, the reversed-order controls, the post-soak checks and the metrics."""
    orig = json.loads(original_result(run_dir).read_text())
    servers = []
    for p in run_plans(orig):
        srv = orig["servers"][p.name]
        s = Server(p, srv.get("port", 0), run_dir, bool(srv.get("deterministic")),
                   port=srv.get("port", 0), state=srv.get("state", "?"))
        s.log_path = run_dir / Path(srv.get("log") or f"server_{p.name}.log").name
        servers.append(s)
    stamps = [t for t in (first_log_time(s.log_path) for s in servers) if t is not None]
    anchor = min(stamps) if stamps else datetime.fromisoformat(orig["date"]).replace(tzinfo=None)
    events = progress_events((run_dir / "progress.log").read_text(), anchor)
    result = dict(orig, correctness=dict(orig["correctness"]), soak=dict(orig["soak"]))
    windows: dict[str, dict[str, list[str]]] = {"correctness": {}, "soak": {}}
    outs: dict[str, dict[str, dict[str, Any]]] = {"correctness": {}, "soak": {}}
    for phase, out in outs.items():
        for s in servers:
            records = run_dir / f"{phase}_{s.name}.jsonl"
            window = phase_window(events, phase, s.name)
            old = orig[phase].get(s.name)
            if old is None or window is None or not records.exists() or not s.log_path.exists():
                continue
            offset, log_end = window_offsets(s.log_path.read_bytes(), *window)
            out[s.name] = {"offset": offset, "log_end": log_end, "records": read_jsonl(records),
                           "idle": old["idle_reached"]}
            windows[phase][s.name] = [t.isoformat(sep=" ") for t in window]
    for s in servers:
        if s.name in outs["correctness"]:
            entry = correctness_entry(s, outs["correctness"])
            if "control_reversed" in orig["correctness"][s.name]:  # its records were not saved
                entry["control_reversed"] = orig["correctness"][s.name]["control_reversed"]
            result["correctness"][s.name] = entry
        if s.name in outs["soak"]:
            result["soak"][s.name] = soak_entry(s, outs["soak"][s.name])
        if s.name == "rota_tp2" and orig.get("tp2") is not None and s.log_path.exists():
            result["tp2"] = ranks_agree(parse_rota_lines(s.read_log()))
    if ROTATION_NOTE not in result.get("notes", []):
        result["notes"] = [*result.get("notes", []), ROTATION_NOTE]
    result["reanalyzed"] = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            "command": command, "run_dir": str(run_dir), "windows": windows}
    result.update(overall(result))
    return result


# --- main -----------------------------------------------------------------------------------
def gpu_names() -> list[str]:
    """'name, memory' of every GPU nvidia-smi sees (empty without one)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="Azure conv CSV")
    ap.add_argument("--model-path", type=Path, default=EVAL / "models" / "llama-3.1-8b")
    ap.add_argument("--out", type=Path, default=EVAL / "results" / "e2e_h200.json")
    ap.add_argument("--out-dir", type=Path, default=EVAL / "results" / "raw" / "e2e_h200",
                    help="server logs, raw records, progress log and a copy of --out")
    ap.add_argument("--budget", type=float, default=540.0, help="wall seconds for everything")
    ap.add_argument("--tp2", action="store_true", help="also baseline_tp2 and rota_tp2 (2 GPUs)")
    ap.add_argument("--servers", nargs="+", choices=SINGLE + TP2 + EXTRA, default=None,
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
        extra = " SGLANG_ENABLE_TP_MEMORY_INBALANCE_CHECK=0" if p.tp > 1 else ""
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
        result["tp2"] = ranks_agree(parse_rota_lines(tp2.read_log()))
        log(f"tp2: ranks {result['tp2']['ranks']} identical: {result['tp2']['identical']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.reanalyze is not None:
        command = shlex.join(["python3", *(sys.argv if argv is None
                                           else ["eval/e2e_rotation.py", *argv])])
        result = reanalyze(args.reanalyze, command)
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
    budget = Budget(time.monotonic() + args.budget)
    result = new_result(args, gpus, base_tokens, burst, plans, skipped)
    servers = [Server(p, args.port + 10 * i, args.out_dir, args.deterministic)
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
        stop_servers(servers)
        result["wall_s"] = round(time.monotonic() - t0, 1)
        result.update(overall(result))
        save(result, paths)
        print(summary_table(result), flush=True)
        log(f"results: {', '.join(map(str, paths))}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
