"""The evaluation matrix: one point per (model, trace, arrivals, SLOs, rate, GPU), the systems
measured there, which resource bound, and the goals checked on it. eval.slo_matrix builds the
measured matrix from GPU sweeps, eval.sim_matrix the simulated one; both write
``{"points": [...], "summary": {...}}`` with points of this shape::

    {"model", "trace", "arrival", "cv", "ttft_slo", "tbt_slo", "rate", "gpu", "commit",
     "bound": "memory" | "compute" | "none" | None,   # the best baseline's measured signals
     "systems": {name: {"ttft_attainment", "tbt_attainment", "both_attainment",
                        "throughput_tok_s", "bound"}},   # attainments as fractions
     "checks": {...}}                                    # check_point's

Systems whose name starts with ``rotasched`` are ours; every other one is a baseline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

OURS = "rotasched"
METRICS = ("ttft_attainment", "tbt_attainment", "both_attainment", "throughput_tok_s")
KEY_FIELDS = ("model", "trace", "arrival", "cv", "ttft_slo", "tbt_slo", "rate", "gpu")
# The goals (issue 14): never worse than the best baseline, a big win where memory binds.
BOTH_TOLERANCE = 0.02
THROUGHPUT_FLOOR = 0.95
BIG_WIN_BELOW = 0.5  # the best baseline's TTFT attainment under which a big win is owed
BIG_WIN_POINTS = 0.5
MOE_MODELS = ("mixtral",)
MLA_MODELS = ("deepseek",)


def is_baseline(name: str) -> bool:
    return not name.startswith("rotasched")


def point_key(point: dict[str, Any]) -> tuple:
    return tuple(point[k] for k in KEY_FIELDS)


def best_baseline(systems: dict[str, dict[str, Any]], metric: str = "both_attainment"
                  ) -> str | None:
    """The baseline with the highest ``metric`` (ties: TTFT attainment, then name)."""
    names = [n for n in systems if is_baseline(n) and systems[n].get(metric) is not None]
    if not names:
        return None
    return max(names, key=lambda n: (systems[n][metric],
                                     systems[n].get("ttft_attainment") or 0.0, n))


def check_point(point: dict[str, Any], ours: str = OURS) -> dict[str, Any]:
    """The goals on one point. ``never_worse``: our both-SLO attainment is at least the best
    baseline's minus 2 points and our throughput at least 95% of the highest baseline
    throughput. ``big_win`` (None where it is not owed: memory must bind and every baseline
    keep under 50% within the TTFT SLO): our TTFT attainment is 50 points above the best."""
    systems = point["systems"]
    mine = systems.get(ours)
    best = best_baseline(systems)
    if mine is None or best is None or any(mine.get(k) is None for k in METRICS):
        return {"best_baseline": best, "never_worse": None, "big_win": None}
    theirs = systems[best]
    top_tput = max(s["throughput_tok_s"] for n, s in systems.items()
                   if is_baseline(n) and s.get("throughput_tok_s") is not None)
    top_ttft = max(s["ttft_attainment"] for n, s in systems.items()
                   if is_baseline(n) and s.get("ttft_attainment") is not None)
    both_diff = mine["both_attainment"] - theirs["both_attainment"]
    tput_ratio = mine["throughput_tok_s"] / top_tput if top_tput else None
    never_worse = (both_diff >= -BOTH_TOLERANCE - 1e-9
                   and (tput_ratio is None or tput_ratio >= THROUGHPUT_FLOOR))
    owed = point.get("bound") == "memory" and top_ttft < BIG_WIN_BELOW
    big_win = (mine["ttft_attainment"] >= top_ttft + BIG_WIN_POINTS - 1e-9) if owed else None
    return {"best_baseline": best, "both_points": round(100 * both_diff, 2),
            "ttft_points": round(100 * (mine["ttft_attainment"] - top_ttft), 2),
            "throughput_ratio": None if tput_ratio is None else round(tput_ratio, 4),
            "never_worse": never_worse, "big_win": big_win}


def summarize(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Goal counts, the misses, and what the matrix covers."""
    checked = [p for p in points if p["checks"].get("never_worse") is not None]
    owed = [p for p in checked if p["checks"].get("big_win") is not None]
    models = sorted({p["model"] for p in points})

    def label(p: dict[str, Any]) -> str:
        return (f"{p['model']} {p['trace']} {p['arrival']}"
                f"{'' if p['arrival'] != 'gamma' else ' cv' + format(p['cv'], 'g')} "
                f"TTFT {p['ttft_slo']:g}s TBT {1000 * p['tbt_slo']:g}ms {p['rate']:g} req/s")

    return {
        "points": len(points),
        "never_worse": f"{sum(p['checks']['never_worse'] for p in checked)}/{len(checked)}",
        "big_win": f"{sum(p['checks']['big_win'] for p in owed)}/{len(owed)}",
        "misses": [{"point": label(p), **{k: p["checks"].get(k) for k in
                                          ("both_points", "ttft_points", "throughput_ratio",
                                           "never_worse", "big_win")}}
                   for p in checked
                   if not p["checks"]["never_worse"] or p["checks"].get("big_win") is False],
        "coverage": {
            "models": models,
            "moe": any(m.startswith(MOE_MODELS) for m in models),
            "mla": any(m.startswith(MLA_MODELS) for m in models),
            "traces": sorted({p["trace"] for p in points}),
            "gamma_points": sum(p["arrival"] == "gamma" for p in points),
            "ttft_0.5_points": sum(p["ttft_slo"] == 0.5 for p in points),
            "bounds": {b: sum(p["bound"] == b for p in points)
                       for b in ("memory", "compute", "none")},
        },
    }


