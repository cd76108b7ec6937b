"""Blocking HTTP calls to an SGLang server (stdlib only; the replay client is eval.lib.replay)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any


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


def is_healthy(url: str, timeout: float = 3.0) -> bool:
    return http_request(url + "/health", timeout=timeout)[0] == 200


def wait_healthy(url: str, alive: Callable[[], bool], timeout: float) -> bool:
    """Poll /health until it answers 200; False once ``timeout`` passes or the server exits."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and alive():
        if is_healthy(url):
            return True
        time.sleep(2.0)
    return False


def wait_idle(url: str, timeout: float) -> bool:
    """Poll /flush_cache until it succeeds. SGLang flushes only when fully idle (SuperInfer adds
    "nothing rotated out"), so success means every request is gone and the prefix cache is empty
    for what comes next; the rotator logs its idle record on that first idle call at the latest."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if http_request(url + "/flush_cache", {}, timeout=10)[0] == 200:
            return True
        time.sleep(1.0)
    return False
