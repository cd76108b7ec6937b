"""What TTFT attainment the matrix's big-win points allow once memory no longer binds.

The big-win goal (issue 14) asks rotasched for +50 TTFT points over the best baseline where
memory binds and the baseline keeps under half the requests within their TTFT SLO. Rotation
can only remove the memory limit; what remains is compute: under bursty arrivals a burst's
prefills can take longer than the TTFT SLO on any schedule. This replays each simulated point
the goal judges (``sim_matrix.json``, ``checks.big_win`` set) with the KV cap multiplied by
``--cap-factor`` (memory never binds), under fcfs (every request prefilled as soon as the GPU
is free, in arrival order) and under rotasched (its order: the fewest late), the same arrival
draws as the matrix, and takes the better TTFT attainment of the two as the point's *ceiling*.
A miss whose ceiling is itself under the baseline + 50 points is one no rotation closes; the
gap between the ceiling and rotasched at the real cap is what the policy leaves.

    python -m eval.diagnostics.memory_ceiling --matrix eval/results/sim_matrix.json --jobs 2 \\
        --out eval/results/diag_memory_ceiling_sim.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from eval.diagnostics.setting_sweep import add_replay_args
from eval.lib.gpu_model import GpuModel, resolve_gpu_model
from eval.lib.jsonfiles import command_line, write_json
from eval.lib.progress import Progress
from eval.lib.traces import make_specs
from eval.sim_matrix import _rows
from eval.sim_policy import simulate

ATTAINMENTS = ("ttft_attainment", "tbt_attainment", "both_attainment")
BIG_WIN_POINTS = 0.5  # issue 14: rotasched's TTFT attainment >= the best baseline's + 50 points
BUILTIN = "built-in"


def judged(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points the big-win goal judges (memory binds, the best baseline under 50%)."""
    return [p for p in points if p.get("checks", {}).get("big_win") is not None]


def _gpu(point: dict[str, Any], models_dir: Path) -> GpuModel:
    if point["gpu_model"] == BUILTIN:
        return resolve_gpu_model(mover=point["mover"])
    slug = point["gpu"].split()[-1]  # "modelled h100"
    return resolve_gpu_model(point["model"], slug, models_dir=models_dir, mover=point["mover"])


def replay(task: tuple[dict[str, Any], str, str, int, float]) -> dict[str, float]:
    """The attainments of one arrival draw of ``point`` under ``system``, the cap scaled."""
    point, models_dir, system, seed, factor = task
    gpu = _gpu(point, Path(models_dir))
    specs = make_specs(_rows(point["trace"]), num=point["num_requests"],
                       arrival=point["arrival"], rate=point["rate"], cv=point["cv"], seed=seed)
    cap = int(point["cap_tokens"] * factor)
    host = int(point["host_kv_gb"] * 1e9) // gpu.bytes_per_token
    out = simulate(specs, system, cap, gpu, point["ttft_slo"], point["tbt_slo"], host,
                   point["horizon_s"])
    return {k: float(out["summary"][k]) for k in ATTAINMENTS}


def entry(point: dict[str, Any], unbounded: dict[str, dict[str, float]]) -> dict[str, Any]:
    """One point: the baseline's and rotasched's TTFT attainment (from the matrix) and the
    unbounded replays' attainments; whether +50 points is within reach at all (the better
    unbounded TTFT attainment, whatever it costs TBT), and what the policy leaves."""
    best = point["checks"]["best_baseline"]
    base = point["systems"][best]["ttft_attainment"]
    rota = point["systems"]["rotasched"]["ttft_attainment"]
    ceiling = max(u["ttft_attainment"] for u in unbounded.values())
    keys = ("model", "trace", "arrival", "cv", "ttft_slo", "tbt_slo", "rate", "rate_factor",
            "gpu")
    return {**{k: point[k] for k in keys}, "best_baseline": best,
            "baseline_ttft": round(base, 4), "rotasched_ttft": round(rota, 4),
            "rotasched_tbt": round(point["systems"]["rotasched"]["tbt_attainment"], 4),
            "unbounded": {k: {m.removesuffix("_attainment"): round(v, 4) for m, v in u.items()}
                          for k, u in unbounded.items()},
            "ceiling_ttft": round(ceiling, 4), "big_win": point["checks"]["big_win"],
            "win_possible": ceiling >= base + BIG_WIN_POINTS,
            "left_points": round(100 * (ceiling - rota), 2)}


