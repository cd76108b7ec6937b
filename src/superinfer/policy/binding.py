"""Which resource binds: KV memory or GPU compute, from what the scheduler did.

Every scheduler iteration says what the GPU runs next (a prefill, a decode step, nothing) and
whether requests wait for their first prefill. The time until the next iteration is charged to
that state. Requests that wait while no prefill runs are held back by KV room (the GPU decodes,
or idles, and could have prefilled them); requests that wait while a prefill runs are held back
by the GPU itself. So over any span:

- ``memory``: requests waited, and for KV room a fair part of it: rotation can buy them time;
- ``compute``: requests waited, mostly for the GPU, and prefills fill most of its time: prefill
  demand alone fills it, and moving KV cannot make more GPU time, only spend some. Decode steps
  a rotation policy runs while it holds prefill back for the decoding streams (``paced_s``)
  count as prefill time here: without the pacing, prefills would have filled them (else a
  policy that paces would read its own decode steps as "the GPU is not busy with prefill",
  pace more and read "none" ever more surely);
- ``none``: requests seldom waited, or waited only in line behind prefills that do not fill
  the GPU (ordinary queueing: neither resource is short).

The caller says why requests wait. SGLang's own policies prefill whenever room allows, so a wait
without a prefill is a wait for room. A rotation policy says "memory" whenever the head of its
order needed room made (the request waited for KV even though a rotation let it in, so the
classification does not flip because rotation works) and "compute" when it holds prefill back
for the decoding streams' sake.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

BOUNDS = ("memory", "compute", "none")
GPU_STATES = ("prefill", "decode", "idle")
WAITS = ("memory", "compute")
# The rule's thresholds (checked across workloads in eval.sim_policy, not fitted to one):
MIN_WAIT_SHARE = 0.1  # requests waiting less of the time than this: nothing binds
COMPUTE_WAIT_RATIO = 2.0  # compute binds only if waits behind prefills dominate this clearly
MIN_PREFILL_SHARE = 0.5  # ... and prefills fill at least this share of the GPU's time
# One scheduler iteration longer than this is a stall (a forward of the models here takes well
# under it; a JIT compile or a blocking call in the scheduler's loop does not): counted apart,
# so a pause shows in the record.
STALL_S = 2.0


@dataclass(slots=True)
class BindingTimes:
    """Seconds of scheduler time by what the GPU ran and why requests waited."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    idle_s: float = 0.0
    memory_wait_s: float = 0.0  # requests waited and no prefill ran: KV room held them back
    compute_wait_s: float = 0.0  # requests waited while a prefill ran: the GPU held them back
    paced_s: float = 0.0  # decode time while requests waited for the GPU: prefill held back
    kv_used_s: float = 0.0  # integral of the device KV pool's used fraction
    stall_s: float = 0.0  # of the above, iterations longer than STALL_S (a stalled loop)

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s + self.idle_s

    def bound(self) -> str:
        return classify(self)

    def add(self, other: BindingTimes) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def scale(self, factor: float) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) * factor)

    def as_dict(self) -> dict[str, float]:
        """Seconds (rounded to the microsecond), the shares and the bound, for a record."""
        out: dict[str, float | str] = {k: round(v, 6) for k, v in asdict(self).items()}
        total = self.total_s
        for name in ("prefill", "decode", "idle", "memory_wait", "compute_wait", "paced"):
            out[f"{name}_share"] = round(getattr(self, f"{name}_s") / total, 4) if total else 0.0
        out["kv_used_mean"] = round(self.kv_used_s / total, 4) if total else 0.0
        out["stall_share"] = round(self.stall_s / total, 4) if total else 0.0
        out["bound"] = self.bound()
        return out

    @classmethod
    def from_dict(cls, d: dict) -> BindingTimes:
        """The seconds of a record written by ``as_dict`` (shares are recomputed)."""
        return cls(**{f.name: float(d.get(f.name, 0.0)) for f in fields(cls)})


def classify(times: BindingTimes) -> str:
    """``memory``, ``compute`` or ``none`` for the span ``times`` covers (see the module
    docstring)."""
    total = times.total_s
    wait = times.memory_wait_s + times.compute_wait_s
    if total <= 0 or wait < MIN_WAIT_SHARE * total:
        return "none"
    if times.compute_wait_s > COMPUTE_WAIT_RATIO * times.memory_wait_s:
        busy = times.prefill_s + times.paced_s
        return "compute" if busy >= MIN_PREFILL_SHARE * total else "none"
    return "memory"


def wait_reason(gpu: str, waiting: bool, room_needed: bool | None) -> str | None:
    """Why requests wait while the GPU runs ``gpu`` (None: nobody waits). Behind a prefill:
    for the GPU. Otherwise for room, unless a rotation policy says its head needed none
    (``room_needed`` False: it held prefill back for the decoding streams); None means SGLang's
    own rule, which prefills whenever room allows."""
    if not waiting:
        return None
    held_for_room = room_needed is None or room_needed
    return "memory" if held_for_room and gpu != "prefill" else "compute"


class BindingMonitor:
    """Charges scheduler time to GPU states; keeps the times since the last ``take_window``
    (for stats records) and an exponentially decayed view of the last ``tau_s`` seconds (for
    decisions that must follow load changes)."""

    def __init__(self, tau_s: float = 10.0) -> None:
        self.tau_s = tau_s
        self.window = BindingTimes()
        self.recent = BindingTimes()
        self._last: tuple[float, str, str | None, float] | None = None

    def observe(self, now_s: float, gpu: str, wait: str | None, kv_used: float) -> None:
        """From ``now_s`` on, the GPU runs ``gpu`` (one of GPU_STATES) and requests wait for
        their first prefill for ``wait`` (one of WAITS; None: nobody waits); ``kv_used`` is the
        device KV pool's used fraction."""
        if gpu not in GPU_STATES:
            raise ValueError(f"gpu must be one of {GPU_STATES}, got {gpu!r}")
        if wait is not None and wait not in WAITS:
            raise ValueError(f"wait must be None or one of {WAITS}, got {wait!r}")
        if self._last is not None:
            self._charge(now_s)
        self._last = (now_s, gpu, wait, kv_used)

    def _charge(self, now_s: float) -> None:
        assert self._last is not None
        since, gpu, wait, kv_used = self._last
        dt = now_s - since
        if dt <= 0:
            return
        span = BindingTimes(kv_used_s=kv_used * dt, stall_s=dt if dt > STALL_S else 0.0)
        setattr(span, f"{gpu}_s", dt)
        if wait is not None:
            setattr(span, f"{wait}_wait_s", dt)
            if wait == "compute" and gpu == "decode":
                span.paced_s = dt
        self.window.add(span)
        self.recent.scale(math.exp(-dt / self.tau_s))
        self.recent.add(span)

    def pause(self, now_s: float) -> None:
        """Charge up to ``now_s`` and stop: the time until the next ``observe`` (a server idle
        between bursts) is not charged to any state."""
        if self._last is not None:
            self._charge(now_s)
        self._last = None

    @property
    def paused(self) -> bool:
        """Nothing observed since start or the last ``pause``: no time is being charged."""
        return self._last is None

    def take_window(self) -> BindingTimes:
        """The times since the last call (charged up to the last observation)."""
        window, self.window = self.window, BindingTimes()
        return window

    def recent_bound(self) -> str:
        return classify(self.recent)
