"""Rotasched at several host-link speeds, in the simulator, over setting_sweep's fixed points.

The host tier sits behind PCIe on an H100 or H200 (~50 GB/s each way) and behind NVLink-C2C
on a GH200 (~450 GB/s), the paper's superchip. A faster link shortens every copy; whether it
buys SLO attainment depends on what limits rotation at a point (the copies, or the slack the
resident streams earn the streams on the host). Each point is replayed with fcfs (which moves
no KV, so one replay per draw serves every speed) and with rotasched at each ``--gbps``.

    python -m eval.diagnostics.link_sweep --gbps 50 100 450 --jobs 2 \\
        --out eval/results/diag_link_speed_sim.json
"""

from __future__ import annotations

import argparse
import statistics
from multiprocessing import Pool
from pathlib import Path
from typing import Any

from eval.diagnostics.setting_sweep import (
    HORIZON_S,
    HOST_GB,
    METRICS,
    POINTS,
    Point,
    add_replay_args,
    compare,
)
from eval.lib.gpu_model import resolve_gpu_model
from eval.lib.jsonfiles import command_line, write_json
from eval.lib.progress import Progress
from eval.lib.traces import make_specs
from eval.sim_matrix import _rows
from eval.sim_policy import simulate


def replay(task: tuple[Point, str, str, float, int]) -> dict[str, float]:
    """One arrival draw of one point under ``system`` with a ``gbps`` link each way."""
    point, models_dir, system, gbps, seed = task
    gpu = resolve_gpu_model(point.model, point.gpu, models_dir=Path(models_dir),
                            mover="staging", link_bytes_per_s=gbps * 1e9)
    specs = make_specs(_rows(point.trace), num=point.num, arrival=point.arrival,
                       rate=point.rate, cv=point.cv, seed=seed)
    out = simulate(specs, system, point.cap, gpu, point.ttft_slo, point.tbt_slo,
                   int(HOST_GB * 1e9) // gpu.bytes_per_token, HORIZON_S)
    return {k: out["summary"][k] for k in METRICS}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gbps", nargs="+", type=float, default=[50.0, 100.0, 450.0],
                    help="host link speeds, GB/s each way")
    ap.add_argument("--seeds", type=int, default=2, help="arrival draws per point")
    add_replay_args(ap)
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1 or min(args.gbps) <= 0:
        ap.error("--seeds, --jobs and --gbps must be positive")
    log = Progress()
    results: list[dict[str, Any]] = []
    with Pool(args.jobs) as pool:
        for n, point in enumerate(POINTS, 1):
            runs = [("fcfs", args.gbps[0])] + [("rotasched", g) for g in args.gbps]
            tasks = [(point, str(args.models_dir), system, g, s)
                     for system, g in runs for s in range(args.seeds)]
            out = pool.map(replay, tasks)
            per = [out[i * args.seeds:(i + 1) * args.seeds] for i in range(len(runs))]
            base = per[0]
            entry = {"point": point._asdict(), "label": point.label,
                     "fcfs": {k: round(statistics.mean(r[k] for r in base), 4) for k in METRICS},
                     "rotasched": {f"{g:g}": compare(base, r)
                                   for (_, g), r in zip(runs[1:], per[1:], strict=True)}}
            results.append(entry)
            row = ", ".join(f"{g} GB/s: TTFT {v['ttft_attainment']:.3f} both "
                            f"{v['both_attainment']:.3f}" for g, v in entry["rotasched"].items())
            log(f"[{n}/{len(POINTS)}] {point.label}: {row}")
            write_json(args.out, {"command": command_line("eval.diagnostics.link_sweep", argv),
                                  "gbps": args.gbps, "seeds": args.seeds, "points": results})


if __name__ == "__main__":
    main()
