"""The SLO metric definitions of eval/lib/metrics.py on hand-built records.

Each case is chosen so that a plausible wrong definition (per-gap instead of paced TBT, TTFT
from arrival instead of send, errors not counted as misses) gives a different number.
"""

from __future__ import annotations

import pytest

from eval.lib.metrics import gaps, meets_tbt, meets_ttft, slo_goal, summarize, ttft


def rec(send: float | None, times: list[float], error: str | None = None,
        aborted: bool = False, arrival: float = 0.0) -> dict:
    return {"arrival": arrival, "send": send, "token_times": times, "error": error,
            "aborted": aborted, "output_len": len(times)}


def test_ttft_is_measured_from_send():
    r = rec(send=5.0, times=[5.6, 5.7], arrival=0.0)
    assert ttft(r) == pytest.approx(0.6)
    assert meets_ttft(r, 1.0)
    assert not meets_ttft(rec(1.0, [2.2]), 1.0)


def test_tbt_is_a_pace_from_the_first_token_not_a_per_gap_bound():
    # Mean gap 0.1 s, but token 2 is due at 0.2 s and comes at 0.25 s: behind the pace.
    assert not meets_tbt(rec(0.0, [0.0, 0.05, 0.25, 0.3]), 0.1)
    # A 0.28 s gap after a burst: every token k still arrives by k x 0.1 s.
    assert meets_tbt(rec(0.0, [0.0, 0.0, 0.0, 0.28]), 0.1)
    # The pace starts at the first token, however late it was.
    assert meets_tbt(rec(0.0, [9.0, 9.1, 9.2]), 0.1)


def test_errors_are_misses_whatever_they_delivered():
    bad = rec(0.0, [0.1, 0.15], error="short output: 2 of 5 tokens")
    assert not meets_ttft(bad, 1.0) and not meets_tbt(bad, 0.1)
    assert not meets_ttft(rec(None, [], error="not sent"), 1.0)


def test_client_aborted_request_is_judged_on_what_it_received():
    r = rec(0.0, [0.2, 0.3], aborted=True)
    assert meets_ttft(r, 1.0) and meets_tbt(r, 0.1)


def test_summarize_counts_and_fractions():
    records = [
        rec(0.0, [0.5, 0.55, 0.6]),           # meets both
        rec(1.0, [3.0, 3.05]),                # TTFT 2.0 s: TTFT miss, TBT ok
        rec(2.0, [2.1, 2.4]),                 # TBT miss (token 1 due at 2.2)
        rec(3.0, [3.1, 3.15], error="boom"),  # error: misses all
    ]
    s = summarize(records, ttft_slo=1.0, tbt_slo=0.1)
    assert s["n"] == 4 and s["errors"] == 1
    assert s["ttft_attainment"] == pytest.approx(2 / 4)
    assert s["tbt_attainment"] == pytest.approx(2 / 4)
    assert s["both_attainment"] == pytest.approx(1 / 4)
    # TTFTs 0.5, 2.0, 0.1, 0.1 (the errored one delivered a first token too).
    assert s["ttft_p50"] == pytest.approx(0.3)
    # Gaps: 0.05, 0.05, 0.05, 0.3, 0.05 -> 4 of 5 within 0.1 s.
    assert s["tbt_gap_attainment"] == pytest.approx(4 / 5)
    assert s["tbt_p50"] == pytest.approx(0.05)
    # 9 tokens from the first send (0.0) to the last token (3.15).
    assert s["output_tokens"] == 9
    assert s["throughput_tok_s"] == pytest.approx(9 / 3.15)


def test_percentiles_skip_requests_without_a_first_token():
    records = [rec(0.0, [t]) for t in (0.1, 0.2, 0.3, 0.4)] + [rec(0.0, [], error="refused")]
    s = summarize(records, 1.0, 0.1)
    assert s["ttft_p50"] == pytest.approx(0.25)
    assert s["ttft_attainment"] == pytest.approx(4 / 5)
    assert gaps(records[0]) == []


def test_empty_input_has_no_fractions():
    s = summarize([], 1.0, 0.1)
    assert s["n"] == 0 and s["ttft_attainment"] is None and s["throughput_tok_s"] is None


def _result(rates, **systems):
    keys = ("ttft_attainment", "tbt_attainment", "throughput_tok_s")
    return {"rates": rates,
            "systems": {n: dict(zip(keys, v, strict=False)) for n, v in systems.items()}}


def test_slo_goal_is_judged_at_the_first_rate_where_every_baseline_is_below_half():
    res = _result([10, 14, 18],
                  fcfs=([1.0, 0.45, 0.3], [0.99, 0.97, 0.96], [100, 120, 130]),
                  lpm=([1.0, 0.55, 0.4], [0.99, 0.98, 0.96], [100, 121, 131]),
                  rotasched=([1.0, 1.0, 0.95], [1.0, 0.99, 0.95], [100, 119, 125]))
    g = slo_goal(res)
    assert g["rate"] == 18 and g["best_baseline"] == "lpm"  # at 14 lpm is still above 50%
    assert abs(g["ttft_points"] - 55.0) < 1e-9 and abs(g["tbt_points"] + 1.0) < 1e-9
    assert abs(g["throughput_change"] - (125 / 131 - 1)) < 1e-12 and g["met"]
    res["systems"]["rotasched"]["throughput_tok_s"][2] = 120  # -8.4%: missed
    assert not slo_goal(res)["met"]


def test_slo_goal_is_none_when_no_rate_puts_every_baseline_below_half():
    res = _result([10], fcfs=([0.4], [1.0], [1]), lpm=([0.6], [1.0], [1]),
                  rotasched=([1.0], [1.0], [1]))
    assert slo_goal(res) is None
    assert slo_goal(_result([10], fcfs=([0.4], [1.0], [1]))) is None  # ours missing
