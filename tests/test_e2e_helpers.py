"""eval.e2e_rotation without a GPU: stats records and metrics parsing, output comparison, the
headline fields, server commands (checked by SGLang's own parser when it is installed), and the
whole script against CPU stand-in servers (tests/fake_sglang_server.py)."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest

from eval import e2e_rotation as e2e
from eval.e2e import outputs, probes, report, servers
from eval.e2e import rotator_stats as rs
from eval.lib import gpus
from eval.lib.server import failure_text
from eval.lib.traces import TraceRow
from superinfer.adapters.sglang.stats import KINDS, RotationStats, format_record
from superinfer.policy import HELD_BY

ROOT = Path(__file__).resolve().parents[1]
FAKE = ROOT / "tests" / "fake_sglang_server.py"
IDLE_KEYS = ("device_free", "device_total", "host_free", "host_total", "table", "rotations_out",
             "rotated_reqs", "multi_rotated_reqs", "max_per_req", "aborted_while_rotated")
D2H_BYTES = 655_000_000


def rotator_record_fields() -> dict[str, set[str]]:
    """The fields the rotator names in its own ``self._record(kind, ...)`` calls (a
    ``**self.stats.as_dict()`` among them stands for every RotationStats field)."""
    tree = ast.parse((ROOT / "src/superinfer/adapters/sglang/rotator.py").read_text())
    stats_fields = set(RotationStats().as_dict())
    found: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "_record"
                and node.args and isinstance(node.args[0], ast.Constant)):
            fields = found.setdefault(node.args[0].value, set())
            for k in node.keywords:
                if k.arg is not None:
                    fields.add(k.arg)
                elif ast.unparse(k.value) == "self.stats.as_dict()":
                    fields |= stats_fields
    return found


def record_line(prefix: str, kind: str, fields: dict) -> str:
    """A log line as SGLang's scheduler logger prints a record: the rank in the prefix's TPn tag
    (none at TP=1) is the rank the record carries."""
    tag, dp = re.search(r"\bTP(\d+)\b", prefix), re.search(r"\bDP(\d+)\b", prefix)
    return f"{prefix} " + format_record(kind, int(tag.group(1)) if tag else 0,
                                        int(dp.group(1)) if dp else 0, fields)


def idle_line(prefix: str = "[2026-11-29 12:00:00]", **kw: int) -> str:
    vals = dict(device_free=12000, device_total=12000, host_free=122064, host_total=122064, table=0,
                rotations_out=0, rotated_reqs=0, multi_rotated_reqs=0, max_per_req=0,
                aborted_while_rotated=0, check_error=None)
    vals.update(kw)
    return record_line(prefix, "idle", vals)


def stats_line(prefix: str = "[2026-11-29 12:00:00]", out: int = 5, in_: int = 4) -> str:
    return record_line(prefix, "stats", {
        "rotations_out": out, "rotations_in": in_, "fallbacks": 0, "aborted_while_rotated": 0,
        "plans_decode_first": 1, "plans_head_blocked": 3, "bytes_d2h": D2H_BYTES,
        "bytes_h2d": 520_000_000, "bytes_d2h_saved": 0, "host_copies_evicted": 0,
        "bytes_written_through": 0, "away": 1, "host_used": 1024, "kept": 0})


def start_line(prefix: str = "[t]", host_page: int = 16, mover: str = "StagingKVMover",
               path: str = "staging") -> str:
    return record_line(prefix, "start", {"policy": "slo", "host_kv_gb": 16.0,
                                         "host_tokens": 122064, "host_page": host_page,
                                         "mover": mover, "path": path})


def rec(idx: int, ids: list[int], n: int | None = None, error: str | None = None,
        aborted: bool = False, retractions: int = 0) -> dict:
    return {"idx": idx, "prompt_len": 10, "output_len": len(ids) if n is None else n,
            "output_ids": ids, "error": error, "aborted": aborted,
            "meta": {"num_retractions": retractions}}


# --- stats records --------------------------------------------------------------------------
def test_parser_reads_the_rotators_own_format():
    assert set(KINDS) == {"start", "stats", "idle", "binding"}  # every kind the plugin logs
    fields = rotator_record_fields()
    assert set(fields) == set(KINDS) - {"binding"}  # the BindingProbe's: tests/test_binding.py
    assert {*IDLE_KEYS, "check_error"} <= fields["idle"] and "host_page" in fields["start"]
    assert {"rotations_out", "rotations_in", "fallbacks"} <= set(RotationStats().as_dict())
    text = "\n".join([
        "[2026-11-29 12:00:00] Prefill batch, #new-seq: 3, #new-token: 900",
        start_line("[2026-11-29 12:00:00]"),
        stats_line(out=7, in_=6),
        idle_line("[2026-11-29 12:00:01.123 TP1]", device_free=11990, rotations_out=7,
                  rotated_reqs=4, multi_rotated_reqs=2, max_per_req=3, aborted_while_rotated=1),
        idle_line("[2026-11-29 12:00:02 DP0 TP0]", rotations_out=7)[:-30],  # cut mid-line
        "superinfer INFO rotasched idle check: device_free=1 device_total=1",  # old text: ignored
    ])
    lines = rs.rotation_records(text)
    assert [(x["kind"], x["tp_rank"]) for x in lines] == [("stats", 0), ("idle", 1)]
    assert lines[0]["rotations_out"] == 7 and lines[0]["rotations_in"] == 6
    assert lines[0]["bytes_d2h"] == D2H_BYTES
    idle = lines[1]
    assert (idle["device_free"], idle["rotated_reqs"], idle["max_per_req"]) == (11990, 4, 3)
    assert all(isinstance(idle[k], int) for k in IDLE_KEYS)


def test_rotator_start_line_gives_the_host_page():
    direct = start_line("[t TP0]", host_page=64, mover="DirectKVMover", path="direct")
    assert rs.rotator_host_page(f"[t] warming up\n{direct}\n") == 64
    old = "rotasched: policy=slo host tier 16.0 GB (122048 tokens, 64-token pages), mover x"
    assert rs.rotator_host_page(f"[t] {old}") == 16  # no start record: the staging path's page
    idle = {"device_total": 100, "device_free": 100, "host_total": 640, "host_free": 576,
            "table": 0}
    assert rs.leak_summary(idle, 64, host_page=64)["host_pages"] == 1
    assert rs.leak_summary(idle, 64)["host_pages"] == 4


def test_rotator_start_line_gives_the_ranks():
    text = f"{start_line('[t TP0]')}\n{start_line('[t TP1]')}\n[t] unrelated"
    assert rs.rotator_ranks(text) == [0, 1]
    assert rs.rotator_ranks(start_line("[2026-11-29 12:00:00]")) == [0]


def test_phase_rotations_subtract_cumulative_and_sum_busy_periods():
    before = rs.rotation_records(idle_line(rotations_out=10, rotated_reqs=3,
                                            aborted_while_rotated=2))
    during = rs.rotation_records("\n".join([
        stats_line(out=20, in_=18),
        idle_line(rotations_out=14, rotated_reqs=3, multi_rotated_reqs=1, max_per_req=2,
                  aborted_while_rotated=2),
        idle_line(device_free=11984, host_free=122048, table=1, rotations_out=25, rotated_reqs=6,
                  multi_rotated_reqs=2, max_per_req=4, aborted_while_rotated=5),
    ]))
    r = rs.phase_rotations(before, during, page_size=16)["0"]
    counts = [r[k] for k in ("rotations_out", "rotated_reqs", "multi_rotated_reqs", "max_per_req")]
    assert counts == [15, 9, 3, 4]
    assert r["aborted_while_rotated"] == 3 and r["idle_checks"] == 2 and r["cumulative_in"] == 18
    assert r["leaks"] == {"device_tokens": 16, "host_tokens": 16, "device_pages": 1,
                          "host_pages": 1, "table": 1, "clean": False}
    assert rs.phase_rotations([], [], 1) == {}


def test_dp_replicas_are_kept_apart_and_their_totals_add_up():
    """Under --dp-size 2 both replicas' schedulers are TP rank 0 ("[t DP1 TP0]" in SGLang's
    log): each is its own rank for pools and leaks, and the server's rotations are the sum."""
    text = "\n".join([start_line("[t DP0 TP0]"), start_line("[t DP1 TP0]")])
    assert rs.rotator_ranks(text) == ["0", "dp1.tp0"]
    during = rs.rotation_records("\n".join([
        idle_line("[t DP0 TP0]", rotations_out=4, rotated_reqs=3, max_per_req=2),
        idle_line("[t DP1 TP0]", rotations_out=6, rotated_reqs=5, max_per_req=1, table=1),
    ]))
    by_rank = rs.phase_rotations([], during, page_size=1)
    assert list(by_rank) == ["0", "dp1.tp0"]
    assert by_rank["0"]["leaks"]["clean"] and not by_rank["dp1.tp0"]["leaks"]["clean"]
    total = rs.first_rank(by_rank)
    assert (total["rotations_out"], total["rotated_reqs"], total["max_per_req"]) == (10, 8, 2)
    assert total["replicas"] == 2 and total["leaks"] is None
    assert rs.idle_leaks(by_rank)["dp1.tp0"]["table"] == 1
    # TP ranks of one replica make the same decisions: one of them counts
    tp = rs.phase_rotations([], rs.rotation_records("\n".join([
        idle_line("[t TP0]", rotations_out=4), idle_line("[t TP1]", rotations_out=4)])), 1)
    assert rs.first_rank(tp)["rotations_out"] == 4


