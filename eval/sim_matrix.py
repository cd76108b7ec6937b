"""The simulated evaluation matrix (eval/results/sim_matrix.json and its figure): eval.sim_policy
swept over the whole space, fcfs (SGLang's rule, the baseline) against rotasched.

The space: every model with a profile for ``--gpu`` (eval/models/<model>/profile_<gpu>.json),
or with ``--builtin`` the simulator's built-in H200 Llama-3.1-8B only; both Azure traces;
Poisson arrivals and gamma ones with gap CV 2 and 4; TTFT SLO 0.5 / 1 / 2 s; TBT SLO 50 / 100 ms;
rates from under each (model, trace)'s knee to twice it. Every model of a run gets the same KV
memory (``--kv-gb``; the default is the 60,000 Llama-3.1-8B tokens the GPU sweeps cap at), so
its cap in tokens is ``kv_gb * 1e9 // bytes_per_token``; a model whose weights leave the card
less (Qwen2.5-32B on an H100: 5 GB) runs on its own with ``--resume``, and ``settings``'
``kv_gb_by_model`` records each model's.

The knee of a (model, trace) is found at the default SLOs (TTFT 1 s, TBT 100 ms) on Poisson
arrivals: the lowest rate at which fcfs's TTFT attainment falls below 90%, from a geometric scan
(x2 steps) narrowed by a few geometric bisections. Its points run at knee x ``--rate-factors``.

Points have eval.lib.matrix's shape (``gpu``: "modelled <gpu>"), plus ``simulated: true``,
``seeds`` (arrival draws per point; metrics are their means; a system's ``bound`` is classified
from its binding times summed over the draws), ``cap_tokens``, ``knee`` and ``rate_factor``. The
point's ``bound`` is the fcfs run's, as the GPU matrix takes the baseline's measured signals.

fcfs decides without the SLOs (they only score its requests), so one fcfs replay per (arrival
draw, rate) serves every SLO pair. The file is rewritten after each (model, trace, arrivals,
rate) group, so an interrupted sweep keeps what it computed; ``--resume`` keeps the points
already in ``--out`` (those simulated with the same settings are skipped) and the knees.
Figures are model estimates, not measurements.

    python -m eval.sim_matrix --builtin --out eval/results/sim_matrix.json     # ~10 min, 2 cores
    python -m eval.sim_matrix --gpu h100 --models llama-3.1-8b --traces conv \\
        --arrivals poisson --ttft-slos 1 --tbt-slos 0.1 --seeds 1 --out /tmp/m.json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from eval.lib import matrix
from eval.lib.gpu_model import (
    MODELS_DIR,
    MOVERS,
    GpuModel,
    ProfileNotFound,
    available_profiles,
    gpu_slug,
    resolve_gpu_model,
)
from eval.lib.jsonfiles import command_line, source_commit, write_json
from eval.lib.metrics import summarize as summarize_records
from eval.lib.progress import Progress
from eval.lib.traces import SYNTHETIC, synthetic_rows
from superinfer.config import RotaConfig
from superinfer.profiles import load_profile_file

TRACE_DIR = Path(__file__).resolve().parent / "data" / "azure_llm_2023"
TRACES = ("conv", "code")
PROBE_TRACES = tuple(SYNTHETIC)  # synthetic length mixes (eval.lib.traces.SYNTHETIC)
ARRIVALS = ("poisson", "gamma2", "gamma4")  # gamma<CV>: gamma gaps of that CV
TTFT_SLOS = (0.5, 1.0, 2.0)
TBT_SLOS = (0.05, 0.1)
RATE_FACTORS = (0.75, 1.0, 1.25, 1.5, 2.0)
BASELINE = "fcfs"
SYSTEMS = (BASELINE, matrix.OURS)
# 60,000 tokens of Llama-3.1-8B (131,072 B each): the cap of the GPU sweeps
DEFAULT_KV_GB = 60_000 * 131_072 / 1e9
KNEE_TTFT_SLO, KNEE_TBT_SLO = 1.0, 0.1
KNEE_TARGET = 0.9  # fcfs attainment under which the knee is
# What the knee judges: TTFT attainment (the sim matrix: where waiting for room starts to show)
# or both SLOs (a GPU plan: where the baseline starts to miss either, which on a model whose
# decode binds first, e.g. DeepSeek-V2-Lite with 250k tokens of KV, is far below its TTFT knee).
KNEE_METRICS = {"ttft": "ttft_attainment", "both": "both_attainment"}
KNEE_STEP = 2.0
KNEE_BISECTIONS = 4  # the bracket shrinks from x2 to x2^(1/16), about 4.4%
KNEE_MAX_RATE = 4096.0
KNEE_MIN_RATE = 1 / 64
EXTRA = ("ttft_p50", "ttft_p99", "errors")  # per system, beside matrix.METRICS
STATS = ("rotations_out", "rotations_no_room", "retractions")


class KneeNotFound(RuntimeError):
    def __init__(self, msg: str, probes: dict[float, float]) -> None:
        super().__init__(msg)
        self.probes = probes


def parse_arrival(label: str) -> tuple[str, float]:
    """'poisson' -> ('poisson', 1.0); 'gamma2' -> ('gamma', 2.0)."""
    if label == "poisson":
        return "poisson", 1.0
    if label.startswith("gamma"):
        try:
            cv = float(label.removeprefix("gamma"))
        except ValueError:
            cv = 0.0
        if cv > 0:
            return "gamma", cv
    raise argparse.ArgumentTypeError(
        f"arrivals are 'poisson' or 'gamma<CV>' (gamma2), not {label!r}")


def find_knee(attainment: Callable[[float], float], start: float = 2.0,
              target: float = KNEE_TARGET, step: float = KNEE_STEP,
              bisections: int = KNEE_BISECTIONS, max_rate: float = KNEE_MAX_RATE,
              min_rate: float = KNEE_MIN_RATE) -> tuple[float, dict[float, float]]:
    """The lowest rate at which ``attainment(rate)`` falls below ``target``: a geometric scan by
    ``step`` from ``start`` (up while it holds, down while it does not) brackets it, then
    ``bisections`` geometric bisections narrow the bracket; the bracket's upper end, the first
    rate seen below ``target``, is the knee. Returns it and every probe (rate -> attainment)."""
    probes: dict[float, float] = {}

    def f(rate: float) -> float:
        rate = float(f"{rate:.6g}")
        if rate not in probes:
            probes[rate] = attainment(rate)
        return probes[rate]

    rate = start
    if f(rate) >= target:
        while f(rate * step) >= target:
            rate *= step
            if rate * step > max_rate:
                raise KneeNotFound(f"attainment stays >= {target} up to {rate:.4g} req/s",
                                   dict(sorted(probes.items())))
        lo, hi = rate, rate * step
    else:
        while f(rate / step) < target:
            rate /= step
            if rate / step < min_rate:
                raise KneeNotFound(f"attainment is < {target} even at {rate:.4g} req/s",
                                   dict(sorted(probes.items())))
        lo, hi = rate / step, rate
    for _ in range(bisections):
        mid = math.sqrt(lo * hi)
        if f(mid) < target:
            hi = mid
        else:
            lo = mid
    return float(f"{hi:.6g}"), dict(sorted(probes.items()))


# --- the work, in worker processes --------------------------------------------------------------
@lru_cache(maxsize=8)
def _rows(trace: str) -> list:
    from eval.lib.traces import load_azure

    if trace in PROBE_TRACES:
        return synthetic_rows(trace)
    return load_azure(TRACE_DIR / f"AzureLLMInferenceTrace_{trace}.csv")


def _replays(gpu: GpuModel, trace: str, system: str, arrival: str, cv: float, rate: float,
             cfg: dict[str, Any], ttft_slo: float, tbt_slo: float) -> list[dict[str, Any]]:
    """``cfg['seeds']`` replays (arrival draws 0, 1, ...) of one system at one rate."""
    from eval.lib.traces import make_specs
    from eval.sim_policy import simulate

    return [simulate(make_specs(_rows(trace), num=cfg["num"], arrival=arrival, rate=rate, cv=cv,
                                seed=k),
                     system, cfg["cap"], gpu, ttft_slo, tbt_slo, cfg["host_tokens"],
                     cfg["horizon"], settings={"decode_profile": cfg["decode_profile"]})
            for k in range(cfg["seeds"])]


def _mean(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(statistics.mean(vals), 6) if vals else None


def _system_entry(runs: list[dict[str, Any]], summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Seed means of one system's metrics; its bound from the binding times of every draw."""
    from superinfer.policy.binding import BindingTimes

    times = BindingTimes()
    for r in runs:
        times.add(BindingTimes.from_dict(r["binding"]))
    entry: dict[str, Any] = {k: _mean([s[k] for s in summaries]) for k in matrix.METRICS + EXTRA}
    entry["bound"] = times.bound()
    entry["binding"] = {k: v for k, v in times.as_dict().items() if k.endswith("_share")}
    entry["stats"] = {k: _mean([r["stats"][k] for r in runs]) for k in STATS}
    entry["per_seed"] = [{"ttft_attainment": s["ttft_attainment"],
                          "both_attainment": s["both_attainment"],
                          "bound": r["binding"]["bound"]}
                         for r, s in zip(runs, summaries, strict=True)]
    return entry


