"""eval.sim_policy: the policy replayed on a modelled GPU finishes every request, leaks
nothing, and beats SGLang's fcfs rule where KV memory is what runs out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eval.lib.traces import RequestSpec, load_azure, make_specs
from eval.sim_policy import SYSTEMS, GpuModel, Simulator, simulate
from superinfer.policy import Phase

ROOT = Path(__file__).resolve().parents[1]

CONV = ROOT / "eval/data/azure_llm_2023/AzureLLMInferenceTrace_conv.csv"


@pytest.fixture(scope="module")
def overload():
    """120 conv requests at 16 req/s into 10,000 KV tokens: fcfs queues on memory."""
    specs = make_specs(load_azure(CONV), num=120, arrival="poisson", rate=16, seed=0)
    return {name: simulate(specs, name, 10_000, GpuModel(), 1.0, 0.1, 122_064, 600)
            for name in SYSTEMS}


@pytest.mark.parametrize("name", SYSTEMS)
def test_every_request_finishes_and_nothing_is_left_held(overload, name):
    res = overload[name]
    assert res["summary"]["n"] == 120 and res["summary"]["errors"] == 0
    assert res["stats"]["held_at_end"] == {"device_tokens": 0, "host_tokens": 0, "table_entries": 0}


def test_rotation_admits_where_fcfs_waits_without_losing_the_pace(overload):
    fcfs, rota = overload["fcfs"], overload["rotasched"]
    assert fcfs["stats"]["rotations_out"] == 0 and rota["stats"]["rotations_out"] > 0
    assert fcfs["summary"]["ttft_attainment"] < 0.7
    assert rota["summary"]["ttft_attainment"] >= fcfs["summary"]["ttft_attainment"] + 0.25
    assert rota["summary"]["tbt_attainment"] >= 0.95  # fcfs: 1.0 (it admits so few)


@pytest.mark.parametrize("name", ["fcfs", "rotasched"])
def test_mixed_chunks_carry_the_streams_tokens_in_prefill_batches(overload, name):
    """--enable-mixed-chunk: prefill batches also give every running stream a token; each
    stream still gets every token of its output, once."""
    plain, mixed = overload[name], overload[f"{name}-mixed"]
    assert plain["stats"]["mixed_decode_tokens"] == 0 < mixed["stats"]["mixed_decode_tokens"]
    assert mixed["summary"]["output_tokens"] == plain["summary"]["output_tokens"]
    if name == "fcfs":  # the same schedule otherwise: fewer decode steps of its own
        assert mixed["stats"]["decode_steps"] < plain["stats"]["decode_steps"]


def test_the_memory_overload_reads_as_memory_bound(overload):
    """fcfs's requests wait for room while the GPU decodes: the binding record says memory,
    and its seconds add up to the replay."""
    binding = overload["fcfs"]["binding"]
    assert binding["bound"] == "memory"
    assert binding["memory_wait_s"] > binding["compute_wait_s"]
    total = binding["prefill_s"] + binding["decode_s"] + binding["idle_s"]
    assert total == pytest.approx(overload["fcfs"]["sim_seconds"], abs=0.05)


def test_a_prefill_overload_reads_as_compute_bound_and_moves_no_kv():
    """Code prompts (~2k tokens, ~28 out) at 22 req/s with room to spare: requests wait behind
    prefills that fill most of the GPU. Compute binds, and rotasched makes no room for new
    work (it could not admit anything sooner), while its throughput stays fcfs's."""
    code = load_azure(ROOT / "eval/data/azure_llm_2023/AzureLLMInferenceTrace_code.csv")
    specs = make_specs(code, num=200, arrival="poisson", rate=22, seed=0)
    fcfs, rota = (simulate(specs, name, 60_000, GpuModel(), 1.0, 0.1, 122_064, 600)
                  for name in ("fcfs", "rotasched"))
    assert fcfs["binding"]["bound"] == "compute" and fcfs["binding"]["prefill_share"] > 0.5
    assert rota["stats"]["rotations_out"] == 0
    tput = rota["summary"]["throughput_tok_s"] / fcfs["summary"]["throughput_tok_s"]
    assert tput > 0.95


def test_kept_host_copies_cut_what_rotate_outs_copy(overload):
    rota, keep = overload["rotasched"]["stats"], overload["rotasched-keep"]["stats"]
    assert rota["d2h_tokens_saved"] == 0 and keep["d2h_tokens_saved"] > 0
    # per rotation, what a rotate-out copies shrinks by what was still on the host
    assert keep["d2h_tokens"] / keep["rotations_out"] < rota["d2h_tokens"] / rota["rotations_out"]


def test_write_through_leaves_rotate_outs_little_to_copy(overload):
    keep, wt = overload["rotasched-keep"]["stats"], overload["rotasched-wt"]["stats"]
    assert keep["written_through_tokens"] == 0 and wt["written_through_tokens"] > 0
    assert wt["d2h_tokens"] / wt["rotations_out"] < keep["d2h_tokens"] / keep["rotations_out"]


