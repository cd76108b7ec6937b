"""What happened to requests, as data: the one way the policy's request table changes.

The adapter (SGLang) and the simulator (eval/) describe what the server did with these events
and hand them to ``Policy.update``; neither writes the table. Host-tier completions arrive as
the ``TierReport`` the host-tier manager returns (policy/types.py), through the same call.
"""

from __future__ import annotations

from dataclasses import dataclass

from .types import TierReport

NO_LIMIT = 1 << 20  # max_new_tokens of a request that set none


@dataclass(frozen=True, slots=True)
class Arrived:
    req_id: str
    arrival_s: float
    num_prompt_tokens: int
    ttft_slo_s: float
    tbt_slo_s: float
    max_new_tokens: int = NO_LIMIT
    # Its output length is fixed (ignore_eos): see Capacity.fixed_length_ratio.
    fixed_length: bool = False


@dataclass(frozen=True, slots=True)
class Requeued:
    """The server retracted a request: it must prefill its prompt plus its output again."""

    req_id: str
    now_s: float
    num_prompt_tokens: int  # prompt plus output so far
    num_output_tokens: int


@dataclass(frozen=True, slots=True)
class PrefillLaunched:
    """A batch holding this request's prefill was launched. ``first_token_s``: when its first
    token is expected, if the batch holds the prompt's last chunk (None: more chunks follow)."""

    req_id: str
    now_s: float
    first_token_s: float | None


@dataclass(frozen=True, slots=True)
class PrefillChunked:
    """A prefill chunk ran and more follow."""

    req_id: str
    now_s: float


@dataclass(frozen=True, slots=True)
class PrefillDone:
    """The prefill produced the first output token: the TBT pace starts now."""

    req_id: str
    now_s: float
    num_tokens: int  # KV tokens on the device
    num_output_tokens: int


@dataclass(frozen=True, slots=True)
class Decoded:
    """One decode step produced one token for each of ``req_ids``."""

    req_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Finished:
    """The request left the server (finished, aborted, timed out). Unknown ids are ignored."""

    req_id: str


@dataclass(frozen=True, slots=True)
class InFlight:
    """Tokens launched but not reported yet, per request (the rest: none). Sent afresh every
    iteration from the server's unprocessed batches, so no count can drift."""

    counts: dict[str, int]


@dataclass(frozen=True, slots=True)
class RotationStarted:
    """A rotate-out (``to_host``) or rotate-in was submitted to the host tier."""

    req_id: str
    now_s: float
    to_host: bool
    num_tokens: int = 0  # KV tokens moved out (rotate-out: resynchronizes the counts)
    num_output_tokens: int = 0


Event = (Arrived | Requeued | PrefillLaunched | PrefillChunked | PrefillDone | Decoded | Finished
         | InFlight | RotationStarted | TierReport)