def test_phase_without_idle_check_falls_back_on_stats_lines():
    # The burst ends and the soak starts before the server logs an idle check (seen on the
    # H200): the burst's rotations come from its stats lines, the soak's from its idle check
    # less the last counter logged before it.
    warmup = [idle_line("[2026-11-29 12:00:00]")]
    burst = rs.rotation_records("\n".join([stats_line("[2026-11-29 12:00:05]", out=8, in_=7),
                                            stats_line("[2026-11-29 12:00:10]", out=454, in_=441),
                                            "[2026-11-29 12:00:11] Cache flushed successfully!"]))
    r = rs.phase_rotations(rs.rotation_records(warmup[0]), burst, page_size=1)["0"]
    assert (r["source"], r["rotations_out"], r["cumulative_in"], r["idle_checks"]) == (
        "stats", 454, 441, 0)
    assert all(r[k] is None for k in ("rotated_reqs", "multi_rotated_reqs", "max_per_req",
                                      "aborted_while_rotated", "pools", "leaks"))
    assert rs.idle_leaks({"0": r}) is None
    soak = rs.rotation_records("\n".join([
        stats_line("[2026-11-29 12:00:15]", out=470, in_=460),
        idle_line("[2026-11-29 12:00:20]", rotations_out=511, rotated_reqs=140,
                  multi_rotated_reqs=112, max_per_req=12, aborted_while_rotated=23)]))
    s = rs.phase_rotations(rs.rotation_records(warmup[0]) + burst, soak, page_size=1)["0"]
    assert (s["source"], s["rotations_out"], s["carried_rotations"]) == ("idle", 57, 454)
    assert (s["rotated_reqs"], s["aborted_while_rotated"]) == (140, 23)
    assert rs.idle_leaks({"0": s}) == {"0": s["leaks"]} and s["leaks"]["clean"]
    # the headline counts stats-line rotations; per-request counts are unknown
    corr = correctness(3)
    corr["rotations"] = r
    corr["rotations_by_rank"] = {"0": r}
    head = report.overall(result_with(correctness={"rota_p1": corr},
                                   soak={"rota_p1": {"leaks": {"0": s["leaks"]},
                                                     "rotations_by_rank": {"0": s}}}))
    assert head["rotations"] == 454 and head["rotations_source"] == {"rota_p1": "stats"}
    assert head["rotated_requests"] is None and head["multi_rotated_requests"] is None
    assert head["soak_aborted_while_rotated"] == 23 and head["passed"]
    unsoaked = report.overall(result_with(correctness={"rota_p1": corr}))
    assert unsoaked["leaked_device_pages"] is None and not unsoaked["passed"]  # leaks unknown


