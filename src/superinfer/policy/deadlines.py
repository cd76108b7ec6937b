"""Deadline and slack arithmetic. Pure functions that accept floats or numpy arrays alike, so
the same formula serves one request in a test and 5,000 in the planner's vectorized pass.

A decoding stream is paced from its first token: output token k (k = 0 is the first) is due at
``first_token_s + k * tbt_slo_s``. A stream ahead of that pace has *slack* it can lend::

    first token            now        next deadline = first + n·tbt
        |---- n tokens out ---|--- slack ---|
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np

from .types import Costs

F = TypeVar("F", float, np.ndarray)


def ttft_deadline(arrival_s: F, ttft_slo_s: F) -> F:
    return arrival_s + ttft_slo_s


def next_token_deadline(first_token_s: F, num_output_tokens: F, tbt_slo_s: F) -> F:
    """Deadline of output token number ``num_output_tokens`` (the next one to be produced)."""
    return first_token_s + num_output_tokens * tbt_slo_s


def transfer_s(num_tokens: F, bytes_per_token: int, bytes_per_s: float) -> F:
    return num_tokens * (bytes_per_token / bytes_per_s)


def link_tokens(share: float, bytes_per_s: float, window_s: float, bytes_per_token: int) -> int:
    """KV tokens one direction may move in ``window_s`` at ``share`` of the link's rate (the
    share bounds how much the copies slow the model down)."""
    return int(share * bytes_per_s * window_s / bytes_per_token)


def slack_s(next_deadline_s: F, now_s: float, costs: Costs) -> F:
    """How long a decoding request may stay idle and still make its next token's deadline."""
    return next_deadline_s - now_s - costs.decode_step_s


def round_trip_s(num_tokens: F, bytes_per_token: int, costs: Costs, wait_s: float,
                 out_tokens: F | None = None) -> F:
    """Out (``out_tokens``: fewer when part of the KV is still on the host), ``wait_s`` while
    the space is used by someone else, back in, one step to produce."""
    out = num_tokens if out_tokens is None else out_tokens
    move = transfer_s(out, bytes_per_token, costs.d2h_bytes_per_s) + transfer_s(
        num_tokens, bytes_per_token, costs.h2d_bytes_per_s
    )
    return move + wait_s + costs.decode_step_s


def reserve_tokens(costs: Costs, window_s: float, total_device_tokens: int, max_frac: float) -> int:
    """Free space to keep for arrivals expected within ``window_s``: the paper's fixed budget B,
    sized from the measured arrival rate and prompt length instead of a constant."""
    want = costs.arrival_rate_per_s * window_s * costs.mean_prompt_tokens
    return int(min(want, max_frac * total_device_tokens))


def make_room_lag_s(num_tokens: F, bytes_per_token: int, costs: Costs) -> F:
    """How long before ``key`` (next-token deadline minus the swap-in copy) a rotated-out
    request that needs room must be decided on. SGLang's overlap scheduler plans batch N while
    N-1 runs, so counting batches from the decision (at plan N): N-1 is the victims' last
    writer, their copy runs during N and their pages are seen free at plan N+2; our copy waits
    for N+1 (in flight then) and runs during N+2; we are seen back at plan N+4, and N+4
    decodes the token. Six steps, the victims' copy, and ours (already in the key)."""
    return 6 * costs.decode_step_s + transfer_s(num_tokens, bytes_per_token, costs.d2h_bytes_per_s)


def prefill_share(costs: Costs) -> float:
    """Share of GPU time the measured arrivals' prefills take (their demand, not what ran)."""
    return costs.arrival_rate_per_s * costs.mean_prompt_tokens * costs.prefill_s_per_token


def prefill_time_share(decode_step_s: float, tbt_slo_s: float) -> float:
    """Share of GPU time left to prefill while decoding streams keep their pace: a decode step
    per TBT. Never under half: a decode step near a TBT long would otherwise read as no
    prefill at all."""
    return 1.0 - min(decode_step_s / tbt_slo_s, 0.5)


def decode_token_s(costs: Costs) -> float:
    """Seconds between a resident stream's tokens: a decode step, stretched by the prefills
    between steps (their share of the GPU is capped so a saturated estimate stays finite)."""
    return costs.decode_step_s / (1.0 - min(prefill_share(costs), 0.75))


def finish_s(remaining_tokens: F, now_s: float, costs: Costs) -> F:
    """When a decoding stream with ``remaining_tokens`` left to produce should be done."""
    return now_s + remaining_tokens * decode_token_s(costs)


def slack_gain(tbt_slo_s: float, decode_step_s: float, prefill_share: float) -> float:
    """Seconds of slack a resident stream earns per second: it gets a token every decode step
    (in the GPU time prefill leaves) and owes one per TBT. A stream on the host spends one
    second of slack per second, so the resident streams fund at most ``gain`` times their
    number on the host: rotate more out for new work and some must come back late."""
    return max((1.0 - min(prefill_share, 1.0)) * tbt_slo_s / decode_step_s - 1.0, 0.0)


def max_extra_away(resident: int, away: int, gain: float) -> int:
    """Largest k such that k more streams leaving (and one newcomer arriving) keeps
    ``away + k <= (resident - k + 1) * gain``."""
    return max(int(((resident + 1) * gain - away) // (1.0 + gain)), 0)
