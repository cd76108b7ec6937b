"""SuperInfer settings: one frozen dataclass, validated once, with no SGLang types.

The SGLang adapter builds it from ``ServerArgs``; everything else receives the fields it needs.
"""

from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("slo", "lvf")
MOVER_PATHS = ("auto", "torch", "staging", "zerocopy", "direct")


class ConfigError(ValueError):
    """A SuperInfer setting is out of range; the message names the flag."""


@dataclass(frozen=True, slots=True)
class RotaConfig:
    ttft_slo_s: float = 1.0
    tbt_slo_s: float = 0.1
    host_kv_gb: float = 8.0
    policy: str = "slo"
    # Victims must have slack >= margin × their round-trip estimate.
    slack_margin: float = 2.0
    # Proactive free reserve = arrival rate × mean prompt × window, capped at a pool fraction.
    reserve_window_s: float = 0.2
    reserve_max_frac: float = 0.25
    # Requests already past their deadline are admitted after those that can still make it.
    late_last: bool = True
    # LVF (reference rule): fixed proactive budget B in tokens.
    lvf_budget_tokens: int = 2400 * 16
    mover: str = "auto"
    # Bound each step's prefill by the least slack of the decoding streams (decode first at 0).
    prefill_pacing: bool = True
    # Smallest paced prefill worth a forward (the fitted overhead can raise it): below it,
    # decode first instead.
    min_prefill_chunk: int = 256
    # Share of the measured PCIe rate rotations may use, each way, over the time since the
    # last plan. The staging copy's gather kernels take SMs from the model: on an H200 a
    # CUDA-graph decode step ran 11.6% slower at the full rate, 5.4% at half, 2.7% at a
    # quarter (eval/diag_interference.py); the direct path (big pages) ~3.7% at the full rate.
    link_share: float = 0.4
    # After a rotate-in, keep the host copy of the request's whole pages (KV never changes once
    # written): its next rotate-out copies only the pages written since. Copies are dropped
    # when the request finishes or is retracted, and evicted (oldest first) for host room.
    keep_host_copy: bool = False
    # Also copy running requests' full pages to the host while the link is idle (implies the
    # above): a later rotate-out moves only the pages written since.
    write_through: bool = False
    # NUMA node of the host tier's memory (e.g. Grace's LPDDR on a GH200); None: first touch.
    host_numa_node: int | None = None

    @property
    def keeps_host_copies(self) -> bool:
        """Kept host copies are on: asked for, or implied by write-through."""
        return self.keep_host_copy or self.write_through

    def __post_init__(self) -> None:
        _positive("--rota-ttft-slo", self.ttft_slo_s)
        _positive("--rota-tbt-slo", self.tbt_slo_s)
        _positive("--rota-host-kv-gb", self.host_kv_gb)
        _positive("--rota-slack-margin", self.slack_margin)
        if self.reserve_window_s < 0:
            raise ConfigError(f"--rota-reserve-window must be >= 0, got {self.reserve_window_s}")
        if not 0.0 <= self.reserve_max_frac < 1.0:
            raise ConfigError(f"reserve_max_frac must be in [0, 1), got {self.reserve_max_frac}")
        if self.policy not in POLICIES:
            raise ConfigError(f"--rota-policy must be one of {POLICIES}, got {self.policy!r}")
        if self.mover not in MOVER_PATHS:
            raise ConfigError(f"--rota-mover must be one of {MOVER_PATHS}, got {self.mover!r}")
        if not 0.0 < self.link_share <= 1.0:
            raise ConfigError(f"--rota-link-share must be in (0, 1], got {self.link_share}")
        if self.min_prefill_chunk < 1:
            raise ConfigError(f"min_prefill_chunk must be >= 1, got {self.min_prefill_chunk}")
        if self.host_numa_node is not None and self.host_numa_node < 0:
            raise ConfigError(f"--rota-host-numa-node must be >= 0, got {self.host_numa_node}")
        if self.lvf_budget_tokens < 0:
            raise ConfigError(f"lvf_budget_tokens must be >= 0, got {self.lvf_budget_tokens}")


def _positive(flag: str, value: float) -> None:
    # NOTE: `not value > 0` also rejects NaN.
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"{flag} must be a positive finite number, got {value}")


def parse_slo_override(custom_params: object) -> tuple[float | None, float | None]:
    """Per-request SLOs from a request's ``custom_params`` dict (``ttft_slo``/``tbt_slo``, seconds).

    Raises ConfigError for a present but invalid value, so the server can answer 400.
    """
    if not isinstance(custom_params, dict):
        return None, None
    out: list[float | None] = []
    for key in ("ttft_slo", "tbt_slo"):
        value = custom_params.get(key)
        if value is None:
            out.append(None)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"custom_params.{key} must be a number of seconds, got {value!r}")
        _positive(f"custom_params.{key}", float(value))
        out.append(float(value))
    return out[0], out[1]
