"""Run a whole SLO evaluation from a plan file: every (workload, system) pair of the plan, one GPU
queue each, one global time budget, then one merged result per workload.

A workload is a trace with its rates and KV cap (eval.sweep_slo's flags); each queue runs its
items one after another on its own GPU (CUDA_VISIBLE_DEVICES=i), so no two servers ever share
a GPU, and every item is one eval.sweep_slo invocation: one server, every rate of its workload.
Results of a queue accumulate in ``<workload>.part<i>.json`` (sweep_slo --merge); at the end the
parts of each workload are merged into ``slo_<gpu>_<workload>.json`` and a file ``DONE`` is
written. The plans under eval/plans/ are named for what they run. Stdlib only: runs on the GPU
machine.

    python -m eval.sweep_plan --plan eval/plans/h200_poisson_all_systems.json \\
        --out-dir /tmp/sweep --budget 1000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from eval.lib.gpus import visible_devices
from eval.lib.progress import Progress
from eval.merge_slo import merge

ROOT = Path(__file__).resolve().parents[1]
PORT_STRIDE = 500  # queue i's servers use ports from 30000 + i * PORT_STRIDE, 20 per item
log = Progress()


def load_plan(path: Path) -> dict[str, Any]:
    """The plan, checked: every queue item names a known workload and system."""
    from eval.sweep_slo import SYSTEMS  # here: planning and merging need no aiohttp or numpy

    plan = json.loads(path.read_text())
    for key in ("gpu", "workloads", "queues"):
        if key not in plan:
            raise SystemExit(f"{path}: missing key {key!r}")
    for queue in plan["queues"]:
        for item in queue:
            workload, _, system = item.partition(":")
            if workload not in plan["workloads"]:
                raise SystemExit(f"{path}: {item!r}: unknown workload {workload!r}")
            if system not in SYSTEMS:
                raise SystemExit(f"{path}: {item!r}: unknown system {system!r} "
                                 f"(one of {', '.join(SYSTEMS)})")
    return plan


def narrowed(plan: dict[str, Any], systems: list[str] | None, rates: list[float] | None
             ) -> dict[str, Any]:
    """The plan cut to the items of ``systems`` and to ``rates`` of each workload (a plan too
    long for one device call, or a re-run of some points)."""
    if systems:
        plan["queues"] = [[i for i in q if i.partition(":")[2] in systems]
                          for q in plan["queues"]]
    if rates:
        for name, wl in plan["workloads"].items():
            wl["rates"] = [r for r in wl["rates"] if r in rates]
            if not wl["rates"]:
                raise SystemExit(f"--rates: workload {name} has none of {rates}")
    return plan


def item_cmd(plan: dict[str, Any], item: str, queue: int, index: int, out_dir: Path,
             budget_s: float) -> list[str]:
    workload, _, system = item.partition(":")
    wl = plan["workloads"][workload]
    cmd = [sys.executable, "-m", "eval.sweep_slo", "--trace", wl["trace"],
           "--trace-name", workload, "--gpu", plan["gpu"], "--systems", system,
           "--rates", *[str(r) for r in wl["rates"]], "--cap", str(wl["cap"]),
           "--port", str(30000 + queue * PORT_STRIDE + 20 * index),
           "--out", str(out_dir / f"{workload}.part{queue}.json"),
           "--raw-dir", str(out_dir / "raw" / workload), "--merge",
           "--budget", f"{budget_s:.0f}", *plan.get("common", []), *wl.get("flags", [])]
    return cmd + ["--server-extra", *plan.get("server_extra", [])]


def run_queue(plan: dict[str, Any], queue: int, items: list[str], out_dir: Path,
              deadline: float) -> None:
    gpu = visible_devices((queue,), os.environ.get("CUDA_VISIBLE_DEVICES"))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu, PYTHONUNBUFFERED="1")
    for index, item in enumerate(items):
        left = deadline - time.monotonic()
        log(f"gpu{queue} {item}: start ({left:.0f}s of budget left)")
        cmd = item_cmd(plan, item, queue, index, out_dir, left)
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env, cwd=ROOT) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                log(f"gpu{queue} {item}: {line.rstrip()}")
        log(f"gpu{queue} {item}: exit {proc.returncode}")


def merge_workloads(plan: dict[str, Any], out_dir: Path) -> list[Path]:
    merged = []
    for workload in plan["workloads"]:
        parts = sorted(out_dir.glob(f"{workload}.part*.json"))
        if not parts:
            continue
        result = merge([json.loads(p.read_text()) for p in parts])
        result["plan"] = plan
        path = out_dir / f"slo_{plan['gpu']}_{workload}.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        merged.append(path)
        log(f"{workload}: {len(parts)} part(s), systems {sorted(result['systems'])} -> {path}")
    return merged


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plan", type=Path, required=True)
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--budget", type=float, required=True, help="wall seconds for everything")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--systems", nargs="+", default=None,
                    help="run only the items of these systems (a plan too long for one device "
                         "call runs in several with the same --out-dir: parts accumulate)")
    ap.add_argument("--rates", type=float, nargs="+", default=None,
                    help="run only these of each workload's rates (a re-run of some points)")
    args = ap.parse_args()
    plan = narrowed(load_plan(args.plan), args.systems, args.rates)
    t0 = time.monotonic()
    deadline = t0 + args.budget
    if args.dry_run:
        for q, items in enumerate(plan["queues"]):
            for i, item in enumerate(items):
                cmd = item_cmd(plan, item, q, i, args.out_dir, args.budget)
                print(f"# gpu{q} {item}\n" + " ".join(cmd))
        return
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "DONE").unlink(missing_ok=True)
    threads = [threading.Thread(target=run_queue, args=(plan, q, items, args.out_dir, deadline))
               for q, items in enumerate(plan["queues"])]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    merge_workloads(plan, args.out_dir)
    (args.out_dir / "DONE").write_text(f"{time.monotonic() - t0:.0f}\n")
    log("done")


if __name__ == "__main__":
    main()