def test_a_rotate_out_with_nothing_to_copy_still_lands():
    """A request whose whole KV is kept on the host rotates out without a copy. With nothing
    else to wait for, the simulator must still poll it through instead of stopping."""
    sim = Simulator([RequestSpec(0, 0.0, 32, 100)], "rotasched-keep", 10_000, GpuModel(), 1.0,
                    0.1, 1024, 60.0)
    sim._arrivals()
    assert sim._prefill(None)
    r = sim.running[0]
    sim._rotate_out({r.rid})  # 32 tokens out...
    assert sim._wait()
    sim._collect()
    sim._rotate_in(r.rid, 0)  # ...and back, keeping the copy's two whole pages
    assert sim._wait()
    sim._collect()
    assert sim.running == [r] and sim.tier.host_tokens(r.rid) == 32
    sim._rotate_out({r.rid})
    assert sim.mover.next_done_s() is None and sim._wait()
    sim._collect()
    assert sim.policy.phase_of(r.rid) is Phase.ON_HOST and r.kv == 0
    stats = sim.all_stats()
    assert stats["rotations_out"] == 2 and stats["d2h_tokens"] == 32
    assert stats["d2h_tokens_saved"] == 32


def test_a_copy_slows_the_decode_step_only_for_the_part_it_runs():
    """A copy ending partway into a step pays that share of the full-step slowdown, so a fast
    link (short copies) costs the decode no more than a slow one for the same bytes."""
    g = GpuModel(link_bytes_per_s=450e9)
    sim = Simulator([RequestSpec(i, 0.0, 1000, 100) for i in range(2)], "rotasched", 100_000,
                    g, 1.0, 0.1, 100_000, 60.0)
    sim._arrivals()
    assert sim._prefill(None)
    batch = sim.running[:1]
    base = g.decode_s(1, batch[0].kv)
    assert sim._decode_step_s(batch) == pytest.approx(base)
    other = sim.running[1]
    sim.tier.start_out(other.rid, other.device_slots(), None, sim.now)
    share = other.kv * g.bytes_per_token / g.link_bytes_per_s / base
    assert 0.01 < share < 0.5
    assert sim._decode_step_s(batch) == pytest.approx(base * (1 + g.copy_slowdown(share, 0)))
    assert sim._decode_step_s(batch) < base * (1 + g.copy_slowdown(True, False))


def test_cli_rejects_bad_arguments(tmp_path):
    run = subprocess.run([sys.executable, "-m", "eval.sim_policy", "--trace", str(CONV),
                          "--cap", "0", "--rates", "10"],
                         capture_output=True, text=True, cwd=ROOT, check=False)
    assert run.returncode == 2 and "must be positive" in run.stderr


def test_interference_model_reproduces_the_measured_decode_costs():
    """The model's charge for both directions at full rate is what the H200 measured."""
    results = ROOT / "eval" / "results"
    diag = json.loads((results / "diag_interference_h200.json").read_text())
    bench = json.loads((results / "duplexkv_h200.json").read_text())
    staging = diag["scenarios"]["graph/staging_mover"]["slowdown"]
    direct = bench["by_page_size"]["direct/page64"]["decode_slowdown"]
    assert GpuModel(mover="staging").copy_slowdown(True, True) == pytest.approx(staging, abs=0.01)
    assert GpuModel(mover="direct").copy_slowdown(True, True) == pytest.approx(direct, abs=0.01)
    for mover in ("staging", "direct"):
        g = GpuModel(mover=mover)
        assert g.copy_slowdown(False, False) == 0.0
        one_way = (g.copy_slowdown(True, False), g.copy_slowdown(False, True))
        assert 0 < one_way[0] < one_way[1] < g.copy_slowdown(True, True)
        # copies through a quarter of the step pay a quarter of it
        assert g.copy_slowdown(0.25, 0.25) == pytest.approx(g.copy_slowdown(True, True) / 4)


def test_cli_writes_a_result_plot_slo_can_draw(tmp_path):
    out = tmp_path / "sim.json"
    run = subprocess.run([sys.executable, "-m", "eval.sim_policy", "--trace", str(CONV),
                          "--cap", "10000", "--rates", "16", "--num", "40", "--seeds", "2",
                          "--systems", "fcfs", "rotasched",
                          "--out", str(out), "--raw-dir", str(tmp_path / "raw")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    doc = json.loads(out.read_text())
    rota = doc["systems"]["rotasched"]
    seeds = rota["per_seed"][0]
    assert doc["seeds"] == 2 and len(seeds) == 2
    assert rota["ttft_attainment"][0] == pytest.approx(sum(r["ttft_attainment"] for r in seeds) / 2)
    assert len((tmp_path / "raw" / "rotasched_rate16.jsonl").read_text().splitlines()) == 40
    plot = subprocess.run([sys.executable, "-m", "eval.plot_slo", str(out)], capture_output=True,
                          text=True, cwd=ROOT, check=False)
    assert plot.returncode == 0, plot.stderr
    for name in ("attainment", "throughput", "ttft_cdf"):
        assert (tmp_path / f"sim_{name}.png").stat().st_size > 10_000


def test_overlap_scheduling_shows_a_request_to_the_plan_after_next():
    """SGLang plans the next batch while one runs: a request that arrives during a long prefill
    misses the batch planned then and runs one batch later (here, the first decode step)."""
    gpu = GpuModel()
    long_prefill_s = gpu.prefill_s(8000, gpu.attn_pairs(8000, 0))
    specs = [RequestSpec(0, 0.0, 8000, 50), RequestSpec(1, long_prefill_s / 2, 100, 5)]

    def first_token_s(overlap: bool) -> float:
        sim = Simulator(specs, "fcfs", 20_000, gpu, 1.0, 0.1, 0, 60.0, overlap=overlap)
        return sim.run()[1]["token_times"][0]

    without, with_overlap = first_token_s(False), first_token_s(True)
    assert without == pytest.approx(long_prefill_s + gpu.prefill_s(100, gpu.attn_pairs(100, 0)))
    assert with_overlap - without == pytest.approx(gpu.decode_s(1, 8000), rel=1e-6)
