"""eval.plot_duplexkv_tradeoff: the HBM-traffic model behind the DuplexKV default."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from eval import plot_duplexkv_tradeoff as tradeoff


def write_diag(folder: Path, name: str, scenarios: dict) -> None:
    (folder / name).write_text(json.dumps({"scenarios": scenarios}))


def test_traffic_counts_each_pass_over_hbm() -> None:
    lanes = {"lane_gbps": {"d2h": 10.0, "h2d": 20.0}}
    assert tradeoff.hbm_traffic("direct", lanes) == (10.0, 20.0)
    assert tradeoff.hbm_traffic("staging", lanes) == (2 * 10 + 20, 10 + 2 * 20)
    gather = {"lane_gbps": {"gather_g8": 7.0}}
    assert tradeoff.hbm_traffic("gather kernel only", gather) == (7.0, 7.0)
    assert tradeoff.hbm_traffic("direct", {"lane_gbps": {"d2h0": 1.0, "d2h1": 2.0}}) == (3.0, 0.0)
    assert tradeoff.hbm_traffic("staging", {"lane_gbps": None}) is None


def test_fit_prices_reads_and_writes_from_one_way_dmas(tmp_path: Path) -> None:
    write_diag(tmp_path, "diag_interference_h200.json", {
        "graph/dma_d2h_only": {"slowdown": 0.01, "gbps": 50.0},
        "graph/dma_h2d_only": {"slowdown": 0.03, "gbps": 50.0}})
    fit = tradeoff.fit_hbm_cost(tmp_path)
    assert fit["per_gbps_read"] == pytest.approx(0.0002)
    assert fit["per_gbps_write"] == pytest.approx(0.0006)
    # 92 GB/s both ways = 46 each way; a copy engine path touches HBM once, staging three times.
    assert fit["copy_engine_predicted_at_goal"] == pytest.approx(46 * 0.0002 + 46 * 0.0006)
    copy_engine = fit["copy_engine_predicted_at_goal"]
    assert fit["staging_predicted_at_goal"] == pytest.approx(3 * copy_engine)
    assert fit["staging_max_duplex_gbps_under_goal"] == pytest.approx(0.05 / (3 * 0.0004))
    point = {"hbm_read_write_gbps": (50.0, 0.0)}
    assert tradeoff.predicted(point, fit) == pytest.approx(0.01)  # the fit point itself


def test_the_committed_results_draw(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "tradeoff"
    monkeypatch.setattr(sys, "argv", ["plot_duplexkv_tradeoff.py", "--out", str(out)])
    tradeoff.main()
    doc = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert doc["hbm_traffic_fit"]["staging_predicted_at_goal"] > 0.05  # the finding, from the data
    assert any(p["meets_goal"] for p in doc["points"] if p["family"] == "direct")