def test_leak_summary_rounds_up_to_pages():
    idle = {"device_total": 12000, "device_free": 11995, "host_total": 160, "host_free": 143,
            "table": 0}
    assert rs.leak_summary(idle, 16) == {"device_tokens": 5, "host_tokens": 17, "device_pages": 1,
                                          "host_pages": 2, "table": 0, "clean": False}
    idle.update(device_free=12000, host_free=160)
    assert rs.leak_summary(idle, 1)["clean"]


def test_ranks_agree():
    same = [stats_line("[t TP0]"), stats_line("[t TP1]"), idle_line("[t TP0]", rotations_out=5),
            idle_line("[t TP0]", rotations_out=5), idle_line("[t TP1]", rotations_out=5)]
    r = rs.ranks_agree(rs.rotation_records("\n".join(same)))
    assert r["ranks"] == [0, 1] and r["identical"] and r["last_lines_equal"]
    assert r["lines"]["idle/TP0"] == 1  # the repeated line counts once
    differ = same + [idle_line("[t TP0]", rotations_out=6), idle_line("[t TP1]", rotations_out=7)]
    r = rs.ranks_agree(rs.rotation_records("\n".join(differ)))
    assert r["identical"] is False and r["last_lines_equal"] is False
    d = r["first_difference"]
    assert (d["kind"], d["index"]) == ("idle", 1)
    assert (d["TP0"]["rotations_out"], d["TP1"]["rotations_out"]) == (6, 7)
    assert rs.ranks_agree(rs.rotation_records(stats_line()))["identical"] is None


# --- outputs --------------------------------------------------------------------------------
def test_compare_outputs():
    ref = [rec(0, [1, 2, 3]), rec(1, [4, 5, 6]), rec(2, [7, 8, 9]), rec(3, [1, 1], error="cut"),
           rec(4, [5, 5, 5], retractions=1)]
    got = [rec(0, [1, 2, 3]), rec(1, [4, 9, 6]), rec(2, [7, 8], n=3), rec(3, [1, 1]),
           rec(4, [5, 5, 6]), rec(5, [1]), rec(6, [2, 2], aborted=True)]
    c = outputs.compare_outputs(ref, got)
    assert (c["n"], c["n_compared"], c["n_equal"], c["n_mismatched"]) == (7, 3, 1, 2)
    assert c["mismatched_with_retraction"] == 1
    assert c["first_mismatch"] == {"idx": 1, "prompt_len": 10, "output_len": 3, "position": 1,
                                   "ref_ids": [5, 6], "got_ids": [9, 6], "retractions": [0, 0]}
    assert outputs.compare_outputs(ref, ref[:3])["n_equal"] == 3


def test_record_counts_and_compact():
    recs = [rec(0, [1, 2]), rec(1, [1], n=2, error="cancelled: replay time limit"),
            rec(2, [3], n=2, aborted=True), rec(3, [], n=2, error="HTTP 400: bad"),
            rec(4, [1, 2], retractions=2)]
    c = outputs.record_counts(recs)
    keys = ("n", "complete", "client_aborted", "errors", "retracted", "tokens")
    assert [c[k] for k in keys] == [5, 2, 1, 2, 1, 6]
    assert c["error_kinds"] == {"cancelled": 1, "HTTP 400": 1}
    small = outputs.compact(recs[0], keep_ids=False)
    assert "output_ids" not in small and small["n_tokens"] == 2
    assert outputs.compact(recs[0], keep_ids=True)["output_ids"] == [1, 2]


# --- HTTP answers and metrics ---------------------------------------------------------------
def test_parse_generate_body():
    meta = {"completion_tokens": 3, "finish_reason": {"type": "length"}}
    plain = json.dumps({"output_ids": [1, 2, 3], "meta_info": meta})
    assert probes.parse_generate_body(plain, stream=False) == {
        "n_ids": 3, "finish_reason": {"type": "length"}, "error": None}
    refused = json.dumps({"error": {"message": "custom_params.ttft_slo must be positive"}})
    assert "ttft_slo" in probes.parse_generate_body(refused, stream=False)["error"]
    abort = {"type": "abort", "message": "bad slo", "status_code": 400}
    sse = ("data: " + json.dumps({"output_ids": [], "meta_info": {"finish_reason": abort,
                                                                  "completion_tokens": 0}})
           + "\n\ndata: [DONE]\n\n")
    assert probes.parse_generate_body(sse, stream=True) == {"n_ids": 0, "finish_reason": abort,
                                                         "error": None}
    # a stream refused as plain JSON
    assert probes.parse_generate_body(refused, stream=True)["error"]
    assert probes.parse_generate_body("Internal Server Error", stream=False)["n_ids"] == 0


