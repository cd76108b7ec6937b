"""SGLang plugin entry point (``sglang.srt.plugins``): extends ``ServerArgs`` with the
rotasched choice and the ``--rota-*`` flags, then registers the scheduler hooks."""

from __future__ import annotations


def load() -> None:
    from .cli import install

    install()
    from .hooks import register

    register()
