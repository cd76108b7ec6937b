"""SuperInfer settings: one frozen dataclass, validated once, with no SGLang types.

Each setting that is a command-line flag carries its flag name, help and check in its field's
metadata: the SGLang adapter generates the flags from the fields, and argparse and
``RotaConfig.__post_init__`` run the same check, so a flag is written once, here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import Field, dataclass, field, fields
from typing import Any

POLICIES = ("slo", "lvf")
MOVER_PATHS = ("auto", "torch", "staging", "zerocopy", "direct")
REQUEST_SLO_MODES = ("clamp", "reject", "off")
REQUEST_SLO_KEYS = ("ttft_slo", "tbt_slo")


class ConfigError(ValueError):
    """A SuperInfer setting is out of range; the message names it (by its flag, if it has one)."""


_KINDS: dict[type, tuple[type, ...]] = {float: (int, float), int: (int,), str: (str,)}


@dataclass(frozen=True, slots=True)
class Check:
    """A setting's one rule: ``parse`` serves argparse (text), a call serves Python values."""

    kind: type  # float, int or str
    expects: str  # what the text must spell ("a number")
    rule: str  # what the value must satisfy ("must be >= 0")
    ok: Callable[[Any], bool]
    choices: tuple[str, ...] | None = None  # argparse lists these itself

    def __call__(self, name: str, value: object) -> Any:
        """``value`` as ``kind`` (ints widen to float); ConfigError naming ``name`` if not ok."""
        if isinstance(value, bool) or not isinstance(value, _KINDS[self.kind]):
            raise ConfigError(f"{name} expects {self.expects}, got {value!r}")
        if self.kind is float:
            value = _as_float(value)
        if not self.ok(value):
            raise ConfigError(f"{name} {self.rule}, got {value!r}")
        return value

    def parse(self, name: str, text: str) -> Any:
        try:
            value = self.kind(text)
        except ValueError:
            raise ConfigError(f"{name} expects {self.expects}, got {text!r}") from None
        return self(name, value)


def _as_float(value: float) -> float:
    try:
        return float(value)
    except OverflowError:  # an int past float's range (JSON allows one): not finite
        return math.inf if value > 0 else -math.inf


def one_of(choices: tuple[str, ...]) -> Check:
    return Check(str, f"one of {choices}", f"must be one of {choices}", choices.__contains__,
                 choices)


POSITIVE = Check(float, "a number", "must be a positive finite number",
                 lambda v: 0 < v < math.inf)  # NaN fails every comparison
SHARE = Check(float, "a number", "must be in (0, 1]", lambda v: 0 < v <= 1)
FRACTION_BELOW_1 = Check(float, "a number", "must be in [0, 1)", lambda v: 0 <= v < 1)
NON_NEGATIVE = Check(float, "a number", "must be a finite number >= 0",
                     lambda v: 0 <= v < math.inf)
NUMA_NODE = Check(str, "'auto', 'off' or a node number", "must be 'auto', 'off' or a node number",
                  lambda v: v in ("auto", "off") or v.isdecimal())
DECODE_PROFILE = Check(str, "'auto', 'off' or a file path",
                       "must be 'auto', 'off' or the path of an existing file",
                       lambda v: v in ("auto", "off") or os.path.isfile(v))
COUNT = Check(int, "an integer", "must be >= 0", lambda v: v >= 0)
AT_LEAST_1 = Check(int, "an integer", "must be >= 1", lambda v: v >= 1)


@dataclass(frozen=True, slots=True)
class Flag:
    """How a setting appears on the command line."""

    name: str  # "--rota-ttft-slo"; SGLang's ServerArgs field is its snake_case form
    help: str
    negated: bool = False  # a bool flag that turns the setting off (--rota-disable-...)


def _flag(name: str, default: Any, help: str, check: Check | None = None,
          negated: bool = False) -> Any:
    return field(default=default, metadata={"flag": Flag(name, help, negated), "check": check})


def _internal(default: Any, check: Check | None = None) -> Any:
    """A setting with no flag (tuning for tests and the simulator)."""
    return field(default=default, metadata={"check": check})


def flag_of(f: Field) -> Flag | None:
    return f.metadata.get("flag")


def setting_name(f: Field) -> str:
    """How messages name a setting: its flag, else its field."""
    flag = flag_of(f)
    return flag.name if flag is not None else f.name