PROM = """# HELP superinfer:rotations_out_total Requests rotated out to the host tier.
# TYPE superinfer:rotations_out_total counter
superinfer:rotations_out_total{tp_rank="0"} 42.0
superinfer:rotations_out_total{tp_rank="1"} 42.0
superinfer:rotations_in_total{tp_rank="0"} 40.0
superinfer:rotations_in_total{tp_rank="1"} 40.0
superinfer:bytes_d2h_total{tp_rank="0"} 5.5e+09
superinfer:bytes_d2h_total{tp_rank="1"} 5.5e+09
superinfer:bytes_h2d_total{tp_rank="0"} 5.2e+09
superinfer:bytes_h2d_total{tp_rank="1"} 5.2e+09
superinfer:host_tier_tokens_used{tp_rank="0"} 0.0
superinfer:host_tier_tokens_used{tp_rank="1"} 0.0
superinfer:requests_rotated_out{tp_rank="0"} 0.0
superinfer:requests_rotated_out{tp_rank="1"} 0.0
sglang:num_running_reqs{model_name="m",engine_type="unified"} 0.0
"""


def test_prometheus_parse_and_check():
    series = probes.parse_prometheus(PROM)
    assert series["superinfer:rotations_out_total"] == [({"tp_rank": "0"}, 42.0),
                                                        ({"tp_rank": "1"}, 42.0)]
    assert series["sglang:num_running_reqs"][0][0] == {"model_name": "m", "engine_type": "unified"}
    m = probes.check_metrics(series)
    assert m["ok"] and m["missing"] == [] and m["tp_ranks"] == ["0", "1"]
    assert m["sglang_series"] == 1
    assert m["values"]["superinfer:bytes_d2h_total"] == {"0": 5.5e9, "1": 5.5e9}
    no_rot = probes.parse_prometheus(PROM.replace("} 42.0", "} 0.0"))
    assert not probes.check_metrics(no_rot)["ok"]
    rank1 = probes.parse_prometheus("\n".join(line for line in PROM.splitlines()
                                              if 'rank="0"' not in line))
    assert not probes.check_metrics(rank1)["ok"]
    missing = probes.parse_prometheus("\n".join(line for line in PROM.splitlines()
                                                if "host_tier" not in line))
    m = probes.check_metrics(missing)
    assert not m["ok"] and m["missing"] == ["superinfer:host_tier_tokens_used"]


def test_prometheus_check_keeps_dp_replicas_apart():
    """Under --dp-size each replica's TP rank 0 publishes its own series, told apart by dp_rank
    (RotationMetrics labels both)."""
    two = PROM.replace('tp_rank="0"', 'tp_rank="0",dp_rank="0"').replace(
        'tp_rank="1"', 'tp_rank="0",dp_rank="1"')
    m = probes.check_metrics(probes.parse_prometheus(two))
    assert m["ok"] and m["tp_ranks"] == ["0", "dp1.tp0"]
    assert m["values"]["superinfer:rotations_out_total"] == {"0": 42.0, "dp1.tp0": 42.0}


# --- plans and commands ---------------------------------------------------------------------
def args_for(*extra: str):
    return e2e.parse_args(["--trace", "t.csv", *extra])


def test_plans_default_tp2_and_gpu_placement():
    plans, skipped = servers.plan_servers(args_for(), 2, 50000)
    assert [p.name for p in plans] == list(servers.SINGLE) and skipped == []
    assert all(p.gpus == (0,) for p in plans)
    plans, skipped = servers.plan_servers(args_for("--tp2"), 2, 50000)
    by = {p.name: p for p in plans}
    assert by["baseline"].gpus == (1,) and by["rota_tp2"].n_gpus == 2
    assert by["rota_tp2"].reference == "baseline_tp2" and by["rota_p16"].reference == "baseline"
    plans, skipped = servers.plan_servers(args_for("--tp2"), 1, 50000)
    assert [p.name for p in plans] == list(servers.SINGLE) and plans[0].gpus == (0,)
    assert [s["server"] for s in skipped] == list(servers.TP2)
    # --dp-size 2: one replica per GPU, compared with an fcfs server of the same shape
    dp = args_for("--servers", "baseline", "rota_p1", *servers.DP2)
    by = {p.name: p for p in servers.plan_servers(dp, 2, 50000)[0]}
    assert by["rota_dp2"].flags[:2] == ("--dp-size", "2") and by["rota_dp2"].gpus == (0, 1)
    assert by["rota_dp2"].reference == "baseline_dp2" and by["baseline"].gpus == (1,)
    plans, skipped = servers.plan_servers(dp, 1, 50000)
    assert [s["server"] for s in skipped] == list(servers.DP2)
    # ... or both replicas on one GPU, started through the launcher that allows it
    shared, skipped = servers.plan_servers(args_for("--servers", *servers.DP2_SHARED), 1, 50000)
    assert skipped == [] and all(p.gpus == (0,) for p in shared)
    rota = shared[1]
    assert rota.reference == "baseline_dp2_1gpu" and rota.rotasched
    cmd = servers.server_cmd(args_for(), rota, 31000, True)
    assert cmd[1:3] == ["-m", servers.SHARED_GPU_SERVER]
    assert " --dp-size 2 --gpu-id-step 0 " in " ".join(cmd)
    assert "--nccl-port" not in cmd  # each replica takes a free one (a given one: all bind it)
    plain = servers.server_cmd(args_for(), plans[0], 31000, True)
    assert plain[1:3] == ["-m", "sglang.launch_server"]
    args = args_for("--servers", "baseline", "rota_p16", "--baseline-gpu", "1")
    plans, _ = servers.plan_servers(args, 1, 9)
    assert [p.name for p in plans] == ["baseline", "rota_p16"] and plans[0].gpus == (1,)
    plans, _ = servers.plan_servers(args_for("--servers", "baseline", "rota_p64"), 1, 9)
    p64 = plans[1]
    assert p64.page_size == 64 and p64.reference == "baseline"
    assert p64.flags[p64.flags.index("--page-size") + 1] == "64"
    keep = servers.plan_servers(args_for("--servers", "baseline", "rota_p16_keep"), 1, 9)[0][1]
    assert "--rota-keep-host-copy" in keep.flags and keep.reference == "baseline"
    wt = servers.plan_servers(args_for("--servers", "baseline", "rota_p16_wt"), 1, 9)[0][1]
    assert "--rota-write-through" in wt.flags and wt.page_size == 16


