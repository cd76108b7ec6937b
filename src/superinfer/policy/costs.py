"""Online cost estimates from what the scheduler observes, with sane defaults at start.

Exponentially weighted averages: cheap, bounded memory, and quick to follow load changes.
Prefill time is fitted as overhead + tokens × rate (weighted least squares over the same
window), since small chunks cost far more per token than large ones.
Under tensor parallelism only rank 0's estimates are used (the adapter shares them).
"""

from __future__ import annotations

from dataclasses import dataclass

from .step_profile import DecodeStepProfile
from .types import Costs, Transfer

DEFAULT_COSTS = Costs(
    prefill_s_per_token=25e-6,  # a guess for an 8B model on one Hopper GPU, until fitted
    decode_step_s=0.025,
    d2h_bytes_per_s=25e9,  # conservative PCIe Gen5 figure until a transfer is measured
    h2d_bytes_per_s=25e9,
    arrival_rate_per_s=0.0,
    mean_prompt_tokens=0.0,
    prefill_overhead_s=0.005,
)


RATE_WINDOW_S = 0.5


@dataclass(slots=True)
class _Ewma:
    value: float
    alpha: float
    seen: bool = False

    def add(self, x: float) -> None:
        # The first sample replaces the default outright: defaults are guesses, not data.
        self.value = x if not self.seen else self.value + self.alpha * (x - self.value)
        self.seen = True


@dataclass(slots=True)
class _AffineFit:
    """Exponentially weighted least squares of y = overhead + rate × x. Until the sizes seen
    differ enough to separate the two, the default overhead is kept and the rate fitted."""

    overhead: float
    rate: float
    alpha: float
    _w: float = 0.0
    _x: float = 0.0
    _y: float = 0.0
    _xx: float = 0.0
    _xy: float = 0.0

    def add(self, x: float, y: float) -> None:
        keep = 1.0 - self.alpha if self._w else 0.0  # the first sample replaces the defaults
        self._w, self._x, self._y = keep * self._w + 1, keep * self._x + x, keep * self._y + y
        self._xx, self._xy = keep * self._xx + x * x, keep * self._xy + x * y
        mx, my = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mx * mx
        if var > (0.1 * mx) ** 2:
            rate = (self._xy / self._w - mx * my) / var
            if rate > 0:
                self.rate = rate
                self.overhead = min(max(my - rate * mx, 0.0), my)
                return
        self.overhead = min(self.overhead, 0.5 * my)
        self.rate = (my - self.overhead) / mx


class CostModel:
    """Accumulates observations; ``costs()`` returns the current estimates."""

    def __init__(self, alpha: float = 0.2, defaults: Costs = DEFAULT_COSTS,
                 decode_profile: DecodeStepProfile | None = None) -> None:
        self.decode_profile = decode_profile  # the served model's, if known (step_profile)
        self._prefill = _AffineFit(defaults.prefill_overhead_s, defaults.prefill_s_per_token, alpha)
        self._decode = _Ewma(defaults.decode_step_s, alpha)
        self._calibration = _Ewma(1.0, alpha)  # measured step / the profile's, per step
        self._d2h = _Ewma(defaults.d2h_bytes_per_s, alpha)
        self._h2d = _Ewma(defaults.h2d_bytes_per_s, alpha)
        self._rate = _Ewma(defaults.arrival_rate_per_s, alpha)
        self._prompt = _Ewma(defaults.mean_prompt_tokens, alpha)
        self._window_start_s: float | None = None
        self._window_arrivals = 0

    def observe_prefill(self, num_tokens: int, elapsed_s: float) -> None:
        if num_tokens > 0 and elapsed_s > 0:
            self._prefill.add(float(num_tokens), elapsed_s)

    def observe_decode(self, elapsed_s: float, streams: int = 0, kv_tokens: int = 0) -> None:
        """A decode step of ``streams`` streams reading ``kv_tokens`` KV tokens (0: not known)
        took ``elapsed_s``."""
        if elapsed_s > 0:
            self._decode.add(elapsed_s)
            if self.decode_profile is not None and streams > 0:
                self._calibration.add(elapsed_s / self.decode_profile.step_s(streams, kv_tokens))

    def observe_transfer(self, transfer: Transfer) -> None:
        """The link's rate: from the copy's own time where the mover timed it. Its time from
        submission to the poll that saw it done is mostly the forward it waited behind and the
        rest of the iteration (a few GB/s on a ~50 GB/s link): as a rate it would starve the
        policy's link budgets, which the step counts of ``deadlines`` already wait for."""
        num_bytes, seconds = transfer.link or (transfer.num_bytes, transfer.elapsed_s)
        if num_bytes > 0 and seconds > 0:
            (self._d2h if transfer.to_host else self._h2d).add(num_bytes / seconds)

    def observe_arrival(self, now_s: float, num_prompt_tokens: int) -> None:
        """Arrivals are counted over windows of at least RATE_WINDOW_S: a burst landing in one
        scheduler iteration must not read as an infinite rate."""
        self._prompt.add(float(num_prompt_tokens))
        if self._window_start_s is None:
            self._window_start_s = now_s
        self._window_arrivals += 1
        span = now_s - self._window_start_s
        if span >= RATE_WINDOW_S:
            self._rate.add((self._window_arrivals - 1) / span)  # the one at now_s opens the next
            self._window_start_s, self._window_arrivals = now_s, 1

    def costs(self) -> Costs:
        return Costs(
            prefill_s_per_token=self._prefill.rate,
            decode_step_s=self._decode.value,
            d2h_bytes_per_s=self._d2h.value,
            h2d_bytes_per_s=self._h2d.value,
            arrival_rate_per_s=self._rate.value,
            mean_prompt_tokens=self._prompt.value,
            prefill_overhead_s=self._prefill.overhead,
            decode_profile=self.decode_profile,
            decode_calibration=self._calibration.value,
        )
