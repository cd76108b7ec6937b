"""The servers an e2e run starts: what each runs, on which GPUs, compared with which baseline,
and starting them all at once with one retry each."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.e2e.log import log
from eval.e2e.probes import generate_once
from eval.lib.gpus import visible_devices
from eval.lib.http import is_healthy
from eval.lib.progress import Budget
from eval.lib.server import ServerProcess, failure_text, read_log, sglang_command, stop_servers
from eval.lib.traces import prompt_ids

STARTUP_GUESS_S = 150.0  # a server start on the H200 (no retry with less budget left)
STRAGGLER_S = 180.0  # once one server is healthy, the others get this long (not the full timeout)
DETERMINISM_WORDS = ("determinis", "batch_invariant", "batch invariant")

SINGLE = ("baseline", "rota_p1", "rota_p16", "rota_p1_noradix")
TP2 = ("baseline_tp2", "rota_tp2")
# Data parallelism (--dp-size 2: one scheduler per GPU, SGLang's controller spreading requests):
# rotasched's outputs against an fcfs server of the same shape; leaks checked per replica.
DP2 = ("baseline_dp2", "rota_dp2")
# The same on one GPU: both DP ranks on GPU 0 (--gpu-id-step 0, which SGLang refuses unless
# started through eval.e2e.shared_gpu_server), for machines with one GPU.
DP2_SHARED = ("baseline_dp2_1gpu", "rota_dp2_1gpu")
SHARED_GPU_SERVER = "eval.e2e.shared_gpu_server"
# Not run by default: 64-token pages, where --rota-mover auto picks the direct path (Llama-3.1-8B),
# and kept host copies (--rota-keep-host-copy) or write-through on 16-token pages.
EXTRA = ("rota_p64", "rota_p16_keep", "rota_p16_wt")


@dataclass(frozen=True)
class ServerPlan:
    """One server to start: its flags, GPUs (indices), and the baseline it is compared with."""

    name: str
    flags: tuple[str, ...]
    gpus: tuple[int, ...]
    page_size: int
    rotasched: bool
    reference: str | None = None
    module: str = "sglang.launch_server"  # what `python -m` starts (unless --launcher is given)

    @property
    def n_gpus(self) -> int:
        return len(self.gpus)


def plan_servers(args: argparse.Namespace, n_gpus: int, baseline_tokens: int
                 ) -> tuple[list[ServerPlan], list[dict[str, str]]]:
    """The servers to start, and those skipped (with the reason)."""
    names = list(args.servers or (SINGLE + TP2 if args.tp2 else SINGLE))
    skipped = []
    two = TP2 + DP2
    if n_gpus < 2 and any(n in two for n in names):
        skipped = [{"server": n, "reason": f"needs 2 GPUs, found {n_gpus}"}
                   for n in names if n in two]
        names = [n for n in names if n not in two]
    pair = any(n in two for n in names)
    # Next to a 2-GPU pair, GPU 0 cannot also hold a baseline sized for the whole burst.
    base_gpu = (1 if pair else 0) if args.baseline_gpu == "auto" else int(args.baseline_gpu)
    fcfs = ("--schedule-policy", "fcfs", "--page-size", "1",
            "--max-total-tokens", str(baseline_tokens))
    rota = ("--max-total-tokens", str(args.cap), "--enable-metrics", "--rota-host-kv-gb",
            f"{args.host_kv_gb:g}", *shlex.split(args.rota_extra))

    shared_dp2 = ("--dp-size", "2", "--gpu-id-step", "0")

    def rotasched(page: int, *flags: str, alias: bool = False) -> tuple[str, ...]:
        policy = "--scheduler-policy" if alias else "--schedule-policy"  # both are accepted
        return (policy, "rotasched", "--page-size", str(page), *flags, *rota)

    table = {
        "baseline": ServerPlan("baseline", fcfs, (base_gpu,), 1, False),
        "rota_p1": ServerPlan("rota_p1", rotasched(1), (0,), 1, True, "baseline"),
        "rota_p16": ServerPlan("rota_p16", rotasched(16, alias=True), (0,), 16, True, "baseline"),
        "rota_p1_noradix": ServerPlan("rota_p1_noradix", rotasched(1, "--disable-radix-cache"),
                                      (0,), 1, True, "baseline"),
        "rota_p64": ServerPlan("rota_p64", rotasched(64), (0,), 64, True, "baseline"),
        "rota_p16_keep": ServerPlan("rota_p16_keep", rotasched(16, "--rota-keep-host-copy"),
                                    (0,), 16, True, "baseline"),
        "rota_p16_wt": ServerPlan("rota_p16_wt", rotasched(16, "--rota-write-through"),
                                  (0,), 16, True, "baseline"),
        "baseline_tp2": ServerPlan("baseline_tp2", ("--tp-size", "2", *fcfs), (0, 1), 1, False),
        "rota_tp2": ServerPlan("rota_tp2", ("--tp-size", "2", *rotasched(1)), (0, 1), 1, True,
                               "baseline_tp2"),
        "baseline_dp2": ServerPlan("baseline_dp2", ("--dp-size", "2", *fcfs), (0, 1), 1, False),
        "rota_dp2": ServerPlan("rota_dp2", ("--dp-size", "2", *rotasched(1)), (0, 1), 1, True,
                               "baseline_dp2"),
        "baseline_dp2_1gpu": ServerPlan("baseline_dp2_1gpu", (*shared_dp2, *fcfs), (0,), 1, False,
                                        module=SHARED_GPU_SERVER),
        "rota_dp2_1gpu": ServerPlan("rota_dp2_1gpu", (*shared_dp2, *rotasched(1)), (0,), 1, True,
                                    "baseline_dp2_1gpu", module=SHARED_GPU_SERVER),
    }
    return [table[n] for n in names], skipped


def server_cmd(args: argparse.Namespace, plan: ServerPlan, port: int,
               deterministic: bool) -> list[str]:
    launcher = (shlex.split(args.launcher) if args.launcher
                else [sys.executable, "-m", plan.module])
    flags = ["--random-seed", "1", "--mem-fraction-static", f"{args.mem_fraction_static:g}"]
    if "--dp-size" not in plan.flags:
        # SGLang's data-parallel controller gives each replica's own group the port it is told,
        # so every replica would bind the same one (EADDRINUSE); left out, each gets a free one.
        flags += ["--nccl-port", str(port + 1)]
    flags += plan.flags
    if deterministic:
        flags.append("--enable-deterministic-inference")
    return sglang_command(args.model_path, port, flags + shlex.split(args.server_extra), launcher)


def server_env(plan: ServerPlan) -> dict[str, str]:
    gpus = visible_devices(plan.gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES=gpus)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # each server makes its own
    if plan.n_gpus > 1:
        # GPU 0 also holds the single-GPU servers: SGLang would refuse the unequal free memory.
        env["SGLANG_ENABLE_TP_MEMORY_INBALANCE_CHECK"] = "0"
    return env


@dataclass
class Server:
    """A planned server, its current process (if started) and its start attempts."""

    plan: ServerPlan
    base_port: int
    out_dir: Path
    deterministic: bool
    vocab: int | None = None  # the model's vocabulary: request token ids stay under it
    port: int = 0
    state: str = "not started"  # starting, healthy, up, failed
    process: ServerProcess | None = None
    log_path: Path | None = None
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
        self.process = ServerProcess(self.cmd, self.log_path, server_env(self.plan))
        self.state = "starting"
        # Servers run in their own sessions: if this script is killed outright they outlive it,
        # and `kill -- -PGID` with a group id from this file ends one.
        with open(self.out_dir / "server_pids.txt", "a") as f:
            f.write(f"{self.name} {self.process.pid}\n")

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path and self.log_path.exists() else 0

    def read_log(self, start: int = 0, end: int | None = None) -> str:
        return read_log(self.log_path, start, end)

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def stop(self, grace_s: float = 20.0) -> None:
        if self.process is not None:
            stop_servers([self.process], grace_s)


def stop_all(servers: list[Server]) -> None:
    stop_servers([s.process for s in servers if s.process is not None])


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
            assert s.process is not None
            deadline = s.process.started + args.startup_timeout
            if first_healthy is not None:  # a hung server must not eat the others' budget
                deadline = min(deadline, max(first_healthy, s.process.started) + STRAGGLER_S)
            if not s.alive():
                _start_failed(s, f"exited with code {s.process.proc.returncode}", args, budget)
            elif is_healthy(s.url):
                s.state = "healthy"
                s.startup_s = time.monotonic() - s.process.started
                first_healthy = first_healthy or time.monotonic()
                log(f"{s.name}: healthy after {s.startup_s:.0f}s")
            elif time.monotonic() > deadline or budget.usable() < 0:
                _start_failed(s, "not healthy in time", args, budget)
        time.sleep(2)
    healthy = [s for s in servers if s.state == "healthy"]
    with ThreadPoolExecutor(max(1, len(healthy))) as ex:
        probes = list(ex.map(lambda s: generate_once(
            s.url, prompt_ids(0, 32, salt=-1, vocab=s.vocab), 4, timeout=args.probe_timeout),
            healthy))
    for s, p in zip(healthy, probes, strict=False):
        s.state = "up" if p["status"] == 200 and p["n_ids"] == 4 else "failed"
        if s.state == "failed":
            s.attempts.append({"deterministic": s.deterministic, "reason": f"first request: {p}",
                               "log": str(s.log_path)})
            s.stop(grace_s=5.0)  # its GPU memory goes back to the others
        log(f"{s.name}: {s.state} (first request: HTTP {p['status']}, {p['n_ids']} tokens)")


def _start_failed(s: Server, reason: str, args: argparse.Namespace, budget: Budget) -> None:
    tail = s.read_log(max(0, s.log_size() - 20000))
    s.attempts.append({"deterministic": s.deterministic, "reason": reason, "log": str(s.log_path),
                       "error": failure_text(tail)[-3000:]})
    s.stop(grace_s=5.0)
    if len(s.attempts) >= 2 or budget.usable(STARTUP_GUESS_S) < 0:
        s.state = "failed"
        log(f"{s.name}: FAILED ({reason}), see {s.log_path}")
        return
    if s.deterministic and blames_determinism(tail):
        s.deterministic = False
    how = "" if s.deterministic else " without deterministic inference"
    log(f"{s.name}: {reason}; retrying once{how}")
    s.launch(args)
