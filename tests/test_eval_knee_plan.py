"""eval.knee_plan: rates around a simulated knee, and a plan eval.sweep_plan accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval import knee_plan, sweep_plan

KNEES = {"m conv h100": {"knee": 11.3137, "cap_tokens": 252800, "gpu_model": "p.json",
                         "probes": {"16": 0.47}},
         "m code h100": {"knee": None, "error": "attainment never fell under 0.9"}}


def test_rates_are_the_knee_times_each_factor_to_half_a_request():
    assert knee_plan.rates_at(11.3137, [1.0, 1.4, 1.8]) == [11.5, 16.0, 20.5]
    assert knee_plan.rates_at(0.2, [1.0, 1.01]) == [0.5]  # never zero, never twice the same


def test_the_plan_runs_each_trace_at_its_knee_and_sweep_plan_accepts_it(tmp_path: Path):
    plan = knee_plan.build_plan("m", "h100", KNEES, ["conv"], [1.0, 1.8], ["lpm", "rotasched"],
                                ["--cuda-graph-max-bs", "128"], num=300)
    wl = plan["workloads"]["m_conv"]
    assert wl["rates"] == [11.5, 20.5] and wl["cap"] == 252800
    assert Path(wl["trace"]) == Path("eval/data/azure_llm_2023/AzureLLMInferenceTrace_conv.csv")
    assert plan["queues"] == [["m_conv:lpm", "m_conv:rotasched"]]
    assert plan["common"][-2:] == ["--model-path", "eval/models/m"]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    assert sweep_plan.load_plan(path)["knees"]["m conv h100"]["knee"] == 11.3137


def test_a_trace_without_a_knee_is_refused_with_the_simulators_reason():
    with pytest.raises(SystemExit, match="never fell"):
        knee_plan.build_plan("m", "h100", KNEES, ["code"], [1.0], ["lpm"], [], num=300)


@pytest.mark.parametrize("flag", [["--kv-gb", "0"], ["--factors", "1", "-2"]])
def test_bad_sizes_are_refused_before_any_simulation(tmp_path: Path, flag):
    with pytest.raises(SystemExit):
        knee_plan.main(["--model", "llama-3.1-8b", "--gpu", "h100", "--sim-out",
                        str(tmp_path / "k.json"), "--out", str(tmp_path / "p.json"), *flag])
    assert not (tmp_path / "k.json").exists()


def test_the_default_knee_is_where_either_slo_starts_to_miss(tmp_path: Path):
    """DeepSeek-V2-Lite with 7.9 GB of KV holds 250k tokens: decode binds long before memory,
    so fcfs misses TBT at rates where every TTFT holds. The plan's knee (both SLOs) sits below
    the sim matrix's (TTFT alone), and a --resume with the other metric searches again."""
    def knee(metric: str) -> float:
        out = tmp_path / f"plan_{metric}.json"
        knee_plan.main(["--model", "deepseek-v2-lite", "--gpu", "h100", "--num", "150",
                        "--factors", "1", "--sim-out", str(tmp_path / "knees.json"), "--resume",
                        "--out", str(out), "--knee-metric", metric])
        (rec,) = json.loads(out.read_text())["knees"].values()
        return rec["knee"]

    both, ttft = knee("both"), knee("ttft")
    assert both < 0.75 * ttft
