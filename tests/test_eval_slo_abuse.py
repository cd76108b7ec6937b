"""eval.slo_abuse: its request sets and report on the CPU, and the whole script against CPU
stand-in servers (tests/fake_sglang_server.py, which checks per-request SLOs with SuperInfer's
own parse_request_slo under the --rota-request-slo mode it is given)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eval.lib.traces import TraceRow
from eval.slo_abuse import (
    CONTROL,
    RUNS,
    RequestSets,
    abuse_extra,
    build_request_sets,
    mode_report,
    parse_args,
    refused_400,
    report,
    run_requests,
    summarize_run,
    table,
)

ROOT = Path(__file__).resolve().parents[1]
FAKE = ROOT / "tests" / "fake_sglang_server.py"
ABUSE = abuse_extra(0.001)


def rows(n: int = 200) -> list[TraceRow]:
    return [TraceRow(0.1 * i, 100 + i, 10 + i % 7) for i in range(n)]


def test_request_sets_add_the_extra_client_over_the_same_span():
    sets = build_request_sets(rows(), num=100, rate=20.0, abuse_frac=0.3, seed=4)
    assert len(sets.others) == 100 and len(sets.extra) == 30
    assert [s.idx for s in sets.others] == list(range(100))
    assert [s.idx for s in sets.extra] == list(range(100, 130))  # the next rows: own prompts
    assert [s.prompt_len for s in sets.extra] == [r.prompt_len for r in rows()[100:130]]
    # Its own Poisson draw at 30% of the rate: about the same span as everyone else's.
    span, extra_span = sets.others[-1].arrival, sets.extra[-1].arrival
    assert 0.4 < extra_span / span < 2.5
    assert build_request_sets(rows(), num=100, rate=20.0, abuse_frac=0.3, seed=4) == sets
    assert build_request_sets(rows(), num=100, rate=20.0, abuse_frac=0.3, seed=5) != sets
    # Everyone else's requests are the sweep's (same rows, rate, seed): one baseline for both.
    from eval.lib.traces import make_specs
    assert sets.others == make_specs(rows(), num=100, rate=20.0, seed=4, arrival="poisson")


def test_request_sets_edges():
    assert build_request_sets(rows(), num=10, rate=5.0, abuse_frac=0.0).extra == []
    assert len(build_request_sets(rows(), num=10, rate=5.0, abuse_frac=0.25).extra) == 2
    with pytest.raises(ValueError, match="rows"):
        build_request_sets(rows(50), num=45, rate=5.0, abuse_frac=0.3)
    with pytest.raises(ValueError):
        build_request_sets(rows(), num=0, rate=5.0)
    with pytest.raises(ValueError):
        build_request_sets(rows(), num=10, rate=0.0)


def test_abuse_extra_asks_for_the_tightest_slos():
    assert ABUSE == {"sampling_params": {"custom_params": {"ttft_slo": 0.001}}}
    assert abuse_extra(0.001, 0.0001)["sampling_params"]["custom_params"] == {
        "ttft_slo": 0.001, "tbt_slo": 0.0001}


def test_each_run_sends_what_it_says():
    sets = build_request_sets(rows(), num=20, rate=10.0, abuse_frac=0.5, seed=1)
    extra_idx = {s.idx for s in sets.extra}
    specs, extras = run_requests(sets, "baseline", ABUSE)
    assert specs == sorted(sets.others, key=lambda s: s.arrival) and extras == [None] * 20
    for run in ("abuse", "honest"):
        specs, extras = run_requests(sets, run, ABUSE)
        assert len(specs) == 30 and {s.idx for s in specs} == set(range(30))
        assert [s.arrival for s in specs] == sorted(s.arrival for s in specs)
        for spec, extra in zip(specs, extras, strict=True):
            mine = spec.idx in extra_idx and run == "abuse"
            assert extra == (ABUSE if mine else None)
    with pytest.raises(ValueError, match="run must be one of"):
        run_requests(sets, "other", ABUSE)


def record(idx: int, ttft: float | None, error: str | None = None,
           reason: dict | None = None) -> dict:
    times = [] if ttft is None else [ttft + 0.01 * k for k in range(4)]
    return {"idx": idx, "send": 0.0, "token_times": times, "error": error, "aborted": False,
            "meta": {} if reason is None else {"finish_reason": reason}}


def test_refusals_are_counted_plain_and_streamed():
    streamed = {"type": "abort", "message": "custom_params.ttft_slo 0.001 is tighter",
                "status_code": 400}
    assert refused_400(record(0, None, "HTTP 400: {...}"))
    assert refused_400(record(0, None, "server abort: x", streamed))
    assert not refused_400(record(0, None, "server abort: x", {"type": "abort"}))
    assert not refused_400(record(0, None, "HTTP 500: boom"))
    assert not refused_400(record(0, 0.1))


def test_a_run_is_summarized_for_everyone_else_apart_from_the_extra_client():
    streamed = {"type": "abort", "message": "refused", "status_code": 400}
    records = [record(0, 0.5), record(1, 2.0), record(2, 0.2), record(3, 0.9),
               record(10, None, "server abort: refused", streamed), record(11, 0.01)]
    s = summarize_run(records, {10, 11}, ttft_slo=1.0, tbt_slo=0.1)
    assert s["others"]["n"] == 4 and s["others"]["ttft_attainment"] == 0.75
    assert s["extra"]["n"] == 2 and s["extra"]["errors"] == 1
    assert s["extra_refused_400"] == 1 and s["others_refused_400"] == 0
    assert summarize_run(records[:4], set(), 1.0, 0.1)["extra"] is None


def run_summary(others_ttft: float, extra_ttft: float | None = None, extra_errors: int = 0,
                refused: int = 0) -> dict:
    extra = None if extra_ttft is None else {"ttft_attainment": extra_ttft,
                                              "errors": extra_errors}
    return {"others": {"ttft_attainment": others_ttft, "tbt_attainment": 0.99, "errors": 0},
            "extra": extra, "extra_refused_400": refused}


def test_mode_report_drops_and_goal():
    runs = {"baseline": run_summary(0.96), "abuse": run_summary(0.92, 0.5),
            "honest": run_summary(0.90, 0.6)}
    r = mode_report("clamp", runs)
    assert r["others_ttft_attainment"] == {"baseline": 0.96, "abuse": 0.92, "honest": 0.90}
    assert r["drop_points"] == pytest.approx(4.0)
    assert r["load_drop_points"] == pytest.approx(6.0)
    # the goal judges the abuse's own effect, beyond what the extra load alone costs
    assert r["abuse_beyond_load_points"] == pytest.approx(-2.0) and r["met"] is True
    assert (r["abuser_ttft_attainment"], r["abuser_errors"]) == (0.5, 0)
    assert not r["control"] and mode_report(CONTROL, runs)["control"]
    missed = mode_report("clamp", {**runs, "abuse": run_summary(0.84)})
    assert missed["abuse_beyond_load_points"] == pytest.approx(6.0) and missed["met"] is False
    # a large drop that the extra load explains is no abuse
    loaded = mode_report("clamp", {**runs, "abuse": run_summary(0.70), "honest": run_summary(0.72)})
    assert loaded["drop_points"] == pytest.approx(26.0) and loaded["met"] is True
    partial = mode_report("off", {"baseline": run_summary(1.0), "abuse": None, "honest": None})
    assert partial["met"] is None and partial["drop_points"] is None
    assert partial["abuser_refused_400"] is None


def test_report_and_table():
    def mode(baseline: float, abuse: float, refused: int = 0) -> dict:
        return {"runs": {"baseline": run_summary(baseline),
                         "abuse": run_summary(abuse, 0.0 if refused else 1.0, refused, refused),
                         "honest": run_summary(baseline - 0.01)}}

    result = {"modes": {"clamp": mode(0.95, 0.93), CONTROL: mode(0.95, 0.60),
                        "reject": mode(0.95, 0.95, refused=90),
                        "off": {"runs": dict.fromkeys(RUNS)}}}
    rep = report(result)
    assert rep["protected_met"] is True and rep["abuse_visible_in_control"] is True
    assert rep["control_beyond_load_points"] == pytest.approx(34.0)
    assert rep["modes"]["reject"]["abuser_refused_400"] == 90
    assert rep["modes"]["off"]["met"] is None  # not run: neither met nor missed
    text = table(rep)
    assert len(text.splitlines()) == 6
    assert "MISSED (control)" in text and "/ 90 / 90 |" in text
    result["modes"]["clamp"] = mode(0.95, 0.80)
    assert report(result)["protected_met"] is False
    assert report({"modes": {}}) == {"modes": {}, "protected_met": None,
                                     "control_beyond_load_points": None,
                                     "abuse_visible_in_control": None}


def test_defaults_run_the_default_mode_and_the_control_first(tmp_path):
    args = parse_args(["--out", str(tmp_path / "x.json")])
    assert args.modes[:2] == ["clamp", CONTROL] and set(args.modes) == {"clamp", CONTROL,
                                                                         "reject", "off"}
    assert args.runs == list(RUNS) and args.abuse_frac == 0.3 and args.abuse_ttft_slo == 0.3
    assert args.trace_name == "azure_conv"
    assert isinstance(RequestSets([], []), RequestSets)


def conv_csv(path: Path, n: int = 40) -> Path:
    lines = [f"2023-11-16 18:15:{i // 10:02d}.{i % 10}000000,{50 + 13 * i},{10 + 7 * i % 40}"
             for i in range(n)]
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(lines) + "\n")
    return path


def run_script(tmp_path: Path, port: int, csv: Path, out: Path, modes: list[str], *extra: str):
    cmd = [sys.executable, "-m", "eval.slo_abuse", "--trace", str(csv), "--rate", "40",
           "--num", "12", "--abuse-frac", "0.5", "--modes", *modes, "--tail", "10",
           "--budget", "300", "--launcher", f"{sys.executable} {FAKE}", "--out", str(out),
           "--raw-dir", str(tmp_path / "raw"),
           "--port", str(port),
           *extra]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def test_slo_abuse_runs_every_mode_against_stand_in_servers(tmp_path: Path, port_base: int) -> None:
    csv, out = conv_csv(tmp_path / "conv.csv"), tmp_path / "abuse.json"
    run = run_script(tmp_path, port_base, csv, out, ["clamp", "reject", CONTROL])
    assert "within 5 points in every protecting mode: True" in run.stdout
    run_script(tmp_path, port_base, csv, out, ["off"], "--merge")
    doc = json.loads(out.read_text())
    assert doc["skipped"] == [] and doc["command"].startswith("python -m eval.slo_abuse")
    assert (doc["num"], doc["num_extra"]) == (12, 6) and len(doc["merged_commands"]) == 1
    assert list(doc["modes"]) == ["clamp", "reject", CONTROL, "off"]
    for mode, entry in doc["modes"].items():
        assert entry["status"] == "ok" and entry["startup_s"] is not None
        assert "--rota-request-slo" in entry["flags"] and Path(entry["server_log"]).exists()
        for run_name in RUNS:
            s = entry["runs"][run_name]
            assert s["others"]["n"] == 12 and s["others"]["errors"] == 0
            assert s["others"]["ttft_attainment"] == 1.0
            assert (s["extra"] is None) == (run_name == "baseline")
        refused = entry["runs"]["abuse"]["extra_refused_400"]
        # Only reject refuses the abusive client; the honest extra requests always pass.
        assert refused == (6 if mode == "reject" else 0), mode
        assert entry["runs"]["honest"]["extra_refused_400"] == 0
        assert entry["runs"]["honest"]["extra"]["errors"] == 0
    rep = doc["report"]
    assert rep["protected_met"] is True
    assert rep["modes"]["reject"]["abuser_errors"] == 6
    assert rep["modes"]["clamp"]["abuser_errors"] == 0
    assert all(rep["modes"][m]["drop_points"] == 0.0 for m in doc["modes"])
    # A second invocation that replayed other requests cannot be merged in.
    bad = subprocess.run([sys.executable, "-m", "eval.slo_abuse", "--trace", str(csv),
                          "--rate", "30", "--num", "12", "--abuse-frac", "0.5", "--modes", "off",
                          "--merge", "--out", str(out), "--raw-dir", str(tmp_path / "raw")],
                         capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert bad.returncode != 0 and "--merge" in bad.stderr