def knee_task(task: dict[str, Any]) -> dict[str, Any]:
    """The knee of one (model, trace): fcfs, Poisson, the default SLOs, judged by
    ``task['metric']`` (``KNEE_METRICS``)."""
    gpu, cfg = task["gpu"], task["cfg"]
    key = KNEE_METRICS[task["metric"]]
    t0 = time.monotonic()

    def attainment(rate: float) -> float:
        runs = _replays(gpu, task["trace"], BASELINE, "poisson", 1.0, rate, cfg,
                        KNEE_TTFT_SLO, KNEE_TBT_SLO)
        return statistics.mean(r["summary"][key] for r in runs)

    out = {"model": task["model"], "trace": task["trace"], **task["sig"],
           "ttft_slo": KNEE_TTFT_SLO, "tbt_slo": KNEE_TBT_SLO, "arrival": "poisson",
           "target": KNEE_TARGET}
    try:
        knee, probes = find_knee(attainment, start=task["start"])
        out["knee"] = knee
    except KneeNotFound as e:
        probes, out["knee"], out["error"] = e.probes, None, str(e)
    out["probes"] = {f"{r:g}": round(a, 4) for r, a in probes.items()}
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


def group_task(task: dict[str, Any]) -> list[dict[str, Any]]:
    """The points of one (model, trace, arrivals, rate): each SLO pair of ``task['slos']``."""
    gpu, cfg, trace = task["gpu"], task["cfg"], task["trace"]
    arrival, cv, rate = task["arrival"], task["cv"], task["rate"]
    # fcfs decides without the SLOs: one replay per draw, scored against every pair
    base = _replays(gpu, trace, BASELINE, arrival, cv, rate, cfg, KNEE_TTFT_SLO, KNEE_TBT_SLO)
    points = []
    for ttft_slo, tbt_slo in task["slos"]:
        systems = {BASELINE: _system_entry(
            base, [summarize_records(r["records"], ttft_slo, tbt_slo) for r in base])}
        for system in task["systems"]:
            if system == BASELINE:
                continue
            runs = _replays(gpu, trace, system, arrival, cv, rate, cfg, ttft_slo, tbt_slo)
            systems[system] = _system_entry(runs, [r["summary"] for r in runs])
        point = {"model": task["model"], "trace": trace, "arrival": arrival, "cv": cv,
                 "ttft_slo": ttft_slo, "tbt_slo": tbt_slo, "rate": rate, "gpu": task["gpu_label"],
                 "commit": task["commit"], "simulated": True, "seeds": cfg["seeds"],
                 "cap_tokens": cfg["cap"], "num_requests": cfg["num"], "knee": task["knee"],
                 "rate_factor": task["rate_factor"], **task["sig"],
                 "bound": systems[BASELINE]["bound"], "systems": systems}
        point["checks"] = matrix.check_point(point)
        points.append(point)
    return points


