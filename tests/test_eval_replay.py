"""eval/lib/replay.py end to end against a loopback HTTP peer that streams like SGLang's /generate.

The fake peer reproduces the wire format of sglang 0.5.17 with --skip-tokenizer-init
(http_server.generate_request + tokenizer_manager._handle_batch_output): SSE ``data: {...}``
events with ``output_ids`` cumulative (default) or a delta (--incremental-streaming-output),
``meta_info.completion_tokens`` cumulative, several tokens per event when the server batches,
an abort as ``output_ids = [last id]`` with finish_reason type "abort", and ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from eval.lib.jsonfiles import read_jsonl, write_jsonl
from eval.lib.metrics import summarize
from eval.lib.replay import replay
from eval.lib.traces import RequestSpec, prompt_ids

HTTP_400, STREAM_ERROR, SERVER_ABORT = 13, 17, 19  # prompt lengths that trigger failures
STALL = 23  # a prompt length whose stream pauses STALL_S after its first 6 tokens (rotated out)
STALL_S = 0.6
INCREMENTAL = web.AppKey("incremental", bool)
BODIES = web.AppKey("bodies", list)
TICK = 0.02  # seconds between the fake server's events


def token(j: int) -> int:
    # Pairs of equal ids: a cumulative list and a delta are indistinguishable by prefix alone.
    return 1000 + j // 2


def chunk_sizes(n: int) -> list[int]:
    """Tokens per event for an n-token stream: 1, 2, 3, 1, 2, 3, ... (batched decode)."""
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(min(n - sum(sizes), 1 + len(sizes) % 3))
    return sizes


def event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


async def generate(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    request.app[BODIES].append(body)
    n = body["sampling_params"]["max_new_tokens"]
    plen = len(body["input_ids"])
    if plen == HTTP_400:
        return web.Response(status=400, text="bad request")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    ids: list[int] = []
    for step, size in enumerate(chunk_sizes(n), start=1):
        await asyncio.sleep(TICK)
        if plen == STREAM_ERROR:
            await resp.write(event({"error": {"message": "invalid", "code": 400}}))
            break
        if plen == SERVER_ABORT and len(ids) >= 2:
            meta = {"finish_reason": {"type": "abort", "message": "KV exhausted"},
                    "completion_tokens": len(ids)}
            await resp.write(event({"output_ids": ids[-1:], "meta_info": meta}))
            break
        if plen == STALL and len(ids) == 6:
            await asyncio.sleep(STALL_S)
        new = [token(len(ids) + i) for i in range(size)]
        ids += new
        done = len(ids) == n
        meta = {"finish_reason": {"type": "length", "length": n} if done else None,
                "prompt_tokens": plen, "completion_tokens": len(ids), "cached_tokens": 0}
        out = new if request.app[INCREMENTAL] else list(ids)
        data = event({"output_ids": out, "meta_info": meta})
        if step == 1:  # split one event across two TCP writes
            await resp.write(data[:7])
            await asyncio.sleep(TICK)
            data = data[7:]
        await resp.write(data)
    await resp.write(b"data: [DONE]\n\n")
    return resp


@contextlib.asynccontextmanager
async def fake_sglang(incremental: bool) -> AsyncIterator[tuple[str, list[dict]]]:
    app = web.Application()
    app[INCREMENTAL] = incremental
    app[BODIES] = []
    app.router.add_post("/generate", generate)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}", app[BODIES]
    finally:
        await runner.cleanup()


def run(coro, limit: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, limit))


@pytest.mark.parametrize("incremental", [False, True])
def test_replay_records_every_token_in_both_stream_modes(incremental, tmp_path):
    specs = [RequestSpec(i, 0.05 * i, 20 + i, 5 + 2 * i) for i in range(6)]
    extra = {"sampling_params": {"custom_params": {"ttft_slo": 0.5}}}

    async def go():
        async with fake_sglang(incremental) as (url, bodies):
            return await replay(url, specs, salt=3, extra=extra, progress=False), bodies

    records, bodies = run(go())
    for spec, r in zip(specs, records, strict=False):
        assert r["error"] is None and not r["aborted"]
        assert r["output_ids"] == [token(j) for j in range(spec.output_len)]
        assert len(r["token_times"]) == spec.output_len
        assert r["send"] == pytest.approx(spec.arrival, abs=0.05)
        assert r["token_times"] == sorted(r["token_times"])
        # One timestamp per event: multi-token events keep their sizes.
        sizes = [r["token_times"].count(t) for t in sorted(set(r["token_times"]))]
        assert sizes == chunk_sizes(spec.output_len)
        assert r["meta"]["finish_reason"]["type"] == "length"
    sent = sorted(bodies, key=lambda b: len(b["input_ids"]))
    for spec, body in zip(specs, sent, strict=False):
        assert body["input_ids"] == prompt_ids(spec.idx, spec.prompt_len, salt=3)
        sp = body["sampling_params"]
        assert (sp["max_new_tokens"], sp["ignore_eos"], sp["temperature"]) == (
            spec.output_len, True, 0)
        assert sp["custom_params"] == {"ttft_slo": 0.5} and body["stream"] is True
    s = summarize(records, ttft_slo=1.0, tbt_slo=0.5)
    assert s["errors"] == 0 and s["ttft_attainment"] == 1.0 and s["tbt_attainment"] == 1.0
    write_jsonl(tmp_path / "r.jsonl", records)
    assert read_jsonl(tmp_path / "r.jsonl") == records


def test_per_spec_extras_reach_only_their_request():
    specs = [RequestSpec(i, 0.0, 20 + i, 3) for i in range(3)]
    extra = {"sampling_params": {"custom_params": {"tenant": "a"}}}
    extras = [None, {"sampling_params": {"custom_params": {"ttft_slo": 0.001}}}, {}]

    async def go():
        async with fake_sglang(True) as (url, bodies):
            return await replay(url, specs, extra=extra, extras=extras, progress=False), bodies

    records, bodies = run(go())
    assert all(r["error"] is None for r in records)
    custom = [b["sampling_params"]["custom_params"]
              for b in sorted(bodies, key=lambda b: len(b["input_ids"]))]
    assert custom == [{"tenant": "a"}, {"tenant": "a", "ttft_slo": 0.001}, {"tenant": "a"}]
    assert extra == {"sampling_params": {"custom_params": {"tenant": "a"}}}  # not mutated
    with pytest.raises(ValueError, match="extras"):
        run(replay("http://127.0.0.1:9", specs, extras=[None], progress=False))


def test_failures_are_recorded_as_errors():
    specs = [RequestSpec(0, 0.0, HTTP_400, 4), RequestSpec(1, 0.0, STREAM_ERROR, 4),
             RequestSpec(2, 0.0, SERVER_ABORT, 6), RequestSpec(3, 0.0, 30, 3)]

    async def go():
        async with fake_sglang(False) as (url, _):
            return await replay(url, specs, progress=False)

    r400, rerr, rabort, rok = run(go())
    assert r400["error"].startswith("HTTP 400") and r400["token_times"] == []
    assert "invalid" in rerr["error"]
    # The abort event repeats the last id; it must not count as a token.
    assert rabort["error"].startswith("server abort")
    assert len(rabort["token_times"]) == sum(chunk_sizes(6)[:2]) == 3
    assert rok["error"] is None
    assert summarize([r400, rerr, rabort, rok], 1.0, 1.0)["ttft_attainment"] == 0.25


def test_time_limit_cancels_and_client_abort_hangs_up():
    slow = [RequestSpec(0, 0.0, 30, 1000), RequestSpec(1, 5.0, 30, 3)]
    short = [RequestSpec(i, 0.0, 30, 12) for i in range(8)]

    async def go():
        async with fake_sglang(True) as (url, _):
            cut = await replay(url, slow, time_limit=0.5, progress=False)
            dropped = await replay(url, short, abort_frac=1.0, seed=1, progress=False)
            return cut, dropped

    cut, dropped = run(go())
    assert cut[0]["error"].startswith("cancelled") and 0 < len(cut[0]["token_times"]) < 1000
    assert cut[1]["error"].startswith("not sent") and cut[1]["send"] is None
    for r in dropped:
        assert r["aborted"] and r["error"] is None and 1 <= len(r["token_times"]) < 12


def test_an_impatient_client_hangs_up_on_a_paused_stream_and_only_then():
    import time

    paused = [RequestSpec(0, 0.0, STALL, 2000)]
    steady = [RequestSpec(0, 0.0, 30, 2000)]

    async def go():
        async with fake_sglang(True) as (url, _):
            t0 = time.perf_counter()
            dropped = await replay(url, paused, abort_frac=1.0, seed=3, abort_stall_s=0.2,
                                   progress=False)
            waited = time.perf_counter() - t0
            kept = await replay(url, [RequestSpec(0, 0.0, STALL, 12)], abort_stall_s=0.2,
                                progress=False)  # not chosen to hang up
            fast = await replay(url, steady[:1], abort_frac=0.0, abort_stall_s=0.2,
                                time_limit=0.5, progress=False)
            return dropped[0], waited, kept[0], fast[0]

    dropped, waited, kept, fast = run(go())
    assert dropped["aborted"] and dropped["error"] is None
    assert len(dropped["token_times"]) == 6 and waited < STALL_S  # at the pause, not the end
    assert not kept["aborted"] and kept["error"] is None and len(kept["token_times"]) == 12
    assert not fast["aborted"]  # a stream that keeps coming is never dropped for stalling


def test_the_commit_a_device_command_names_wins_over_its_git_copy(monkeypatch):
    from eval.lib import jsonfiles

    monkeypatch.delenv(jsonfiles.COMMIT_ENV, raising=False)
    here = jsonfiles.source_commit()
    assert here  # this checkout is a git repository
    monkeypatch.setenv(jsonfiles.COMMIT_ENV, "4973d79")
    assert jsonfiles.source_commit() == "4973d79"
