"""How long should a late head wait for finishing streams before a rotation makes its room?

RotaSched ranks requests past their latest start behind every request that can still make its
TTFT (README, rule 1). Such a late head used to get no rotation at all (rule 3): it waited for
streams to finish, while the room they freed went to streams coming back from the host. On a
finite workload that left late requests waiting to its end, and its last tokens came seconds
later (Qwen2.5-32B on an H100: 91% of lpm's throughput, eval/results/slo_matrix.json). Now it
waits at most ``RotaConfig.late_wait_slos`` of its TTFT SLOs. This replays a fixed set of
points in eval.sim_policy (calibrated GPU profiles; models, traces, arrivals, SLOs and replay
lengths the matrix covers) for several values of that limit, ``1e9`` standing for the rule
before (no limit), and fcfs as the baseline each is set against.

    python -m eval.diagnostics.late_wait --jobs 2 --out eval/results/diag_late_wait_sim.json
"""

from __future__ import annotations

import argparse
import statistics
from multiprocessing import Pool
from pathlib import Path
from typing import Any, NamedTuple

from eval.lib.gpu_model import MODELS_DIR, resolve_gpu_model
from eval.lib.jsonfiles import command_line, write_json
from eval.lib.progress import Progress
from eval.lib.traces import load_azure, make_specs
from eval.sim_matrix import TRACE_DIR
from eval.sim_policy import simulate

NO_LIMIT = 1e9  # the rule before: a late head waits for finishes, however long they take
HOST_GB = 64.0
HORIZON_S = 600.0
METRICS = ("ttft_attainment", "tbt_attainment", "both_attainment", "throughput_tok_s")


class Point(NamedTuple):
    model: str
    gpu: str
    trace: str
    arrival: str
    cv: float
    rate: float
    num: int
    cap: int  # device KV tokens
    ttft_slo: float
    tbt_slo: float

    @property
    def label(self) -> str:
        arrivals = "poisson" if self.arrival == "poisson" else f"gamma CV {self.cv:g}"
        return (f"{self.model} {self.trace} {arrivals} {self.rate:g} req/s, {self.num} requests, "
                f"SLOs {self.ttft_slo:g} s / {self.tbt_slo * 1000:g} ms")


LLAMA, MIXTRAL, DEEPSEEK, QWEN = "llama-3.1-8b", "mixtral-8x7b", "deepseek-v2-lite", "qwen2.5-32b"
POINTS = (
    Point(LLAMA, "h100", "conv", "poisson", 1, 14, 300, 60000, 1.0, 0.1),
    Point(LLAMA, "h100", "conv", "poisson", 1, 22, 300, 60000, 1.0, 0.1),
    Point(LLAMA, "h100", "conv", "poisson", 1, 22, 300, 60000, 0.5, 0.05),
    Point(LLAMA, "h100", "conv", "gamma", 4, 22, 300, 60000, 1.0, 0.1),
    Point(LLAMA, "h100", "conv", "poisson", 1, 22, 100, 60000, 1.0, 0.1),
    Point(LLAMA, "h100", "code", "poisson", 1, 14, 300, 60000, 1.0, 0.1),
    Point(LLAMA, "h100", "code", "poisson", 1, 20, 300, 60000, 1.0, 0.05),
    Point(MIXTRAL, "h200", "conv", "poisson", 1, 5.75, 300, 60000, 1.0, 0.1),
    Point(MIXTRAL, "h200", "conv", "gamma", 4, 7.66, 300, 60000, 1.0, 0.05),
    Point(MIXTRAL, "h200", "conv", "poisson", 1, 6, 100, 60000, 1.0, 0.1),
    Point(MIXTRAL, "h200", "code", "poisson", 1, 8, 300, 60000, 1.0, 0.1),
    Point(DEEPSEEK, "h100", "conv", "poisson", 1, 37.5, 300, 252839, 1.0, 0.1),
    Point(DEEPSEEK, "h100", "code", "poisson", 1, 30, 300, 252839, 1.0, 0.1),
    Point(QWEN, "h100", "conv", "poisson", 1, 4.5, 100, 19073, 1.0, 0.1),
    Point(QWEN, "h100", "conv", "poisson", 1, 3.0, 100, 19073, 1.0, 0.1),
    Point(QWEN, "h100", "conv", "poisson", 1, 4.5, 300, 19073, 1.0, 0.1),
    Point(QWEN, "h100", "code", "poisson", 1, 4.0, 300, 19073, 1.0, 0.1),
)


