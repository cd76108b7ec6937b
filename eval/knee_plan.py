"""A sweep plan for one profiled model at rates around its own knee, from the calibrated simulator.

The matrix's GPU points run "three rates around each model's knee", and a model's knee is not
known before it is profiled. This finds it the way eval.sim_matrix does (fcfs, Poisson, TTFT 1 s
/ TBT 100 ms, the same KV memory in GB for every model, so the cap in tokens follows from the
model's bytes per token), but by default where fcfs starts to miss either SLO, not the TTFT SLO
alone (``--knee-metric``: a model whose decode binds first loses TBT long before TTFT), and
writes an eval.sweep_plan plan: each trace at knee x ``--factors``
(rounded to 0.5 req/s), the named systems back to back in one queue. The simulator's JSON (knees
and its predictions at those rates) goes to ``--sim-out``; with ``--resume`` the knees already
there are kept, so a second trace costs no second search. Runs where the profile is: on the GPU
machine right after eval.profile_model, so no idle gap returns the machine.

    python -m eval.knee_plan --model deepseek-v2-lite --gpu h100 --traces conv \\
        --models-dir /tmp/models --sim-out /tmp/knees.json --out /tmp/plan.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from eval import sim_matrix
from eval.lib.gpu_model import MODELS_DIR
from eval.lib.jsonfiles import write_json

SERVER_EXTRA = ["--cuda-graph-max-bs", "128", "--rota-host-kv-gb", "64"]
FACTORS = (1.0, 1.4, 1.8)


def rates_at(knee: float, factors: list[float]) -> list[float]:
    """knee x each factor, to 0.5 req/s, distinct and ascending."""
    return sorted({max(0.5, round(knee * f * 2) / 2) for f in factors})


def build_plan(model: str, gpu: str, knees: dict[str, Any], traces: list[str],
               factors: list[float], systems: list[str], server_extra: list[str],
               num: int) -> dict[str, Any]:
    workloads: dict[str, Any] = {}
    used: dict[str, Any] = {}
    for trace in traces:
        key = next((k for k in knees if k.startswith(f"{model} {trace} ")), None)
        rec = knees.get(key) if key else None
        if not rec or not rec.get("knee"):
            raise SystemExit(f"no simulated knee for {model} {trace}: "
                             f"{(rec or {}).get('error', 'not found')}")
        used[key] = {k: rec.get(k) for k in ("knee", "cap_tokens", "gpu_model", "probes")}
        workloads[f"{model}_{trace}"] = {
            "trace": str(sim_matrix.TRACE_DIR.relative_to(sim_matrix.TRACE_DIR.parents[2])
                         / f"AzureLLMInferenceTrace_{trace}.csv"),
            "rates": rates_at(rec["knee"], factors), "cap": rec["cap_tokens"], "flags": []}
    return {
        "gpu": gpu,
        "note": (f"Issue 14 matrix, {model} on one {gpu}: {', '.join(traces)} at "
                 f"{'/'.join(f'{f:g}' for f in factors)} x the simulated knee (eval.knee_plan), "
                 f"{' and '.join(systems)} back to back."),
        "knees": used,
        "common": ["--num", str(num), "--tail", "20", "--ttft-slo", "1.0", "--tbt-slo", "0.1",
                   "--seed", "0", "--model-path", f"eval/models/{model}"],
        "server_extra": server_extra,
        "workloads": workloads,
        "queues": [[f"{w}:{s}" for w in workloads for s in systems]],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--gpu", required=True, help="the profile's GPU slug (h100, h200, ...)")
    ap.add_argument("--traces", nargs="+", default=["conv"], choices=sim_matrix.TRACES)
    ap.add_argument("--factors", nargs="+", type=float, default=list(FACTORS),
                    help="rates as multiples of the knee")
    ap.add_argument("--systems", nargs="+", default=["lpm", "rotasched"])
    ap.add_argument("--num", type=int, default=300, help="requests per rate")
    ap.add_argument("--kv-gb", type=float, default=sim_matrix.DEFAULT_KV_GB,
                    help="device KV memory, GB (default: the sim matrix's, 60,000 Llama-3.1-8B "
                         "tokens); lower it where the model leaves less on the card")
    ap.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    ap.add_argument("--sim-out", type=Path, required=True, help="eval.sim_matrix's JSON")
    ap.add_argument("--resume", action="store_true", help="keep knees already in --sim-out")
    ap.add_argument("--knee-metric", choices=sorted(sim_matrix.KNEE_METRICS), default="both",
                    help="both (default): where fcfs keeps under 90%% within both SLOs, so the "
                         "points sit where the baseline starts to miss either; ttft: the sim "
                         "matrix's knee")
    ap.add_argument("--server-extra", nargs=argparse.REMAINDER, default=SERVER_EXTRA)
    ap.add_argument("--out", type=Path, required=True, help="the plan")
    args = ap.parse_args(argv)
    if min(args.factors) <= 0 or args.kv_gb <= 0:
        ap.error("--factors and --kv-gb must be positive")
    sim_argv = ["--gpu", args.gpu, "--models", args.model, "--models-dir", str(args.models_dir),
                "--traces", *args.traces, "--arrivals", "poisson", "--ttft-slos", "1",
                "--tbt-slos", "0.1", "--rate-factors", *map(str, args.factors),
                "--num", str(args.num), "--kv-gb", str(args.kv_gb), "--out", str(args.sim_out),
                "--knee-metric", args.knee_metric]
    sim_matrix.main(sim_argv + (["--resume"] if args.resume else []))
    knees = json.loads(args.sim_out.read_text())["knees"]
    plan = build_plan(args.model, args.gpu, knees, args.traces, args.factors, args.systems,
                      args.server_extra, args.num)
    write_json(args.out, plan)
    for name, wl in plan["workloads"].items():
        print(f"{name}: rates {wl['rates']} req/s, cap {wl['cap']} tokens -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
