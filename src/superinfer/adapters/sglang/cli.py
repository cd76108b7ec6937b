"""SuperInfer's command-line surface inside SGLang's own parser.

SGLang derives its CLI from the annotated fields of ``ServerArgs`` (a dataclass; a msgspec Struct
from 0.5.20: ``compat`` builds either). Our plugin entry point (``plugin.load``), which SGLang's
launchers run before they parse the command line, calls ``install``: it swaps in a subclass that
adds our fields and the ``rotasched`` choice, so ``--help`` lists them, argparse validates them
(exit code 2 with a message), and the values travel to every scheduler process inside
``ServerArgs``. A pickled ``ServerArgs`` rebuilds through ``_restore_server_args``, so a spawned
process that has not loaded the plugins yet gets the subclass too. ``patches/`` holds the
upstream change that makes the swap unnecessary.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

from ...config import Check, ConfigError, Flag, RotaConfig, flag_of
from . import compat

ROTASCHED = "rotasched"
_NS = "schedule.rotasched"


def _flags() -> Iterator[tuple[dataclasses.Field, Flag]]:
    """The RotaConfig fields that are flags, with their flag."""
    for f in dataclasses.fields(RotaConfig):
        flag = flag_of(f)
        if flag is not None:
            yield f, flag


def _dest(flag: Flag) -> str:
    """The ServerArgs field of a flag: the name SGLang derives the same flag from."""
    return flag.name.removeprefix("--").replace("-", "_")


def _type_parser(flag: Flag, check: Check) -> Callable[[str], Any]:
    """``check`` for argparse: a ConfigError becomes a usage error (exit 2, flag named)."""
    def parse(text: str) -> Any:
        try:
            return check.parse(flag.name, text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = flag.name
    return parse


def extend_server_args(module: ModuleType) -> None:
    """Replace ``module.ServerArgs`` by a subclass with the rotasched choice and flags."""
    base = module.ServerArgs
    if getattr(base, "__superinfer__", False):
        return
    A, Arg, NS = module.A, module.Arg, module.NS
    choices = [*_schedule_policy_choices(base, module), ROTASCHED]
    annotations: dict[str, Any] = {
        "schedule_policy": A[str, Arg(
            help="The scheduling policy of the requests. 'rotasched' (SuperInfer) rotates "
                 "decode requests' KV to host memory by their SLO slack.",
            choices=choices, aliases=["--scheduler-policy"]), NS("schedule")],
    }
    ns: dict[str, Any] = {"schedule_policy": base.schedule_policy}
    hints = typing.get_type_hints(RotaConfig)
    for f, flag in _flags():
        check: Check | None = f.metadata["check"]
        extra: dict[str, Any] = {}
        if check is not None and check.choices:  # argparse lists them and says "invalid choice"
            extra["choices"] = list(check.choices)
        elif check is not None:
            extra["type_parser"] = _type_parser(flag, check)
        arg = Arg(help=f"rotasched: {flag.help}", **extra)
        annotations[_dest(flag)] = A[hints[f.name], arg, NS(_NS)]
        ns[_dest(flag)] = (not f.default) if flag.negated else f.default
    ns.update({
        "__annotations__": annotations,
        "__module__": module.__name__,
        "__qualname__": base.__qualname__,
        "__doc__": base.__doc__,
        "__superinfer__": True,
        "__reduce__": _reduce_server_args,
    })
    cls = compat.subclass_server_args(base, ns)
    module.ServerArgs = cls


def install() -> type:
    """Extend SGLang's ``ServerArgs`` in this process (idempotent) and return the subclass.

    Runs after SGLang's own modules are imported, so the names they bound to the original class
    are pointed at the subclass too: ``ServerArgs`` in loaded ``sglang`` modules (and the lazy
    ``sglang.ServerArgs``), and ``Engine.server_args_class``, which ``sgl.Engine(**kwargs)``
    builds its ServerArgs with.
    """
    import sglang.srt.server_args as module

    base = module.ServerArgs
    if getattr(base, "__superinfer__", False):
        return base
    extend_server_args(module)
    cls = module.ServerArgs
    for name, mod in list(sys.modules.items()):
        if not (name == "sglang" or name.startswith("sglang.")):
            continue
        bound = getattr(mod, "__dict__", {}).get("ServerArgs")
        if bound is base:
            mod.ServerArgs = cls
        elif getattr(bound, "__dict__", {}).get("_module") is base:  # sglang.ServerArgs (lazy)
            bound._module = cls
    engine = sys.modules.get("sglang.srt.entrypoints.engine")
    if engine is not None and getattr(engine.Engine, "server_args_class", None) is base:
        engine.Engine.server_args_class = cls
    return cls


def _reduce_server_args(self: Any) -> tuple:
    """Pickle by ``_restore_server_args`` rather than by class: the receiving process (a spawned
    scheduler unpickles its arguments before it loads the plugins) has only SGLang's class."""
    return _restore_server_args, compat.server_args_state(self)


def _restore_server_args(fields: dict[str, Any], extra: dict[str, Any]) -> Any:
    cls = getattr(sys.modules.get("sglang.srt.server_args"), "ServerArgs", None)
    if not getattr(cls, "__superinfer__", False):
        cls = install()
    return compat.rebuild_server_args(cls, fields, extra)


def _schedule_policy_choices(base: type, module: ModuleType) -> list[str]:
    hints = typing.get_type_hints(base, include_extras=True)
    for meta in hints["schedule_policy"].__metadata__:
        if isinstance(meta, module.Arg) and meta.choices:
            return list(meta.choices)
    raise RuntimeError("sglang's ServerArgs.schedule_policy has no choices: unsupported version")


def is_rotasched(server_args: Any) -> bool:
    return getattr(server_args, "schedule_policy", None) == ROTASCHED


def rota_config(server_args: Any) -> RotaConfig:
    """The RotaConfig a server was started with. RotaConfig checks the values again: a
    ServerArgs built in Python never went through argparse."""
    if not all(hasattr(server_args, _dest(flag)) for _, flag in _flags()):
        raise ConfigError(
            f"--schedule-policy {ROTASCHED}: this ServerArgs has no --rota-* fields; it was built "
            "before SGLang loaded the superinfer plugin: call "
            "sglang.srt.plugins.load_plugins() before building it")
    values = {}
    for f, flag in _flags():
        value = getattr(server_args, _dest(flag))
        values[f.name] = (not value) if flag.negated else value
    return RotaConfig(**values)
