"""A server to replay against: started, healthy, warmed up and idle, then stopped. What
eval.sweep_slo (one server per system) and eval.slo_abuse (one per mode) do around their
replays."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from eval.lib.http import wait_healthy, wait_idle
from eval.lib.progress import Budget
from eval.lib.replay import replay
from eval.lib.server import ServerProcess, stop_servers
from eval.lib.traces import RequestSpec

EXIT_GRACE_S = 5.0  # after warm-up errors, how long a dying server gets to exit


@dataclass(frozen=True)
class ReadyServer:
    base: str  # http://127.0.0.1:<port>
    startup_s: float  # from start to warmed up
    warmup_errors: int


@contextmanager
def ready_server(name: str, cmd: list[str], port: int, log_path: Path, warmup: list[RequestSpec],
                 budget: Budget, startup_timeout: float, drain_timeout: float,
                 log: Callable[[str], None], give_up: Callable[[str, str], None],
                 vocab: int | None = None) -> Iterator[ReadyServer | None]:
    """Start ``cmd`` (logging to ``log_path``, replaced), wait for /health within
    ``startup_timeout`` and the budget, replay ``warmup`` (token ids under ``vocab``; the JIT
    kernels compile before anything is timed) and wait until it is idle. Yields the server, or
    None after ``give_up(status, reason)`` if it never got there (a server that died in the
    warm-up is reported at once, not after a drain timeout); stops it on exit either way."""
    base = f"http://127.0.0.1:{port}"
    log_path.unlink(missing_ok=True)
    server = ServerProcess(cmd, log_path)
    log(f"{name}: starting: {' '.join(server.cmd)}")
    try:
        if not wait_healthy(base, server.alive, min(startup_timeout, budget.usable())):
            state = "not healthy in time" if server.alive() else "exited"
            give_up(f"server failed to start ({state}), see {log_path}", "server failed")
            yield None
            return
        warm = asyncio.run(replay(base, warmup, salt=-1, time_limit=120.0, progress=False,
                                  vocab=vocab))
        ready = ReadyServer(base, time.monotonic() - server.started,
                            sum(r["error"] is not None for r in warm))
        log(f"{name}: up in {ready.startup_s:.0f}s (warm-up errors: {ready.warmup_errors})")
        if ready.warmup_errors:  # a server that is dying may take a moment to be gone
            _wait_exit(server, EXIT_GRACE_S)
        if not server.alive():
            first = next((r["error"] for r in warm if r["error"] is not None), None)
            give_up(f"server exited during warm-up (first error: {first}), see {log_path}",
                    "server failed")
            yield None
            return
        if not wait_idle(base, drain_timeout):
            give_up("server busy after warm-up", "drain failed")
            yield None
            return
        yield ready
    finally:
        stop_servers([server], grace_s=30.0)


def _wait_exit(server: ServerProcess, timeout: float) -> None:
    end = time.monotonic() + timeout
    while server.alive() and time.monotonic() < end:
        time.sleep(0.1)
