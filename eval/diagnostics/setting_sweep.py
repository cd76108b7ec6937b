"""One policy setting swept in the simulator over a fixed set of matrix points.

Some of RotaSched's settings are judgment calls with no flag (``RotaConfig``'s internal
fields): how long a late head waits for finishing streams before a rotation makes its room
(``late_wait_slos``, README rule 3), how much of the slack the resident streams earn the
streams on the host may spend (``away_margin``). This replays a fixed set of points in
eval.sim_policy (calibrated GPU profiles; models, traces, arrivals, SLOs and replay lengths the
matrix covers) for several values of one setting, with fcfs as the baseline each is set
against, so a value is chosen where the figures are flat rather than where one point peaks
(eval/README.md, "Late heads" and "The away bound").

    python -m eval.diagnostics.setting_sweep --setting late_wait_slos --values 1e9 1 1.5 2 3 5 \\
        --jobs 2 --out eval/results/diag_late_wait_sim.json
    python -m eval.diagnostics.setting_sweep --setting away_margin --values 1 1.25 1.5 2 \\
        --jobs 2 --out eval/results/diag_away_margin_sim.json
    python -m eval.diagnostics.setting_sweep --setting fewest_late --values 0 1 \\
        --jobs 2 --out eval/results/diag_fewest_late_sim.json
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
from eval.lib.traces import make_specs
from eval.sim_matrix import _rows
from eval.sim_policy import simulate
from superinfer.config import ConfigError, RotaConfig

# RotaConfig's internal fields worth a sweep (the others have flags); a switch takes 0 and 1
TUNABLE = ("late_wait_slos", "away_margin", "reserve_window_s", "reserve_max_frac",
           "fewest_late", "early_returns", "pacing_step_share")
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
    Point(QWEN, "h100", "conv", "poisson", 1, 1.78, 300, 19073, 1.0, 0.1),
    Point(QWEN, "h100", "conv", "poisson", 1, 1.78, 300, 19073, 0.5, 0.05),
    Point(QWEN, "h100", "conv", "gamma", 4, 1.49, 300, 19073, 1.0, 0.1),
    Point(QWEN, "h100", "code", "poisson", 1, 4.0, 300, 19073, 1.0, 0.1),
    # long outputs (eval.lib.traces.SYNTHETIC), decode-bound: where a rule that leaves device
    # memory idle shows in throughput first
    Point(LLAMA, "h100", "long-output", "gamma", 4, 9.11, 300, 60000, 1.0, 0.05),
    Point(QWEN, "h100", "long-output", "poisson", 1, 1.35, 300, 30000, 0.5, 0.1),
    Point(QWEN, "h100", "long-output", "poisson", 1, 1.35, 300, 30000, 1.0, 0.05),
)


def add_replay_args(ap: argparse.ArgumentParser) -> None:
    """The flags every simulated diagnostic takes: its processes, the profiles, its result."""
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    ap.add_argument("--out", type=Path, required=True)


def replay(task: tuple[Point, str, str, float | None, int]) -> dict[str, float]:
    """One arrival draw of one point: fcfs (``value`` None) or rotasched with ``setting`` at
    ``value``."""
    point, models_dir, setting, value, seed = task
    gpu = resolve_gpu_model(point.model, point.gpu, models_dir=Path(models_dir), mover="staging")
    specs = make_specs(_rows(point.trace), num=point.num, arrival=point.arrival,
                       rate=point.rate, cv=point.cv, seed=seed)
    system = "fcfs" if value is None else "rotasched"
    if isinstance(getattr(RotaConfig(), setting), bool):
        value = None if value is None else bool(value)
    settings = None if value is None else {setting: value}
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
    ap.add_argument("--setting", required=True, choices=TUNABLE,
                    help="a RotaConfig field without a flag")
    ap.add_argument("--values", nargs="+", type=float, required=True)
    ap.add_argument("--seeds", type=int, default=3, help="arrival draws per point")
    add_replay_args(ap)
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1:
        ap.error("--seeds and --jobs must be at least 1")
    try:  # the config's own check, before minutes of replays
        for v in args.values:
            RotaConfig(**{args.setting: v})
    except ConfigError as e:
        ap.error(str(e))
    log = Progress()
    results = []
    with Pool(args.jobs) as pool:
        for n, point in enumerate(POINTS, 1):
            values: list[float | None] = [None, *args.values]
            tasks = [(point, str(args.models_dir), args.setting, v, s)
                     for v in values for s in range(args.seeds)]
            runs = pool.map(replay, tasks)
            per = {v: runs[i * args.seeds:(i + 1) * args.seeds] for i, v in enumerate(values)}
            base = per.pop(None)
            entry: dict[str, Any] = {
                "point": point._asdict(), "label": point.label,
                "fcfs": {k: round(statistics.mean(r[k] for r in base), 4) for k in METRICS},
                "rotasched": {f"{v:g}": compare(base, r) for v, r in per.items()}}
            results.append(entry)
            row = ", ".join(f"{k}: both {v['both_attainment']:.3f} "
                            f"thr {v['throughput_vs_fcfs']:.3f}"
                            for k, v in entry["rotasched"].items())
            log(f"[{n}/{len(POINTS)}] {point.label}: {row}")
            write_json(args.out, {
                "command": command_line("eval.diagnostics.setting_sweep", argv),
                "setting": args.setting, "values": args.values, "seeds": args.seeds,
                "default": getattr(RotaConfig(), args.setting), "points": results})


if __name__ == "__main__":
    main()