def _run_all(fn: Callable[[dict[str, Any]], Any], tasks: list[dict[str, Any]], jobs: int):
    """``fn`` over ``tasks``, results as they finish (in this process when ``jobs`` is 1)."""
    if jobs <= 1 or len(tasks) <= 1:
        yield from map(fn, tasks)
        return
    # spawn, not fork: the parent has torch loaded, and forked OpenMP state can hang children
    with multiprocessing.get_context("spawn").Pool(min(jobs, len(tasks))) as pool:
        yield from pool.imap_unordered(fn, tasks)


# --- the sweep ----------------------------------------------------------------------------------
def summarize(points: list[dict[str, Any]], knees: dict[str, Any]) -> dict[str, Any]:
    """eval.lib.matrix's summary, the knees, and never-worse counts per bound."""
    summary = matrix.summarize(points)
    by_bound = {}
    for b in ("memory", "compute", "none"):
        checked = [p for p in points
                   if p["bound"] == b and p["checks"].get("never_worse") is not None]
        by_bound[b] = f"{sum(p['checks']['never_worse'] for p in checked)}/{len(checked)}"
    summary["never_worse_by_bound"] = by_bound
    summary["knees"] = {k: v.get("knee") for k, v in sorted(knees.items())}
    return summary


def _sorted(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    order = {t: i for i, t in enumerate(TRACES)}
    return sorted(points, key=lambda p: (p["model"], order.get(p["trace"], 9), p["trace"],
                                         p["arrival"] != "poisson", p["cv"], p["ttft_slo"],
                                         p["tbt_slo"], p["rate"], p["gpu"]))


def plot(points: list[dict[str, Any]], out: Path, title: str) -> None:
    """eval.lib.matrix.plot per (model, arrivals) row and trace column, tiled into one PNG: the
    whole matrix in one strip is too wide to read."""
    import tempfile

    from PIL import Image

    points = _sorted(points)
    rows = list(dict.fromkeys((p["model"], p["arrival"], p["cv"]) for p in points))
    cols = list(dict.fromkeys(p["trace"] for p in points))
    tiles: dict[tuple[int, int], Image.Image] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (model, arrival, cv) in enumerate(rows):
            for j, trace in enumerate(cols):
                cell = [p for p in points if (p["model"], p["arrival"], p["cv"], p["trace"])
                        == (model, arrival, cv, trace)]
                path = Path(tmp) / f"{i}_{j}.png"
                what = "poisson" if arrival == "poisson" else f"{arrival} CV {cv:g}"
                matrix.plot(cell, path, f"{title}\n{model}, {trace}, {what} arrivals")
                if path.exists():
                    with Image.open(path) as im:
                        tiles[i, j] = im.convert("RGB")
    if not tiles:
        return
    w = max(t.width for t in tiles.values())
    h = max(t.height for t in tiles.values())
    sheet = Image.new("RGB", (w * len(cols), h * len(rows)), "white")
    for (i, j), tile in tiles.items():
        sheet.paste(tile, (j * w, i * h))
    out.parent.mkdir(parents=True, exist_ok=True)
    # a few flat colours: a palette keeps the sheet a fraction of its RGB size in the repo
    sheet.quantize(colors=64).save(out, optimize=True)


def _models(args: argparse.Namespace, ap: argparse.ArgumentParser) -> list[GpuModel]:
    link = args.link_gbps and args.link_gbps * 1e9
    if args.builtin:
        gpu = resolve_gpu_model(mover=args.mover, link_bytes_per_s=link)
        if args.models and args.models != [gpu.model_name]:
            ap.error(f"--builtin simulates {gpu.model_name} only")
        return [gpu]
    if not args.gpu:
        ap.error("name a profiled GPU (--gpu h100) or pass --builtin")
    slug = gpu_slug(args.gpu)
    have = [m for m, g in available_profiles(args.models_dir) if g == slug]
    names = [m for m in have if not args.models or m in args.models]
    missing = sorted(set(args.models or ()) - set(have))
    if missing or not names:
        ap.error(f"no profile_{slug}.json for {', '.join(missing) or 'any model'} under "
                 f"{args.models_dir} (have: {', '.join(have) or 'none'}); make one with "
                 f"eval.profile_model, or pass --builtin")
    try:
        return [resolve_gpu_model(m, slug, models_dir=args.models_dir, mover=args.mover,
                                  link_bytes_per_s=link) for m in names]
    except ProfileNotFound as e:
        ap.error(str(e))


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", help="simulate every model profiled on this GPU (h100, h200, ...)")
    ap.add_argument("--builtin", action="store_true",
                    help="the simulator's built-in H200 Llama-3.1-8B instead of profiles")
    ap.add_argument("--models", nargs="+", help="only these models (default: every profiled one)")
    ap.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    ap.add_argument("--traces", nargs="+", default=list(TRACES), choices=TRACES + PROBE_TRACES,
                    help="the Azure traces (default), or synthetic length mixes that probe the "
                         "policy off them: long-output (mean prompt 1500, output 400 tokens), "
                         "rag (6000, 150)")
    ap.add_argument("--arrivals", nargs="+", default=list(ARRIVALS),
                    help="poisson and/or gamma<CV> (gamma2, gamma4)")
    ap.add_argument("--ttft-slos", nargs="+", type=float, default=list(TTFT_SLOS), help="s")
    ap.add_argument("--tbt-slos", nargs="+", type=float, default=list(TBT_SLOS), help="s")
    ap.add_argument("--rate-factors", nargs="+", type=float, default=list(RATE_FACTORS),
                    help="rates as multiples of each (model, trace)'s knee")
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS),
                    choices=("fcfs", "rotasched", "rotasched-keep", "rotasched-wt", "fcfs-mixed",
                             "rotasched-mixed"),
                    help="fcfs (the baseline) always runs; -mixed: under SGLang's "
                         "--enable-mixed-chunk")
    ap.add_argument("--kv-gb", type=float, default=DEFAULT_KV_GB,
                    help="device KV memory of every model, GB (default: 60,000 Llama-3.1-8B "
                         "tokens, as the GPU sweeps)")
    ap.add_argument("--host-kv-gb", type=float, default=64.0, help="host tier, GB")
    ap.add_argument("--num", type=int, default=300, help="requests per replay")
    ap.add_argument("--seeds", type=int, default=2, help="arrival draws per point (averaged)")
    ap.add_argument("--horizon", type=float, default=600.0, help="simulated seconds at most")
    ap.add_argument("--knee-start", type=float, default=2.0, help="first rate of the knee scan")
    ap.add_argument("--knee-metric", choices=sorted(KNEE_METRICS), default="ttft",
                    help="the knee is where fcfs keeps under 90%% within the TTFT SLO (ttft) or "
                         "within both SLOs (both)")
    ap.add_argument("--mover", choices=MOVERS, default="staging")
    ap.add_argument("--link-gbps", type=float, default=None, help="host link GB/s each way")
    ap.add_argument("--decode-profile", default="auto",
                    help="rotasched's --rota-decode-profile: 'auto' (each model's own profile, "
                         "as the server finds the shipped one), 'off', or a profile file whose "
                         "shape every model's pacing then reads (how much a wrong one costs)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=Path("eval/results/sim_matrix.json"))
    ap.add_argument("--plot", type=Path, default=None, help="default: --out with .png")
    ap.add_argument("--resume", action="store_true",
                    help="keep --out's points and knees; skip points already simulated with "
                         "the same settings (without it, --out is rewritten from scratch)")
    args = ap.parse_args(argv)
    try:
        args.arrivals = [parse_arrival(a) for a in args.arrivals]
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    if min(args.num, args.seeds, args.jobs) < 1:
        ap.error("--num, --seeds and --jobs must be at least 1")
    if min(args.kv_gb, args.host_kv_gb, args.horizon, args.knee_start, *args.rate_factors,
           *args.ttft_slos, *args.tbt_slos) <= 0:
        ap.error("sizes, SLOs, rate factors and the horizon must be positive")
    if args.link_gbps is not None and args.link_gbps <= 0:
        ap.error("--link-gbps must be positive")
    try:  # before minutes of replays
        RotaConfig(decode_profile=args.decode_profile)
        if args.decode_profile not in ("auto", "off"):
            load_profile_file(args.decode_profile)
    except ValueError as e:  # ConfigError is one
        ap.error(str(e))
    if BASELINE not in args.systems:
        args.systems.insert(0, BASELINE)
    return args, ap


def main(argv: list[str] | None = None) -> int:
    args, ap = parse_args(argv)
    gpus = _models(args, ap)
    log = Progress()
    commit = source_commit()
    t0 = time.monotonic()
    old_points, old_knees, old_elapsed, kv_gb = [], {}, 0.0, {}
    if args.resume and args.out.exists():
        doc = json.loads(args.out.read_text())
        old_points, old_knees = doc.get("points", []), doc.get("knees", {})
        old_elapsed = float(doc.get("elapsed_total_s") or 0.0)
        old_settings = doc.get("settings", {})
        kv_gb = dict(old_settings.get("kv_gb_by_model")
                     or {p["model"]: old_settings.get("kv_gb") for p in old_points})
    # each model's device KV (a model too large for the card gets less: --kv-gb per run)
    kv_gb.update({gpu.model_name: args.kv_gb for gpu in gpus})

    # what each model runs with; a point or knee made with other settings is made again
    plans = []
    for gpu in gpus:
        cap = int(args.kv_gb * 1e9) // gpu.bytes_per_token
        host_tokens = int(args.host_kv_gb * 1e9) // gpu.bytes_per_token
        sig = {"gpu_model": gpu.profile or "built-in", "host_kv_gb": args.host_kv_gb,
               "horizon_s": args.horizon, "mover": gpu.mover,
               "link_gbps": gpu.link_bytes_per_s / 1e9, "decode_profile": args.decode_profile}
        cfg = {"num": args.num, "seeds": args.seeds, "cap": cap, "host_tokens": host_tokens,
               "horizon": args.horizon, "decode_profile": args.decode_profile}
        plans.append((gpu, cfg, sig))
        log(f"{gpu.model_name} on modelled {gpu.gpu_name} ({sig['gpu_model']}): "
            f"{gpu.bytes_per_token} B/token, cap {cap} tokens, host {host_tokens} tokens")

    def same(rec: dict[str, Any], cfg: dict[str, Any], sig: dict[str, Any]) -> bool:
        return (rec.get("cap_tokens") == cfg["cap"] and rec.get("num_requests") == cfg["num"]
                and rec.get("seeds") == cfg["seeds"]
                and all(rec.get(k) == v for k, v in sig.items()))

    # 1. the knees
    knees = dict(old_knees)
    knee_tasks = []
    for gpu, cfg, sig in plans:
        for trace in args.traces:
            key = f"{gpu.model_name} {trace} {gpu.gpu_name}"
            rec = {"cap_tokens": cfg["cap"], "num_requests": cfg["num"], "seeds": cfg["seeds"],
                   "knee_metric": args.knee_metric, **sig}
            if key in knees and same(knees[key], cfg, sig) and knees[key].get("knee") \
                    and knees[key].get("knee_metric", "ttft") == args.knee_metric:
                log(f"knee {key}: {knees[key]['knee']:g} req/s (kept from {args.out})")
                continue
            knee_tasks.append({"model": gpu.model_name, "trace": trace, "gpu": gpu, "cfg": cfg,
                               "sig": rec, "start": args.knee_start, "key": key,
                               "metric": args.knee_metric})
    if knee_tasks:
        log(f"finding {len(knee_tasks)} knee(s) on {min(args.jobs, len(knee_tasks))} processes")
    keys = {(t["model"], t["trace"]): t["key"] for t in knee_tasks}
    for res in _run_all(knee_task, knee_tasks, args.jobs):
        knees[keys[(res["model"], res["trace"])]] = res
        log(f"knee {res['model']} {res['trace']}: "
            f"{res['knee'] if res['knee'] else res.get('error')} ({res['seconds']:g} s, "
            f"probes {res['probes']})")

    # 2. the points, grouped by (model, trace, arrivals, rate): fcfs once for every SLO pair
    slo_pairs = [(a, b) for a in args.ttft_slos for b in args.tbt_slos]
    done_keys = set()
    for p in old_points:
        for gpu, cfg, sig in plans:
            if p["model"] == gpu.model_name and same(p, cfg, sig) \
                    and set(args.systems) <= set(p["systems"]):
                done_keys.add(matrix.point_key(p))
    tasks = []
    for gpu, cfg, sig in plans:
        label = f"modelled {gpu.gpu_name}"
        for trace in args.traces:
            knee = knees.get(f"{gpu.model_name} {trace} {gpu.gpu_name}", {}).get("knee")
            if not knee:
                log(f"no knee for {gpu.model_name} {trace}: its points are skipped")
                continue
            for arrival, cv in args.arrivals:
                for factor in args.rate_factors:
                    rate = round(knee * factor, 2)
                    todo = [(a, b) for a, b in slo_pairs
                            if (gpu.model_name, trace, arrival, cv, a, b, rate, label)
                            not in done_keys]
                    if todo:
                        tasks.append({"gpu": gpu, "cfg": cfg, "sig": sig, "model": gpu.model_name,
                                      "trace": trace, "arrival": arrival, "cv": cv, "rate": rate,
                                      "rate_factor": factor, "knee": knee, "slos": todo,
                                      "systems": args.systems, "gpu_label": label,
                                      "commit": commit})
    total = sum(len(t["slos"]) for t in tasks)
    kept = f", {len(done_keys)} kept from {args.out}" if args.resume else ""
    log(f"{total} points to simulate in {len(tasks)} groups on "
        f"{min(args.jobs, len(tasks) or 1)} processes{kept}")
    points = list(old_points)
    settings = {"kv_gb_by_model": kv_gb, "host_kv_gb": args.host_kv_gb, "num": args.num,
                "seeds": args.seeds, "horizon_s": args.horizon,
                "rate_factors": args.rate_factors, "knee_target": KNEE_TARGET,
                "knee_metric": args.knee_metric,
                "knee_slos": [KNEE_TTFT_SLO, KNEE_TBT_SLO], "systems": args.systems}

    def write(elapsed: float) -> dict[str, Any]:
        summary = summarize(points, knees)
        write_json(args.out, {
            "points": _sorted(points), "summary": summary, "knees": knees,
            "settings": settings, "commit": commit, "elapsed_s": round(elapsed, 1),
            "elapsed_total_s": round(old_elapsed + elapsed, 1),  # over --resume runs
            "command": command_line("eval.sim_matrix", argv),
            "note": ("eval.sim_policy's simulator swept over the space: estimates on a "
                     "modelled GPU, not measurements; see eval/lib/matrix.py for the goals")},
                   rows="points")
        return summary

    t_points, done = time.monotonic(), 0
    write(time.monotonic() - t0)  # the knees, even if no point finishes
    for new in _run_all(group_task, tasks, args.jobs):
        points = matrix.merge(points, new)
        done += len(new)
        summary = write(time.monotonic() - t0)
        spent = time.monotonic() - t_points
        eta = spent / done * (total - done)
        p = new[0]
        log(f"{done}/{total} points, {spent:.0f} s, ETA {eta:.0f} s: {p['model']} {p['trace']} "
            f"{p['arrival']}{p['cv']:g} {p['rate']:g} req/s; never worse "
            f"{summary['never_worse']}")
    summary = write(time.monotonic() - t0)
    plot(points, args.plot or args.out.with_suffix(".png"),
         "rotasched against fcfs, simulated (" + ", ".join(sorted({p["gpu"] for p in points}))
         + ")")
    log(f"{len(points)} points in {args.out}: never worse {summary['never_worse']} "
        f"(by bound {summary['never_worse_by_bound']}), big win {summary['big_win']}; "
        f"knees {summary['knees']}")
    for miss in summary["misses"]:
        print("  miss:", miss)
    return 0


if __name__ == "__main__":
    sys.exit(main())
