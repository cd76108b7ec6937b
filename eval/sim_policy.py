"""Replay a trace through the RotaSched policy (or SGLang's fcfs rule) on a simulated GPU.

Why: device time is scarce, and the policy's failures on the H200 were feedback loops (victims
picked again every step, prefill chunks shrinking to 256 tokens, prefill storms once every
stream was behind) that a cheap replay can show before a GPU run. This is not SGLang: it
mirrors the parts of its scheduler that decide who runs (PrefillAdder's memory rule, chunked
prefill, decode retraction, new_token_ratio decay) and feeds the real policy and cost model
the observations the adapter would. It runs one batch at a time (no overlap scheduling) and
moves KV over a link with a fixed rate per direction. Figures are model estimates only.

    python -m eval.sim_policy \\
        --trace ../shared/data/azure_llm_2023/AzureLLMInferenceTrace_conv.csv \\
        --cap 60000 --rates 14 18 22 --num 300 --out eval/results/sim_conv.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from eval.lib.jsonfiles import command_line, write_jsonl
from eval.lib.metrics import summarize
from eval.lib.traces import RequestSpec, load_azure, make_specs
from superinfer.config import RotaConfig
from superinfer.policy import Capacity, CostModel, Phase, create_policy, deadlines
from superinfer.policy.table import CLIP_NEW_TOKENS

# --rota-keep-host-copy, --rota-write-through
SYSTEMS = ("fcfs", "rotasched", "rotasched-keep", "rotasched-wt")
HOST_PAGE = 16  # the host tier's page on the staging path: a kept copy is whole pages


# What moving KV costs a decode step (eval/plot_duplexkv_tradeoff.py, H200): every GB/s read
# from HBM 0.0153%, written 0.0495% (priced by one-way contiguous DMAs); staging passes each byte
# through HBM three times, the direct path once; on top, what each path's measured full-duplex
# slowdown has beyond its traffic (staging 11.6% measured, direct 3.7%): its kernels' SM time.
HBM_COST_PER_GBPS = (0.000153, 0.000495)  # (read, write)
HBM_PASSES = {"staging": ((2, 1), (1, 2)), "direct": ((1, 0), (0, 1))}  # (read, write): d2h, h2d
EXTRA_BEYOND_TRAFFIC = {"staging": 0.019, "direct": 0.0045}  # both directions at full rate
MOVERS = tuple(HBM_PASSES)


@dataclass(frozen=True)
class GpuModel:
    """Costs of one Llama-3.1-8B-shaped forward on an H200 (../shared/gpu/README.md: prefill
    ~42k tokens/s in 8k chunks, decode ~7.5k tokens/s at 64 requests; PCIe ~50 GB/s each way)
    and what a decode step pays while KV moves one or both ways on ``mover``'s data path."""

    prefill_overhead_s: float = 0.012
    prefill_s_per_token: float = 24e-6
    decode_base_s: float = 0.005
    decode_s_per_req: float = 3e-5
    decode_s_per_kv_token: float = 2.7e-8
    link_bytes_per_s: float = 50e9
    bytes_per_token: int = 131072
    mover: str = "staging"
    max_prefill_tokens: int = 16384
    chunked_prefill_size: int = 8192

    def prefill_s(self, tokens: int) -> float:
        return self.prefill_overhead_s + tokens * self.prefill_s_per_token

    def decode_s(self, batch: int, kv_tokens: int, d2h: bool = False, h2d: bool = False) -> float:
        step = (self.decode_base_s + batch * self.decode_s_per_req
                + kv_tokens * self.decode_s_per_kv_token)
        return step * (1 + self.copy_slowdown(d2h, h2d))

    def copy_slowdown(self, d2h: bool, h2d: bool) -> float:
        """Decode-step slowdown while the link runs full rate in the directions given."""
        gbps = self.link_bytes_per_s / 1e9
        cost = 0.0
        for active, (reads, writes) in zip((d2h, h2d), HBM_PASSES[self.mover], strict=False):
            if active:
                cost += gbps * (reads * HBM_COST_PER_GBPS[0] + writes * HBM_COST_PER_GBPS[1])
                cost += EXTRA_BEYOND_TRAFFIC[self.mover] / 2
        return cost


