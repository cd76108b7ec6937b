"""eval/diagnostics/setting_sweep.py: the setting reaches the simulated policy, a bad value is
refused before any replay, and the comparison."""

from __future__ import annotations

import pytest

from eval.diagnostics.setting_sweep import LLAMA, METRICS, Point, compare, main, replay
from eval.lib.gpu_model import MODELS_DIR
from superinfer.config import ConfigError

SMALL = Point(LLAMA, "h100", "conv", "poisson", 1, 20, 30, 60000, 1.0, 0.1)


def test_the_setting_reaches_the_policy_and_a_bad_value_is_refused(tmp_path, capsys):
    run = replay((SMALL, str(MODELS_DIR), "late_wait_slos", 2.0, 0))
    assert set(run) == set(METRICS) and 0 <= run["both_attainment"] <= 1
    with pytest.raises(ConfigError, match="away_margin"):
        replay((SMALL, str(MODELS_DIR), "away_margin", 0.0, 0))
    with pytest.raises(SystemExit):
        main(["--setting", "away_margin", "--values", "1.5", "-1", "--out",
              str(tmp_path / "d.json")])
    assert "away_margin" in capsys.readouterr().err and not (tmp_path / "d.json").exists()


def test_compare_averages_the_draws_and_sets_throughput_against_fcfs():
    def run(ttft: float, tput: float) -> dict[str, float]:
        return {"ttft_attainment": ttft, "tbt_attainment": 1.0, "both_attainment": ttft,
                "throughput_tok_s": tput}

    out = compare([run(0.5, 100.0), run(0.7, 300.0)], [run(0.9, 190.0), run(1.0, 230.0)])
    assert out == {"ttft_attainment": 0.95, "tbt_attainment": 1.0, "both_attainment": 0.95,
                   "throughput_vs_fcfs": 1.05}


def test_a_switch_reaches_the_policy_as_a_bool(monkeypatch):
    import eval.diagnostics.setting_sweep as sweep

    seen = []

    def fake_simulate(*args, settings=None):
        seen.append(settings)
        return {"summary": dict.fromkeys(METRICS, 1.0)}

    monkeypatch.setattr(sweep, "simulate", fake_simulate)
    for value in (0.0, 1.0, None):
        replay((SMALL, str(MODELS_DIR), "fewest_late", value, 0))
    assert seen == [{"fewest_late": False}, {"fewest_late": True}, None]