def replay(task: tuple[Point, str, float | None, int]) -> dict[str, float]:
    """One arrival draw of one point: fcfs (``limit`` None) or rotasched with that limit."""
    point, models_dir, limit, seed = task
    gpu = resolve_gpu_model(point.model, point.gpu, models_dir=Path(models_dir), mover="staging")
    rows = load_azure(TRACE_DIR / f"AzureLLMInferenceTrace_{point.trace}.csv")
    specs = make_specs(rows, num=point.num, arrival=point.arrival, rate=point.rate, cv=point.cv,
                       seed=seed)
    system = "fcfs" if limit is None else "rotasched"
    settings = None if limit is None else {"late_wait_slos": limit}
    out = simulate(specs, system, point.cap, gpu, point.ttft_slo, point.tbt_slo,
                   int(HOST_GB * 1e9) // gpu.bytes_per_token, HORIZON_S, settings=settings)
    return {k: out["summary"][k] for k in METRICS}


def compare(base: list[dict[str, float]], runs: list[dict[str, float]]) -> dict[str, float]:
    """Seed means of rotasched's attainments, and its throughput over fcfs's."""
    mean = {k: statistics.mean(r[k] for r in runs) for k in METRICS}
    fcfs_tput = statistics.mean(r["throughput_tok_s"] for r in base)
    return {"ttft_attainment": round(mean["ttft_attainment"], 4),
            "tbt_attainment": round(mean["tbt_attainment"], 4),
            "both_attainment": round(mean["both_attainment"], 4),
            "throughput_vs_fcfs": round(mean["throughput_tok_s"] / fcfs_tput, 4)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limits", nargs="+", type=float, default=[NO_LIMIT, 1.0, 1.5, 2.0, 3.0, 5.0],
                    help=f"late_wait_slos values ({NO_LIMIT:g}: no limit, the rule before)")
    ap.add_argument("--seeds", type=int, default=3, help="arrival draws per point")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1 or min(args.limits) <= 0:
        ap.error("--seeds and --jobs must be at least 1, --limits positive")
    log = Progress()
    results = []
    with Pool(args.jobs) as pool:
        for n, point in enumerate(POINTS, 1):
            limits: list[float | None] = [None, *args.limits]
            tasks = [(point, str(args.models_dir), lim, s)
                     for lim in limits for s in range(args.seeds)]
            runs = pool.map(replay, tasks)
            per = {lim: runs[i * args.seeds:(i + 1) * args.seeds] for i, lim in enumerate(limits)}
            base = per.pop(None)
            entry: dict[str, Any] = {
                "point": point._asdict(), "label": point.label,
                "fcfs": {k: round(statistics.mean(r[k] for r in base), 4) for k in METRICS},
                "rotasched": {f"{lim:g}": compare(base, r) for lim, r in per.items()}}
            results.append(entry)
            row = ", ".join(f"{k}: both {v['both_attainment']:.3f} "
                            f"thr {v['throughput_vs_fcfs']:.3f}"
                            for k, v in entry["rotasched"].items())
            log(f"[{n}/{len(POINTS)}] {point.label}: {row}")
            write_json(args.out, {"command": command_line("eval.diagnostics.late_wait", argv),
                                  "seeds": args.seeds, "limits": args.limits,
                                  "no_limit": NO_LIMIT, "points": results})


if __name__ == "__main__":
    main()
