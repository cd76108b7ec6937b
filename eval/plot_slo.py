"""PNGs from an eval.sweep_slo (or eval.sim_policy) result: attainment vs rate, throughput vs
rate, TTFT CDF.

    python -m eval.plot_slo eval/results/slo_h200_azure_conv.json   # PNGs beside the JSON
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

# Fixed colours and markers per system, so every figure reads the same way.
STYLE = {
    "fcfs": ("tab:blue", "o"),
    "lpm": ("tab:orange", "s"),
    "hicache": ("tab:green", "^"),
    "rotasched-lvf": ("tab:purple", "v"),
    "rotasched": ("tab:red", "D"),
    "rotasched-keep": ("tab:brown", "P"),
}


def _style(name: str) -> dict[str, Any]:
    color, marker = STYLE.get(name, (None, "x"))
    lw = 2.6 if name == "rotasched" else 1.6  # ours stands out
    return {"color": color, "marker": marker, "linewidth": lw, "label": name}


def _series(rates: list[float], values: list[float | None]) -> tuple[list[float], list[float]]:
    pts = [(r, v) for r, v in zip(rates, values, strict=False) if v is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _subtitle(res: dict[str, Any]) -> str:
    counts = sorted(set(res["num_requests"]))
    n = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return (f"{res['trace']} on {res['gpu'].upper()}, {n} requests per rate, "
            f"{res['arrival']} arrivals, KV cap {res['cap_tokens']:,} tokens, "
            f"TTFT SLO {res['ttft_slo']:g} s, TBT SLO {1000 * res['tbt_slo']:g} ms")


def plot_attainment(res: dict[str, Any], out: Path) -> None:
    rates = res["rates"]
    panels = [("ttft_attainment", f"TTFT ≤ {res['ttft_slo']:g} s"),
              ("tbt_attainment", f"every token on a {1000 * res['tbt_slo']:g} ms pace"),
              ("both_attainment", "both")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), sharey=True)
    for ax, (key, title) in zip(axes, panels, strict=False):
        for name, sysres in res["systems"].items():
            xs, ys = _series(rates, sysres.get(key, []))
            if xs:
                ax.plot(xs, [100 * y for y in ys], **_style(name))
        ax.axhline(50, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"SLO attainment: {title}")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("requests meeting the SLO (%)")
    axes[0].legend(loc="lower left")
    fig.suptitle(_subtitle(res))
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)


def plot_throughput(res: dict[str, Any], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.6))
    for name, sysres in res["systems"].items():
        xs, ys = _series(res["rates"], sysres.get("throughput_tok_s", []))
        if xs:
            ax.plot(xs, ys, **_style(name))
    ax.set_title("Output throughput")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("output tokens/s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.suptitle(_subtitle(res), fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)


def _ttfts(path: Path) -> np.ndarray:
    """TTFTs of a raw JSONL file; requests without a first token count as infinitely late."""
    vals = []
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                ok = r["token_times"] and r["error"] is None
                vals.append(r["token_times"][0] - r["send"] if ok else np.inf)
    return np.sort(np.asarray(vals, dtype=float))


def _resolve(raw_path: str, json_path: Path) -> Path | None:
    for p in (Path(raw_path), json_path.parent / raw_path, json_path.parent / Path(raw_path).name):
        if p.exists():
            return p
    return None


def plot_ttft_cdf(res: dict[str, Any], json_path: Path, out: Path) -> bool:
    """TTFT CDF at the highest rate with raw files here (systems without one there are left
    out); False if no raw file is found."""
    rates = res["rates"]
    fig, ax = plt.subplots(figsize=(6.5, 4.6))
    plotted_rate = None
    for i in reversed(range(len(rates))):
        files = {n: _resolve(s["raw"][i]["path"], json_path)
                 for n, s in res["systems"].items() if s.get("raw") and s["raw"][i]}
        files = {n: p for n, p in files.items() if p is not None}
        if files:
            plotted_rate = rates[i]
            break
    if plotted_rate is None:
        plt.close(fig)
        return False
    for name, path in files.items():
        t = _ttfts(path)
        frac = np.arange(1, len(t) + 1) / len(t)
        finite = np.isfinite(t)
        ax.step(t[finite], 100 * frac[finite], where="post", **_style(name) | {"marker": None})
    ax.axvline(res["ttft_slo"], color="grey", linestyle=":", linewidth=1.2,
               label=f"TTFT SLO ({res['ttft_slo']:g} s)")
    ax.set_xscale("log")
    ax.set_title(f"TTFT distribution at {plotted_rate:g} req/s")
    ax.set_xlabel("time to first token (s, log scale)")
    ax.set_ylabel("requests with TTFT ≤ x (%)\n(failed requests never arrive)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right")
    fig.suptitle(_subtitle(res), fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("result", type=Path, help="slo_<gpu>_<trace>.json from sweep_slo.py")
    ap.add_argument("--out-dir", type=Path, default=None, help="default: beside the JSON")
    args = ap.parse_args()
    res = json.loads(args.result.read_text())
    out_dir = args.out_dir or args.result.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.result.stem
    made = [out_dir / f"{stem}_attainment.png", out_dir / f"{stem}_throughput.png"]
    plot_attainment(res, made[0])
    plot_throughput(res, made[1])
    cdf = out_dir / f"{stem}_ttft_cdf.png"
    if plot_ttft_cdf(res, args.result, cdf):
        made.append(cdf)
    else:
        print("no raw files found: TTFT CDF skipped")
    print("\n".join(str(p) for p in made))


if __name__ == "__main__":
    main()
