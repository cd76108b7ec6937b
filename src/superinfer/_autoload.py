"""Runs at interpreter start (``superinfer_autoload.pth``): extends SGLang's CLI as soon as
``sglang.srt.server_args`` is imported, in the server process and in every spawned scheduler.

Cheap by design: it imports nothing heavy and only installs an import hook. Opt out with
``SUPERINFER_AUTOLOAD=0``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

_TARGET = "sglang.srt.server_args"


class _ServerArgsHook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):  # noqa: ANN001 - importlib protocol
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)  # find the real spec, once
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_extend(module) -> None:  # noqa: ANN001
            exec_module(module)
            from superinfer.adapters.sglang.cli import extend_server_args

            extend_server_args(module)

        spec.loader.exec_module = exec_and_extend  # type: ignore[method-assign]
        return spec


def install() -> None:
    if os.environ.get("SUPERINFER_AUTOLOAD", "1") == "0" or _TARGET in sys.modules:
        return
    if not any(isinstance(f, _ServerArgsHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _ServerArgsHook())


install()
