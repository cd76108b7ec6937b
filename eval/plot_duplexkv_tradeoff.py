"""One picture of the DuplexKV trade-off on the H200, from the committed diag JSONs
(``eval.diagnostics.diag_interference``):

- left: for every rotation data path, the duplex bandwidth it sustained *while* the decode
  stand-in ran, against the decode step's slowdown. The issue's goal is the shaded box
  (>= 92 GB/s both ways, <= 5% slowdown).
- right: why. The decode step streams weights from HBM, so every byte a path moves through HBM
  slows it. Contiguous DMA one way at a time prices a GB/s read from HBM (d2h) and written to
  it (h2d); the line ``slowdown = a * read + b * write`` then predicts every other point from
  its traffic alone: staging moves each byte through HBM three times (gather read + write,
  DMA read; h2d mirrored), a copy engine path once. Points above the diagonal pay extra
  (kernels holding SMs); the staging path is over 5% from its traffic alone at 92 GB/s.

Writes a PNG and a JSON of the points (file and scenario each came from) and the fit.

    python -m eval.plot_duplexkv_tradeoff --out eval/results/duplexkv_tradeoff_h200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_DUPLEX_GBPS, GOAL_SLOWDOWN = 92.0, 0.05

# (diag file, scenario, label, family). The families are the data paths; "reference" is a
# contiguous pinned copy with no gather at all: the copy engines' ceiling, not a mover.
POINTS = [
    ("diag_pipeline_h200.json", "graph/dma_only", "contiguous DMA, no gather", "reference"),
    ("diag_small_chunks_h200.json", "graph/staging_mover", "staging mover (default), full rate",
     "staging"),
    ("diag_small_chunks_h200.json", "graph/staging_mover_capped_50pct", "staging mover, half rate",
     "staging"),
    ("diag_interference_h200.json", "graph/staging_mover_capped_25pct",
     "staging mover, quarter rate", "staging"),
    ("diag_pipeline_h200.json", "graph/pipe_c2048", "staging, 256 MiB chunks (graph)", "staging"),
    ("diag_pipeline_h200.json", "graph/pipe_c16", "staging, 2 MiB chunks (graph)", "staging"),
    ("diag_pipeline_h200.json", "graph/pipe_c16_l2", "staging, 2 MiB chunks + L2 persist",
     "staging + L2"),
    ("diag_pipeline_h200.json", "graph/pipe_c32_l2", "staging, 4 MiB chunks + L2 persist",
     "staging + L2"),
    ("diag_memcpy_streams_h200.json", "graph/memcpy_batch",
     "direct, 32 KiB pieces (16-token pages)", "direct"),
    ("diag_batch_pages_h200.json", "graph/memcpy_batch_page32",
     "direct, 64 KiB pieces (32-token pages)", "direct"),
    ("diag_batch_pages_h200.json", "graph/memcpy_batch_page64",
     "direct, 128 KiB pieces (64-token pages)", "direct"),
    ("diag_pages2d_h200.json", "graph/pages2d", "direct 2D, all layers of a 16-token page",
     "direct"),
]
COLORS = {"reference": "0.5", "staging": "tab:blue", "staging + L2": "tab:cyan",
          "direct": "tab:orange",
          "gather kernel only": "tab:red"}
# Only on the right panel: the one-way DMAs that price a GB/s of HBM read and write (the fit),
# and the staging path's gather kernel alone (no PCIe at all).
FIT_POINTS = {"read": ("diag_interference_h200.json", "graph/dma_d2h_only"),
              "write": ("diag_interference_h200.json", "graph/dma_h2d_only")}
GATHER_POINTS = [("diag_interference_h200.json", f"graph/gather_only_g{n}",
                  f"gather kernel, {n} programs",
                  "gather kernel only") for n in (8, 32, 132)]
# HBM (read, write) per payload byte of each lane, by family: a copy engine path reads (d2h) or
# writes (h2d) device memory once; staging adds a kernel pass over a device buffer (d2h: gather
# read + write, DMA read; h2d: DMA write, scatter read + write); the gather alone reads + writes.
TRAFFIC = {"copy": {"d2h": (1, 0), "h2d": (0, 1)}, "staged": {"d2h": (2, 1), "h2d": (1, 2)},
           "gather": {"*": (1, 1)}}
RIGHT_PANEL_MAX = 0.16
RIGHT_PANEL_LABELS = {"staging mover (default), full rate",
                      "direct, 128 KiB pieces (64-token pages)",
                      "gather kernel, 8 programs", "staging, 2 MiB chunks + L2 persist"}
FAMILY_TRAFFIC = {"reference": "copy", "direct": "copy", "staging": "staged",
                  "staging + L2": "staged",
                  "gather kernel only": "gather"}


def collect(results: Path, specs: list[tuple[str, str, str, str]] = POINTS) -> list[dict]:
    """The points that exist in the committed JSONs; a missing file or scenario is reported."""
    points = []
    for file, scenario, label, family in specs:
        path = results / file
        if not path.exists():
            print(f"skip {label}: no {path}")
            continue
        doc = json.loads(path.read_text())
        r = doc["scenarios"].get(scenario, {})
        if "slowdown" not in r or r.get("gbps") is None:
            print(f"skip {label}: {file} has no measured {scenario}")
            continue
        covered = r.get("windows_covered")
        points.append({"label": label, "family": family, "file": file, "scenario": scenario,
                       "duplex_gbps_under_decode": r["gbps"],
                       "duplex_gbps_alone": r.get("load_alone_gbps"),
                       "decode_slowdown": r["slowdown"],
                       "windows_covered": covered, "trials": r.get("trials"),
                       "date": doc.get("date"),
                       "hbm_read_write_gbps": hbm_traffic(family, r),
                       "meets_goal": (r["gbps"] >= GOAL_DUPLEX_GBPS
                                      and r["slowdown"] <= GOAL_SLOWDOWN)})
    return points


def hbm_traffic(family: str, scenario: dict) -> tuple[float, float] | None:
    """GB/s read from and written to HBM by the load, from its lanes' payload rates; None when
    the scenario has no per-lane rates (the capped runs)."""
    lanes, per_byte = scenario.get("lane_gbps"), TRAFFIC[FAMILY_TRAFFIC[family]]
    if not lanes or any(v is None for v in lanes.values()):
        return None
    read = write = 0.0
    for name, gbps in lanes.items():
        r, w = per_byte.get("*") or per_byte[name.rstrip("0123456789")]
        read, write = read + r * gbps, write + w * gbps
    return read, write


def fit_hbm_cost(results: Path) -> dict:
    """Slowdown per GB/s read from HBM and per GB/s written, from one-way contiguous DMAs."""
    fit = {}
    for kind, (file, scenario) in FIT_POINTS.items():
        r = json.loads((results / file).read_text())["scenarios"][scenario]
        fit[f"per_gbps_{kind}"] = r["slowdown"] / r["gbps"]
        fit[f"{kind}_from"] = f"{file}:{scenario}"
    a, b = fit["per_gbps_read"], fit["per_gbps_write"]
    # What the traffic alone costs at the goal's duplex rate (half each way), and the most
    # duplex bandwidth each family can have under the goal's slowdown from its traffic alone.
    for name, kind in (("copy_engine", "copy"), ("staging", "staged")):
        (r1, w1), (r2, w2) = TRAFFIC[kind]["d2h"], TRAFFIC[kind]["h2d"]
        per_duplex_gbps = (a * (r1 + r2) + b * (w1 + w2)) / 2
        fit[f"{name}_predicted_at_goal"] = per_duplex_gbps * GOAL_DUPLEX_GBPS
        fit[f"{name}_max_duplex_gbps_under_goal"] = GOAL_SLOWDOWN / per_duplex_gbps
    return fit


def predicted(point: dict, fit: dict) -> float | None:
    traffic = point["hbm_read_write_gbps"]
    if traffic is None:
        return None
    return fit["per_gbps_read"] * traffic[0] + fit["per_gbps_write"] * traffic[1]


def plot(points: list[dict], gather: list[dict], fit: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(17, 6.4), gridspec_kw={"width_ratios": [1.15, 1]})
    ax.axvspan(GOAL_DUPLEX_GBPS, 110, ymin=0, ymax=GOAL_SLOWDOWN * 100 / 14, color="tab:green",
               alpha=0.12, label="goal: ≥ 92 GB/s, ≤ 5%")
    for fam, color in COLORS.items():
        for p in (q for q in points if q["family"] == fam):
            covered = p["windows_covered"]
            partial = covered is not None and covered < (p["trials"] or 0) / 2
            ax.scatter(p["duplex_gbps_under_decode"], 100 * p["decode_slowdown"], s=60,
                       color=color, facecolors="none" if partial else color, zorder=3)
            ax.annotate(p["label"], (p["duplex_gbps_under_decode"], 100 * p["decode_slowdown"]),
                        xytext=(6, 3), textcoords="offset points", fontsize=7.5)
        if any(q["family"] == fam for q in points):
            ax.scatter([], [], color=color, label=fam)
    ax.set_xlim(0, 110)
    ax.set_ylim(0, 14)
    ax.set_xlabel("both directions at once, GB/s, while the decode step runs")
    ax.set_ylabel("decode step slowdown, % (CUDA-graph replay, Llama-3.1-8B shape)")
    ax.set_title("bandwidth against decode interference\n"
                 "hollow: the load ran dry in most timed windows; "
                 "zero copy (+160–230%) is off the chart",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)

    lim, off_chart = 100 * RIGHT_PANEL_MAX, []
    for p in points + gather:
        x = predicted(p, fit)
        if x is None:
            continue
        if max(x, p["decode_slowdown"]) > RIGHT_PANEL_MAX:
            off_chart.append(f"{p['label']}: {100 * x:.0f}% predicted, "
                             f"{100 * p['decode_slowdown']:.0f}% measured")
            continue
        bx.scatter(100 * x, 100 * p["decode_slowdown"], s=50, color=COLORS[p["family"]], zorder=3)
        if p["label"] in RIGHT_PANEL_LABELS:
            bx.annotate(p["label"], (100 * x, 100 * p["decode_slowdown"]), xytext=(6, 6),
                        textcoords="offset points", fontsize=7.5, color=COLORS[p["family"]])
    for fam, color in COLORS.items():
        if any(q["family"] == fam for q in points + gather):
            bx.scatter([], [], color=color, label=fam)
    bx.plot([0, lim], [0, lim], color="0.4", lw=0.8, label="traffic explains it all")
    bx.axhline(100 * GOAL_SLOWDOWN, color="tab:green", lw=0.8, ls="--", label="goal: ≤ 5%")
    for name, color in (("staging", "tab:blue"), ("copy_engine", "tab:orange")):
        x = 100 * fit[f"{name}_predicted_at_goal"]
        bx.axvline(x, color=color, lw=0.8, ls=":")
        bx.annotate(f"{name.replace('_', ' ')} path at 92 GB/s: {x:.1f}% from traffic alone",
                    (x, lim * 0.98), rotation=90, fontsize=7.5, va="top", ha="right", color=color)
    if off_chart:
        bx.text(0.98, 0.98, "off the chart:\n" + "\n".join(off_chart), transform=bx.transAxes,
                fontsize=7, ha="right", va="top")
    bx.set_xlim(0, lim)
    bx.set_ylim(0, lim)
    bx.set_xlabel(f"slowdown predicted from HBM traffic alone, %  "
                  f"({100 * fit['per_gbps_read']:.4f}%/GB/s read, "
                  f"{100 * fit['per_gbps_write']:.4f}%/GB/s write)")
    bx.set_ylabel("measured slowdown, %")
    bx.set_title("why: the decode step is HBM-bound; staging moves each byte through HBM 3 times\n"
                 "(priced by one-way contiguous DMAs; "
                 "above the diagonal: extra cost of kernels holding SMs)",
                 fontsize=10)
    bx.grid(alpha=0.3)
    bx.legend(loc="lower right", fontsize=8, ncol=2)
    fig.suptitle("DuplexKV on one H200 (PCIe Gen5), Llama-3.1-8B KV", fontsize=11)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of the diag JSONs")
    ap.add_argument("--out", type=Path, default=RESULTS / "duplexkv_tradeoff_h200",
                    help="output stem: writes STEM.png and STEM.json")
    args = ap.parse_args()
    points = collect(args.results)
    if not points:
        raise SystemExit(f"no measured points under {args.results}")
    gather = collect(args.results, GATHER_POINTS)
    fit = fit_hbm_cost(args.results)
    for p in points + gather:
        p["slowdown_predicted_from_hbm_traffic"] = predicted(p, fit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"goal": {"duplex_gbps": GOAL_DUPLEX_GBPS, "decode_slowdown": GOAL_SLOWDOWN},
         "hbm_traffic_fit": fit, "points": points, "gather_kernel_points": gather},
         indent=2) + "\n")
    plot(points, gather, fit, args.out.with_suffix(".png"))
    print(f"HBM traffic alone at {GOAL_DUPLEX_GBPS:.0f} GB/s duplex: staging "
          f"{fit['staging_predicted_at_goal']:+.1%}, copy engine path "
          f"{fit['copy_engine_predicted_at_goal']:+.1%}; most duplex under {GOAL_SLOWDOWN:.0%}: "
          f"staging {fit['staging_max_duplex_gbps_under_goal']:.0f} GB/s")


if __name__ == "__main__":
    main()
