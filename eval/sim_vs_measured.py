"""The simulator against the GPU: replay a sweep's exact requests in eval.sim_policy, compare.

For each eval.sweep_slo result file: the same request specs (the same ``make_specs`` call: trace,
request count per rate, arrival process, CV, seed, length caps), the same KV cap, SLOs, host tier
size and mover, on the GPU profile of the sweep's model and GPU (eval/models/<model>/
profile_<gpu>.json, from eval.profile_model; ``--builtin``: the simulator's built-in H200
Llama-3.1-8B). Measured systems map onto simulated ones: SGLang's fcfs, lpm (no shared prefixes
in these replays, so it schedules like fcfs) and hicache (its host copies are not modelled) onto
the simulator's fcfs, rotasched (with --rota-keep-host-copy / --rota-write-through / --rota-policy
lvf: rotasched-keep / -wt / -lvf) onto itself. Writes a JSON (every (file, system, rate):
measured, simulated, simulated minus measured in points; mean and worst per metric) and one PNG
(simulated against measured, one panel per metric).

    python -m eval.sim_vs_measured eval/results/slo_h200_azure_conv.json \\
        eval/results/slo_h100_conv22_restructure.json --out /tmp/sim_vs_measured.json
    python -m eval.sim_vs_measured eval/results/slo_h200_azure_code.json --builtin --out /tmp/c.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from eval.lib.gpu_model import MODELS_DIR, ProfileNotFound, gpu_slug, resolve_gpu_model
from eval.lib.jsonfiles import command_line, write_json
from eval.lib.traces import load_azure, make_specs
from eval.sim_policy import HOST_PAGE, simulate

EVAL = Path(__file__).resolve().parent
METRICS = ("ttft_attainment", "tbt_attainment", "both_attainment", "throughput_tok_s")
ATTAINMENTS = METRICS[:3]
# measured system -> simulated one, before the rotasched flags refine it
DEFAULT_MAP = {"fcfs": "fcfs", "lpm": "fcfs", "hicache": "fcfs", "rotasched": "rotasched",
               "rotasched-lvf": "rotasched-lvf"}
SERVER_HOST_KV_GB = 8.0  # --rota-host-kv-gb's default (superinfer.config.RotaConfig)


def log(msg: str) -> None:
    print(msg, flush=True)


def flag_value(flags: list[str], name: str) -> str | None:
    """The last value given to ``name`` in a flag list (``--x v`` or ``--x=v``)."""
    val = None
    for i, f in enumerate(flags):
        if f == name and i + 1 < len(flags):
            val = flags[i + 1]
        elif f.startswith(name + "="):
            val = f.split("=", 1)[1]
    return val


def sim_system(name: str, flags: list[str], mapping: dict[str, str]) -> str | None:
    base = mapping.get(name)
    if base != "rotasched":
        return base
    if flag_value(flags, "--rota-policy") == "lvf":
        return "rotasched-lvf"
    if "--rota-keep-host-copy" in flags:
        return "rotasched-keep"
    if "--rota-write-through" in flags:
        return "rotasched-wt"
    return base


def resolve_trace(path: str, override: Path | None) -> Path:
    """The sweep ran on the GPU machine (e.g. .gpu/data/...): the repository's own copy of an
    Azure CSV of that name (eval/data/azure_llm_2023) comes first, then the path as written."""
    if override is not None:
        return override
    p = Path(path)
    for cand in (EVAL / "data" / "azure_llm_2023" / p.name, p, EVAL.parent / p):
        if cand.exists():
            return cand
    raise FileNotFoundError(f"trace {path} not found here (nor eval/data/azure_llm_2023/"
                            f"{p.name}): pass --trace")


def overlap_scheduled(doc: dict[str, Any], sysres: dict[str, Any], forced_off: bool) -> bool:
    """Whether the measured server ran SGLang's overlap scheduler (its default)."""
    flags = [*(doc.get("server_extra") or []), *(sysres.get("flags") or [])]
    return not forced_off and "--disable-overlap-schedule" not in flags


