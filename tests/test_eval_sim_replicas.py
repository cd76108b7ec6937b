"""eval.sim_replicas: round robin's split, the side-by-side replicas behind power of two, and a
small run on the H100 Llama profile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval import sim_replicas
from eval.lib.gpu_model import resolve_gpu_model
from eval.lib.traces import RequestSpec, load_azure, make_specs
from eval.sim_policy import Simulator, simulate

TRACE = (Path(__file__).resolve().parents[1] / "eval" / "data" / "azure_llm_2023"
         / "AzureLLMInferenceTrace_conv.csv")


def test_round_robin_deals_requests_in_turn_and_keeps_their_arrivals():
    specs = [RequestSpec(i, 0.1 * i, 10 + i, 5) for i in range(7)]
    a, b = sim_replicas.round_robin(specs, 2)
    assert [s.idx for s in a] == [0, 2, 4, 6] and [s.idx for s in b] == [1, 3, 5]
    assert [s.arrival for s in b] == [specs[1].arrival, specs[3].arrival, specs[5].arrival]
    assert sim_replicas.round_robin(specs, 1) == [specs]


@pytest.mark.parametrize("system", sim_replicas.SYSTEMS)
def test_one_replica_behind_the_router_is_the_plain_replay(system: str):
    """Run up to each arrival, then handed the request: the same replay, to the token, as the
    simulator given every request up front (so side-by-side routing changes only the routing)."""
    gpu = resolve_gpu_model("llama-3.1-8b", "h100")
    specs = make_specs(load_azure(TRACE), num=60, arrival="poisson", rate=30, seed=3)
    sim = dict(cap=8000, gpu=gpu, ttft_slo=1.0, tbt_slo=0.1, host_tokens=200_000,
               horizon_s=300.0)
    (routed,) = sim_replicas.power_of_two(specs, system, 1, True, 0, **sim)
    plain = simulate(specs, system, **sim)
    assert routed["records"] == plain["records"]
    if system == "rotasched":
        assert plain["stats"]["rotations_out"] > 0  # the replay rotated: the case is covered


def test_power_of_two_routes_every_request_once_to_the_lower_load():
    gpu = resolve_gpu_model("llama-3.1-8b", "h100")
    specs = make_specs(load_azure(TRACE), num=80, arrival="poisson", rate=40, seed=1)
    runs = sim_replicas.power_of_two(specs, "fcfs", 2, False, 0, cap=8000, gpu=gpu,
                                     ttft_slo=1.0, tbt_slo=0.1, host_tokens=0, horizon_s=300.0)
    sends = sorted(r["send"] for run in runs for r in run["records"])
    assert sends == sorted(s.arrival for s in specs)
    assert all(len(run["records"]) > 10 for run in runs)  # both replicas got work


def test_the_load_hook_counts_the_kv_of_requests_on_the_host():
    gpu = resolve_gpu_model("llama-3.1-8b", "h100")
    specs = make_specs(load_azure(TRACE), num=60, arrival="poisson", rate=30, seed=3)
    sim = Simulator([], "rotasched", 8000, gpu, 1.0, 0.1, 200_000, 300.0)
    seen = []
    for spec in specs:
        sim.run_until(spec.arrival)
        sim.add_request(spec)
        on_host = [r for r in sim.away.values() if r.kv == 0]
        held = sum(r.spec.prompt_len + r.out - 1 for r in on_host)
        assert sim.load_tokens(True) - sim.load_tokens(False) == held
        seen.append(held)
    assert max(seen) > 0  # some arrival found requests on the host


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
        assert point[system]["power_of_two"]["n"] == 80
    assert point["rotasched"]["power_of_two_sglang_load"]["n"] == 80
    gain = 100 * (point["rotasched"]["round_robin"]["ttft_attainment"]
                  - point["fcfs"]["round_robin"]["ttft_attainment"])
    assert point["ttft_gain_points_round_robin"] == round(gain, 2)
