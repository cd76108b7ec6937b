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
from types import ModuleType
from typing import Any, Optional

from ...config import MOVER_PATHS, POLICIES, RotaConfig

ROTASCHED = "rotasched"
_NS = "schedule.rotasched"
_DEFAULTS = RotaConfig()


def _fraction(flag: str):
    def parse(text: str) -> float:
        value = _positive_float(flag)(text)
        if value > 1:
            raise argparse.ArgumentTypeError(f"{flag} must be in (0, 1], got {text!r}")
        return value

    parse.__name__ = "fraction"
    return parse


def _positive_float(flag: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} expects a number, got {text!r}") from None
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{flag} must be a positive finite number, got {text!r}")
        return value

    parse.__name__ = "positive float"
    return parse


def _node_index(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rota-host-numa-node expects a node number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"--rota-host-numa-node must be >= 0, got {text!r}")
    return value


_node_index.__name__ = "NUMA node"


def extend_server_args(module: ModuleType) -> None:
    """Replace ``module.ServerArgs`` by a subclass with the rotasched choice and flags."""
    base = module.ServerArgs
    if getattr(base, "__superinfer__", False):
        return
    A, Arg, NS = module.A, module.Arg, module.NS
    choices = [*_schedule_policy_choices(base, module), ROTASCHED]

    ns = {
        "__annotations__": {
            "schedule_policy": A[str, Arg(
                help="The scheduling policy of the requests. 'rotasched' (SuperInfer) rotates "
                     "decode requests' KV to host memory by their SLO slack.",
                choices=choices, aliases=["--scheduler-policy"]), NS("schedule")],
            "rota_ttft_slo": A[float, Arg(
                help="rotasched: time-to-first-token SLO in seconds.",
                type_parser=_positive_float("--rota-ttft-slo")), NS(_NS)],
            "rota_tbt_slo": A[float, Arg(
                help="rotasched: time-between-tokens SLO in seconds.",
                type_parser=_positive_float("--rota-tbt-slo")), NS(_NS)],
            "rota_host_kv_gb": A[float, Arg(
                help="rotasched: size of the pinned host KV tier per TP rank, in GB.",
                type_parser=_positive_float("--rota-host-kv-gb")), NS(_NS)],
            "rota_policy": A[str, Arg(
                help="rotasched: 'slo' (deadline/slack based) or 'lvf' (the reference rule).",
                choices=list(POLICIES)), NS(_NS)],
            "rota_mover": A[str, Arg(
                help="rotasched: KV data path: auto (direct for pages of >= 128 KiB per layer, else "
                     "staging), torch, staging (gather + DMA), zerocopy or direct (page copies, "
                     "no kernels).",
                choices=list(MOVER_PATHS)), NS(_NS)],
            "rota_slack_margin": A[float, Arg(
                help="rotasched: a victim's slack must cover its round trip this many times.",
                type_parser=_positive_float("--rota-slack-margin")), NS(_NS)],
            "rota_link_share": A[float, Arg(
                help="rotasched: share of the host link's measured rate that rotations may "
                     "use, each way (bounds the model's slowdown).",
                type_parser=_fraction("--rota-link-share")), NS(_NS)],
            "rota_keep_host_copy": A[bool, Arg(
                help="rotasched: keep a rotated-in request's host copy, so its next rotate-out "
                     "moves only the KV written since (costs host tier space; evicted first)."),
                NS(_NS)],
            "rota_write_through": A[bool, Arg(
                help="rotasched: while the host link is idle, copy running requests' full pages "
                     "to the host in the background (implies --rota-keep-host-copy)."), NS(_NS)],
            "rota_host_numa_node": A[Optional[int], Arg(
                help="rotasched: NUMA node for the host KV tier's memory (e.g. Grace's on a "
                     "GH200); default: wherever first touch puts it.",
                type_parser=_node_index), NS(_NS)],
            "rota_disable_prefill_pacing": A[bool, Arg(
                help="rotasched: do not bound each step's prefill by the decoding streams' "
                     "least slack (ablation)."), NS(_NS)],
        },
        "schedule_policy": base.schedule_policy,
        "rota_ttft_slo": _DEFAULTS.ttft_slo_s,
        "rota_tbt_slo": _DEFAULTS.tbt_slo_s,
        "rota_host_kv_gb": _DEFAULTS.host_kv_gb,
        "rota_policy": _DEFAULTS.policy,
        "rota_mover": _DEFAULTS.mover,
        "rota_slack_margin": _DEFAULTS.slack_margin,
        "rota_link_share": _DEFAULTS.link_share,
        "rota_keep_host_copy": _DEFAULTS.keep_host_copy,
        "rota_write_through": _DEFAULTS.write_through,
        "rota_host_numa_node": _DEFAULTS.host_numa_node,
        "rota_disable_prefill_pacing": not _DEFAULTS.prefill_pacing,
        "__module__": module.__name__,
        "__qualname__": base.__qualname__,
        "__doc__": base.__doc__,
        "__superinfer__": True,
    }
    cls = dataclasses.dataclass(type(base.__name__, (base,), ns))
    # Pickling (spawned scheduler processes) finds the class by module + qualname.
    module.ServerArgs = cls


def _schedule_policy_choices(base: type, module: ModuleType) -> list[str]:
    hints = __import__("typing").get_type_hints(base, include_extras=True)
    for meta in hints["schedule_policy"].__metadata__:
        if isinstance(meta, module.Arg) and meta.choices:
            return list(meta.choices)
    raise RuntimeError("sglang's ServerArgs.schedule_policy has no choices: unsupported version")


def is_rotasched(server_args: Any) -> bool:
    return getattr(server_args, "schedule_policy", None) == ROTASCHED


def rota_config(server_args: Any) -> RotaConfig:
    """The RotaConfig a server was started with (values already validated by argparse)."""
    return RotaConfig(
        ttft_slo_s=server_args.rota_ttft_slo,
        tbt_slo_s=server_args.rota_tbt_slo,
        host_kv_gb=server_args.rota_host_kv_gb,
        policy=server_args.rota_policy,
        mover=server_args.rota_mover,
        slack_margin=server_args.rota_slack_margin,
        prefill_pacing=not server_args.rota_disable_prefill_pacing,
        link_share=server_args.rota_link_share,
        keep_host_copy=server_args.rota_keep_host_copy,
        write_through=server_args.rota_write_through,
        host_numa_node=server_args.rota_host_numa_node,
    )