def model_of(doc: dict[str, Any]) -> str:
    return Path(doc.get("model_path") or "llama-3.1-8b").name


def compare_file(path: Path, args: argparse.Namespace, index: int) -> tuple[dict, list[dict]]:
    doc = json.loads(path.read_text())
    model = args.model or model_of(doc)
    extra = list(doc.get("server_extra") or [])
    tp = int(flag_value(extra, "--tp-size") or flag_value(extra, "--tp") or 1)
    gpu = args.gpu or gpu_slug(str(doc.get("gpu", "h200")), tp)
    link = args.link_gbps * 1e9 if args.link_gbps else None
    if args.builtin:
        base = resolve_gpu_model(link_bytes_per_s=link)
    else:
        base = resolve_gpu_model(model, gpu, models_dir=args.models_dir, link_bytes_per_s=link)
    trace = resolve_trace(doc["trace_path"], args.trace)
    rows = load_azure(trace)
    rates = doc["rates"]
    specs = [make_specs(rows, num=n, arrival=doc.get("arrival", "poisson"), rate=rate,
                        cv=doc.get("cv", 1.0), seed=doc.get("seed", 0),
                        max_prompt=doc.get("max_prompt"), max_output=doc.get("max_output"))
             for rate, n in zip(rates, doc["num_requests"], strict=True)]
    info = {"path": str(path), "trace": doc.get("trace"), "trace_csv": str(trace),
            "gpu": doc.get("gpu"), "model": model, "profile_gpu": gpu,
            "gpu_model": asdict(base), "rates": rates, "num_requests": doc["num_requests"],
            "arrival": doc.get("arrival"), "cv": doc.get("cv"), "seed": doc.get("seed"),
            "cap_tokens": doc["cap_tokens"], "ttft_slo": doc["ttft_slo"],
            "tbt_slo": doc["tbt_slo"], "server_extra": doc.get("server_extra") or [],
            "systems": {}}
    log(f"{path.name}: {doc.get('trace')} on {doc.get('gpu')}, model {model}, rates {rates}, "
        f"simulated on {'the built-in model' if base.profile is None else base.profile}")
    cache: dict[tuple, dict] = {}
    points = []
    for name, sysres in doc["systems"].items():
        flags = list(sysres.get("flags") or []) + list(doc.get("server_extra") or [])
        sim_name = sim_system(name, flags, args.mapping)
        mover = "direct" if flag_value(flags, "--rota-mover") == "direct" else "staging"
        host_gb = float(flag_value(flags, "--rota-host-kv-gb") or SERVER_HOST_KV_GB)
        info["systems"][name] = {"simulated_as": sim_name, "mover": mover, "host_kv_gb": host_gb,
                                 "status": sysres.get("status")}
        if sim_name is None:
            log(f"  {name}: no simulated counterpart (--map {name}=SYSTEM), left out")
            continue
        gpu_model = replace(base, mover=mover)
        host_tokens = max(HOST_PAGE, int(host_gb * 1e9) // gpu_model.bytes_per_token)
        for i, rate in enumerate(rates):
            measured = {k: (sysres.get(k) or [None] * len(rates))[i] for k in METRICS}
            if measured["ttft_attainment"] is None:
                continue
            key = (sim_name, mover, host_tokens, i)
            if key not in cache:
                t0 = time.monotonic()
                res = simulate(specs[i], sim_name, doc["cap_tokens"], gpu_model, doc["ttft_slo"],
                               doc["tbt_slo"], host_tokens, args.horizon,
                               overlap=overlap_scheduled(doc, sysres, args.no_overlap))
                cache[key] = {"summary": res["summary"], "stats": res["stats"],
                              "sim_seconds": res["sim_seconds"],
                              "wall_s": round(time.monotonic() - t0, 2)}
            sim = cache[key]
            simulated = {k: sim["summary"][k] for k in METRICS}
            pt = {"input": index, "trace": doc.get("trace"), "gpu": doc.get("gpu"),
                  "system": name, "simulated_as": sim_name, "rate": rate,
                  "measured": measured, "simulated": simulated,
                  "diff_points": {k: _points(simulated[k], measured[k]) for k in ATTAINMENTS},
                  "throughput_diff_pct": _pct(simulated["throughput_tok_s"],
                                              measured["throughput_tok_s"]),
                  "sim_stats": sim["stats"], "sim_seconds": sim["sim_seconds"]}
            points.append(pt)
            d = pt["diff_points"]
            log(f"  {name:>13} ({sim_name}) @ {rate:g} req/s: TTFT "
                f"{_fmt(measured['ttft_attainment'])} measured, "
                f"{_fmt(simulated['ttft_attainment'])} simulated ({_signed(d['ttft_attainment'])}"
                f"); TBT {_signed(d['tbt_attainment'])}; both {_signed(d['both_attainment'])}; "
                f"throughput {_signed(pt['throughput_diff_pct'], '%')}  [{sim['wall_s']}s]")
    return info, points


def _points(sim: float | None, meas: float | None) -> float | None:
    return None if sim is None or meas is None else round(100.0 * (sim - meas), 3)


def _pct(sim: float | None, meas: float | None) -> float | None:
    return None if not sim or not meas else round(100.0 * (sim - meas) / meas, 3)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:5.1f}%"