def test_server_commands():
    args = args_for("--tp2", "--cap", "9000", "--rota-extra", "--rota-tbt-slo 0.2",
                    "--server-extra", "--log-level info")
    plans, _ = servers.plan_servers(args, 2, 77777)
    cmds = {p.name: servers.server_cmd(args, p, 31000 + 10 * i, True) for i, p in enumerate(plans)}
    joined = {n: " ".join(c) for n, c in cmds.items()}
    for cmd in joined.values():
        assert "--load-format dummy --skip-tokenizer-init --attention-backend triton" in cmd
        assert "--disable-prefill-cuda-graph" in cmd and "--disable-overlap" not in cmd
        assert "--enable-deterministic-inference" in cmd and cmd.endswith("--log-level info")
    assert ("--schedule-policy rotasched --page-size 1 --max-total-tokens 9000 --enable-metrics"
            in joined["rota_p1"])
    assert "--scheduler-policy rotasched --page-size 16" in joined["rota_p16"]
    assert "--disable-radix-cache" in joined["rota_p1_noradix"]
    assert "--rota-tbt-slo 0.2" in joined["rota_p1"]
    assert "--schedule-policy fcfs --page-size 1 --max-total-tokens 77777" in joined["baseline"]
    assert "--tp-size 2" in joined["rota_tp2"] and "--rota" not in joined["baseline"]
    ports = [c[c.index("--port") + 1] for c in cmds.values()] + [c[c.index("--nccl-port") + 1]
                                                                for c in cmds.values()]
    assert all("--dp-size" not in c for c in cmds.values())  # all of these name their port
    assert len(set(ports)) == len(ports)
    plan = plans[0]
    assert "--enable-deterministic-inference" not in servers.server_cmd(args, plan, 1, False)


def test_sglang_parser_accepts_every_command():
    pytest.importorskip("sglang")
    import argparse

    from sglang.srt import server_args as sa

    from superinfer.adapters.sglang.cli import extend_server_args

    extend_server_args(sa)
    args = args_for("--servers", *servers.SINGLE, *servers.TP2, *servers.DP2, "--rota-extra",
                    "--rota-policy lvf")
    plans, _ = servers.plan_servers(args, 2, 80000)
    for i, p in enumerate(plans):
        parser = argparse.ArgumentParser()
        sa.ServerArgs.add_cli_args(parser)
        ns = parser.parse_args(servers.server_cmd(args, p, 31000 + 10 * i, True)[3:])
        assert ns.enable_deterministic_inference and ns.load_format == "dummy"
        assert ns.tp_size * ns.dp_size == p.n_gpus and ns.page_size == p.page_size
        assert ns.schedule_policy == ("rotasched" if p.rotasched else "fcfs")
        assert ns.max_total_tokens == (args.cap if p.rotasched else 80000)
        assert ns.enable_metrics == p.rotasched and ns.incremental_streaming_output
        if p.rotasched:
            assert ns.rota_host_kv_gb == 16.0 and ns.rota_policy == "lvf"


def test_visible_devices_and_env():
    assert gpus.visible_devices((0, 1), None) == "0,1"
    assert gpus.visible_devices((1,), "4,5") == "5"
    assert gpus.visible_count(8, "2,3") == 2 and gpus.visible_count(2, None) == 2
    plans, _ = servers.plan_servers(args_for("--tp2"), 2, 1)
    env = servers.server_env(next(p for p in plans if p.name == "rota_tp2"))
    assert env["SGLANG_ENABLE_TP_MEMORY_INBALANCE_CHECK"] == "0"
    assert "PROMETHEUS_MULTIPROC_DIR" not in env


