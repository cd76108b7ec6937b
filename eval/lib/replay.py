"""Replay request specs against an SGLang server and record every token's arrival time.

Each request is POSTed to /generate as token ids with a forced output length (ignore_eos,
max_new_tokens) and ``stream: true``. SGLang answers with SSE lines ``data: {...}`` and a final
``data: [DONE]``. With --skip-tokenizer-init a chunk's ``output_ids`` is cumulative by default and
a delta with --incremental-streaming-output; ``meta_info.completion_tokens`` is cumulative in
both, so it says how many tokens a chunk added and the new ids are always the list's tail.

Stdlib + aiohttp + numpy only: this runs on the GPU machine. As a script it replays a trace
against a server that is already up:

    python -m eval.lib.replay --url http://127.0.0.1:30000 --trace CONV.csv --rate 10 --num 200 \\
        --out /tmp/records.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import random
import resource
import sys
import time
from typing import Any

import aiohttp

from eval.lib.jsonfiles import write_jsonl
from eval.lib.metrics import Record, summarize
from eval.lib.traces import ARRIVALS, RequestSpec, load_azure, make_specs, prompt_ids

META_KEYS = ("finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens",
             "num_retractions")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``extra`` into ``base`` (so extra can add sampling_params.custom_params)."""
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def request_body(spec: RequestSpec, salt: int, extra: dict[str, Any] | None = None,
                 vocab: int | None = None) -> bytes:
    body: dict[str, Any] = {
        "input_ids": prompt_ids(spec.idx, spec.prompt_len, salt, vocab),
        "sampling_params": {"max_new_tokens": spec.output_len, "ignore_eos": True,
                            "temperature": 0},
        "stream": True,
    }
    return json.dumps(_merge(body, extra or {})).encode()


def new_record(spec: RequestSpec) -> Record:
    return {"idx": spec.idx, "arrival": spec.arrival, "prompt_len": spec.prompt_len,
            "output_len": spec.output_len, "send": None, "token_times": [], "output_ids": [],
            "error": None, "aborted": False, "meta": {}}


def _take_chunk(rec: Record, chunk: dict[str, Any], now: float) -> None:
    """Append a chunk's new tokens (all stamped ``now``) to ``rec``; note errors and aborts."""
    if "error" in chunk:
        err = chunk["error"]
        rec["error"] = str(err.get("message", err) if isinstance(err, dict) else err)
        return
    ids = chunk.get("output_ids") or []
    meta = chunk.get("meta_info") or {}
    have = len(rec["output_ids"])
    total = meta.get("completion_tokens")
    if isinstance(total, int):
        new = ids[-(total - have):] if total > have else []
    elif len(ids) >= have and ids[:have] == rec["output_ids"]:
        new = ids[have:]  # NOTE: no count from the server: a prefix match means cumulative
    else:
        new = ids
    rec["output_ids"].extend(new)
    rec["token_times"].extend([now] * len(new))
    rec["meta"].update({k: meta[k] for k in META_KEYS if k in meta})
    reason = meta.get("finish_reason")
    if isinstance(reason, dict) and reason.get("type") == "abort":
        rec["error"] = f"server abort: {reason.get('message', '')}"


async def _stream(session: aiohttp.ClientSession, url: str, body: bytes, rec: Record,
                  clock: float, abort_after: int | None, stall_s: float | None) -> None:
    async with session.post(url, data=body,
                            headers={"Content-Type": "application/json"}) as resp:
        if resp.status != 200:
            rec["error"] = f"HTTP {resp.status}: {(await resp.text())[:300]}"
            return
        buf = b""
        while True:
            # an impatient client: once streaming, it hangs up after ``stall_s`` without a token
            wait_s = stall_s if abort_after is not None and rec["token_times"] else None
            try:
                data = await asyncio.wait_for(resp.content.readany(), wait_s)
            except asyncio.TimeoutError:
                rec["aborted"] = True
                resp.close()
                return
            if not data:
                return
            now = time.perf_counter() - clock
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    return
                _take_chunk(rec, json.loads(payload), now)
                if rec["error"] is not None:
                    return
                if abort_after is not None and len(rec["token_times"]) >= abort_after:
                    rec["aborted"] = True
                    resp.close()  # drop the connection: the server aborts the request
                    return


async def _one(session: aiohttp.ClientSession, url: str, spec: RequestSpec, body: bytes,
               rec: Record, clock: float, abort_after: int | None, stall_s: float | None,
               progress: _Progress) -> None:
    await asyncio.sleep(max(0.0, spec.arrival - (time.perf_counter() - clock)))
    rec["send"] = time.perf_counter() - clock
    progress.sent += 1
    try:
        await _stream(session, url, body, rec, clock, abort_after, stall_s)
        got = len(rec["token_times"])
        if rec["error"] is None and not rec["aborted"] and got != spec.output_len:
            rec["error"] = f"short output: {got} of {spec.output_len} tokens"
    except asyncio.CancelledError:
        rec["error"] = "cancelled: replay time limit"
        raise
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        progress.done += 1
        progress.tokens += len(rec["token_times"])
        progress.errors += rec["error"] is not None