@dataclass
class SimReq:
    spec: RequestSpec
    rid: str
    prefilled: int = 0  # tokens of (prompt + recomputed output) with KV on the device
    kv: int = 0  # device KV tokens held
    token_times: list[float] = field(default_factory=list)
    kv_moving: int = 0  # tokens of the copy in flight, and how long it takes from its submission
    copy_s: float = 0.0
    host: int = 0  # host tokens held: the whole KV while away, a kept copy while running
    epoch: int = 0  # bumped when the device KV leaves (rotate-out, retraction)
    # write-through in flight: (tokens, copy size, epoch) at start
    wt: tuple[int, int, int] = (0, 0, 0)

    @property
    def out(self) -> int:
        return len(self.token_times)

    def to_prefill(self) -> int:
        """Tokens a prefill must still compute (a retracted request recomputes its output)."""
        return self.spec.prompt_len + max(self.out - 1, 0) - self.prefilled


class NewTokenRatio:
    """SGLang's estimate of how much of its remaining output a running request will use:
    starts cautious, decays every decode step, jumps back after a retraction."""

    def __init__(self, init: float = 0.7, floor: float = 0.1, decay_steps: int = 600) -> None:
        self.init, self.floor, self.step = init, floor, (init - floor) / decay_steps
        self.value = init

    def decode(self) -> None:
        self.value = max(self.floor, self.value - self.step)

    def retracted(self) -> None:
        self.value = self.init


