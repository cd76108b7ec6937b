"""eval.sweep_plan: plan checks, the per-item commands, and the merge of queue parts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval import sweep_plan

EVAL = Path(__file__).resolve().parents[1] / "eval"

PLAN = {
    "gpu": "h200",
    "common": ["--num", "10"],
    "server_extra": ["--cuda-graph-max-bs", "8"],
    "workloads": {"conv": {"trace": "c.csv", "rates": [1, 2], "cap": 600},
                  "code": {"trace": "k.csv", "rates": [3], "cap": 300}},
    "queues": [["conv:fcfs", "code:fcfs"], ["conv:rotasched"]],
}


def write_plan(tmp_path: Path, plan: dict) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    return path


def test_the_shipped_plan_is_valid():
    plan = sweep_plan.load_plan(EVAL / "plans" / "h200_poisson_all_systems.json")
    items = [i for q in plan["queues"] for i in q]
    assert len(items) == len(set(items)) == 10  # five systems on each of two traces, once


@pytest.mark.parametrize("item,error", [("nope:fcfs", "unknown workload"),
                                        ("conv:fifo", "unknown system")])
def test_bad_items_are_refused_with_the_reason(tmp_path, item, error):
    plan = dict(PLAN, queues=[[item]])
    with pytest.raises(SystemExit, match=error):
        sweep_plan.load_plan(write_plan(tmp_path, plan))


def test_item_command_carries_workload_and_distinct_ports(tmp_path):
    cmds = [sweep_plan.item_cmd(PLAN, item, q, i, tmp_path, 500.0)
            for q, items in enumerate(PLAN["queues"]) for i, item in enumerate(items)]
    ports = [c[c.index("--port") + 1] for c in cmds]
    assert len(set(ports)) == len(ports)
    code = cmds[1]
    assert code[code.index("--cap") + 1] == "300" and code[code.index("--systems") + 1] == "fcfs"
    assert code[code.index("--out") + 1].endswith("code.part0.json")
    assert code[-3:] == ["--server-extra", "--cuda-graph-max-bs", "8"]  # must come last


def test_parts_of_a_workload_merge_into_one_result(tmp_path):
    for q, system in enumerate(("fcfs", "rotasched")):
        part = {"rates": [1, 2], "num_requests": [10, 10], "command": f"q{q}", "skipped": [],
                "systems": {system: {"ttft_attainment": [1.0, 0.5]}}}
        (tmp_path / f"conv.part{q}.json").write_text(json.dumps(part))
    [path] = sweep_plan.merge_workloads(PLAN, tmp_path)
    merged = json.loads(path.read_text())
    assert path.name == "slo_h200_conv.json"
    assert set(merged["systems"]) == {"fcfs", "rotasched"} and merged["plan"] == PLAN


def _part(systems: dict, date: str, cap: int = 600) -> dict:
    cmds = [f"sweep_slo.py --systems {s} --rates 1 2" for s in systems]
    return {"rates": [1, 2], "num_requests": [10, 10], "cap_tokens": cap, "command": cmds[-1],
            "merged_commands": cmds, "date": date, "skipped": [{"system": "lpm", "rate": 2}],
            "systems": {s: {"ttft_attainment": v} for s, v in systems.items()}}


def test_picked_systems_keep_the_run_they_came_from():
    from eval.merge_slo import pick

    run1 = _part({"fcfs": [1.0, 0.4], "rotasched": [0.9, 0.3]}, "day1")
    run2 = _part({"rotasched": [1.0, 1.0], "lpm": [1.0, None]}, "day2")
    res = pick([("rotasched", run2, "bbb"), ("fcfs", run1, "aaa"), ("lpm", run2, "bbb")])
    assert list(res["systems"]) == ["rotasched", "fcfs", "lpm"]
    rot = res["systems"]["rotasched"]
    assert rot["ttft_attainment"] == [1.0, 1.0]  # run 2's, not run 1's
    assert (rot["commit"], rot["date"], rot["command"]) == (
        "bbb", "day2", "sweep_slo.py --systems rotasched --rates 1 2")
    assert res["systems"]["fcfs"]["commit"] == "aaa"
    assert res["skipped"] == [{"system": "lpm", "rate": 2}]  # only the picked system's skips
    with pytest.raises(SystemExit, match="not in that part"):
        pick([("hicache", run1, "aaa")])
    with pytest.raises(SystemExit, match="cap_tokens"):
        pick([("fcfs", run1, "aaa"), ("lpm", _part({"lpm": [1, 1]}, "day3", cap=900), "ccc")])


def test_a_plan_narrowed_to_some_systems_and_rates():
    plan = sweep_plan.narrowed(json.loads(json.dumps(PLAN)), ["rotasched"], [2, 3])
    assert plan["queues"] == [[], ["conv:rotasched"]]
    assert [wl["rates"] for wl in plan["workloads"].values()] == [[2], [3]]
    with pytest.raises(SystemExit, match="none of"):
        sweep_plan.narrowed(json.loads(json.dumps(PLAN)), None, [5])
