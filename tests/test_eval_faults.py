"""eval.faults's judging: the start-up cases against stand-in servers, the e2e cases against
synthetic eval.e2e_rotation results and server logs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from eval import faults
from superinfer.adapters.sglang.stats import format_record


def args(tmp_path: Path, **kw) -> argparse.Namespace:
    base = dict(model_path=tmp_path, out_dir=tmp_path, port=39000, startup_timeout=20.0,
                case_budget=60.0, num=10)
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("script, passed", [
    ("print('HostTierSizeError: --rota-host-kv-gb 1000000 asks 1 PB; 12 GB available')", True),
    ("print('started fine')", False),  # exited, but said nothing about the tier
    ("import time; print('HostTierSizeError --rota-host-kv-gb'); time.sleep(60)", False),
])
def test_startup_case(tmp_path, monkeypatch, script, passed):
    monkeypatch.setattr(faults, "sglang_command",
                        lambda *a, **k: [sys.executable, "-c", script])
    case = faults.startup_case("tier_too_large", args(tmp_path, startup_timeout=3.0), [],
                               "exits", ["--rota-host-kv-gb", "HostTierSizeError"])
    assert case["passed"] is passed
    assert case["observed"]["exited"] is (not script.endswith("sleep(60)"))


def stats_log(**counters: int) -> str:
    fields = {"rotations_out": 12, "rotations_in": 12, "fallbacks": 0, "copies_failed_d2h": 0,
              "copies_failed_h2d": 0, **counters}
    return "[t] " + format_record("stats", 0, 0, fields) + "\n"


def e2e_result(n: int = 10, errors: int = 0, equal: int | None = None, leak: int = 0) -> dict:
    equal = n - errors if equal is None else equal
    return {"passed": True, "leaked_device_tokens": leak, "leaked_host_tokens": 0,
            "leaked_table_entries": 0,
            "correctness": {"rota_p1": {"n": n, "complete": n - errors, "errors": errors,
                                        "error_kinds": {"HTTP 500": errors} if errors else {},
                                        "compare": {"n_compared": n - errors, "n_equal": equal,
                                                    "n_mismatched": n - errors - equal}}}}


def test_judging_copy_failures():
    d2h_log = stats_log(copies_failed_d2h=1) + "rotasched: rotate-out copy of r3 failed\n"
    case = {"case": "d2h_copy_failure"}
    assert faults.judge_e2e(case, e2e_result(), d2h_log, failed_out=1)["passed"]
    # the same run, but a page leaked, or an output differs, or nothing was logged: failed
    assert not faults.judge_e2e(case, e2e_result(leak=16), d2h_log, failed_out=1)["passed"]
    assert not faults.judge_e2e(case, e2e_result(equal=9), d2h_log, failed_out=1)["passed"]
    assert not faults.judge_e2e(case, e2e_result(), stats_log(copies_failed_d2h=1),
                                failed_out=1)["passed"]
    h2d_log = stats_log(copies_failed_h2d=1) + "rotasched: rotate-in copy of r4 failed\n"
    judged = faults.judge_e2e({"case": "h2d_copy_failure"}, e2e_result(errors=1), h2d_log,
                              failed_in=1)
    assert judged["passed"] and judged["observed"]["burst"]["errors"] == 1
    # two requests failed where one copy did: one was lost to something else
    assert not faults.judge_e2e({}, e2e_result(errors=2), h2d_log, failed_in=1)["passed"]
    assert not faults.judge_e2e({}, None, h2d_log)["passed"]


def timed_stats_log(full_counts: list[int], every_s: float = 5.0) -> str:
    """Stats records ``every_s`` apart whose cumulative plans_host_full are ``full_counts``."""
    return "".join(
        "[t] " + format_record("stats", 0, 0, {"rotations_out": 12, "plans_host_full": n,
                                               "at_s": i * every_s}) + "\n"
        for i, n in enumerate(full_counts))


def test_judging_a_full_tier_needs_a_tier_full_long_enough():
    # full over 3 of 4 intervals (15 s), then idle; rank 1's records do not count twice
    log = timed_stats_log([0, 3, 9, 9, 20])
    log += "[t] " + format_record("stats", 1, 0, {"plans_host_full": 99, "at_s": 30.0}) + "\n"
    assert faults.host_full_seconds(log) == 15.0
    judged = faults.judge_e2e({}, e2e_result(), log, host_full_s=15.0)
    assert judged["passed"] and judged["observed"]["host_full_s"] == 15.0
    assert not faults.judge_e2e({}, e2e_result(), log, host_full_s=60.0)["passed"]
    assert not faults.judge_e2e({}, e2e_result(), stats_log(), host_full_s=1.0)["passed"]
    # full long enough, but an output differs: failed
    assert not faults.judge_e2e({}, e2e_result(equal=9), log, host_full_s=15.0)["passed"]


def test_long_soak_is_recorded_as_not_run(tmp_path):
    out = tmp_path / "faults.json"
    faults.main(["--cases", "long_soak", "--out", str(out), "--out-dir", str(tmp_path)])
    [case] = json.loads(out.read_text())["cases"]
    assert case["case"] == "long_soak" and case["passed"] is None
    assert case["observed"].startswith("not run")


def test_both_copy_failures_come_from_one_run(tmp_path, monkeypatch):
    """Asked for together, the two copy-failure cases share one eval.e2e_rotation run that
    injects both failures; each entry judges that run, and leaves the not-run list."""
    runs = []
    log = (stats_log(copies_failed_d2h=1, copies_failed_h2d=1)
           + "rotasched: rotate-out copy of r3 failed\nrotasched: rotate-in copy of r4 failed\n")

    def fake_e2e(name, _args, expected, env, extra):
        runs.append((name, env))
        return {"case": name, "expected": expected, "command": "x"}, e2e_result(errors=1), log

    monkeypatch.setattr(faults, "e2e_case", fake_e2e)
    out = tmp_path / "faults.json"
    out.write_text(json.dumps({"cases": [], "not_run": {"d2h_copy_failure": "later",
                                                        "full_tier": "later"}}))
    faults.main(["--cases", "h2d_copy_failure", "long_soak", "d2h_copy_failure",
                 "--out", str(out), "--out-dir", str(tmp_path)])
    assert runs == [("copy_failures", {faults.TEST_FAIL_COPY: "h2d:3,d2h:3"})]
    doc = json.loads(out.read_text())
    cases = {c["case"]: c for c in doc["cases"]}
    assert set(cases) == {"h2d_copy_failure", "d2h_copy_failure", "long_soak"}
    assert cases["d2h_copy_failure"]["passed"] and cases["h2d_copy_failure"]["passed"]
    assert "the other direction fails too" in cases["d2h_copy_failure"]["expected"]
    assert doc["not_run"] == {"full_tier": "later"}


def test_the_copy_failure_burst_is_spread_so_requests_rotate(tmp_path, monkeypatch):
    """All at once, every request is late at once and none rotates (no copy to fail where
    outputs are compared): the e2e run gets the burst as arrivals at --burst-rate."""
    cmds = []

    def run(cmd, **kw):
        if "eval.e2e_rotation" in cmd:
            cmds.append(cmd)
        return faults.subprocess.CompletedProcess(cmd, 1, "", "")

    monkeypatch.setattr(faults.subprocess, "run", run)
    faults.main(["--cases", "d2h_copy_failure", "--burst-rate", "15",
                 "--out", str(tmp_path / "f.json"), "--out-dir", str(tmp_path)])
    (cmd,) = cmds
    assert cmd[cmd.index("--burst-rate") + 1] == "15.0"
    assert not json.loads((tmp_path / "f.json").read_text())["cases"][0]["passed"]  # no result


def test_a_full_tier_soak_shorter_than_the_full_time_asked_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        faults.main(["--cases", "full_tier", "--full-soak-s", "30", "--out",
                     str(tmp_path / "f.json"), "--out-dir", str(tmp_path)])
    assert "--full-soak-s must be at least 60" in capsys.readouterr().err