def test_failure_text_blames_determinism_only_in_the_error():
    warned = ("[t] Sampling backend is set to pytorch for deterministic inference.\n"
              "Traceback (most recent call last):\n  File \"model_runner.py\"\n"
              "torch.OutOfMemoryError: CUDA out of memory\n")
    assert not servers.blames_determinism(warned)
    failed = warned + ("Traceback (most recent call last):\n  File \".../batch_invariant_ops.py\"\n"
                       "ImportError: deep_gemm\n")
    assert servers.blames_determinism(failed)
    assert failure_text("a\nValueError: x\nb") == "ValueError: x"


def test_request_sets():
    rows = [TraceRow(0.1 * i, 100 + 37 * i, 5 + 13 * i) for i in range(100)]
    args = args_for("--num", "30", "--max-prompt", "1500", "--soak-rate", "40")
    burst = outputs.burst_specs(rows, args)
    assert len(burst) == 30 and all(s.arrival == 0.0 for s in burst)
    assert all(s.prompt_len <= 1500 and 32 <= s.output_len <= 256 for s in burst)
    assert {s.output_len for s in burst} >= {32, 256}
    assert outputs.baseline_tokens(burst) == sum(s.prompt_len + s.output_len for s in burst) + 4096
    soak = outputs.soak_specs(rows, 50, args)
    assert [s.idx for s in soak] == list(range(30, 80))
    assert soak[0].arrival == 0.0 and all(a.arrival <= b.arrival for a, b in pairwise(soak))
    assert all(32 <= s.output_len <= 256 for s in soak)
    # --burst-rate: the same requests, spread as Poisson arrivals at that rate
    spread = outputs.burst_specs(rows, args_for("--num", "30", "--max-prompt", "1500",
                                                "--burst-rate", "20"))
    assert [(s.idx, s.prompt_len, s.output_len) for s in spread] == [
        (s.idx, s.prompt_len, s.output_len) for s in burst]
    assert spread[0].arrival == 0.0 and all(a.arrival <= b.arrival for a, b in pairwise(spread))
    assert 0.5 < spread[-1].arrival < 3.0  # 29 gaps of 1/20 s on average


# --- headline fields ------------------------------------------------------------------------
def correctness(n_equal: int, rotations: int = 10, idle: bool = True,
                device_free: int = 100) -> dict:
    leaks = rs.leak_summary({"device_total": 100, "device_free": device_free, "host_total": 64,
                              "host_free": 64, "table": 0}, 1)
    return {"n": 3, "complete": 3, "idle_reached": idle, "reference": "baseline",
            "compare": {"n": 3, "n_compared": 3, "n_equal": n_equal},
            "rotations": {"rotations_out": rotations, "rotated_reqs": 2, "multi_rotated_reqs": 1},
            "rotations_by_rank": {"0": {"leaks": leaks}}}


def result_with(**parts) -> dict:
    base = {"correctness": {"baseline": {"n": 3, "complete": 3, "idle_reached": True,
                                         "control_reversed": {"n_compared": 3, "n_equal": 3}},
                            "rota_p1": correctness(3)},
            "soak": {}, "checks": {"rota_p1": {"passed": True, "bad_slo": {"status": 400}}},
            "metrics": {"rota_p1": {"ok": True}}, "tp2": None}
    base.update(parts)
    return base


def test_overall_passes_and_fails_for_the_right_reasons():
    head = report.overall(result_with())
    assert head["passed"] and head["rotations"] == 10 and head["outputs_equal"]
    assert head["leaked_device_pages"] == 0 and head["leak_source"] == {"rota_p1": "correctness"}
    assert head["control_outputs_equal"] and head["bad_slo_status"] == {"rota_p1": 400}
    assert head["outputs_compared"] == {"rota_p1": "3/3 of 3"}
    corr = {"rota_p1": correctness(2)}
    assert not report.overall(result_with(correctness=corr))["outputs_equal"]
    no_rotation = {"rota_p1": correctness(3, rotations=0)}
    assert not report.overall(result_with(correctness=no_rotation))["passed"]
    leak = report.overall(result_with(correctness={"rota_p1": correctness(3, device_free=97)}))
    assert leak["leaked_device_tokens"] == 3 and not leak["passed"]
    unknown = report.overall(result_with(correctness={"rota_p1": correctness(3, idle=False)}))
    assert unknown["leaked_device_pages"] is None and not unknown["passed"]
    held = correctness(3, device_free=96)["rotations_by_rank"]["0"]["leaks"]
    soaked = {"rota_p1": {"leaks": {"0": held}}}
    head = report.overall(result_with(soak=soaked))
    assert head["leaked_device_tokens"] == 4 and head["leak_source"] == {"rota_p1": "soak"}
    tp2 = dict(result_with()["correctness"], rota_tp2=correctness(3))
    assert report.overall(result_with(correctness=tp2, tp2={"identical": True}))["tp2_ran"]
    assert not report.overall(result_with(correctness=tp2, tp2={"identical": False}))["passed"]
    refused_not = {"rota_p1": {"passed": False, "bad_slo": {"status": 200}}}
    assert not report.overall(result_with(checks=refused_not))["passed"]


# --- the whole script against stand-in servers ----------------------------------------------
def run_script(tmp_path: Path, port: int, *extra: str, env: dict[str, str] | None = None
               ) -> tuple[int, dict]:
    csv = tmp_path / "conv.csv"
    rows = [f"2023-11-16 18:15:{i // 10:02d}.{i % 10}000000,{50 + 13 * i},{10 + 7 * i % 90}"
            for i in range(120)]
    csv.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n")
    out = tmp_path / "e2e.json"
    cmd = [sys.executable, "-m", "eval.e2e_rotation",
           "--launcher", f"{sys.executable} {FAKE}", "--trace", str(csv), "--num", "16",
           "--max-output", "48", "--soak-num", "40", "--soak-rate", "40", "--soak-seconds", "1",
           "--soak-tail", "1", "--budget", "400",
           "--port", str(port), "--out", str(out),
           "--out-dir", str(tmp_path / "raw"), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, **(env or {})}, check=False)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.returncode, json.loads(out.read_text())


