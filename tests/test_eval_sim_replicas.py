"""eval.sim_replicas: round robin's split, and a small run on the H100 Llama profile."""

from __future__ import annotations

import json
from pathlib import Path

from eval import sim_replicas
from eval.lib.traces import RequestSpec

TRACE = (Path(__file__).resolve().parents[1] / "eval" / "data" / "azure_llm_2023"
         / "AzureLLMInferenceTrace_conv.csv")


def test_round_robin_deals_requests_in_turn_and_keeps_their_arrivals():
    specs = [RequestSpec(i, 0.1 * i, 10 + i, 5) for i in range(7)]
    a, b = sim_replicas.round_robin(specs, 2)
    assert [s.idx for s in a] == [0, 2, 4, 6] and [s.idx for s in b] == [1, 3, 5]
    assert [s.arrival for s in b] == [specs[1].arrival, specs[3].arrival, specs[5].arrival]
    assert sim_replicas.round_robin(specs, 1) == [specs]


def test_a_small_run_scores_both_systems_both_ways(tmp_path: Path):
    out = tmp_path / "r.json"
    sim_replicas.main(["--trace", str(TRACE), "--model", "llama-3.1-8b", "--gpu", "h100",
                       "--cap", "20000", "--rates", "8", "--replicas", "2", "--num", "40",
                       "--out", str(out)])
    (point,) = json.loads(out.read_text())["points"]
    assert point["router_rate"] == 16
    for system in sim_replicas.SYSTEMS:
        assert point[system]["one_server"]["n"] == 40
        assert point[system]["round_robin"]["n"] == 80
    gain = 100 * (point["rotasched"]["round_robin"]["ttft_attainment"]
                  - point["fcfs"]["round_robin"]["ttft_attainment"])
    assert point["ttft_gain_points_round_robin"] == round(gain, 2)