def summarize(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (model, trace, arrival): big wins, misses a rotation could still close, and the
    mean points rotasched leaves under the ceiling."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in entries:
        arrivals = "poisson" if e["arrival"] == "poisson" else f"gamma CV {e['cv']:g}"
        groups[f"{e['model']} {e['trace']} {arrivals}"].append(e)
    groups["all"] = entries

    def row(es: list[dict[str, Any]]) -> dict[str, Any]:
        misses = [e for e in es if not e["big_win"]]
        # within reach of rotasched's own rules (its TBT pacing kept), not only of fcfs's
        own = [e for e in misses if "rotasched" in e["unbounded"] and
               e["unbounded"]["rotasched"]["ttft"] >= e["baseline_ttft"] + BIG_WIN_POINTS]
        return {"points": len(es), "big_win": len(es) - len(misses),
                "misses_within_reach": sum(e["win_possible"] for e in misses),
                "misses_within_reach_of_rotasched": len(own),
                "misses_out_of_reach": sum(not e["win_possible"] for e in misses),
                "mean_left_points": round(statistics.mean(e["left_points"] for e in es), 2),
                "max_left_points": max(e["left_points"] for e in es)}

    return {name: row(es) for name, es in groups.items() if es}


def plot(entries: list[dict[str, Any]], out: Path) -> None:
    """Rotasched's TTFT gain against the ceiling's, per point: the +50 goal as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6))
    for model in sorted({e["model"] for e in entries}):
        es = [e for e in entries if e["model"] == model]
        ax.scatter([100 * (e["ceiling_ttft"] - e["baseline_ttft"]) for e in es],
                   [100 * (e["rotasched_ttft"] - e["baseline_ttft"]) for e in es],
                   s=14, alpha=0.7, label=model)
    ax.plot([0, 100], [0, 100], color="grey", lw=0.8, label="rotasched = ceiling")
    ax.axhline(100 * BIG_WIN_POINTS, color="red", lw=0.8, ls="--", label="goal: +50 points")
    ax.axvline(100 * BIG_WIN_POINTS, color="red", lw=0.8, ls=":")
    ax.set_xlabel("ceiling: TTFT gain with memory unbounded (points over the best baseline)")
    ax.set_ylabel("rotasched's TTFT gain at the real KV cap (points)")
    ax.set_title("Big-win points (simulated): what rotation reaches vs what compute allows")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--matrix", type=Path, default=Path("eval/results/sim_matrix.json"))
    ap.add_argument("--cap-factor", type=float, default=20.0,
                    help="KV cap multiplier for the unbounded replays")
    ap.add_argument("--systems", nargs="+", default=["fcfs", "rotasched"],
                    choices=("fcfs", "rotasched"))
    ap.add_argument("--limit", type=int, default=None, help="first N judged points only")
    add_replay_args(ap)
    args = ap.parse_args(argv)
    if args.cap_factor < 1 or args.jobs < 1:
        ap.error("--cap-factor and --jobs must be at least 1")
    points = judged(json.loads(args.matrix.read_text())["points"])[:args.limit]
    if not points:
        ap.error(f"{args.matrix}: no point the big-win goal judges")
    log = Progress()
    tasks = [(p, str(args.models_dir), s, k, args.cap_factor)
             for p in points for s in args.systems for k in range(p["seeds"])]
    log(f"{len(points)} points x {len(args.systems)} systems, {len(tasks)} replays")
    # spawn, not fork: the parent may have torch loaded (eval.sim_matrix's reason)
    with get_context("spawn").Pool(args.jobs) as pool:
        runs = iter(pool.map(replay, tasks, chunksize=4))
    entries = []
    for p in points:
        unbounded = {}
        for system in args.systems:
            draws = [next(runs) for _ in range(p["seeds"])]
            unbounded[system] = {k: statistics.mean(d[k] for d in draws) for k in ATTAINMENTS}
        entries.append(entry(p, unbounded))
    summary = summarize(entries)
    png = args.out.with_suffix(".png")
    plot(entries, png)
    write_json(args.out, {"command": command_line("eval.diagnostics.memory_ceiling", argv),
                          "matrix": str(args.matrix), "cap_factor": args.cap_factor,
                          "systems": args.systems, "summary": summary, "points": entries,
                          "png": str(png)})
    for name, row in summary.items():
        log(f"{name}: big win {row['big_win']}/{row['points']}, misses within reach "
            f"{row['misses_within_reach']} ({row['misses_within_reach_of_rotasched']} of "
            f"rotasched's own rules), out of reach {row['misses_out_of_reach']}, "
            f"rotasched {row['mean_left_points']:+.1f} points under the ceiling on average")


if __name__ == "__main__":
    main()
