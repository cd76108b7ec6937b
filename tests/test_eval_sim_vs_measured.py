"""eval.sim_vs_measured on the CPU: against a committed GPU sweep, with the built-in H200 model,
it replays exactly the sweep's requests, and writes measured, simulated and their difference
right (it is not asked to agree), plus one PNG; systems map and missing profiles are reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval import sim_vs_measured
from eval.lib.gpu_model import GpuModel
from eval.lib.traces import load_azure, make_specs
from eval.sim_policy import simulate

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "eval" / "results"
CONV = ROOT / "eval/data/azure_llm_2023/AzureLLMInferenceTrace_conv.csv"


@pytest.fixture(scope="module")
def h100_conv22(tmp_path_factory):
    out = tmp_path_factory.mktemp("svm") / "cmp.json"
    src = RESULTS / "slo_h100_conv22_restructure.json"
    rc = sim_vs_measured.main([str(src), "--builtin", "--out", str(out)])
    assert rc == 0
    return json.loads(src.read_text()), json.loads(out.read_text()), out


def test_measured_and_differences_are_written_right(h100_conv22):
    sweep, doc, out = h100_conv22
    assert {(p["system"], p["simulated_as"], p["rate"]) for p in doc["points"]} == {
        ("lpm", "fcfs", 22.0), ("rotasched", "rotasched", 22.0)}
    for p in doc["points"]:
        for k in sim_vs_measured.METRICS:
            assert p["measured"][k] == sweep["systems"][p["system"]][k][0]
        for k in sim_vs_measured.ATTAINMENTS:
            assert p["diff_points"][k] == pytest.approx(
                100 * (p["simulated"][k] - p["measured"][k]), abs=1e-3)
        m, s = p["measured"]["throughput_tok_s"], p["simulated"]["throughput_tok_s"]
        assert p["throughput_diff_pct"] == pytest.approx(100 * (s - m) / m, abs=1e-3)
    summ = doc["summary"]["all"]["ttft_attainment_points"]
    diffs = [p["diff_points"]["ttft_attainment"] for p in doc["points"]]
    assert summ["n"] == 2 and summ["mean_abs"] == pytest.approx(
        sum(abs(d) for d in diffs) / 2, abs=1e-3)
    inp = doc["inputs"][0]
    assert inp["model"] == "llama-3.1-8b" and inp["profile_gpu"] == "h100"
    assert inp["gpu_model"]["profile"] is None  # --builtin
    assert inp["systems"]["rotasched"]["host_kv_gb"] == 64.0  # from the sweep's server_extra
    assert Path(inp["trace_csv"]).resolve() == CONV.resolve()  # .gpu/data/... found here
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_simulated_side_is_the_sweeps_own_requests(h100_conv22):
    """The same make_specs call as eval.sweep_slo (300 conv requests, Poisson 22 req/s, seed 0):
    lpm's simulated figures are the simulator's fcfs on exactly those."""
    sweep, doc, _ = h100_conv22
    specs = make_specs(load_azure(CONV), num=300, arrival="poisson", rate=22.0, cv=1.0, seed=0)
    res = simulate(specs, "fcfs", sweep["cap_tokens"], GpuModel(), 1.0, 0.1,
                   int(64e9) // GpuModel().bytes_per_token, 600.0)
    lpm = next(p for p in doc["points"] if p["system"] == "lpm")
    for k in sim_vs_measured.METRICS:
        assert lpm["simulated"][k] == res["summary"][k]


def test_mapping_flags_and_missing_profile(tmp_path, capsys):
    sweep = {"rates": [16.0], "num_requests": [40], "trace": "azure_conv",
             "trace_path": ".gpu/data/azure_llm_2023/AzureLLMInferenceTrace_conv.csv",
             "gpu": "NVIDIA H100 80GB HBM3", "model_path": "/x/eval/models/llama-3.1-8b",
             "cap_tokens": 10000, "ttft_slo": 1.0, "tbt_slo": 0.1, "arrival": "poisson",
             "cv": 1.0, "seed": 3, "max_prompt": None, "max_output": None,
             "server_extra": ["--rota-host-kv-gb", "16"],
             "systems": {
                 "rotasched": {"flags": ["--schedule-policy", "rotasched",
                                         "--rota-keep-host-copy", "--rota-mover", "direct"],
                               "status": "ok", "ttft_attainment": [0.9],
                               "tbt_attainment": [0.95], "both_attainment": [0.88],
                               "throughput_tok_s": [1500.0]},
                 "hicache": {"flags": [], "status": "ok", "ttft_attainment": [0.5],
                             "tbt_attainment": [0.9], "both_attainment": [0.45],
                             "throughput_tok_s": [1400.0]},
                 "fcfs": {"flags": [], "status": "stopped", "ttft_attainment": [None],
                          "tbt_attainment": [None], "both_attainment": [None],
                          "throughput_tok_s": [None]}}}
    src = tmp_path / "sweep.json"
    src.write_text(json.dumps(sweep))
    out = tmp_path / "cmp.json"
    # no profile for llama-3.1-8b on h100 in an empty models dir: a clear error
    empty = tmp_path / "models"
    empty.mkdir()
    rc = sim_vs_measured.main([str(src), "--out", str(out), "--models-dir", str(empty)])
    err = capsys.readouterr().err
    assert rc == 2 and "no GPU profile for model llama-3.1-8b on gpu h100" in err
    assert not out.exists()
    rc = sim_vs_measured.main([str(src), "--builtin", "--out", str(out), "--map", "hicache=none"])
    assert rc == 0
    doc = json.loads(out.read_text())
    (p,) = doc["points"]  # hicache left out, fcfs measured nothing
    assert p["system"] == "rotasched" and p["simulated_as"] == "rotasched-keep"
    systems = doc["inputs"][0]["systems"]
    assert systems["rotasched"]["mover"] == "direct" and systems["rotasched"]["host_kv_gb"] == 16
    assert systems["hicache"]["simulated_as"] is None
    assert p["sim_stats"]["held_at_end"] == {"device_tokens": 0, "host_tokens": 0,
                                             "table_entries": 0}
