"""Several replicas behind a round-robin router, in the simulator (issue 16, on paper): does
rotasched keep its one-server TTFT gain when N servers share N times the traffic?

Round robin needs no feedback from the servers, so each replica is one independent simulation
of every N-th request of a stream at N x the rate (the requests keep their arrival times); the
replicas' records are scored together. Against one server at the per-replica rate, each
replica's arrivals are smoother (every N-th of a Poisson stream: gaps with CV 1/sqrt(N)), which
is what a round-robin router does to bursts. Load-aware routing (cache_aware, power_of_two)
needs the servers' state and is not modelled.

    python -m eval.sim_replicas --trace eval/data/azure_llm_2023/AzureLLMInferenceTrace_conv.csv \\
        --model llama-3.1-8b --gpu h100 --cap 60000 --rates 18 22 --replicas 2 \\
        --out eval/results/sim_replicas.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from eval.lib.gpu_model import resolve_gpu_model
from eval.lib.jsonfiles import command_line, source_commit, write_json
from eval.lib.metrics import summarize
from eval.lib.traces import RequestSpec, load_azure, make_specs
from eval.sim_policy import simulate

SYSTEMS = ("fcfs", "rotasched")
FIELDS = ("ttft_attainment", "tbt_attainment", "both_attainment", "throughput_tok_s")


def round_robin(specs: list[RequestSpec], replicas: int) -> list[list[RequestSpec]]:
    """What a round-robin router sends each replica: every ``replicas``-th request, in order."""
    return [specs[k::replicas] for k in range(replicas)]


def scored(runs: list[dict[str, Any]], ttft_slo: float, tbt_slo: float) -> dict[str, Any]:
    """The replicas' requests scored as one replay (throughput: all tokens over the span)."""
    records = [r for run in runs for r in run["records"]]
    s = summarize(records, ttft_slo, tbt_slo)
    return {k: s[k] for k in FIELDS} | {"n": s["n"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", type=Path, required=True)
    ap.add_argument("--model", default=None, help="a profiled model (default: built-in H200)")
    ap.add_argument("--gpu", default=None)
    ap.add_argument("--cap", type=int, required=True, help="device KV tokens per replica")
    ap.add_argument("--rates", type=float, nargs="+", required=True,
                    help="per-replica rates, req/s (the router gets replicas x each)")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--num", type=int, default=300, help="requests per replica")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ttft-slo", type=float, default=1.0)
    ap.add_argument("--tbt-slo", type=float, default=0.1)
    ap.add_argument("--host-kv-gb", type=float, default=64.0, help="per replica")
    ap.add_argument("--horizon", type=float, default=600.0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.replicas < 1 or args.num < 1 or args.cap <= 0 or min(args.rates) <= 0:
        ap.error("--replicas, --num, --cap and --rates must be positive")
    gpu = resolve_gpu_model(args.model, args.gpu)
    rows = load_azure(args.trace)
    host_tokens = int(args.host_kv_gb * 1e9) // gpu.bytes_per_token
    points = []
    for rate in args.rates:
        one = make_specs(rows, num=args.num, arrival="poisson", rate=rate, seed=args.seed)
        many = make_specs(rows, num=args.num * args.replicas, arrival="poisson",
                          rate=rate * args.replicas, seed=args.seed)
        point: dict[str, Any] = {"rate_per_replica": rate, "router_rate": rate * args.replicas}
        for system in SYSTEMS:
            def run(specs: list[RequestSpec], system: str = system) -> dict[str, Any]:
                return simulate(specs, system, args.cap, gpu, args.ttft_slo, args.tbt_slo,
                                host_tokens, args.horizon)

            point[system] = {
                "one_server": scored([run(one)], args.ttft_slo, args.tbt_slo),
                "round_robin": scored([run(s) for s in round_robin(many, args.replicas)],
                                      args.ttft_slo, args.tbt_slo)}
        for where in ("one_server", "round_robin"):
            point[f"ttft_gain_points_{where}"] = round(100 * (
                point["rotasched"][where]["ttft_attainment"]
                - point["fcfs"][where]["ttft_attainment"]), 2)
        points.append(point)
        print(f"{rate:g} req/s per replica: TTFT gain one server "
              f"{point['ttft_gain_points_one_server']:+.1f} points, {args.replicas} replicas "
              f"round robin {point['ttft_gain_points_round_robin']:+.1f}", flush=True)
    write_json(args.out, {
        "model": gpu.model_name, "gpu": f"modelled {gpu.gpu_name}", "replicas": args.replicas,
        "cap_tokens": args.cap, "num_per_replica": args.num, "ttft_slo": args.ttft_slo,
        "tbt_slo": args.tbt_slo, "points": points, "commit": source_commit(),
        "command": command_line("eval.sim_replicas", argv),
        "note": "simulated; round robin only (no server feedback), so each replica runs alone"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