class _Progress:
    """Counters plus a status line on stderr (redrawn in place on a terminal)."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label = total, label
        self.sent = self.done = self.tokens = self.errors = 0
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def line(self) -> str:
        width = 30
        fill = int(width * self.done / max(1, self.total))
        return (f"{self.label}[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} done "
                f"{self.sent - self.done} in flight, {self.errors} err, {self.tokens} tok, "
                f"{time.perf_counter() - self.t0:.0f}s")

    async def run(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.show()

    def show(self, end: str = "") -> None:
        sys.stderr.write(("\r" + self.line() + end) if self.tty else (self.line() + "\n"))
        sys.stderr.flush()


def _raise_fd_limit() -> None:
    # Hundreds of concurrent streams can exceed the usual soft limit of 1024 descriptors.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def replay(url: str, specs: list[RequestSpec], *, salt: int = 0,
                 extra: dict[str, Any] | None = None,
                 extras: list[dict[str, Any] | None] | None = None,
                 time_limit: float | None = None, abort_frac: float = 0.0, seed: int = 0,
                 abort_stall_s: float | None = None, progress: bool = True, label: str = "",
                 vocab: int | None = None) -> list[Record]:
    """Send ``specs`` at their arrival offsets; return one record per spec (in spec order).
    Token ids stay under ``vocab`` (the served model's vocabulary size).

    ``extra`` is merged into every request body; ``extras`` (one dict or None per spec) into
    that spec's body after it, so some clients can send what others do not.

    After ``time_limit`` seconds every unfinished request is cancelled and marked as an error.
    ``abort_frac`` of the requests (chosen with ``seed``) hang up after a random number of
    tokens, to exercise the server's abort path; they are marked ``aborted``. With
    ``abort_stall_s`` (0 or None: never) they also hang up once no token came for that long
    after their first: a rotated-out stream pauses, so these aborts find requests on the host
    tier.
    """
    _raise_fd_limit()
    gen_url = url.rstrip("/") + "/generate"
    if extras is not None and len(extras) != len(specs):
        raise ValueError(f"extras: {len(extras)} entries for {len(specs)} specs")
    per_spec = extras if extras is not None else [None] * len(specs)
    # Encoded before the clock starts.
    bodies = [request_body(s, salt, _merge(copy.deepcopy(extra or {}), e or {}), vocab)
              for s, e in zip(specs, per_spec, strict=True)]
    stall_s = abort_stall_s or None  # 0: never
    rng = random.Random(seed)
    aborts = [rng.randint(1, s.output_len - 1) if s.output_len > 1 and rng.random() < abort_frac
              else None for s in specs]
    records = [new_record(s) for s in specs]
    prog = _Progress(len(specs), label)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=timeout) as session:
        clock = time.perf_counter()
        tasks = [asyncio.create_task(_one(session, gen_url, s, b, r, clock, a, stall_s, prog))
                 for s, b, r, a in zip(specs, bodies, records, aborts, strict=False)]
        ticker = asyncio.create_task(prog.run(1.0 if prog.tty else 10.0)) if progress else None
        _, pending = await asyncio.wait(tasks, timeout=time_limit)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if ticker is not None:
            ticker.cancel()
            prog.show(end="\n" if prog.tty else "")
    for r in records:
        if r["send"] is None:
            r["error"] = "not sent: replay time limit"
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:30000")
    ap.add_argument("--trace", required=True, help="Azure CSV (TIMESTAMP,ContextTokens,...)")
    ap.add_argument("--num", type=int, default=None, help="first N requests (default: all)")
    ap.add_argument("--start", type=int, default=0, help="skip this many rows first")
    ap.add_argument("--rate", type=float, default=None, help="target mean rate, req/s")
    ap.add_argument("--arrival", choices=ARRIVALS, default="trace",
                    help="trace: the CSV's timestamps (rescaled to --rate if given)")
    ap.add_argument("--cv", type=float, default=1.0, help="gamma arrivals: gap CV")
    ap.add_argument("--seed", type=int, default=0, help="arrivals and abort choice")
    ap.add_argument("--salt", type=int, default=0, help="token-id salt (new ids, no cache hits)")
    ap.add_argument("--vocab", type=int, default=None,
                    help="the served model's vocabulary size: token ids stay under it")
    ap.add_argument("--max-prompt", type=int, default=None)
    ap.add_argument("--max-output", type=int, default=None)
    ap.add_argument("--time-limit", type=float, default=None, help="seconds for the whole run")
    ap.add_argument("--abort-frac", type=float, default=0.0,
                    help="fraction of requests the client drops mid-stream")
    ap.add_argument("--extra-json", default=None,
                    help='merged into each body, e.g. \'{"sampling_params": {"custom_params": '
                         '{"ttft_slo": 0.5}}}\'')
    ap.add_argument("--ttft-slo", type=float, default=1.0, help="for the printed summary, s")
    ap.add_argument("--tbt-slo", type=float, default=0.1, help="for the printed summary, s")
    ap.add_argument("--out", required=True, help="JSON lines, one record per request")
    args = ap.parse_args()

    specs = make_specs(load_azure(args.trace), num=args.num, start=args.start,
                       arrival=args.arrival, rate=args.rate, cv=args.cv, seed=args.seed,
                       max_prompt=args.max_prompt, max_output=args.max_output)
    extra = json.loads(args.extra_json) if args.extra_json else None
    records = asyncio.run(replay(args.url, specs, salt=args.salt, extra=extra,
                                 time_limit=args.time_limit, abort_frac=args.abort_frac,
                                 seed=args.seed, vocab=args.vocab))
    write_jsonl(args.out, records)
    print(json.dumps(summarize(records, args.ttft_slo, args.tbt_slo), indent=1))


if __name__ == "__main__":
    main()
