"""Starting and stopping SGLang servers for a measurement.

Every eval server runs the same way: dummy weights of the model config in eval/models (so no
download and no tokenizer: requests and answers are token ids), in its own process session so
that its scheduler processes stop with it, its output in one log file.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# Incremental streaming keeps each SSE chunk O(new tokens), so the client's JSON parsing cannot
# become the bottleneck that skews token timestamps (the default resends every id so far).
DUMMY_SERVER_FLAGS = ("--load-format", "dummy", "--skip-tokenizer-init",
                      "--attention-backend", "triton", "--sampling-backend", "pytorch",
                      "--disable-prefill-cuda-graph", "--incremental-streaming-output")


def sglang_command(model_path: str | Path, port: int, flags: list[str] | tuple[str, ...],
                   launcher: list[str] | None = None) -> list[str]:
    """The server command: ``launcher`` (default: this Python's ``-m sglang.launch_server``),
    the model, the common flags, loopback host and port, then ``flags``."""
    launcher = launcher or [sys.executable, "-m", "sglang.launch_server"]
    return [*launcher, "--model-path", str(model_path), *DUMMY_SERVER_FLAGS,
            "--host", "127.0.0.1", "--port", str(port), *flags]


class ServerProcess:
    """A started server: its process (leader of its own session) and its log file."""

    def __init__(self, cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.cmd, self.log_path = cmd, log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def read_log(self, start: int = 0, end: int | None = None) -> str:
        return read_log(self.log_path, start, end)


def read_log(path: Path | None, start: int = 0, end: int | None = None) -> str:
    """Bytes [start, end) of a log file as text ("" when there is none)."""
    if path is None or not path.exists():
        return ""
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read() if end is None else f.read(max(0, end - start))
    return data.decode("utf-8", "replace")


def stop_servers(servers: list[ServerProcess], grace_s: float = 20.0) -> None:
    """SIGTERM every server's process group, SIGKILL what is left after ``grace_s``."""
    groups = [s.proc for s in servers]
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

def add_server_run_args(ap: argparse.ArgumentParser) -> None:
    """The flags every script that starts servers and replays against them shares: the wall
    budget, timeouts, port, launcher and extra server flags (``--server-extra`` must come last
    on the command line)."""
    ap.add_argument("--budget", type=float, default=math.inf,
                    help="total wall seconds; remaining work is skipped and recorded")
    ap.add_argument("--tail", type=float, default=60.0,
                    help="seconds after the last arrival before unfinished requests are cut")
    ap.add_argument("--startup-timeout", type=float, default=400.0)
    ap.add_argument("--drain-timeout", type=float, default=120.0)
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--launcher", default=None,
                    help="server command before its flags "
                         "(default: this python -m sglang.launch_server)")
    ap.add_argument("--server-extra", nargs=argparse.REMAINDER, default=[],
                    help="flags appended to every server command (must come last)")
