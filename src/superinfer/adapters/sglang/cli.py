"""SuperInfer's command-line surface inside SGLang's own parser.

SGLang 0.5.17 derives its CLI from the annotated fields of the ``ServerArgs`` dataclass and
parses it before any plugin loads. So, right after ``sglang.srt.server_args`` is imported (see
``superinfer._autoload``), ``extend_server_args`` swaps in a dataclass subclass that adds our
fields and the ``rotasched`` choice: ``--help`` lists them, argparse validates them (exit code
2 with a message), and the values travel to every scheduler process inside ``ServerArgs``.
``patches/`` holds the upstream change that makes this unnecessary.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

from ...config import Check, ConfigError, Flag, RotaConfig, flag_of

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
    })
    cls = dataclasses.dataclass(type(base.__name__, (base,), ns))
    # Pickling (spawned scheduler processes) finds the class by module + qualname.
    module.ServerArgs = cls


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
    values = {}
    for f, flag in _flags():
        value = getattr(server_args, _dest(flag))
        values[f.name] = (not value) if flag.negated else value
    return RotaConfig(**values)
