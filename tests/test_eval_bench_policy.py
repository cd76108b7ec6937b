"""eval.bench_policy drives the policy through its public API (events in, StepSnapshot plans
out): a short run of the benchmark's own scenario, so a change to that API cannot leave the
benchmark behind (it did once, unnoticed)."""

from __future__ import annotations

import pytest

from eval import bench_policy


@pytest.mark.parametrize("name", ["slo", "lvf"])
def test_a_short_benchmark_plans_and_rotates(name):
    r = bench_policy.run(name, iterations=20, num_running=1024, num_waiting=4096)
    assert r["iterations"] == 20 and r["plan_ms_p50"] > 0 and r["plan_ms_max"] >= r["plan_ms_p99"]
    assert r["victims_chosen_per_iteration"] > 0  # memory is tight: the worst case is timed
