"""eval.e2e_rotation on real SGLang, small sizes: rotasched's greedy outputs equal the fcfs
baseline's, requests were rotated, no pool leaks after the soak, bad SLOs get a 4xx, metrics.

Takes minutes (four servers start at once), so it runs only with SUPERINFER_E2E=1;
SUPERINFER_E2E_TP2=1 adds the TP=2 pair (needs 2 GPUs), SUPERINFER_E2E_TRACE names the Azure
conv CSV (default eval/data/azure_llm_2023/AzureLLMInferenceTrace_conv.csv, in the repo).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRACE = Path(os.environ.get("SUPERINFER_E2E_TRACE",
                            ROOT / "eval/data/azure_llm_2023/AzureLLMInferenceTrace_conv.csv"))
BUDGET_S = 560


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not os.environ.get("SUPERINFER_E2E"),
                       reason="set SUPERINFER_E2E=1 (takes minutes)"),
    pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="needs sglang"),
    pytest.mark.skipif(not _cuda(), reason="needs CUDA"),
]


def test_rotation_end_to_end(tmp_path):
    out = tmp_path / "e2e.json"
    cmd = [sys.executable, "-m", "eval.e2e_rotation", "--trace", str(TRACE),
           "--num", "64", "--cap", "6000", "--max-output", "128", "--burst-timeout", "200",
           "--soak-num", "400", "--soak-rate", "20", "--soak-seconds", "20",
           "--budget", str(BUDGET_S), "--out", str(out), "--out-dir", str(tmp_path / "raw")]
    if os.environ.get("SUPERINFER_E2E_TP2"):
        cmd.append("--tp2")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BUDGET_S + 120, cwd=ROOT,
                          check=False)
    assert out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    r = json.loads(out.read_text())
    detail = proc.stdout[-4000:]
    assert r["rotations"] > 0 and r["rotated_requests"] > 0, detail
    assert r["outputs_equal"], detail
    leaks = (r["leaked_device_pages"], r["leaked_host_pages"], r["leaked_table_entries"])
    assert leaks == (0, 0, 0), detail
    assert r["bad_slo_status"] and all(400 <= s < 500 for s in r["bad_slo_status"].values()), detail
    assert r["checks_ok"] and r["metrics_ok"], detail
    if r["tp2_ran"]:
        assert r["tp2_identical_decisions"] is True, detail
    assert r["passed"], detail
