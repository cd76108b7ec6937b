"""Progress lines and the wall-clock budget of a GPU run.

Device time is rented by the minute, so every GPU script takes a ``--budget`` and skips, and
records, what no longer fits instead of being killed mid-write.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path


class Progress:
    """Timestamped progress lines on stdout (``[HH:MM:SS +  12s] msg``), copied to a file once
    ``path`` is set. Thread-safe: sweep_plan logs from one thread per GPU queue."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.path: Path | None = None
        self._lock = threading.Lock()

    def __call__(self, msg: str) -> None:
        line = f"[{datetime.now():%H:%M:%S} +{time.monotonic() - self.t0:4.0f}s] {msg}"
        with self._lock:
            print(line, flush=True)
            if self.path is not None:
                with open(self.path, "a") as f:
                    f.write(line + "\n")


@dataclass
class Budget:
    """A deadline for the whole run; ``stop_margin_s`` stays free at its end for stopping
    servers and writing results."""

    seconds: float = math.inf
    stop_margin_s: float = 45.0
    start: float = field(default_factory=time.monotonic)

    @property
    def deadline(self) -> float:
        return self.start + self.seconds

    def usable(self, reserve: float = 0.0) -> float:
        """Seconds left for work after ``reserve`` and the stop margin."""
        return self.deadline - time.monotonic() - self.stop_margin_s - reserve
