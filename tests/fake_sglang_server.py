"""A CPU stand-in for ``python -m sglang.launch_server``, for tests of eval.e2e_rotation and
eval.sweep_slo.

It speaks what the script uses, in sglang 0.5.17's formats: /health, /generate (token ids,
``stream`` SSE with --incremental-streaming-output deltas, or one JSON answer), /flush_cache
(200 only when idle), /metrics (Prometheus text, with --enable-metrics), and it logs the
rotator's stats records (``superinfer.adapters.sglang.stats.format_record``) the way SGLang's
scheduler logger prints them (``[date time TPn] record`` with --tp-size > 1, ``[date time DPd
TPn]`` with --dp-size > 1). Output ids depend only on the prompt, so every server agrees.
Under rotasched every request counts as rotated ``idx % 3`` times; a per-request SLO is
checked by SuperInfer's own ``parse_request_slo`` under the --rota-* SLO flags, and a refused
one is answered as SGLang + SuperInfer do (HTTP 400, or an abort with status_code 400 inside a
200 stream). Knobs for negative tests (environment):
FAKE_SGLANG_FAIL_DETERMINISTIC=1 (exit like a failed deterministic-inference start),
FAKE_SGLANG_LEAK=N (rotasched idle checks report N device tokens still held),
FAKE_SGLANG_VOCAB=N (the vocabulary, instead of --model-path's config.json). Like SGLang with
--skip-tokenizer-init, a token id past the vocabulary kills the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

from aiohttp import web

from superinfer.adapters.sglang.stats import format_record
from superinfer.config import ConfigError, RotaConfig, parse_request_slo
from superinfer.policy.binding import BindingTimes

TOKEN_S = 0.002
HOST_TOKENS = 122064
BYTES_PER_ROTATION = 130_000_000


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--tp-size", type=int, default=1)
    ap.add_argument("--dp-size", type=int, default=1)
    ap.add_argument("--schedule-policy", "--scheduler-policy", dest="policy", default="fcfs")
    ap.add_argument("--page-size", type=int, default=1)
    ap.add_argument("--max-total-tokens", type=int, default=100000)
    ap.add_argument("--enable-deterministic-inference", action="store_true")
    ap.add_argument("--enable-metrics", action="store_true")
    defaults = RotaConfig()
    ap.add_argument("--rota-ttft-slo", type=float, default=defaults.ttft_slo_s)
    ap.add_argument("--rota-tbt-slo", type=float, default=defaults.tbt_slo_s)
    ap.add_argument("--rota-request-slo", default=defaults.request_slo)
    ap.add_argument("--rota-min-request-slo-ratio", type=float,
                    default=defaults.min_request_slo_ratio)
    ap.add_argument("--rota-monitor", action="store_true")
    return ap.parse_known_args(argv)[0]


class State:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rota = args.policy == "rotasched"
        vocab = os.environ.get("FAKE_SGLANG_VOCAB")
        if vocab is None and args.model_path:
            config = Path(args.model_path) / "config.json"
            vocab = json.loads(config.read_text()).get("vocab_size") if config.exists() else None
        self.vocab = int(vocab) if vocab else None
        self.config = RotaConfig(ttft_slo_s=args.rota_ttft_slo, tbt_slo_s=args.rota_tbt_slo,
                                 request_slo=args.rota_request_slo,
                                 min_request_slo_ratio=args.rota_min_request_slo_ratio)
        self.inflight: set[int] = set()
        self.next_id = 0
        self.out = self.in_ = self.aborted_rotated = 0
        self.period: Counter[int] = Counter()  # request -> rotations, this busy period
        self.monitor = self.rota or args.rota_monitor
        self.busy_since: float | None = None

    def log(self, kind: str, fields: dict) -> None:
        """One record per scheduler (TP rank of each DP replica), as every rank's rotator logs
        its own, tagged the way SGLang's logger prefixes them."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        for dp in range(self.args.dp_size):
            for rank in range(self.args.tp_size):
                tag = (f" DP{dp}" if self.args.dp_size > 1 else "") + (
                    f" TP{rank}" if self.args.tp_size > 1 or self.args.dp_size > 1 else "")
                sys.stderr.write(f"[{stamp}{tag}] {format_record(kind, rank, dp, fields)}\n")
        sys.stderr.flush()

    def begin(self) -> int:
        if not self.inflight:
            self.busy_since = time.monotonic()
        self.next_id += 1
        self.inflight.add(self.next_id)
        return self.next_id

    def end(self, rid: int, rotations: int, finished: bool) -> None:
        self.inflight.discard(rid)
        if self.rota and rotations:
            self.period[rid] = rotations
            self.out += rotations
            self.in_ += rotations if finished else rotations - 1
            self.aborted_rotated += not finished
        if not self.inflight and self.rota:
            self.idle_check()
        if not self.inflight and self.monitor:
            self.binding()

    def binding(self) -> None:
        """The busy period's binding record: 40% prefill, 60% decode, requests waiting for
        room a third of the time (a stand-in: nothing here is measured)."""
        busy = time.monotonic() - (self.busy_since or time.monotonic())
        times = BindingTimes(prefill_s=0.4 * busy, decode_s=0.6 * busy,
                             memory_wait_s=busy / 3, kv_used_s=0.5 * busy)
        self.log("binding", {"wall_s": round(time.time(), 3), **times.as_dict()})

    def idle_check(self) -> None:
        total = self.args.max_total_tokens
        held = int(os.environ.get("FAKE_SGLANG_LEAK", "0"))
        counts = self.period.values()
        self.log("idle", {"device_free": total - held, "device_total": total,
                          "host_free": HOST_TOKENS, "host_total": HOST_TOKENS, "table": 0,
                          "rotations_out": self.out, "rotated_reqs": len(counts),
                          "multi_rotated_reqs": sum(c > 1 for c in counts),
                          "max_per_req": max(counts, default=0),
                          "aborted_while_rotated": self.aborted_rotated,
                          "plans_decode_first": self.out, "plans_head_blocked": 0,
                          "check_error": None})
        self.period.clear()

    def stats(self) -> None:
        self.log("stats", {"rotations_out": self.out, "rotations_in": self.in_, "fallbacks": 0,
                           "aborted_while_rotated": self.aborted_rotated,
                           "plans_decode_first": 0, "plans_head_blocked": 0,
                           "bytes_d2h": self.out * BYTES_PER_ROTATION,
                           "bytes_h2d": self.in_ * BYTES_PER_ROTATION, "bytes_d2h_saved": 0,
                           "host_copies_evicted": 0, "bytes_written_through": 0,
                           "away": len(self.inflight) // 3, "host_used": 0, "kept": 0})


def output_ids(prompt: list[int], n: int) -> list[int]:
    base = sum(prompt[:8]) % 997
    return [100 + (base * 31 + k * 7) % 5000 for k in range(n)]


def bad_slo(params: dict, config: RotaConfig) -> str | None:
    try:
        parse_request_slo(params.get("custom_params"), config)
    except ConfigError as e:
        return str(e)
    return None


async def generate(request: web.Request) -> web.StreamResponse:
    st: State = request.app["state"]
    body = await request.json()
    params = body["sampling_params"]
    prompt = body["input_ids"]
    if st.vocab is not None and max(prompt, default=0) >= st.vocab:
        sys.stderr.write(f"Assertion `ind < ind_dim_size` failed: token id {max(prompt)} past "
                         f"the vocabulary ({st.vocab})\nScheduler hit an exception\n")
        os._exit(1)
    n = params["max_new_tokens"]
    error = bad_slo(params, st.config) if st.rota else None
    abort = {"type": "abort", "message": error, "status_code": 400}
    if not body.get("stream"):
        if error:
            return web.json_response({"error": {"message": error}}, status=400)
        await asyncio.sleep(TOKEN_S * n)
        meta = {"finish_reason": {"type": "length", "length": n}, "prompt_tokens": len(prompt),
                "completion_tokens": n, "num_retractions": 0}
        return web.json_response({"output_ids": output_ids(prompt, n), "meta_info": meta})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    if error:
        chunk = {"output_ids": [], "meta_info": {"finish_reason": abort, "completion_tokens": 0}}
        await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n" + b"data: [DONE]\n\n")
        return resp
    rid, ids, finished = st.begin(), output_ids(prompt, n), False
    try:
        for start in range(0, n, 2):
            await asyncio.sleep(TOKEN_S)
            done = start + 2 >= n
            meta = {"finish_reason": {"type": "length", "length": n} if done else None,
                    "prompt_tokens": len(prompt), "completion_tokens": min(n, start + 2),
                    "num_retractions": 0}
            chunk = {"output_ids": ids[start:start + 2], "meta_info": meta}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        finished = True
    finally:
        st.end(rid, sum(prompt[:4]) % 3, finished)
    return resp


async def flush_cache(request: web.Request) -> web.Response:
    return web.Response(status=400 if request.app["state"].inflight else 200)


async def metrics(request: web.Request) -> web.Response:
    st: State = request.app["state"]
    lines = ["# TYPE sglang:num_running_reqs gauge",
             f"sglang:num_running_reqs {len(st.inflight)}.0"]
    if st.rota:
        for rank, dp in ((t, d) for d in range(st.args.dp_size) for t in range(st.args.tp_size)):
            lab = f'{{tp_rank="{rank}",dp_rank="{dp}"}}'
            lines += [f"superinfer:rotations_out_total{lab} {st.out}.0",
                      f"superinfer:rotations_in_total{lab} {st.in_}.0",
                      f"superinfer:bytes_d2h_total{lab} {st.out * BYTES_PER_ROTATION}.0",
                      f"superinfer:bytes_h2d_total{lab} {st.in_ * BYTES_PER_ROTATION}.0",
                      f"superinfer:host_tier_tokens_used{lab} 0.0",
                      f"superinfer:requests_rotated_out{lab} 0.0"]
    return web.Response(text="\n".join(lines) + "\n")


async def stats_loop(st: State) -> None:
    while True:
        await asyncio.sleep(1.0)
        if st.out:
            st.stats()


async def serve(args: argparse.Namespace) -> None:
    st = State(args)
    app = web.Application()
    app["state"] = st
    app.router.add_get("/health", lambda _: web.Response(status=200))
    app.router.add_post("/generate", generate)
    app.router.add_route("*", "/flush_cache", flush_cache)
    if args.enable_metrics:  # as SGLang: no /metrics route (404) without the flag
        app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    if st.rota:
        direct = args.page_size >= 64  # --rota-mover auto on Llama-3.1-8B-sized pages
        st.log("start", {"policy": "slo", "host_kv_gb": 16.0, "host_tokens": HOST_TOKENS,
                         "host_page": args.page_size if direct else 16,
                         "mover": "DirectKVMover" if direct else "StagingKVMover",
                         "path": "direct" if direct else "staging"})
        st.idle_check()
    await stats_loop(st)


def main() -> None:
    args = parse(sys.argv[1:])
    if args.enable_deterministic_inference and os.environ.get("FAKE_SGLANG_FAIL_DETERMINISTIC"):
        sys.stderr.write("Traceback (most recent call last):\n  File \"batch_invariant_ops.py\"\n"
                         "RuntimeError: deterministic inference is not supported here\n")
        sys.exit(1)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
