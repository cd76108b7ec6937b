"""SGLang plugin entry point (``sglang.srt.plugins``): registers the scheduler hooks."""

from __future__ import annotations


def load() -> None:
    from .hooks import register

    register()