@dataclass(frozen=True, slots=True)
class RotaConfig:
    ttft_slo_s: float = _flag("--rota-ttft-slo", 1.0,
                              "time-to-first-token SLO in seconds.", POSITIVE)
    tbt_slo_s: float = _flag("--rota-tbt-slo", 0.1,
                             "time-between-tokens SLO in seconds.", POSITIVE)
    host_kv_gb: float = _flag("--rota-host-kv-gb", 8.0,
                              "size of the pinned host KV tier per TP rank, in GB.", POSITIVE)
    policy: str = _flag("--rota-policy", "slo",
                        "'slo' (deadline/slack based) or 'lvf' (the reference rule).",
                        one_of(POLICIES))
    slack_margin: float = _flag(
        "--rota-slack-margin", 2.0,
        "a victim's slack must cover its round trip this many times.", POSITIVE)
    # The streams on the host may spend at most 1 / away_margin of the slack the resident ones
    # earn (deadlines.max_extra_away). An aggregate over many streams, so it needs less margin
    # than one victim's round trip (slack_margin); the value: eval/README.md, "The away bound".
    away_margin: float = _internal(1.5, POSITIVE)
    # Proactive free reserve = arrival rate × mean prompt × window, capped at a pool fraction.
    reserve_window_s: float = _internal(0.2, NON_NEGATIVE)
    reserve_max_frac: float = _internal(0.25, FRACTION_BELOW_1)
    # Requests already past their deadline are admitted after those that can still make it.
    late_last: bool = _internal(True)
    # When the GPU cannot prefill every waiting request by its TTFT deadline, the ones with the
    # longest prefills go late with them (Moore-Hodgson: the fewest late; README, rule 1).
    fewest_late: bool = _internal(True)
    # A late head (every waiting request is past its latest start) waits for finishing streams
    # to free its room at most this many of its TTFT SLOs, then a rotation makes it. With no
    # limit, late requests waited while streams came and went from the host, to the end of a
    # finite workload, whose last tokens then came seconds later (README, rule 3; the value:
    # eval/README.md, "Late heads").
    late_wait_slos: float = _internal(2.0, POSITIVE)
    # While a blocked new head waits for room no rotation makes now, rotated-out streams come
    # back early into the free room it leaves idle (README, rule 3; eval/README.md, "Early
    # returns"): left on the host, they cost a loaded decode-bound GPU throughput.
    early_returns: bool = _internal(True)
    # LVF (reference rule): fixed proactive budget B in tokens.
    lvf_budget_tokens: int = _internal(2400 * 16, COUNT)
    mover: str = _flag(
        "--rota-mover", "auto",
        "KV data path: auto (direct for pages of >= 128 KiB per layer, else staging), torch, "
        "staging (gather + DMA), zerocopy or direct (page copies, no kernels).",
        one_of(MOVER_PATHS))
    prefill_pacing: bool = _flag(
        "--rota-disable-prefill-pacing", True,
        "do not bound each step's prefill by the decoding streams' least slack (ablation).",
        negated=True)
    # Where compute binds, a decode step run ahead of a prefill that could run is GPU time the
    # queue waits for (its tokens would have ridden in later, larger steps): README's rule 5.
    pacing_cost_share: float = _flag(
        "--rota-pacing-cost-share", 0.03,
        "where compute binds, the most GPU time that prefill pacing may cost (decode steps "
        "ahead of a runnable prefill, batches cut short), as a share of elapsed time; past it, "
        "prefill runs unpaced and decoding streams' TBT is served late. 1.0 paces whatever it "
        "costs.", SHARE)
    # A stream holds prefill back only while the decode step is under this share of its TBT.
    # A step earns a stream its TBT minus the step; past 3/4 that is at most a third of a step,
    # so waiting prefill out of such slack leaves the queue and free KV idle for many steps
    # and buys almost no TBT (eval/README.md, "A TBT about one decode step").
    pacing_step_share: float = _internal(0.75, POSITIVE)
    # A burst's queue can make the step outgrow the TBT that the step of now is well within;
    # seeing that coming takes the step as a function of the batch (policy.step_profile).
    decode_profile: str = _flag(
        "--rota-decode-profile", "auto",
        "how the decode step grows with the batch, so prefill pacing sees a waiting burst push "
        "the step past the TBT: 'auto' (default) uses the shipped profile of the served model "
        "(and GPU, if there is one for it), 'off' none (pacing reads the step of now), or a "
        "profile JSON written by eval.profile_model.", DECODE_PROFILE)
    # Smallest paced prefill worth a forward (the fitted overhead can raise it): below it,
    # decode first instead.
    min_prefill_chunk: int = _internal(256, AT_LEAST_1)
    # The share applies over the time since the last plan. Copies slow the model's decode
    # steps (HBM traffic; the staging path's gather kernels also take SMs), roughly in
    # proportion to the rate: README's DuplexKV section has the measured trade-off.
    link_share: float = _flag(
        "--rota-link-share", 0.4,
        "share of the host link's measured rate that rotations may use, each way (bounds the "
        "model's slowdown).", SHARE)
    # KV never changes once written, so a kept copy stays valid. Copies are dropped when the
    # request finishes or is retracted, and evicted (oldest first) for host room.
    keep_host_copy: bool = _flag(
        "--rota-keep-host-copy", False,
        "keep a rotated-in request's host copy, so its next rotate-out moves only the KV "
        "written since (costs host tier space; evicted first).")
    write_through: bool = _flag(
        "--rota-write-through", False,
        "while the host link is idle, copy running requests' full pages to the host in the "
        "background (implies --rota-keep-host-copy).")
    host_numa_node: str = _flag(
        "--rota-host-numa-node", "auto",
        "NUMA node for each rank's host KV tier: 'auto' (default) binds it to its GPU's node "
        "where the host has more than one memory node, a number binds every rank's to that node "
        "(e.g. Grace's on a GH200), 'off' leaves placement to first touch.", NUMA_NODE)
    # A tighter SLO is a higher priority (EDF admits it first, it is rarely a rotation victim,
    # and a tight TBT bounds every step's prefill), so by default a client may only loosen its
    # SLOs: as in SGLang, where priorities need --enable-priority-scheduling, the operator
    # grants more. README's "Per-request SLOs" has the trade-off.
    request_slo: str = _flag(
        "--rota-request-slo", "clamp",
        "what a per-request SLO (custom_params ttft_slo/tbt_slo) tighter than the floor "
        "(--rota-min-request-slo-ratio x the server's SLO) does: 'clamp' (default) raises it to "
        "the floor, 'reject' answers HTTP 400, 'off' ignores every override (the server's SLOs "
        "apply to all requests). Looser values are always allowed; malformed ones are a 400 in "
        "every mode.", one_of(REQUEST_SLO_MODES))
    min_request_slo_ratio: float = _flag(
        "--rota-min-request-slo-ratio", 1.0,
        "the tightest per-request SLO allowed, as a fraction of the server's SLO, in (0, 1]. "
        "1.0 (default): clients may only loosen their SLOs, never jump the queue; e.g. 0.5 lets "
        "any client ask for half the server's SLOs.", SHARE)

    monitor: bool = _flag(
        "--rota-monitor", False,
        "under any other --schedule-policy, log which resource binds (KV memory or GPU compute) "
        "every few seconds, as rotasched always does (the 'binding' stats record).")

    def __post_init__(self) -> None:
        for f in fields(self):
            check: Check | None = f.metadata.get("check")
            value = getattr(self, f.name)
            if check is not None and not (value is None and f.default is None):
                check(setting_name(f), value)
        if self.write_through:
            # Write-through's copies are kept copies: readers test keep_host_copy alone.
            object.__setattr__(self, "keep_host_copy", True)