def _signed(x: float | None, unit: str = " pts") -> str:
    return "n/a" if x is None else f"{x:+.1f}{unit}"


def summarize_diffs(points: list[dict]) -> dict[str, Any]:
    def stats(vals: list[float]) -> dict[str, Any]:
        if not vals:
            return {"n": 0}
        return {"n": len(vals), "mean": round(statistics.mean(vals), 3),
                "mean_abs": round(statistics.mean(abs(v) for v in vals), 3),
                "max_abs": round(max(abs(v) for v in vals), 3)}

    def block(pts: list[dict]) -> dict[str, Any]:
        out = {k + "_points": stats([p["diff_points"][k] for p in pts
                                     if p["diff_points"][k] is not None]) for k in ATTAINMENTS}
        out["throughput_pct"] = stats([p["throughput_diff_pct"] for p in pts
                                       if p["throughput_diff_pct"] is not None])
        return out

    return {"all": block(points),
            "per_system": {s: block([p for p in points if p["system"] == s])
                           for s in dict.fromkeys(p["system"] for p in points)}}


def plot(points: list[dict], inputs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eval.plot_slo import STYLE

    markers = "oDs^vP*X"
    panels = [("ttft_attainment", "TTFT attainment (%)", 100),
              ("tbt_attainment", "TBT attainment (%)", 100),
              ("both_attainment", "both SLOs (%)", 100),
              ("throughput_tok_s", "output throughput (tok/s)", 1)]
    fig, axes = plt.subplots(1, 4, figsize=(20, 5.2))
    for ax, (key, title, scale) in zip(axes, panels, strict=True):
        vals = []
        for p in points:
            m, s = p["measured"][key], p["simulated"][key]
            if m is None or s is None:
                continue
            vals += [m * scale, s * scale]
            color = STYLE.get(p["system"], (None, "x"))[0]
            ax.scatter(m * scale, s * scale, color=color, marker=markers[p["input"] % 8], s=50,
                       edgecolors="black", linewidths=0.5, zorder=3)
            ax.annotate(f"{p['rate']:g}", (m * scale, s * scale), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        lo, hi = (min(vals), max(vals)) if vals else (0, 1)
        # traces of very different throughput side by side: log axes
        log_axes = scale == 1 and lo > 0 and hi > 5 * lo
        if log_axes:
            lo, hi = lo / 1.3, hi * 1.3
            ax.set_xscale("log")
            ax.set_yscale("log")
        else:
            pad = 0.05 * (hi - lo or 1)
            lo, hi = lo - pad, hi + pad
        if scale == 100:
            lo, hi = max(lo, 0), min(max(hi, 5), 102)
            for off in (-10, 10):
                ax.plot([lo, hi], [lo + off, hi + off], color="grey", lw=0.6, ls=":")
        ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, ls="--")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel("measured")
        ax.set_ylabel("simulated")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    handles = []
    for s in dict.fromkeys(p["system"] for p in points):
        sim = next(p["simulated_as"] for p in points if p["system"] == s)
        handles.append(plt.Line2D([], [], color=STYLE.get(s, (None, "x"))[0], marker="o",
                                  ls="", label=f"{s} (sim: {sim})"))
    for i, inp in enumerate(inputs):
        handles.append(plt.Line2D([], [], color="grey", marker=markers[i % 8], ls="",
                                  label=f"{Path(inp['path']).name} ({inp['gpu']})"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8)
    fig.suptitle("simulator (eval.sim_policy) against the GPU sweeps, same requests; "
                 "labels: req/s; dotted: ±10 points", fontsize=11)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, nargs="+", help="eval.sweep_slo result JSONs")
    ap.add_argument("--out", type=Path, required=True, help="comparison JSON")
    ap.add_argument("--png", type=Path, default=None, help="default: --out with .png")
    ap.add_argument("--model", default=None,
                    help="profile model (default: each file's model_path folder name)")
    ap.add_argument("--gpu", default=None, help="profile GPU (default: each file's gpu, slugged)")
    ap.add_argument("--builtin", action="store_true",
                    help="simulate on the built-in H200 Llama-3.1-8B model, not a profile")
    ap.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    ap.add_argument("--trace", type=Path, default=None,
                    help="the CSV to use instead of each file's trace_path")
    ap.add_argument("--link-gbps", type=float, default=None, help="host link GB/s each way")
    ap.add_argument("--horizon", type=float, default=600.0, help="simulated seconds at most")
    ap.add_argument("--no-overlap", action="store_true",
                    help="simulate every server without SGLang's overlap scheduler's lag "
                    "(default: as each measured server ran)")
    ap.add_argument("--map", nargs="+", default=[], metavar="MEASURED=SIMULATED",
                    help="map a measured system onto a simulated one (fcfs, rotasched, "
                         "rotasched-keep, rotasched-wt, rotasched-lvf), or =none to leave it out")
    args = ap.parse_args(argv)
    args.mapping = dict(DEFAULT_MAP)
    for m in args.map:
        k, sep, v = m.partition("=")
        if not sep or not k:
            ap.error(f"--map {m!r}: want MEASURED=SIMULATED")
        args.mapping[k] = None if v in ("", "none") else v
    args.png = args.png or args.out.with_suffix(".png")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    inputs, points = [], []
    for i, path in enumerate(args.results):
        try:
            info, pts = compare_file(path, args, i)
        except ProfileNotFound as e:
            print(f"sim_vs_measured: {path}: {e}; or pass --builtin", file=sys.stderr)
            return 2
        inputs.append(info)
        points += pts
    result = {"command": command_line("eval.sim_vs_measured", argv),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "note": ("simulated minus measured, same request specs; attainment differences in "
                       "percentage points, throughput in percent of the measured"),
              "mapping": args.mapping, "inputs": inputs, "points": points,
              "summary": summarize_diffs(points), "png": str(args.png)}
    write_json(args.out, result)
    plot(points, inputs, args.png)
    s = result["summary"]["all"]
    log(f"{len(points)} points: mean |simulated - measured| TTFT "
        f"{s['ttft_attainment_points'].get('mean_abs', 'n/a')} pts, TBT "
        f"{s['tbt_attainment_points'].get('mean_abs', 'n/a')} pts, both "
        f"{s['both_attainment_points'].get('mean_abs', 'n/a')} pts, throughput "
        f"{s['throughput_pct'].get('mean_abs', 'n/a')}% -> {args.out}, {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