def test_script_end_to_end_on_stand_in_servers(tmp_path, port_base):
    rc, r = run_script(tmp_path, port_base, "--tp2", "--gpus", "2")
    assert rc == 0 and r["passed"], json.dumps(r)[:3000]
    assert r["outputs_equal"] and r["rotations"] > 0
    assert r["tp2_ran"] and r["tp2_identical_decisions"]
    assert r["leaked_device_pages"] == r["leaked_host_pages"] == 0
    assert set(r["bad_slo_status"].values()) == {400} and r["metrics_ok"]
    assert r["servers"]["rota_tp2"]["rotator_ranks"] == [0, 1]
    assert set(r["soak"]) == {"rota_p1", "rota_p16", "rota_p1_noradix", "rota_tp2"}
    assert r["correctness"]["baseline"]["control_reversed"]["n_equal"] == 16
    assert (tmp_path / "raw" / "server_rota_tp2.log").exists()
    assert (tmp_path / "raw" / "e2e.json").exists() and r["command"] and r["date"]


def test_script_checks_a_dp2_server_against_its_own_baseline(tmp_path, port_base):
    """--dp-size 2 (issue 16): outputs against an fcfs server of the same shape, each replica's
    pools checked on its own after the abort soak."""
    rc, r = run_script(tmp_path, port_base, "--gpus", "2", "--servers", "baseline", "rota_p1",
                       *servers.DP2, "--no-control")
    assert rc == 0 and r["passed"], json.dumps(r)[:3000]
    assert r["correctness"]["rota_dp2"]["reference"] == "baseline_dp2"
    assert r["correctness"]["rota_dp2"]["compare"]["n_equal"] == 16
    assert r["servers"]["rota_dp2"]["rotator_ranks"] == ["0", "dp1.tp0"]
    soak = r["soak"]["rota_dp2"]
    assert set(soak["rotations_by_rank"]) == {"0", "dp1.tp0"}
    assert all(v["clean"] for v in soak["leaks"].values())


def test_script_retries_without_determinism_and_reports_leaks(tmp_path, port_base):
    rc, r = run_script(tmp_path, port_base, "--gpus", "1", "--servers", "baseline", "rota_p16",
                       "--no-control",
                       env={"FAKE_SGLANG_FAIL_DETERMINISTIC": "1", "FAKE_SGLANG_LEAK": "3"})
    assert rc == 1 and not r["passed"] and r["outputs_equal"]
    srv = r["servers"]["rota_p16"]
    assert srv["state"] == "up" and not srv["deterministic"]
    assert srv["attempts"][0]["deterministic"] and "batch_invariant" in srv["attempts"][0]["error"]
    assert r["leaked_device_tokens"] == 3 and r["leaked_device_pages"] == 1  # page size 16
    assert "control_reversed" not in r["correctness"]["baseline"]


