"""The one place that reads SUPERINFER_* environment variables (test switches only: every
setting an operator picks is a --rota-* flag in config.py)."""

from __future__ import annotations

import os

from .config import ConfigError

TEST_FAIL_COPY = "SUPERINFER_TEST_FAIL_COPY"


def test_fail_copies(environ: dict[str, str] | None = None) -> dict[bool, frozenset[int]]:
    """Fault injection for tests, off unless set, in the style of SGLang's SGLANG_TEST_RETRACT:
    ``SUPERINFER_TEST_FAIL_COPY=d2h:3,h2d:1`` reports the 3rd rotate-out copy and the 1st
    rotate-in copy as failed (numbers count rotation copies per direction, from 1).
    Returns {to_host: numbers}."""
    text = (environ if environ is not None else os.environ).get(TEST_FAIL_COPY, "").strip()
    fails: dict[bool, set[int]] = {True: set(), False: set()}
    for item in filter(None, (part.strip() for part in text.split(","))):
        way, _, number = item.partition(":")
        if way not in ("d2h", "h2d") or not number.isdigit() or int(number) < 1:
            raise ConfigError(f"{TEST_FAIL_COPY}: expected items like 'd2h:3' or 'h2d:1', "
                              f"got {item!r}")
        fails[way == "d2h"].add(int(number))
    return {to_host: frozenset(numbers) for to_host, numbers in fails.items() if numbers}