@dataclass(frozen=True, slots=True)
class RequestSlo:
    """A request's SLOs in seconds: its ``custom_params`` override, else the server's."""

    ttft_s: float
    tbt_s: float


# A value this close to the floor counts as the floor: 0.9 x 0.1 is 0.09000000000000001.
_FLOOR_TOLERANCE = 1e-9


def parse_request_slo(custom_params: object, config: RotaConfig) -> RequestSlo:
    """Parse a request's ``custom_params`` (``ttft_slo``/``tbt_slo``, seconds) once, on entry.

    Raises ConfigError, so the server can answer 400, in every ``--rota-request-slo`` mode for a
    present but invalid value (a client bug) and for an unknown key that starts with ``ttft`` or
    ``tbt`` (a misspelled override would silently do nothing); and in mode ``reject`` for a
    value below the floor (``min_request_slo_ratio`` x the server's SLO). Mode ``clamp`` raises
    such a value to the floor, mode ``off`` ignores overrides. Looser values are always kept.
    Other keys are ignored: ``custom_params`` is shared with other plugins.
    """
    params = custom_params if isinstance(custom_params, dict) else {}
    for key in params:
        if (isinstance(key, str) and key not in REQUEST_SLO_KEYS
                and key.lower().startswith(("ttft", "tbt"))):
            raise ConfigError(f"custom_params.{key} is not a known key: the per-request SLO "
                              f"keys are {' and '.join(REQUEST_SLO_KEYS)}")
    return RequestSlo(_override(params, "ttft_slo", config.ttft_slo_s, "--rota-ttft-slo", config),
                      _override(params, "tbt_slo", config.tbt_slo_s, "--rota-tbt-slo", config))


def _override(params: dict, key: str, default: float, default_flag: str,
              config: RotaConfig) -> float:
    value = params.get(key)
    if value is None:
        return default
    value = POSITIVE(f"custom_params.{key}", value)  # checked in every mode
    if config.request_slo == "off":
        return default
    floor = config.min_request_slo_ratio * default
    if value >= floor * (1 - _FLOOR_TOLERANCE):
        return value
    if config.request_slo == "clamp":
        return floor
    raise ConfigError(
        f"custom_params.{key} {value!r} is tighter than this server allows: the floor is "
        f"{floor:g} s (--rota-min-request-slo-ratio {config.min_request_slo_ratio:g} x "
        f"{default_flag} {default:g}); looser values are allowed")
