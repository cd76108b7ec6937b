"""eval.sim_matrix on the CPU: a tiny sweep writes eval.lib.matrix's points (both systems, a
bound, the checks) and a figure, --resume adds nothing already there, the knee search finds a
known knee, and fcfs's replay does not depend on the SLOs (which lets one replay serve them all)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from eval import sim_matrix
from eval.lib import matrix
from eval.lib.gpu_model import GpuModel
from eval.lib.traces import load_azure, make_specs
from eval.sim_policy import simulate

ROOT = Path(__file__).resolve().parents[1]
CONV = ROOT / "eval/data/azure_llm_2023/AzureLLMInferenceTrace_conv.csv"
# 1 GB of KV (7,629 tokens): 40 conv requests run out of memory at a rate worth finding
TINY = ["--builtin", "--traces", "conv", "--arrivals", "poisson", "--ttft-slos", "1",
        "--tbt-slos", "0.1", "--num", "40", "--seeds", "1", "--rate-factors", "1", "2",
        "--kv-gb", "1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim_matrix") / "m.json"
    assert sim_matrix.main([*TINY, "--jobs", "2", "--out", str(out)]) == 0
    return out, json.loads(out.read_text())


def test_the_file_has_the_matrix_shape(tiny):
    out, doc = tiny
    assert set(doc) >= {"points", "summary", "knees", "settings", "command"}
    assert out.with_suffix(".png").stat().st_size > 0
    knee = doc["knees"]["llama-3.1-8b conv h200"]["knee"]
    assert knee > 0 and doc["summary"]["knees"] == {"llama-3.1-8b conv h200": knee}
    pts = doc["points"]
    assert sorted(p["rate"] for p in pts) == [round(knee, 2), round(2 * knee, 2)]
    # one compact point per line: 900 points stay a small file that diffs point by point
    lines = out.read_text().splitlines()
    assert [json.loads(line.strip().rstrip(",")) for line in lines
            if line.startswith('  {"model"')] == pts
    for p in pts:
        assert set(matrix.KEY_FIELDS) <= set(p)
        assert p["gpu"] == "modelled h200" and p["simulated"] is True and p["seeds"] == 1
        assert p["cap_tokens"] == int(1e9) // 131072 and p["num_requests"] == 40
        assert (p["model"], p["trace"], p["arrival"], p["cv"]) == (
            "llama-3.1-8b", "conv", "poisson", 1.0)
        assert set(p["systems"]) == {"fcfs", "rotasched"}
        assert p["bound"] in ("memory", "compute", "none")
        assert p["bound"] == p["systems"]["fcfs"]["bound"]
        for s in p["systems"].values():
            assert s["bound"] in ("memory", "compute", "none")
            assert all(0 <= s[k] <= 1 for k in ("ttft_attainment", "both_attainment"))
            assert s["throughput_tok_s"] > 0
        assert p["checks"] == matrix.check_point(p)
        assert p["checks"]["never_worse"] in (True, False)
    assert doc["settings"]["kv_gb_by_model"] == {"llama-3.1-8b": 1.0}
    s = doc["summary"]
    assert s["points"] == 2 and s["never_worse"].endswith("/2")
    assert set(s["never_worse_by_bound"]) == {"memory", "compute", "none"}
    assert sum(int(v.split("/")[1]) for v in s["never_worse_by_bound"].values()) == 2


def test_resume_adds_nothing_new(tiny, capsys):
    out, doc = tiny
    capsys.readouterr()
    assert sim_matrix.main([*TINY, "--jobs", "1", "--out", str(out), "--resume"]) == 0
    log = capsys.readouterr().out
    assert "0 points to simulate" in log and "kept from" in log
    again = json.loads(out.read_text())
    assert again["points"] == doc["points"] and again["knees"] == doc["knees"]


def test_resume_keeps_each_models_kv_memory(tmp_path, tiny):
    """A model run on its own with less KV (``--kv-gb``, ``--resume``) keeps the other models'
    figure in ``settings``; a file from before the per-model record reads its one figure as
    every earlier model's."""
    _, doc = tiny
    old = dict(doc, settings={k: v for k, v in doc["settings"].items() if k != "kv_gb_by_model"})
    old["settings"]["kv_gb"] = 1.0
    old["points"] = [dict(p, model="qwen2.5-32b") for p in doc["points"]]
    out = tmp_path / "m.json"
    out.write_text(json.dumps(old))
    assert sim_matrix.main([*TINY, "--jobs", "1", "--out", str(out), "--resume"]) == 0
    kv = json.loads(out.read_text())["settings"]["kv_gb_by_model"]
    assert kv == {"qwen2.5-32b": 1.0, "llama-3.1-8b": 1.0}
    args = [*TINY[:-1], "0.5", "--jobs", "1", "--out", str(out), "--resume",
            "--rate-factors", "1"]
    assert sim_matrix.main(args) == 0
    kv = json.loads(out.read_text())["settings"]["kv_gb_by_model"]
    assert kv == {"qwen2.5-32b": 1.0, "llama-3.1-8b": 0.5}


def test_knee_search_brackets_a_known_knee():
    calls = []

    def attainment(rate: float) -> float:  # falls below 0.9 past 13.7 req/s
        calls.append(rate)
        return 0.95 if rate <= 13.7 else 0.6

    knee, probes = sim_matrix.find_knee(attainment, start=2.0)
    assert 13.7 < knee <= 13.7 * 2 ** (1 / 16) + 1e-9
    assert probes[knee] < 0.9 and len(calls) == len(set(calls)) <= 9
    # from above the knee, the scan goes down
    knee_down, _ = sim_matrix.find_knee(attainment, start=100.0)
    assert 13.7 < knee_down <= 13.7 * 2 ** (1 / 16) + 1e-9
    with pytest.raises(sim_matrix.KneeNotFound):
        sim_matrix.find_knee(lambda r: 1.0, start=2.0)


def test_arrival_labels():
    assert sim_matrix.parse_arrival("poisson") == ("poisson", 1.0)
    assert sim_matrix.parse_arrival("gamma4") == ("gamma", 4.0)
    for bad in ("gamma", "gamma0", "uniform"):
        with pytest.raises(argparse.ArgumentTypeError):
            sim_matrix.parse_arrival(bad)


def test_fcfs_replays_the_same_whatever_the_slos():
    specs = make_specs(load_azure(CONV), num=40, arrival="poisson", rate=20, seed=0)
    a = simulate(specs, "fcfs", 7629, GpuModel(), 1.0, 0.1, 10_000, 600)
    b = simulate(specs, "fcfs", 7629, GpuModel(), 0.5, 0.05, 10_000, 600)
    assert a["records"] == b["records"] and a["binding"] == b["binding"]