def merge(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old`` with every point of ``new`` added, replacing a point with the same key."""
    keys = {point_key(p) for p in new}
    kept = [p for p in old if point_key(p) not in keys]
    return sorted(kept + new, key=lambda p: tuple(str(v) for v in point_key(p)))


def plot(points: list[dict[str, Any]], out: Path, title: str) -> None:
    """Per point: our TTFT and both-SLO attainment minus the best baseline's (points), bars
    coloured by what bound; a red x where a goal was missed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [p for p in points if p["checks"].get("never_worse") is not None]
    if not shown:
        return
    colours = {"memory": "tab:blue", "compute": "tab:orange", "none": "tab:gray", None: "k"}
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.32 * len(shown) + 2), 7), sharex=True)
    xs = range(len(shown))
    for ax, key, what in ((axes[0], "ttft_points", "TTFT attainment"),
                          (axes[1], "both_points", "both-SLO attainment")):
        vals = [p["checks"][key] for p in shown]
        ax.bar(xs, vals, color=[colours.get(p["bound"], "k") for p in shown])
        ax.axhline(0, color="k", lw=0.8)
        ax.set_ylabel(f"{what}\nminus best baseline (points)")
        for x, p in zip(xs, shown, strict=True):
            missed = not p["checks"]["never_worse"] or p["checks"].get("big_win") is False
            if missed:
                ax.plot(x, 0, "rx", ms=9, mew=2)
    axes[1].axhline(-100 * BOTH_TOLERANCE, color="r", lw=0.8, ls=":")
    axes[1].set_xticks(list(xs))
    axes[1].set_xticklabels([f"{p['gpu'].removeprefix('modelled ')} {p['model']} {p['trace']} "
                             f"{'Poisson' if p['arrival'] == 'poisson' else p['arrival']}"
                             f"{' CV' + format(p['cv'], 'g') if p['arrival'] == 'gamma' else ''}"
                             f" {p['ttft_slo']:g}s/{1000 * p['tbt_slo']:g}ms {p['rate']:g}/s"
                             for p in shown], rotation=90, fontsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for b, c in colours.items() if b]
    axes[0].legend(handles, [f"{b} binds" if b != "none" else "nothing binds"
                             for b in colours if b], fontsize=8)
    axes[0].set_title(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
