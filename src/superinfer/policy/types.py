"""Plain data crossing the boundary between the SGLang adapter and the policy.

No tensors, no SGLang objects: the adapter translates, the policy decides. All times are
seconds on one clock chosen by the adapter (rank 0's, broadcast under tensor parallelism).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from .step_profile import DecodeStepProfile


class Phase(IntEnum):
    WAITING = 0  # needs a prefill (new, or retracted by SGLang)
    PREFILLING = 1  # in a (chunked) prefill: neither a candidate nor a victim
    RUNNING = 2  # decoding, KV on the device
    ROTATING_OUT = 3  # device->host copy in flight
    ON_HOST = 4  # rotated out: KV on the host tier, waiting to come back
    ROTATING_IN = 5  # host->device copy in flight


@dataclass(frozen=True, slots=True)
class Costs:
    """Measured (or default) costs; see costs.CostModel."""

    prefill_s_per_token: float
    decode_step_s: float  # one decode batch alone (not counting prefills in between)
    d2h_bytes_per_s: float
    h2d_bytes_per_s: float
    arrival_rate_per_s: float
    mean_prompt_tokens: float
    # A prefill forward costs this much on top of its tokens (launches, weights read once): a
    # per-token rate alone, measured on small chunks, would read as slow and shrink them more.
    prefill_overhead_s: float = 0.0
    # How the decode step grows with the batch, for the served model (None: not known), and
    # the measured steps' ratio to what it says (its error on this GPU and backend).
    decode_profile: DecodeStepProfile | None = None
    decode_calibration: float = 1.0

    def decode_step_for(self, streams: int, kv_tokens: int) -> float:
        """The decode step of a batch of ``streams`` streams reading ``kv_tokens`` KV tokens:
        the profile's step for it times the calibration (the profile gives the shape, the
        measured steps the level, so a profile taken with another attention backend or on
        another GPU still serves). Without a profile, the measured step of now."""
        if self.decode_profile is None:
            return self.decode_step_s
        return self.decode_calibration * self.decode_profile.step_s(streams, kv_tokens)

    def prefill_s(self, num_tokens: float) -> float:
        """Seconds to prefill ``num_tokens`` in one forward (a numpy array works too)."""
        return self.prefill_overhead_s + num_tokens * self.prefill_s_per_token

    def prefill_tokens_within(self, seconds: float) -> int:
        """The largest prefill that finishes within ``seconds`` (0 if not even an empty one)."""
        return max(int((seconds - self.prefill_overhead_s) / self.prefill_s_per_token), 0)


@dataclass(frozen=True, slots=True)
class Capacity:
    """Memory as the adapter sees it this iteration, in tokens."""

    # Free plus evictable device tokens, before the running batch's decode reservation.
    available_device_tokens: int
    total_device_tokens: int
    free_host_tokens: int
    bytes_per_token: int
    # SGLang reserves this fraction of each running request's remaining output tokens.
    new_token_ratio: float = 0.0
    # ... and this fraction for a request of fixed output length (None: new_token_ratio too).
    fixed_length_ratio: float | None = None


@dataclass(frozen=True, slots=True)
class StepSnapshot:
    """Everything a plan reads besides the policy's own request table, built by the adapter
    once per scheduler iteration."""

    now_s: float
    capacity: Capacity
    costs: Costs
    # The most prompt tokens one prefill batch takes without cutting a request.
    max_prefill_tokens: int
    # When the batches already launched should be done (None: the GPU is idle now).
    gpu_free_at_s: float | None = None
    # Which resource bound lately (policy.binding): "memory", "compute" or "none".
    bound: str = "none"


@dataclass(frozen=True, slots=True)
class Transfer:
    """One finished rotation copy, for the cost model."""

    to_host: bool
    num_bytes: int  # the KV the copy stands for (a request's whole KV), not the bytes it moved
    elapsed_s: float  # from submission to the poll that saw it done
    # What the copy moved and how long it ran on the link alone, where the mover timed it
    # (CUDA events); None: only ``elapsed_s`` is known.
    link: tuple[int, float] | None = None


@dataclass(slots=True)
class TierReport:
    """What the host tier finished since the last poll (the policy's view of DuplexKV).

    ``finished_out``: device->host copies done on every rank: the device KV may be released.
    ``finished_in``: host->device copies done: the request may rejoin the running batch.
    ``cancelled``: those of the two lists that were dropped while their copy ran; their host
    pages are already free. ``host_tokens``: the kept host copy of every resident request
    that has one (absent: none).
    """

    now_s: float = 0.0
    finished_out: list[str] = field(default_factory=list)
    finished_in: list[str] = field(default_factory=list)
    cancelled: set[str] = field(default_factory=set)
    # Copies that failed (not in the lists above; their host pages are free): a failed
    # rotate-out leaves the request running on the device, a failed rotate-in fails it.
    failed_out: list[str] = field(default_factory=list)
    failed_in: list[str] = field(default_factory=list)
    host_tokens: dict[str, int] = field(default_factory=dict)
    transfers: list[Transfer] = field(default_factory=list)
    free_host_tokens: int = 0  # free pages plus kept copies (evictable), in tokens
    used_host_tokens: int = 0


@dataclass(frozen=True, slots=True)
class ReqView:
    """One request's policy state, for logs and tests (the planner works on columns)."""

    req_id: str
    phase: Phase
    arrival_s: float
    ttft_slo_s: float
    tbt_slo_s: float
    num_prompt_tokens: int
    num_tokens: int
    num_output_tokens: int
    max_new_tokens: int
    first_token_s: float | None
    resident_since_s: float
    rotated_at_s: float


# Why a blocked new head got no room made by rotation: compute binds (new work waits for the
# GPU), finishing streams free the room in time, no decoding stream has the slack to leave,
# the streams on the host would spend more slack than the resident ones earn, the host tier is
# full.
HELD_BY = ("compute", "room_comes", "no_victims", "away_bound", "host_full")


@dataclass(slots=True)
class StepPlan:
    """What to do this iteration; each request id appears in at most one list."""

    admit: list[str] = field(default_factory=list)  # WAITING ids for the queue front, in order
    rotate_in: list[str] = field(default_factory=list)  # ON_HOST ids, in order
    rotate_out: list[str] = field(default_factory=list)  # RUNNING ids
    reasons: dict[str, str] = field(default_factory=dict)  # id -> why (logs and tests)
    # Prefill tokens this step may run without making a decoding stream miss its next token
    # (None: no limit; 0: run a decode step first).
    prefill_token_budget: int | None = None
    # The EDF head is a new request that does not fit and no rotation makes room for it this
    # step: nothing behind it is admitted (counted in the server's stats line).
    head_blocked: bool = False
    # The EDF head is a new request that needed room (made by rotation or not): it waits for
    # KV memory, which is what policy.binding counts as memory binding.
    room_needed: bool = False
    # Room was wanted from rotation but the host tier had none for the streams it takes: what
    # rotation cannot do, SGLang's own admission and retraction then do.
    host_full: bool = False
    # Why no rotation made room for a blocked head (set with ``head_blocked``; one of HELD_BY):
    # counted per reason in the server's stats and the simulator's, to tell which guard held
    # new work back where the two disagree.
    held_by: str | None = None

    def check(self) -> None:
        ids = self.admit + self.rotate_in + self.rotate_out
        if len(ids) != len(set(ids)):
            raise AssertionError(f"a request appears twice in {self}")
