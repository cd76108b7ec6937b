"""eval.sweep_slo end to end against CPU stand-in servers (tests/fake_sglang_server.py): every
system starts, serves every rate, drains and stops, and the result has a summary per rate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from superinfer.adapters.sglang.stats import parse_records

ROOT = Path(__file__).resolve().parents[1]
FAKE = ROOT / "tests" / "fake_sglang_server.py"


def write_trace(tmp_path: Path) -> Path:
    csv = tmp_path / "conv.csv"
    rows = [f"2023-11-16 18:15:{i // 10:02d}.{i % 10}000000,{50 + 13 * i},{10 + 7 * i % 40}"
            for i in range(40)]
    csv.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n")
    return csv


def test_sweep_runs_every_system_and_rate(tmp_path: Path, port_base: int) -> None:
    csv = write_trace(tmp_path)
    out = tmp_path / "slo.json"
    cmd = [sys.executable, "-m", "eval.sweep_slo", "--trace", str(csv), "--rates", "20", "40",
           "--num", "12", "--systems", "fcfs", "rotasched", "--tail", "10", "--budget", "300",
           "--launcher", f"{sys.executable} {FAKE}", "--out", str(out),
           "--raw-dir", str(tmp_path / "raw"), "--port", str(port_base)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["skipped"] == [] and doc["command"].startswith("python -m eval.sweep_slo")
    for name in ("fcfs", "rotasched"):
        system = doc["systems"][name]
        assert system["status"] == "ok" and system["startup_s"] is not None
        assert [s["n"] for s in system["summaries"]] == [12, 12]
        assert system["errors"] == [0, 0] and all(system["ttft_attainment"])
        assert Path(system["server_log"]).exists()
        # each replay's binding records, added up (the stand-in logs one per busy period)
        assert system["bound"] == ["memory", "memory"]
        assert all(b["prefill_share"] == 0.4 for b in system["binding"])
    # the rotator's plan counters at each replay's idle record (none under fcfs: no rotator)
    assert doc["systems"]["fcfs"]["plan_counters"] == [None, None]
    counters = doc["systems"]["rotasched"]["plan_counters"]
    assert all(c["plans_decode_first"] == c["rotations_out"] for c in counters)
    assert counters[1]["rotations_out"] >= counters[0]["rotations_out"]  # cumulative
    assert "--rota-monitor" in doc["systems"]["fcfs"]["flags"]
    rota_log = Path(doc["systems"]["rotasched"]["server_log"]).read_text()
    assert [r["kind"] for r in parse_records(rota_log)][0] == "start"  # the server's own log


def sweep_one(tmp_path: Path, port_base: int, model: str, env: dict[str, str] | None = None
              ) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "slo.json"
    cmd = [sys.executable, "-m", "eval.sweep_slo", "--trace", str(write_trace(tmp_path)),
           "--rates", "40", "--num", "12", "--systems", "lpm", "--tail", "10", "--budget", "300",
           "--model-path", str(ROOT / "eval" / "models" / model),
           "--launcher", f"{sys.executable} {FAKE}", "--out", str(out),
           "--raw-dir", str(tmp_path / "raw"), "--port", str(port_base)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, check=False,
                         env={**os.environ, **(env or {})})
    return run, json.loads(out.read_text())


def test_requests_stay_inside_a_small_vocabulary(tmp_path: Path, port_base: int) -> None:
    # Mixtral's 32,000 tokens: ids drawn for Llama-3 would kill the server in its warm-up
    run, doc = sweep_one(tmp_path, port_base, "mixtral-8x7b")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert doc["systems"]["lpm"]["status"] == "ok" and doc["systems"]["lpm"]["errors"] == [0]


def test_a_server_that_dies_in_its_warm_up_is_reported_at_once(tmp_path: Path,
                                                               port_base: int) -> None:
    t0 = time.monotonic()
    run, doc = sweep_one(tmp_path, port_base, "llama-3.1-8b", {"FAKE_SGLANG_VOCAB": "150"})
    status = doc["systems"]["lpm"]["status"]
    assert "exited during warm-up" in status and "see " in status, status
    assert doc["skipped"] == [{"system": "lpm", "rate": 40, "reason": "server failed"}]
    assert time.monotonic() - t0 < 60  # not after a drain timeout