class Simulator:
    def __init__(self, specs: list[RequestSpec], system: str, cap: int, gpu: GpuModel,
                 ttft_slo: float, tbt_slo: float, host_tokens: int, horizon_s: float) -> None:
        self.gpu, self.cap, self.horizon = gpu, cap, horizon_s
        self.ttft_slo, self.tbt_slo = ttft_slo, tbt_slo
        self.reqs = [SimReq(s, f"r{s.idx}") for s in specs]
        self.pending = deque(sorted(self.reqs, key=lambda r: r.spec.arrival))
        self.waiting: list[SimReq] = []
        self.running: list[SimReq] = []
        self.chunked: SimReq | None = None
        self.admitted: set[str] = set()  # the last plan's admissions (the queue SGLang is shown)
        self.copies: list[tuple[float, str, SimReq]] = []  # (done_s, "d2h"|"h2d", req)
        self.link_free_s = {"d2h": 0.0, "h2d": 0.0}
        self.parked: dict[str, SimReq] = {}
        self.host_free = host_tokens
        self.keep = system in ("rotasched-keep", "rotasched-wt")
        self.write_through = system == "rotasched-wt"
        self.host_tokens = host_tokens
        self.kept: dict[str, SimReq] = {}  # running requests with a kept host copy, oldest first
        self.ratio = NewTokenRatio()
        self.policy = None
        if system != "fcfs":
            cfg = RotaConfig(policy="lvf" if system == "rotasched-lvf" else "slo",
                             ttft_slo_s=ttft_slo, tbt_slo_s=tbt_slo)
            self.policy = create_policy(cfg)
        self.costs = CostModel()
        self.now = 0.0
        self.last_was_decode = False
        self.stats = {"rotations_out": 0, "retractions": 0, "prefill_batches": 0,
                      "prefill_tokens": 0,
                      "decode_steps": 0, "decode_first": 0, "d2h_tokens": 0, "d2h_tokens_saved": 0,
                      "kept_copies_evicted": 0, "written_through_tokens": 0}

    # --- memory as SGLang's PrefillAdder counts it --------------------------------------------
    def used(self) -> int:
        return sum(r.kv for r in self.reqs)

    def reservation(self) -> float:
        return sum(min(r.spec.output_len - r.out, CLIP_NEW_TOKENS) * self.ratio.value
                   for r in self.running)

    # --- main loop -----------------------------------------------------------------------------
    def run(self) -> list[dict]:
        done = 0
        while done < len(self.reqs) and self.now < self.horizon:
            self._arrivals()
            self._finish_copies()
            budget = self._plan()
            if not self._prefill(budget) and not self._decode():
                nxt = [c[0] for c in self.copies] + ([self.pending[0].spec.arrival]
                                                     if self.pending else [])
                if not nxt:
                    break
                self.now = max(self.now, min(nxt))
            done = sum(r.out >= r.spec.output_len for r in self.reqs)
        while self.copies:  # write-through copies still landing after the last request finished
            self.now = max(self.now, min(c[0] for c in self.copies))
            self._finish_copies()
        return [{"send": r.spec.arrival, "token_times": r.token_times, "aborted": False,
                 "error": None if r.out >= r.spec.output_len else "not finished in the horizon"}
                for r in self.reqs]

    def _arrivals(self) -> None:
        while self.pending and self.pending[0].spec.arrival <= self.now:
            r = self.pending.popleft()
            self.waiting.append(r)
            self.costs.observe_arrival(self.now, r.spec.prompt_len)
            if self.policy:
                self.policy.table.add(r.rid, r.spec.arrival, r.spec.prompt_len, self.ttft_slo,
                                      self.tbt_slo, r.spec.output_len)

    def _finish_copies(self) -> None:
        for c in sorted((c for c in self.copies if c[0] <= self.now), key=lambda c: c[:2]):
            self.copies.remove(c)
            _, way, r = c
            t = self.policy.table
            if way == "wt":
                self._write_through_done(r)
                continue
            self.costs.observe_transfer(way, r.kv_moving * self.gpu.bytes_per_token, r.copy_s)
            if way == "d2h":
                r.kv = 0
                t.set_phase(r.rid, Phase.ON_HOST, self.now)
                self.parked[r.rid] = r
            else:
                keep = r.kv // HOST_PAGE * HOST_PAGE if self.keep else 0
                self.host_free += r.host - keep
                r.host = keep
                if keep:
                    self.kept[r.rid] = r
                    t.set_host_tokens(r.rid, keep)
                t.set_phase(r.rid, Phase.RUNNING, self.now)
                self.running.append(r)

    def _copy(self, way: str, r: SimReq, tokens: int) -> None:
        secs = tokens * self.gpu.bytes_per_token / self.gpu.link_bytes_per_s
        link = "h2d" if way == "h2d" else "d2h"  # write-through shares the device->host link
        start = max(self.now, self.link_free_s[link])
        self.link_free_s[link] = start + secs
        if way != "wt":
            r.kv_moving, r.copy_s = tokens, start + secs - self.now
        self.copies.append((start + secs, way, r))

    def _write_through(self) -> None:
        """As the adapter: while nothing moves out, copy running requests' unsaved full pages,
        most first, within one step's link share (the first past it), into the free half."""
        c = self.costs.costs()
        budget = deadlines.link_tokens(self.policy.config.link_share, self.gpu.link_bytes_per_s,
                                       c.decode_step_s,
                                 self.gpu.bytes_per_token)
        room = self.host_free - self.host_tokens // 2
        wants = sorted(((r.kv // HOST_PAGE * HOST_PAGE - r.host, r) for r in self.running
                        if r.out < r.spec.output_len), key=lambda w: (-w[0], w[1].rid))
        first = True
        for want, r in wants:
            if want < HOST_PAGE or want > room or (want > budget and not first):
                continue
            first = False
            self.host_free -= want
            room, budget = room - want, budget - want
            r.wt = (want, r.host, r.epoch)
            self._copy("wt", r, want)
            self.stats["written_through_tokens"] += want

    def _write_through_done(self, r: SimReq) -> None:
        tokens, base, epoch = r.wt
        if r in self.running and r.epoch == epoch and r.host == base:
            r.host += tokens
            self.kept[r.rid] = r
            self.policy.table.set_host_tokens(r.rid, r.host)
        else:
            self.host_free += tokens

    def _plan(self) -> int | None:
        self.admitted = set()
        if not self.policy or len(self.policy.table) == 0:
            return None
        t = self.policy.table
        chunk_left = self.chunked.to_prefill() if self.chunked else 0
        cap = Capacity(available_device_tokens=self.cap - self.used() - chunk_left,
                       total_device_tokens=self.cap,
                       free_host_tokens=self.host_free + sum(r.host for r in self.kept.values()),
                       bytes_per_token=self.gpu.bytes_per_token,
                       new_token_ratio=self.ratio.value)
        # as the adapter passes it
        limit = min(self.gpu.max_prefill_tokens, self.gpu.chunked_prefill_size)
        plan = self.policy.plan(self.now, cap, self.costs.costs(), limit, None)
        self.admitted = set(plan.admit)
        for r in [r for r in self.running if r.rid in set(plan.rotate_out)]:
            tail = r.kv - r.host
            if r.out >= r.spec.output_len or not self._host_room(tail, r):
                continue
            self.running.remove(r)
            self.kept.pop(r.rid, None)
            r.epoch += 1
            self.host_free -= tail
            self.stats["d2h_tokens"] += tail
            self.stats["d2h_tokens_saved"] += r.host
            r.host = r.kv
            t.set_counts(r.rid, r.kv, r.out)
            t.set_host_tokens(r.rid, 0)
            t.set_phase(r.rid, Phase.ROTATING_OUT, self.now)
            self._copy("d2h", r, tail)
            self.stats["rotations_out"] += 1
        for rid in plan.rotate_in:
            r = self.parked[rid]
            need = r.spec.prompt_len + r.out - 1
            if self.cap - self.used() - chunk_left < need:
                continue
            del self.parked[rid]
            r.kv = need
            t.set_phase(rid, Phase.ROTATING_IN, self.now)
            self._copy("h2d", r, need)
        if (self.write_through and not plan.rotate_out
                and not any(w != "h2d" for _, w, _ in self.copies)):
            self._write_through()
        if plan.admit:
            front = [r for rid in plan.admit for r in self.waiting if r.rid == rid]
            self.waiting = front + [r for r in self.waiting if r not in front]
        return plan.prefill_token_budget

    def _host_room(self, tokens: int, mover: SimReq) -> bool:
        """Room for ``tokens`` on the host, evicting other requests' kept copies (oldest first)."""
        for rid in list(self.kept):
            if self.host_free >= tokens:
                break
            if rid != mover.rid:
                self._drop_kept(self.kept[rid])
                self.stats["kept_copies_evicted"] += 1
        return self.host_free >= tokens

    def _drop_kept(self, r: SimReq) -> None:
        if self.kept.pop(r.rid, None) is not None:
            self.host_free += r.host
            r.host = 0
            if self.policy and r.rid in self.policy.table:
                self.policy.table.set_host_tokens(r.rid, 0)

    def _prefill(self, budget: int | None) -> bool:
        """One prefill batch the way SGLang's PrefillAdder forms it with chunked prefill on: the
        chunked request first (even without memory to spare), then the queue in order while
        memory allows and any of the token limit remains; the request that meets the chunk size
        is cut there and its rest runs next batch. Under RotaSched the adapter shows SGLang only
        the plan's admissions, under a limit no larger than the budget; 0 hides the queue
        (decode first)."""
        g = self.gpu
        limit, hide = g.max_prefill_tokens, False
        if budget is not None:
            hide = budget == 0 and bool(self.running)
            if hide and not self.chunked:
                self.stats["decode_first"] += 1
                return False
            limit = min(limit, max(budget, 256))
        room = self.cap - self.used() - self.reservation()
        batch: list[tuple[SimReq, int]] = []
        rem_input, rem_chunk = limit, g.chunked_prefill_size
        shown = [] if hide else [r for r in self.waiting if r is not self.chunked
                                 and (not self.admitted or r.rid in self.admitted)]
        queue = ([self.chunked] if self.chunked else []) + shown
        for r in queue:
            need = r.to_prefill()
            forced = r is self.chunked
            reserve = min(r.spec.output_len, CLIP_NEW_TOKENS)
            if not forced and need + reserve > room:
                break
            take = min(need, rem_chunk)
            batch.append((r, take))
            rem_input, rem_chunk = rem_input - take, rem_chunk - take
            room -= take + (0 if forced else reserve)  # SGLang books a new request's whole output
            if take < need or rem_input <= 0 or rem_chunk <= 0:
                break
        tokens = sum(take for _, take in batch)
        if not batch:
            return False
        dur = g.prefill_s(tokens)
        self.now += dur
        self.costs.observe_prefill(tokens, dur)
        self.last_was_decode = False
        self.stats["prefill_batches"] += 1
        self.stats["prefill_tokens"] += tokens
        self.chunked = None
        for r, take in batch:
            r.prefilled += take
            r.kv += take
            if r in self.waiting:
                self.waiting.remove(r)
            if r.to_prefill() > 0:
                self.chunked = r
                if self.policy and self.policy.table.phase_of(r.rid) is Phase.WAITING:
                    self.policy.table.prefill_launched(r.rid, self.now, None)
                continue
            if not r.token_times:
                r.token_times.append(self.now)
            if self.policy:
                self.policy.table.prefill_done(r.rid, r.kv, self.now)
            self._after_token(r)
        return True

    def _decode(self) -> bool:
        if not self.running:
            return False
        while self.running and self.cap - self.used() < len(self.running):
            victim = max(self.running, key=lambda r: r.out)  # SGLang retracts the longest output
            self.running.remove(victim)
            self._drop_kept(victim)  # its KV is recomputed: the copy would be stale
            victim.epoch += 1
            victim.kv, victim.prefilled = 0, 0
            self.waiting.insert(0, victim)
            self.ratio.retracted()
            self.stats["retractions"] += 1
            if self.policy:
                self.policy.table.set_phase(victim.rid, Phase.WAITING, self.now)
                self.policy.table.set_prompt_tokens(victim.rid, victim.to_prefill())
        if not self.running:
            return False
        ways = {way for _, way, _ in self.copies}
        dur = self.gpu.decode_s(len(self.running),
                                sum(r.kv for r in self.running), bool(ways - {"h2d"}),
                                "h2d" in ways)
        self.now += dur
        if self.last_was_decode:
            self.costs.observe_decode(dur)
        self.last_was_decode = True
        self.ratio.decode()
        self.stats["decode_steps"] += 1
        batch = list(self.running)
        if self.policy:
            self.policy.table.advance([r.rid for r in batch])
        for r in batch:
            r.kv += 1
            r.token_times.append(self.now)
            self._after_token(r)
        return True

    def _after_token(self, r: SimReq) -> None:
        if r.out >= r.spec.output_len:
            if r in self.running:
                self.running.remove(r)
            self._drop_kept(r)
            r.kv = 0
            if self.policy:
                self.policy.table.remove(r.rid)
        elif r not in self.running:
            self.running.append(r)


def simulate(specs: list[RequestSpec], system: str, cap: int, gpu: GpuModel, ttft_slo: float,
             tbt_slo: float, host_tokens: int, horizon_s: float) -> dict:
    sim = Simulator(specs, system, cap, gpu, ttft_slo, tbt_slo, host_tokens, horizon_s)
    records = sim.run()
    # What is still held once every request is done: anything but zeros is a leak.
    held = {"device_tokens": sim.used(), "host_tokens": host_tokens - sim.host_free,
            "table_entries": len(sim.policy.table) if sim.policy else 0}
    return {"summary": summarize(records, ttft_slo, tbt_slo),
            "stats": {**sim.stats, "held_at_end": held},
            "sim_seconds": round(sim.now, 2), "records": records}


def _write_raw(raw_dir: Path, system: str, rate: float, records: list[dict]) -> dict:
    path = raw_dir / f"{system}_rate{rate:g}.jsonl"
    write_jsonl(path, records)
    return {"path": str(path), "n": len(records)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--cap", type=int, required=True, help="device KV tokens")
    ap.add_argument("--rates", type=float, nargs="+", required=True)
    ap.add_argument("--num", type=int, default=300)
    ap.add_argument("--arrival", default="poisson", choices=("poisson", "gamma", "trace"))
    ap.add_argument("--cv", type=float, default=1.0,
                    help="gamma arrivals: gap coefficient of variation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=1,
                    help="arrival draws per point (seed, seed+1, ...): figures are their means, "
                         "since one draw can move attainment by several points; raw records come "
                         "from the first")
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--ttft-slo", type=float, default=1.0)
    ap.add_argument("--tbt-slo", type=float, default=0.1)
    ap.add_argument("--host-kv-gb", type=float, default=64.0,
                    help="host tier size, like --rota-host-kv-gb")
    ap.add_argument("--horizon", type=float, default=600.0,
                    help="simulated seconds before giving up")
    ap.add_argument("--mover", choices=MOVERS, default="staging",
                    help="KV data path whose decode-step cost the model charges "
                         "(rotasched's --rota-mover)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--raw-dir", type=Path,
                    help="also write per-request records (JSON lines) here, "
                    "for plot_slo.py's TTFT CDF")
    args = ap.parse_args()
    if args.cap <= 0 or any(r <= 0 for r in args.rates) or args.host_kv_gb <= 0 or args.seeds < 1:
        ap.error("--cap, --rates, --host-kv-gb and --seeds must be positive")
    rows = load_azure(args.trace)
    gpu = GpuModel(mover=args.mover)
    host_tokens = int(args.host_kv_gb * 1e9) // gpu.bytes_per_token
    # Same keys as sweep_slo.py's results, so plot_slo.py draws it too.
    trace = Path(args.trace).stem.replace("AzureLLMInferenceTrace_", "azure_")
    result = {"trace": trace + " (simulated)", "trace_path": args.trace, "gpu": "modelled h200",
              "cap_tokens": args.cap, "rates": args.rates,
              "num_requests": [args.num] * len(args.rates),
              "arrival": args.arrival, "cv": args.cv, "ttft_slo": args.ttft_slo,
              "tbt_slo": args.tbt_slo,
              "gpu_model": asdict(gpu), "host_kv_gb": args.host_kv_gb, "seeds": args.seeds,
              "systems": {}, "command": command_line("eval.sim_policy"),
              "note": ("eval.sim_policy: the real policy on a modelled GPU; estimates, "
                       "not measurements")}
    keys = ("ttft_attainment", "tbt_attainment", "both_attainment", "throughput_tok_s", "ttft_p50",
            "ttft_p99")
    t0 = time.monotonic()
    for system in args.systems:
        per = result["systems"].setdefault(system, {**{k: [] for k in keys}, "stats": [], "raw": [],
                                                    "per_seed": []})
        for rate in args.rates:
            runs = [simulate(make_specs(rows, num=args.num, arrival=args.arrival, rate=rate,
                                        cv=args.cv,
                                        seed=args.seed + k),
                             system, args.cap, gpu, args.ttft_slo, args.tbt_slo, host_tokens,
                             args.horizon)
                    for k in range(args.seeds)]
            s = {k: statistics.mean(r["summary"][k] for r in runs) for k in keys}
            for k in keys:
                per[k].append(s[k])
            res = runs[0]
            per["stats"].append(res["stats"])
            per["per_seed"].append([{k: r["summary"][k] for k in keys} | {"stats": r["stats"]}
                                    for r in runs])
            per["raw"].append(_write_raw(args.raw_dir, system, rate, res["records"])
                              if args.raw_dir else None)
            print(f"{system:>14} @ {rate:g} req/s: TTFT {100 * s['ttft_attainment']:5.1f}%  "
                  f"TBT {100 * s['tbt_attainment']:5.1f}%  {s['throughput_tok_s']:6.0f} tok/s  "
                  f"[{time.monotonic() - t0:.0f}s] {res['stats']}",
                  flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
