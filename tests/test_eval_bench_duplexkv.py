"""eval.bench_duplexkv on the CPU: the script runs end to end, and its summary rules hold on
the committed H200 runs (headline = rotasched's own default path, per-page baselines by size)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eval import bench_duplexkv as bench

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "eval" / "results"


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eval.bench_duplexkv", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)


def test_smoke_run_writes_every_issue_key_and_a_plot(tmp_path: Path) -> None:
    out = tmp_path / "d.json"
    run = run_bench("--smoke", "--sizes", "64", "128", "--reps", "1", "--pool-tokens", "4096",
                    "--out", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    doc = json.loads(out.read_text())
    for key in ("gpu", "duplex_gbps", "d2h_gbps", "h2d_gbps", "per_page_copy_gbps",
                "decode_slowdown", "command", "date"):
        assert key in doc, key
    assert doc["verified"] and all(doc["verified"].values())  # bytes checked after each path
    assert doc["default_config"] == doc["measured_best"]  # smoke runs lack staging: best stands in
    assert out.with_suffix(".png").stat().st_size > 0


def test_resummarize_reproduces_the_committed_headline(tmp_path: Path) -> None:
    committed = json.loads((RESULTS / "duplexkv_h200.json").read_text())
    out = tmp_path / "again.json"
    run = run_bench("--resummarize", str(RESULTS / "duplexkv_h200.json"), "--out", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    again = json.loads(out.read_text())
    for key in ("default_config", "duplex_gbps", "decode_slowdown", "speedup_vs_per_page",
                "goals_met", "by_page_size", "measured_best"):
        assert again[key] == committed[key], key
    assert again["resummarized"]["from"].endswith("duplexkv_h200.json")


@pytest.mark.parametrize("run", ["duplexkv_h200.json", "duplexkv_h200_run7.json"])
def test_headline_is_the_path_rotasched_takes_at_16_token_pages(run: str) -> None:
    doc = json.loads((RESULTS / run).read_text())
    assert doc["default_config"] == "staging/chunk2048/grid32"  # --rota-mover auto, 32 KiB pieces
    staging = doc["detail"]["staging/chunk2048/grid32"][-1]
    assert doc["duplex_gbps"] == staging["duplex_gbps"]


def test_bigger_pages_are_compared_with_per_page_copies_of_their_own_size() -> None:
    doc = json.loads((RESULTS / "duplexkv_h200.json").read_text())
    by_page = doc["per_page_copy_by_page"]
    direct64 = doc["by_page_size"]["direct/page64"]
    per_page64 = max(by_page["64"]["d2h_gbps"], by_page["64"]["h2d_gbps"])
    assert direct64["per_page_copy_gbps"] == per_page64
    assert direct64["speedup_vs_per_page"] == pytest.approx(
        min(direct64["d2h_gbps"] / by_page["64"]["d2h_gbps"],
            direct64["h2d_gbps"] / by_page["64"]["h2d_gbps"]))


def test_parse_config_names_and_rejects() -> None:
    assert bench.parse_config("staging:2048:32")["name"] == "staging/chunk2048/grid32"
    assert bench.parse_config("direct:64:0:cuda")["name"] == "direct/page64/cudaslots"
    assert bench.page_of("direct/page64/cudaslots") == 64 and bench.page_of("torch") == bench.PAGE
    with pytest.raises(ValueError, match="slots"):
        bench.parse_config("direct:64:0:gpu")


def test_a_run_without_16_token_pages_is_summarized_and_an_empty_one_raises(tmp_path: Path) -> None:
    raw = {k: v for k, v in json.loads((RESULTS / "duplexkv_h200.json").read_text()).items()
           if k in bench.RAW_KEYS}
    only64 = {**raw, "detail": {"direct/page64": raw["detail"]["direct/page64"]},
              "decode": {"direct/page64": raw["decode"]["direct/page64"]}}
    summary = bench.summarize(only64)
    assert summary["default_config"] == summary["measured_best"] == "direct/page64"
    bench.write_summary(summary, tmp_path / "only64.json")
    assert (tmp_path / "only64.png").stat().st_size > 0
    assert summary["by_page_size"]["direct/page64"]["speedup_vs_per_page"] == pytest.approx(
        raw["detail"]["direct/page64"][-1]["d2h_gbps"]
        / raw["per_page_copy_by_page"]["64"]["d2h_gbps"], rel=0.05)
    with pytest.raises(ValueError, match="no configuration ran"):
        bench.summarize({**raw, "detail": {}, "decode": {},
                         "failed_configs": {"direct/page64": "boom"}})
