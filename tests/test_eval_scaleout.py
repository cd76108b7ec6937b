"""eval.scaleout against CPU stand-in servers (tests/fake_sglang_server.py) behind the real
SGLang router (sglang-router from PyPI): every (system, routing policy, rate) replayed through
the router, one server's share straight to it, and the report that judges issue 16's goal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval import scaleout

ROOT = Path(__file__).resolve().parents[1]
FAKE = ROOT / "tests" / "fake_sglang_server.py"
TRACE = ROOT / "eval" / "data" / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv"


def test_both_systems_through_two_routing_policies(tmp_path: Path, port_base: int) -> None:
    out = tmp_path / "scaleout.json"
    cmd = [sys.executable, "-m", "eval.scaleout", "--trace", str(TRACE), "--rates", "20",
           "--num", "16", "--servers", "2", "--gpus", "1", "--systems", "lpm", "rotasched",
           "--policies", "round_robin", "cache_aware", "--tail", "10", "--budget", "200",
           "--abort-frac", "0.5",
           "--port", str(port_base), "--router-port", str(port_base + 40),
           "--launcher", f"{sys.executable} {FAKE}", "--out", str(out),
           "--raw-dir", str(tmp_path / "raw")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["skipped"] == [], doc["skipped"]
    got = {(e["system"], e["routing"], e["rate"]): e for e in doc["entries"]}
    assert set(got) == {(s, r, rate) for s in ("lpm", "rotasched")
                        for r, rate in (("round_robin", 20), ("cache_aware", 20),
                                        ("direct", 10))}
    for e in got.values():
        assert e["status"] == "ok" and e["errors"] == 0 and e["n"] in (16, 8)
        assert 0 <= e["ttft_attainment"] <= 1 and e["throughput_tok_s"] > 0
    assert "2 servers on 1 GPU(s)" in doc["setup"]
    # the router checks: aborts mid-stream through the first routing policy, then every
    # server drained, clean and exporting its metrics
    (check,) = doc["abort_checks"]
    assert (check["system"], check["routing"], check["status"]) == ("rotasched", "round_robin",
                                                                    "ok")
    assert check["client_aborted"] >= 1 and check["passed"], check
    assert [s["leaks"]["clean"] and s["metrics_ok"] for s in check["servers"]] == [True, True]
    assert [(r["routing"], r["rate"]) for r in doc["report"]] == [("cache_aware", 20),
                                                                  ("round_robin", 20)]
    assert (tmp_path / "raw" / "router_rotasched_cache_aware.log").exists()


def test_the_abort_check_fails_a_server_that_leaks(tmp_path: Path, port_base: int) -> None:
    out = tmp_path / "scaleout.json"
    cmd = [sys.executable, "-m", "eval.scaleout", "--trace", str(TRACE), "--rates", "20",
           "--num", "8", "--servers", "2", "--gpus", "1", "--systems", "rotasched",
           "--policies", "round_robin", "--no-direct", "--tail", "10", "--budget", "200",
           "--abort-frac", "0.5", "--port", str(port_base), "--router-port", str(port_base + 40),
           "--launcher", f"{sys.executable} {FAKE}", "--out", str(out),
           "--raw-dir", str(tmp_path / "raw")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False,
                         env={**os.environ, "FAKE_SGLANG_LEAK": "3"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (check,) = json.loads(out.read_text())["abort_checks"]
    assert check["passed"] is False
    assert [s["leaks"]["device_tokens"] for s in check["servers"]] == [3, 3]


def entry(routing: str, system: str, rate: float, ttft: float, tbt: float = 0.99,
          tput: float = 1000.0) -> dict:
    return {"routing": routing, "system": system, "rate": rate, "status": "ok",
            "ttft_attainment": ttft, "tbt_attainment": tbt, "throughput_tok_s": tput}


def test_report_judges_the_routed_gain_against_one_servers():
    entries = [entry("direct", "lpm", 22, 0.45), entry("direct", "rotasched", 22, 0.98),
               entry("round_robin", "lpm", 44, 0.40), entry("round_robin", "rotasched", 44, 0.90),
               entry("cache_aware", "lpm", 44, 0.40),
               entry("cache_aware", "rotasched", 44, 0.70, tbt=0.95, tput=900.0)]
    rows = {r["routing"]: r for r in scaleout.report(entries, servers=2)}
    assert rows["round_robin"] == {"routing": "round_robin", "rate": 44, "ttft_gain_points": 50.0,
                                   "single_server_gain_points": 53.0, "tbt_diff_points": 0.0,
                                   "throughput_ratio": 1.0, "goal_met": True}
    # 30 points against one server's 53, TBT -4, 90% throughput: missed three ways
    assert rows["cache_aware"]["goal_met"] is False
    assert rows["cache_aware"]["tbt_diff_points"] == -4.0
    # no single-server figure: no verdict of met
    lone = scaleout.report(entries[2:4], servers=2)
    assert lone[0]["single_server_gain_points"] is None and lone[0]["goal_met"] is False


def test_append_keeps_the_other_systems_entries_and_refuses_another_run(tmp_path: Path) -> None:
    out = tmp_path / "scaleout.json"
    same = {"setup": "2 servers", "trace_path": "t.csv", "model_path": "m", "num": 300,
            "ttft_slo": 1.0, "tbt_slo": 0.1, "server_extra": [], "seed": 0}
    earlier = {**same, "entries": [entry("round_robin", "lpm", 16, 0.5),
                                   entry("round_robin", "rotasched", 16, 0.6)],
               "abort_checks": [{"system": "rotasched", "passed": False}], "skipped": []}
    out.write_text(json.dumps(earlier))
    now = {**same, "entries": [], "abort_checks": [], "skipped": []}
    scaleout.kept_from(out, now, ["rotasched"])
    # lpm's entry stays; rotasched's, being run again, go
    assert [(e["system"], e["ttft_attainment"]) for e in now["entries"]] == [("lpm", 0.5)]
    assert now["abort_checks"] == []
    other = {**now, "num": 150, "entries": []}
    with pytest.raises(SystemExit, match="num"):
        scaleout.kept_from(out, other, ["rotasched"])
    missing = {**same, "entries": [], "abort_checks": [], "skipped": []}
    scaleout.kept_from(tmp_path / "none.json", missing, ["lpm"])
    assert missing["entries"] == []