# --- re-analysis of a finished run ------------------------------------------------------------
def write_run_dir(d: Path) -> None:
    """A finished run's --out-dir, by hand: baseline + rota_p1, a burst whose end logged no idle
    check, a soak, progress.log across midnight (server logs carry the date, it does not)."""
    d.mkdir()
    ids = {i: [100 + i, 200 + i, 300 + i] for i in range(3)}
    burst = [dict(outputs.compact(rec(i, ids[i]), keep_ids=True)) for i in range(3)]
    for name in ("baseline", "rota_p1"):
        (d / f"correctness_{name}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in burst))
    soak = [rec(10, [1, 2]), rec(11, [1], n=2, error="cancelled: replay time limit"),
            rec(12, [1], n=2, aborted=True)]
    (d / "soak_rota_p1.jsonl").write_text(
        "".join(json.dumps(outputs.compact(r, keep_ids=False)) + "\n" for r in soak))
    (d / "progress.log").write_text("\n".join([
        "[23:59:50 +   0s] 2 servers on 1 GPU(s) (H200), budget 400s, logs in /gone",
        "[23:59:58 +   8s] correctness: 3 requests at once to baseline, rota_p1 (limit 100s)",
        "[00:00:10 +  20s] correctness: baseline: 3/3 complete, 0 errors",
        "[00:00:10 +  20s] correctness: rota_p1: 3/3 complete, 0 errors, equal 3/3",
        "[00:00:10 +  20s] soak: 3 requests at 40 req/s to rota_p1, 10% aborted mid-stream",
        "[00:00:20 +  30s] soak: rota_p1: 1/3 complete, 1 aborted by the client",
        "[00:00:21 +  31s] checks: rota_p1: normal 200/200, bad SLO -> HTTP 400",
    ]) + "\n")
    start = start_line("[2026-11-29 23:59:40]")
    (d / "server_rota_p1.log").write_text("\n".join([
        start,
        idle_line("[2026-11-29 23:59:40]"),  # warm-up
        stats_line("[2026-11-29 23:59:57]", out=1, in_=0),  # before the burst: subtracted
        stats_line("[2026-11-30 00:00:04]", out=7, in_=6),
        "Traceback (most recent call last):",  # unstamped: goes with the line before
        stats_line("[2026-11-30 00:00:09]", out=9, in_=9),
        "[2026-11-30 00:00:09] Cache flushed successfully!",
        stats_line("[2026-11-30 00:00:15]", out=12, in_=11),
        stats_line("[2026-11-30 00:00:19]", out=13, in_=12),
        idle_line("[2026-11-30 00:00:19]", rotations_out=13, rotated_reqs=5,
                  multi_rotated_reqs=2, max_per_req=3, aborted_while_rotated=1),
    ]) + "\n")
    (d / "server_baseline.log").write_text("[2026-11-29 23:59:41] The server is fired up\n")
    servers = {n: {"state": "up", "gpus": [0], "port": 31000 + 10 * i, "deterministic": True,
                   "log": f"/gone/server_{n}.log", "attempts": []}
               for i, n in enumerate(("baseline", "rota_p1"))}
    orig = {
        "command": "python -m eval.e2e_rotation --gpus 1 --servers baseline rota_p1 --num 3 "
                   "--out-dir /gone --out /gone/e2e_h200.json",
        "date": "2026-11-29T23:59:50+00:00", "gpu": ["NVIDIA H200, 143771 MiB"],
        "settings": {"baseline_tokens": 5000}, "notes": ["n"], "servers": servers,
        "correctness": {
            "baseline": {"n": 3, "complete": 3, "idle_reached": True,
                         "control_reversed": {"n": 3, "n_compared": 3, "n_equal": 3}},
            "rota_p1": {"n": 3, "complete": 3, "idle_reached": True, "rotations_by_rank": {},
                        "rotations": None, "reference": "baseline",
                        "compare": {"n": 3, "n_compared": 3, "n_equal": 3}}},
        "soak": {"rota_p1": {"idle_reached": True, "leaks": None, "rotations_by_rank": {}}},
        "checks": {"rota_p1": {"passed": True, "bad_slo": {"status": 400}}},
        "metrics": {"rota_p1": {"ok": True}}, "tp2": None, "skipped": [], "wall_s": 31.0,
        "rotations": 0, "passed": False,
    }
    (d / "e2e_h200.json").write_text(json.dumps(orig))


def test_reanalyze_rebuilds_the_result_from_a_run_dir(tmp_path):
    run_dir, out = tmp_path / "e2e", tmp_path / "re.json"
    write_run_dir(run_dir)
    assert e2e.main(["--reanalyze", str(run_dir), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    orig = json.loads((run_dir / "e2e_h200.json").read_text())
    assert {k: r[k] for k in ("command", "date", "gpu", "wall_s")} == {
        k: orig[k] for k in ("command", "date", "gpu", "wall_s")}
    assert r["reanalyzed"]["command"].endswith(f"--reanalyze {run_dir} --out {out}")
    assert r["reanalyzed"]["windows"]["correctness"]["rota_p1"] == [
        "2026-11-29 23:59:58", "2026-11-30 00:00:10"]
    corr = r["correctness"]["rota_p1"]
    assert corr["rotations"]["source"] == "stats" and corr["rotations"]["rotations_out"] == 8
    assert corr["compare"]["n_equal"] == corr["compare"]["n_compared"] == 3
    assert r["correctness"]["baseline"]["control_reversed"]["n_equal"] == 3  # kept
    soak = r["soak"]["rota_p1"]
    assert (soak["n"], soak["complete"], soak["client_aborted"], soak["errors"]) == (3, 1, 1, 1)
    rot = soak["rotations_by_rank"]["0"]
    assert (rot["source"], rot["rotations_out"], rot["carried_rotations"]) == ("idle", 4, 9)
    assert (r["rotations"], r["rotated_requests"], r["outputs_equal"]) == (8, None, True)
    assert r["leaked_device_pages"] == r["leaked_host_pages"] == 0 and r["passed"]
    assert r["soak_aborted_while_rotated"] == 1 and r["control_outputs_equal"]
    # a leak in the soak's idle check, and a mismatched output, fail it
    log = run_dir / "server_rota_p1.log"
    text = log.read_text()
    held = '"host_free":122064'
    i = text.rindex(held)  # the soak's idle record: 64 tokens still held
    log.write_text(text[:i] + '"host_free":122000' + text[i + len(held):])
    recs = [json.loads(x) for x in (run_dir / "correctness_rota_p1.jsonl").read_text()
            .splitlines()]
    recs[1]["output_ids"][2] += 1
    (run_dir / "correctness_rota_p1.jsonl").write_text("".join(json.dumps(x) + "\n"
                                                               for x in recs))
    assert e2e.main(["--reanalyze", str(run_dir), "--out", str(out)]) == 1
    r = json.loads(out.read_text())
    assert r["leaked_host_pages"] == 4 and r["leaked_host_tokens"] == 64
    assert not r["outputs_equal"] and r["outputs_compared"] == {"rota_p1": "2/3 of 3"}


def test_blocked_heads_are_counted_by_why_no_rotation_made_room():
    stats = RotationStats()
    for why in ("away_bound", None, "away_bound", "compute"):
        stats.count_blocked(why)
    counts = {k: v for k, v in stats.as_dict().items() if k.startswith("plans_blocked_")}
    assert set(counts) == {f"plans_blocked_{why}" for why in HELD_BY}
    assert counts["plans_blocked_away_bound"] == 2 and counts["plans_blocked_compute"] == 1
    assert sum(counts.values()) == 3
