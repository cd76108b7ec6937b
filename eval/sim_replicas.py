"""Several replicas behind a router, in the simulator (issue 16, on paper): does rotasched keep
its one-server TTFT gain when N servers share N times the traffic, and does the load signal
a router reads need to count rotated-out requests?

Round robin needs no feedback from the servers, so each replica is one independent simulation
of every N-th request of a stream at N x the rate (the requests keep their arrival times); the
replicas' records are scored together. Against one server at the per-replica rate, each
replica's arrivals are smoother (every N-th of a Poisson stream: gaps with CV 1/sqrt(N)), which
is what a round-robin router does to bursts.

``power_of_two`` (the SGLang router's load-aware policy) runs the replicas side by side: at each
arrival every replica is run up to it, two are drawn at random and the request goes to the one
whose load (SGLang's ``num_total_tokens``: KV in use plus queued prompts) is lower. Under
rotasched it runs twice: with the load as SGLang reports it (a rotated-out request's KV is in
neither count) and with SuperInfer's load hook, which adds it back
(``adapters/sglang/load_signal.py``).

    python -m eval.sim_replicas --trace eval/data/azure_llm_2023/AzureLLMInferenceTrace_conv.csv \\
        --model llama-3.1-8b --gpu h100 --cap 60000 --rates 18 22 --replicas 2 \\
        --out eval/results/sim_replicas.json
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

from eval.lib.gpu_model import resolve_gpu_model
from eval.lib.jsonfiles import command_line, source_commit, write_json
from eval.lib.metrics import summarize
from eval.lib.traces import RequestSpec, load_azure, make_specs
from eval.sim_policy import Simulator, simulate

SYSTEMS = ("fcfs", "rotasched")
FIELDS = ("ttft_attainment", "tbt_attainment", "both_attainment", "throughput_tok_s")


def round_robin(specs: list[RequestSpec], replicas: int) -> list[list[RequestSpec]]:
    """What a round-robin router sends each replica: every ``replicas``-th request, in order."""
    return [specs[k::replicas] for k in range(replicas)]


def power_of_two(specs: list[RequestSpec], system: str, replicas: int, count_rotated_out: bool,
                 seed: int, **sim: Any) -> list[dict[str, Any]]:
    """Route ``specs`` (in arrival order) across ``replicas`` simulated servers by the power of
    two choices on their load, running them side by side; each replica's records."""
    rng = random.Random(seed)
    servers = [Simulator([], system, **sim) for _ in range(replicas)]
    for spec in specs:
        for server in servers:
            server.run_until(spec.arrival)
        pair = rng.sample(range(replicas), min(2, replicas))
        target = min(pair, key=lambda k: servers[k].load_tokens(count_rotated_out))
        servers[target].add_request(spec)
    for server in servers:
        server.run()
    return [{"records": server.records()} for server in servers]


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
    sim = {"cap": args.cap, "gpu": gpu, "ttft_slo": args.ttft_slo, "tbt_slo": args.tbt_slo,
           "host_tokens": host_tokens, "horizon_s": args.horizon}

    def score(runs: list[dict[str, Any]]) -> dict[str, Any]:
        return scored(runs, args.ttft_slo, args.tbt_slo)

    points = []
    for rate in args.rates:
        one = make_specs(rows, num=args.num, arrival="poisson", rate=rate, seed=args.seed)
        many = make_specs(rows, num=args.num * args.replicas, arrival="poisson",
                          rate=rate * args.replicas, seed=args.seed)
        point: dict[str, Any] = {"rate_per_replica": rate, "router_rate": rate * args.replicas}
        for system in SYSTEMS:
            point[system] = {
                "one_server": score([simulate(one, system, **sim)]),
                "round_robin": score([simulate(s, system, **sim)
                                      for s in round_robin(many, args.replicas)]),
                "power_of_two": score(power_of_two(many, system, args.replicas, True, args.seed,
                                                   **sim))}
            if system != "fcfs":  # fcfs rotates nothing: the hook changes no figure of it
                point[system]["power_of_two_sglang_load"] = score(
                    power_of_two(many, system, args.replicas, False, args.seed, **sim))
        for where, baseline in (("one_server", "one_server"), ("round_robin", "round_robin"),
                                ("power_of_two", "power_of_two"),
                                ("power_of_two_sglang_load", "power_of_two")):
            point[f"ttft_gain_points_{where}"] = round(100 * (
                point["rotasched"][where]["ttft_attainment"]
                - point["fcfs"][baseline]["ttft_attainment"]), 2)
        points.append(point)
        print(f"{rate:g} req/s per replica: TTFT gain one server "
              f"{point['ttft_gain_points_one_server']:+.1f} points, {args.replicas} replicas "
              f"round robin {point['ttft_gain_points_round_robin']:+.1f}, power of two "
              f"{point['ttft_gain_points_power_of_two']:+.1f} (SGLang's own load: "
              f"{point['ttft_gain_points_power_of_two_sglang_load']:+.1f})", flush=True)
    write_json(args.out, {
        "model": gpu.model_name, "gpu": f"modelled {gpu.gpu_name}", "replicas": args.replicas,
        "cap_tokens": args.cap, "num_per_replica": args.num, "ttft_slo": args.ttft_slo,
        "tbt_slo": args.tbt_slo, "points": points, "commit": source_commit(),
        "command": command_line("eval.sim_replicas", argv),
        "note": ("simulated; round robin: each replica alone; power_of_two: the replicas side by "
                 "side, two drawn per request, the lower num_total_tokens wins (with the "
                 "rotated-out KV: SuperInfer's load hook; _sglang_load: without it)")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
