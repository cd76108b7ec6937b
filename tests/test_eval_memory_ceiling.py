"""eval/diagnostics/memory_ceiling.py: the judged points, a scaled cap that lifts a
memory-bound replay, and each point's verdict (a miss within reach or out of it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.diagnostics.memory_ceiling import entry, judged, main, replay, summarize
from eval.lib.gpu_model import MODELS_DIR

POINT = {"model": "llama-3.1-8b", "trace": "conv", "arrival": "poisson", "cv": 1.0,
         "ttft_slo": 1.0, "tbt_slo": 0.1, "rate": 30.0, "rate_factor": 2.0,
         "gpu": "modelled h100", "gpu_model": "/x/eval/models/llama-3.1-8b/profile_h100.json",
         "mover": "staging", "num_requests": 60, "cap_tokens": 6000, "host_kv_gb": 8.0,
         "horizon_s": 600.0, "seeds": 1}


def point(base: float, rota: float, big_win: bool | None, **over) -> dict:
    return {**POINT, **over, "checks": {"best_baseline": "fcfs", "big_win": big_win},
            "systems": {"fcfs": {"ttft_attainment": base},
                        "rotasched": {"ttft_attainment": rota, "tbt_attainment": 0.99}}}


def unbounded(fcfs: float, rota: float) -> dict:
    return {"fcfs": {"ttft_attainment": fcfs, "tbt_attainment": 0.7, "both_attainment": 0.6},
            "rotasched": {"ttft_attainment": rota, "tbt_attainment": 0.98,
                          "both_attainment": rota}}


def test_only_the_points_the_goal_judges():
    pts = [point(0.4, 0.95, True), point(0.9, 0.95, None), point(0.3, 0.6, False)]
    assert judged(pts) == [pts[0], pts[2]]


def test_memory_unbounded_lifts_a_memory_bound_replay():
    tight = replay((POINT, str(MODELS_DIR), "fcfs", 0, 1.0))
    loose = replay((POINT, str(MODELS_DIR), "fcfs", 0, 20.0))
    assert set(tight) == {"ttft_attainment", "tbt_attainment", "both_attainment"}
    assert 0 <= tight["ttft_attainment"] < loose["ttft_attainment"] <= 1


def test_a_miss_is_within_reach_only_where_the_ceiling_clears_the_goal():
    reach = entry(point(0.40, 0.70, False), unbounded(0.85, 0.95))
    assert reach["ceiling_ttft"] == 0.95 and reach["win_possible"]
    assert reach["left_points"] == 25.0
    out = entry(point(0.40, 0.70, False), unbounded(0.75, 0.80))
    assert not out["win_possible"] and out["left_points"] == 10.0
    won = entry(point(0.30, 0.90, True, model="qwen2.5-32b"), unbounded(0.92, 0.9))
    assert won["unbounded"]["fcfs"] == {"ttft": 0.92, "tbt": 0.7, "both": 0.6}
    # reached by fcfs alone (its TBT given up), not by rotasched's own rules
    fcfs_only = entry(point(0.40, 0.70, False), unbounded(0.95, 0.85))
    assert fcfs_only["win_possible"]
    rows = summarize([reach, out, won, fcfs_only])
    assert rows["all"] == {"points": 4, "big_win": 1, "misses_within_reach": 2,
                           "misses_within_reach_of_rotasched": 1, "misses_out_of_reach": 1,
                           "mean_left_points": 15.5, "max_left_points": 25.0}
    assert rows["qwen2.5-32b conv poisson"]["big_win"] == 1


def test_a_matrix_without_judged_points_is_refused(tmp_path: Path, capsys):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"points": [point(0.9, 0.95, None)]}))
    with pytest.raises(SystemExit):
        main(["--matrix", str(path), "--out", str(tmp_path / "o.json")])
    assert "no point" in capsys.readouterr().err and not (tmp_path / "o.json").exists()
