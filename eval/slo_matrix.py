"""The measured evaluation matrix (eval/results/slo_matrix.json and its figure) from GPU sweeps.

Each (system, rate) of an eval.sweep_slo result becomes part of one matrix point (see
eval.lib.matrix for the point and the goals); points already in ``--out`` with the same key
(model, trace, arrivals, SLOs, rate, GPU) are replaced, others kept, so sweeps from several
sittings on the GPU machine add up. Only measured GPU points belong here: the simulator's go
to eval/results/sim_matrix.json (eval.sim_matrix). With ``--sim-vs-measured`` (eval.sim_vs_measured
results over the same sweeps) each system of a point also carries what the calibrated simulator
predicted for it ("simulated"), so every GPU point shows simulated against measured.

    python -m eval.slo_matrix /tmp/out/slo_conv.json /tmp/out/slo_code.json \\
        --out eval/results/slo_matrix.json --plot eval/results/slo_matrix.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from eval.lib import matrix
from eval.lib.jsonfiles import write_json
from superinfer.policy.binding import BindingTimes


def simulated_index(docs: list[dict[str, Any]]) -> dict[tuple[str, float, str], dict]:
    """(sweep file name, rate, system) -> the simulator's attainments, from
    eval.sim_vs_measured results."""
    index = {}
    for doc in docs:
        for p in doc["points"]:
            source = Path(doc["inputs"][p["input"]]["path"]).name
            index[(source, float(p["rate"]), p["system"])] = p["simulated"]
    return index


def points_of(doc: dict[str, Any], source: str, model: str | None = None,
              commit: str | None = None,
              simulated: dict[tuple[str, float, str], dict] | None = None
              ) -> list[dict[str, Any]]:
    """One point per rate of an eval.sweep_slo result: every system that measured it."""
    model = model or Path(doc["model_path"]).name
    # the CSV's kind (a plan's workload name, e.g. azure_conv_gamma4, says more than the trace)
    trace = Path(doc.get("trace_path") or doc["trace"]).stem.rsplit("_", 1)[-1]
    points = []
    for i, rate in enumerate(doc["rates"]):
        systems, commits = {}, set()
        for name, res in doc["systems"].items():
            if res.get("ttft_attainment", [None])[i] is None:
                continue
            systems[name] = {k: res[k][i] for k in matrix.METRICS}
            binding = (res.get("binding") or [None] * len(doc["rates"]))[i]
            # classified again from the measured seconds: the rule of this checkout
            systems[name]["bound"] = BindingTimes.from_dict(binding).bound() if binding else None
            sim = (simulated or {}).get((Path(source).name, float(rate), name))
            if sim is not None:
                systems[name]["simulated"] = {k: sim.get(k) for k in matrix.METRICS}
            commits.add(res.get("commit") or doc.get("commit"))
        if not any(not matrix.is_baseline(n) for n in systems) or len(systems) < 2:
            continue  # a point needs ours and a baseline measured
        best = matrix.best_baseline(systems)
        point = {"model": model, "trace": trace, "arrival": doc["arrival"],
                 "cv": doc["cv"] if doc["arrival"] == "gamma" else 1.0,
                 "ttft_slo": doc["ttft_slo"], "tbt_slo": doc["tbt_slo"], "rate": rate,
                 "gpu": doc["gpu"],
                 "commit": commit or ", ".join(sorted(c for c in commits if c)) or None,
                 "cap_tokens": doc.get("cap_tokens"), "num_requests": doc["num_requests"][i],
                 "bound": systems[best]["bound"] if best else None,
                 "systems": systems, "source": source}
        point["checks"] = matrix.check_point(point)
        points.append(point)
    return points


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweeps", nargs="+", type=Path, help="eval.sweep_slo result JSONs")
    ap.add_argument("--model", help="model name (default: the sweep's --model-path folder)")
    ap.add_argument("--commit", help="commit the sweep ran at, if its JSON does not say")
    ap.add_argument("--sim-vs-measured", nargs="*", type=Path, default=[],
                    help="eval.sim_vs_measured results over these sweeps")
    ap.add_argument("--out", type=Path, default=Path("eval/results/slo_matrix.json"))
    ap.add_argument("--plot", type=Path, default=None, help="default: --out with .png")
    args = ap.parse_args(argv)
    simulated = simulated_index([json.loads(p.read_text()) for p in args.sim_vs_measured])
    new = [p for path in args.sweeps
           for p in points_of(json.loads(path.read_text()), str(path), args.model, args.commit,
                              simulated)]
    old = json.loads(args.out.read_text())["points"] if args.out.exists() else []
    points = matrix.merge(old, new)
    summary = matrix.summarize(points)
    write_json(args.out, {"points": points, "summary": summary,
                          "note": "measured on GPUs only; see eval/lib/matrix.py for the goals"})
    matrix.plot(points, args.plot or args.out.with_suffix(".png"),
                "rotasched against the best SGLang baseline, measured")
    print(f"{len(new)} points from {len(args.sweeps)} sweeps; {len(points)} in {args.out}: "
          f"never worse {summary['never_worse']}, big win {summary['big_win']}")
    for miss in summary["misses"]:
        print("  miss:", miss)


if __name__ == "__main__":
    main()
