"""The evaluation matrix's goals (eval.lib.matrix) and the measured matrix built from sweeps
(eval.slo_matrix)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval import slo_matrix
from eval.lib import matrix
from superinfer.policy.binding import BindingTimes


def system(ttft: float, tbt: float, both: float, tput: float) -> dict:
    return {"ttft_attainment": ttft, "tbt_attainment": tbt, "both_attainment": both,
            "throughput_tok_s": tput}


def point(bound: str, **systems: dict) -> dict:
    return {"model": "m", "trace": "conv", "arrival": "poisson", "cv": 1.0, "ttft_slo": 1.0,
            "tbt_slo": 0.1, "rate": 10.0, "gpu": "h100", "bound": bound, "systems": systems}


@pytest.mark.parametrize("ours, never_worse, big_win", [
    (system(0.99, 0.99, 0.98, 1000), True, True),
    (system(0.99, 0.99, 0.98, 940), False, True),  # under 95% of the top baseline throughput
    (system(0.99, 0.50, 0.47, 1000), True, True),  # both-SLO 2 points under lpm: tolerated
    (system(0.99, 0.50, 0.46, 1000), False, True),  # 3 points under: worse
    (system(0.70, 0.99, 0.50, 1000), True, False),  # +30 TTFT points only
])
def test_goals_on_a_memory_bound_point(ours, never_worse, big_win):
    p = point("memory", lpm=system(0.40, 0.95, 0.49, 990), fcfs=system(0.45, 0.90, 0.41, 1000),
              rotasched=ours)
    checks = matrix.check_point(p)
    assert checks["best_baseline"] == "lpm"  # by both-SLO attainment, not by TTFT
    assert checks["never_worse"] is never_worse and checks["big_win"] is big_win
    assert checks["ttft_points"] == pytest.approx(100 * (ours["ttft_attainment"] - 0.45))


def test_big_win_is_owed_only_where_memory_binds_and_baselines_miss():
    ours = system(0.99, 0.99, 0.98, 1000)
    assert matrix.check_point(point("compute", lpm=system(0.4, 0.9, 0.4, 1000),
                                     rotasched=ours))["big_win"] is None
    assert matrix.check_point(point("memory", lpm=system(0.6, 0.9, 0.5, 1000),
                                    rotasched=ours))["big_win"] is None
    assert matrix.check_point(point("memory", lpm=system(0.6, 0.9, 0.5, 1000)))[
        "never_worse"] is None  # nothing of ours measured


def sweep_doc(bindings: list[dict | None]) -> dict:
    rates = [10.0, 20.0]
    lpm = {k: [0.5, 0.3] for k in matrix.METRICS} | {"binding": bindings}
    ours = {k: [0.9, None] for k in matrix.METRICS}  # its second rate never ran
    return {"rates": rates, "model_path": "/x/eval/models/llama-3.1-8b",
            "trace": "azure_conv_gamma4",
            "trace_path": "eval/data/azure_llm_2023/AzureLLMInferenceTrace_conv.csv",
            "arrival": "gamma", "cv": 4.0, "ttft_slo": 0.5, "tbt_slo": 0.1, "gpu": "h100",
            "commit": "abc", "cap_tokens": 60000, "num_requests": [300, 300],
            "systems": {"lpm": lpm, "rotasched": ours}}


def test_points_of_a_sweep(tmp_path: Path):
    memory = BindingTimes(prefill_s=2, decode_s=8, memory_wait_s=5).as_dict()
    memory["bound"] = "compute"  # a stale label: the seconds decide
    points = slo_matrix.points_of(sweep_doc([memory, None]), str(tmp_path / "s.json"))
    [p] = points  # the rate without rotasched is no point
    assert (p["model"], p["trace"], p["arrival"], p["cv"], p["rate"]) == (
        "llama-3.1-8b", "conv", "gamma", 4.0, 10.0)
    assert p["bound"] == p["systems"]["lpm"]["bound"] == "memory"
    assert p["commit"] == "abc" and p["checks"]["never_worse"] is True


def test_main_merges_sweeps_into_the_matrix(tmp_path: Path):
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps(sweep_doc([None, None])))
    svm = tmp_path / "svm.json"
    svm.write_text(json.dumps({"inputs": [{"path": str(sweep)}], "points": [
        {"input": 0, "rate": 10.0, "system": "rotasched",
         "simulated": system(0.8, 0.9, 0.7, 900)}]}))
    out = tmp_path / "matrix.json"
    slo_matrix.main([str(sweep), "--sim-vs-measured", str(svm), "--out", str(out)])
    doc = json.loads(out.read_text())
    [p] = doc["points"]
    assert p["systems"]["rotasched"]["simulated"]["both_attainment"] == 0.7
    assert "simulated" not in p["systems"]["lpm"]
    assert doc["summary"]["never_worse"] == "1/1" and (tmp_path / "matrix.png").exists()
    slo_matrix.main([str(sweep), "--out", str(out), "--commit", "def"])  # same key: replaced
    [p] = json.loads(out.read_text())["points"]
    assert p["commit"] == "def"
