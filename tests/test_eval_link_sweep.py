"""eval/diagnostics/link_sweep.py: the link speed reaches the simulator, fcfs (no KV moved)
does not depend on it, and bad arguments are refused before any replay."""

from __future__ import annotations

import pytest

from eval.diagnostics.link_sweep import main, replay
from eval.diagnostics.setting_sweep import LLAMA, METRICS, Point
from eval.lib.gpu_model import MODELS_DIR

SMALL = Point(LLAMA, "h100", "conv", "poisson", 1, 30, 40, 8000, 1.0, 0.1)


def test_fcfs_ignores_the_link_and_rotasched_runs_at_each_speed():
    slow = replay((SMALL, str(MODELS_DIR), "fcfs", 50.0, 0))
    assert replay((SMALL, str(MODELS_DIR), "fcfs", 450.0, 0)) == slow
    for gbps in (50.0, 450.0):
        run = replay((SMALL, str(MODELS_DIR), "rotasched", gbps, 0))
        assert set(run) == set(METRICS) and 0 <= run["both_attainment"] <= 1


def test_bad_arguments_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--gbps", "50", "0", "--out", str(tmp_path / "d.json")])
    assert "--gbps" in capsys.readouterr().err and not (tmp_path / "d.json").exists()
