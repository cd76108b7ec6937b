"""Why does KV rotation slow a decode step? A diagnostic that separates the causes.

``eval.bench_duplexkv`` found that any copy-engine rotation path (Triton staging mover at any
grid, plain torch copies) costs its decode stand-in 31-38%. Three suspects:

1. SM theft: gather/scatter kernels hold SMs, so each GEMM of the step needs an extra wave.
2. The DMA itself: PCIe traffic to/from HBM slows the HBM-bound matmuls.
3. Eager launches: the real SGLang decode is a CUDA graph; the stand-in ran eagerly.

Every scenario times the stand-in step (CUDA events, median over windows of ``--steps`` steps)
alone and while one interfering load runs continuously on other streams for the whole window,
interleaving the two per trial. The load is enqueued ahead of the window and topped up from the
host while the window runs; a window counts as covered when every load lane started before it,
ended after it and never ran dry. The load's bandwidth inside the window comes from per-unit
CUDA events. Loads (all on random scattered 16-token pages of a Llama-3.1-8B KV pool, never
zero data):

- ``dma_only`` / ``dma_d2h_only`` / ``dma_h2d_only``: big contiguous pinned<->device copies.
- ``gather_only_gN``: the Triton gather into a device staging buffer, N programs, no DMA
  (its GB/s counts payload once; HBM sees it twice, read + write).
- ``staging_mover``: StagingKVMover(path="staging") both ways at full rate (as bench_duplexkv).
- ``memcpy_batch*``: per-page 32 KiB copies, one ``cudaMemcpyBatchAsync`` call per 256 MiB
  unit (copy engines only, no kernels, no staging), via ctypes; checked bit for bit first;
  ``_xNstreams``: N streams per direction, in case one copy engine is what limits them.
- ``run2d_N*``: kernel-free too, for runs of N consecutive device slots (what SGLang's
  allocator hands a prompt when the pool is not fragmented): one ``cudaMemcpy2DAsync`` per
  (run, layer, K/V) straight between the layer-first device pool and the token-major host pool
  (2 KiB rows at the host's token pitch); checked bit for bit first.
- ``staging_mover_capped_Ppct``: the mover gated to one bounded batch per decode step, sized
  to keep it busy ~P% of a step: does a per-step byte budget bound the interference?
- ``memcpy_batch_pageP``: the batch copies on ``P``-token pages (64/128 KiB pieces);
  ``memcpy_batch_order_any``: source access order "any"; ``memcpy_batch_d2h_dma_h2d`` (and the
  reverse): one direction in 32 KiB pieces, the other as big contiguous copies.
- ``pages2d*``: one ``cudaMemcpy2DAsync`` per (page, K/V) covering every layer (32 KiB rows at
  the layer pitch of a pool allocated as one tensor).
- ``staging_cN[_l2]``: the staging mover with N-token chunks, its ring small enough for L2;
  ``_l2`` marks it persisting in L2 (host-bound: Python issues every chunk).
- ``pipe_cN[_l2]``: the same staging pipeline captured once in a CUDA graph per direction, so
  small chunks are not bound by the host: does keeping the staged bytes in L2 cut the cost?

Every scenario runs with the step replayed from a CUDA graph (``graph/...``); the baseline and
the full-rate staging mover also run eagerly (``eager/...``). One failing scenario records its
traceback and the rest go on; the JSON is rewritten after each scenario.

    python -m eval.diagnostics.diag_interference --out /tmp/diag.json --only graph/baseline \\
        memcpy_batch --budget-s 170
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import itertools
import json
import math
import os
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from eval.bench_duplexkv import PAGE, Bench, DecodeStandIn, capture_step, log
from eval.lib.jsonfiles import command_line
from superinfer.host_tier.cudart import (
    LOC_DEVICE,
    LOC_HOST,
    SRC_ACCESS_ORDER_STREAM,
    MemcpyAttributes,
    MemLocation,
)
from superinfer.host_tier.cudart import CudaRuntime as BaseRuntime
from superinfer.host_tier.interface import KVLayout, mha_planes

MiB = 1 << 20
LAYOUT = KVLayout(32, 8, 128, 2)  # Llama-3.1-8B on one rank: 128 KiB of KV per token
MAX_UNITS_PER_LANE = 1500  # bounds one prefill (host time, launch-queue depth)
Event = torch.cuda.Event


# --------------------------------------------------------------------------- decode side


class Decode:
    """The stand-in decode step on its own stream, run eagerly or replayed from a CUDA graph."""

    def __init__(self, model: DecodeStandIn, mode: str, stream: torch.cuda.Stream) -> None:
        self.model, self.mode, self.stream = model, mode, stream
        self.graph = capture_step(model) if mode == "graph" else None
        self.enqueue(2)  # first use on this stream (cuBLAS workspace, allocator blocks)
        torch.cuda.synchronize()

    def enqueue(self, steps: int) -> None:
        with torch.cuda.stream(self.stream):
            for _ in range(steps):
                if self.graph is not None:
                    self.graph.replay()
                else:
                    self.model.step()

    def mark(self) -> Event:
        """A timing event at the current end of the decode stream."""
        event = Event(enable_timing=True)
        event.record(self.stream)
        return event

    def window(self, steps: int) -> tuple[Event, Event]:
        start = self.mark()
        self.enqueue(steps)
        return start, self.mark()


def alone_step_ms(decode: Decode, steps: int) -> float:
    torch.cuda.synchronize()
    start, end = decode.window(steps)
    end.synchronize()
    return start.elapsed_time(end) / steps


# --------------------------------------------------------------------------- load side


@dataclass
class Lane:
    """One stream of interfering work, submitted in units (e.g. one 256 MiB copy).

    ``end_stream`` is where a unit's last operation runs: a timing event recorded there after
    each submit marks the unit's completion on the GPU clock."""

    name: str
    submit: Callable[[], int]  # enqueue one unit; returns its payload bytes
    end_stream: torch.cuda.Stream
    unit_ms: float = 1.0  # calibrated: one unit's duration when the load runs alone
    records: list[tuple[int, Event]] = field(default_factory=list)
    begin: Event | None = None
    _first_pending: int = 0

    def reset(self) -> None:
        self.records, self._first_pending = [], 0
        self.begin = Event(enable_timing=True)
        self.begin.record(self.end_stream)

    def submit_unit(self) -> None:
        num_bytes = self.submit()
        event = Event(enable_timing=True)
        event.record(self.end_stream)
        self.records.append((num_bytes, event))

    def pending(self) -> int:
        """Units submitted but not finished (they finish in order, so scan from the oldest)."""
        records = self.records
        while self._first_pending < len(records) and records[self._first_pending][1].query():
            self._first_pending += 1
        return len(self.records) - self._first_pending

    def gbps(self, t0: Event | None = None, t1: Event | None = None) -> float | None:
        """Throughput over the unit completions inside [t0, t1] (all of them when no window):
        bytes of the 2nd..last unit ending inside, over the time between first and last end."""
        ref = t0 if t0 is not None else self.records[0][1]
        limit = t0.elapsed_time(t1) if t0 is not None and t1 is not None else math.inf
        ends = [(ref.elapsed_time(ev), b) for b, ev in self.records]
        inside = [(t, b) for t, b in ends if 0.0 <= t <= limit]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return None
        return sum(b for _, b in inside[1:]) / ((inside[-1][0] - inside[0][0]) * 1e-3) / 1e9


class LoadRunner:
    """Keeps a set of lanes busy: calibration alone, prefill before a window, top-up during it."""

    def __init__(self, lanes: list[Lane], on_poll: Callable[[], object] | None = None) -> None:
        self.lanes, self.on_poll = lanes, on_poll

    def reset(self) -> None:
        torch.cuda.synchronize()
        self._poll()
        for lane in self.lanes:
            lane.reset()

    def submit_round_robin(self, counts: list[int]) -> None:
        """Interleave submissions so the lanes start together."""
        for i in range(max(counts)):
            for lane, n in zip(self.lanes, counts, strict=False):
                if i < n:
                    lane.submit_unit()

    def calibrate(self, target_ms: float = 60.0) -> dict:
        """Warm up (compiles kernels), then run ~``target_ms`` of the load alone: its GB/s per
        lane with all lanes at once, and each lane's unit duration for sizing the prefill."""
        self.reset()
        self.submit_round_robin([1] * len(self.lanes))
        self.reset()
        t0 = time.perf_counter()
        self.submit_round_robin([1] * len(self.lanes))
        torch.cuda.synchronize()
        rough_ms = (time.perf_counter() - t0) * 1e3  # an upper bound: includes launch overhead
        self.reset()
        self.submit_round_robin([_clamp(math.ceil(target_ms / rough_ms) + 2, 3, MAX_UNITS_PER_LANE)
                                 for _ in self.lanes])
        torch.cuda.synchronize()
        out = {}
        for lane in self.lanes:
            rate = lane.gbps()
            unit_bytes = lane.records[-1][0]
            lane.unit_ms = unit_bytes / (rate * 1e9) * 1e3 if rate else rough_ms
            out[lane.name] = {"gbps": rate, "unit_mib": unit_bytes / MiB, "unit_ms": lane.unit_ms}
        self._poll()
        return out

    def prefill(self, cover_ms: float) -> None:
        counts = [math.ceil(cover_ms / lane.unit_ms) + 1 for lane in self.lanes]
        self.submit_round_robin([_clamp(n, 2, MAX_UNITS_PER_LANE) for n in counts])

    def top_up(self, depth_ms: float = 4.0) -> bool:
        """Keep ~``depth_ms`` of work queued per lane; True if some lane had run dry."""
        self._poll()
        ran_dry = False
        for lane in self.lanes:
            pending = lane.pending()
            ran_dry |= pending == 0
            for _ in range(max(2, math.ceil(depth_ms / lane.unit_ms)) - pending):
                lane.submit_unit()
        return ran_dry

    def coverage(self, start: Event, end: Event) -> bool:
        """Every lane began before the window and its last unit ended after it (GPU clock)."""
        return all(lane.begin.elapsed_time(start) >= 0
                   and end.elapsed_time(lane.records[-1][1]) >= 0 for lane in self.lanes)

    def _poll(self) -> None:
        if self.on_poll is not None:
            self.on_poll()


def _clamp(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, x))


# --------------------------------------------------------------------------- measurements


def baseline(decode: Decode, steps: int, trials: int) -> dict:
    times = [alone_step_ms(decode, steps) for _ in range(trials)]
    return {"alone_ms": statistics.median(times), "alone_ms_all": times}


def loaded_window(decode: Decode, runner: LoadRunner, steps: int, cover_ms: float) -> dict:
    """One window of ``steps`` decode steps with the load running on other streams throughout."""
    runner.reset()
    runner.prefill(cover_ms)
    start, end = decode.window(steps)
    ran_dry = False
    while not end.query():
        ran_dry |= runner.top_up()
        time.sleep(2e-4)
    torch.cuda.synchronize()
    lanes = {lane.name: lane.gbps(start, end) for lane in runner.lanes}
    total = None if None in lanes.values() else sum(lanes.values())
    return {"step_ms": start.elapsed_time(end) / steps, "lane_gbps": lanes, "gbps": total,
            "covered": runner.coverage(start, end) and not ran_dry, "ran_dry": ran_dry}


def loaded_scenario(decode: Decode, runner: LoadRunner, steps: int, trials: int) -> dict:
    """Alone and loaded windows interleaved ``trials`` times; medians and the slowdown."""
    calib = runner.calibrate()
    alone, loaded = [], []
    for _ in range(trials):
        alone.append(alone_step_ms(decode, steps))
        loaded.append(loaded_window(decode, runner, steps, cover_ms=1.3 * steps * alone[-1]))
    a = statistics.median(alone)
    r = statistics.median(w["step_ms"] for w in loaded)
    rates = [w["gbps"] for w in loaded if w["gbps"] is not None]
    return {
        "alone_ms": a, "loaded_ms": r, "slowdown": r / a - 1,
        "gbps": statistics.median(rates) if rates else None,
        "lane_gbps": {name: _median_or_none([w["lane_gbps"][name] for w in loaded])
                      for name in loaded[0]["lane_gbps"]},
        "load_alone": calib,
        "load_alone_gbps": _sum_or_none([c["gbps"] for c in calib.values()]),
        "windows_covered": sum(w["covered"] for w in loaded), "trials": trials,
        "alone_ms_all": alone, "loaded_ms_all": [w["step_ms"] for w in loaded],
    }


def capped_scenario(decode: Decode, res: Resources, fraction: float, steps: int,
                    trials: int) -> dict:
    """The staging mover gated to one batch per decode step (both ways), sized so that at its
    alone rate it is busy ~``fraction`` of a step; each batch waits for its step to start."""
    calib = LoadRunner(res.mover_lanes(), on_poll=res.mover.poll).calibrate()
    per_dir = min(c["gbps"] for c in calib.values())
    step_ms = alone_step_ms(decode, steps)
    tokens = max(PAGE, int(fraction * step_ms * 1e-3 * per_dir * 1e9 / LAYOUT.bytes_per_token)
                 // PAGE * PAGE)
    alone, windows = [], []
    for _ in range(trials):
        alone.append(alone_step_ms(decode, steps))
        windows.append(capped_window(decode, res, tokens, steps))
    a = statistics.median(alone)
    r = statistics.median(w["step_ms"] for w in windows)
    return {
        "alone_ms": a, "loaded_ms": r, "slowdown": r / a - 1,
        "gbps": statistics.median(w["gbps"] for w in windows),
        "tokens_per_step_each_way": tokens,
        "mib_per_step_each_way": tokens * LAYOUT.bytes_per_token / MiB,
        "target_busy_fraction": fraction,
        "est_busy_fraction": tokens * LAYOUT.bytes_per_token / (per_dir * 1e9) / (a * 1e-3),
        "transfers_lag_ms": statistics.median(w["lag_ms"] for w in windows),
        "load_alone": calib, "trials": trials,
        "alone_ms_all": alone, "loaded_ms_all": [w["step_ms"] for w in windows],
    }


def capped_window(decode: Decode, res: Resources, tokens: int, steps: int) -> dict:
    torch.cuda.synchronize()
    res.mover.poll()
    bench, mover = res.bench, res.mover
    offsets = itertools.cycle(range(0, bench.out_slots.numel() - tokens + 1, tokens))
    decode.enqueue(1)  # untimed lead: the GPU stays busy while the host submits the first batch
    start = decode.mark()
    for _ in range(steps):
        ready = Event()
        ready.record(decode.stream)  # this step's transfer runs alongside this step
        a = next(offsets)
        batch = slice(a, a + tokens)
        with torch.cuda.stream(res.submit_stream):
            mover.submit_d2h("cap", bench.out_slots[batch], bench.out_host[batch], ready)
            mover.submit_h2d("cap", bench.in_host[batch], bench.in_slots[batch], ready)
        decode.enqueue(1)
    end = decode.mark()
    ends = [_mark(s) for s in res.mover_end_streams()]
    torch.cuda.synchronize()
    window_ms = start.elapsed_time(end)
    span_ms = max(start.elapsed_time(e) for e in ends)
    return {"step_ms": window_ms / steps, "lag_ms": span_ms - window_ms,
            "gbps": 2 * steps * tokens * LAYOUT.bytes_per_token / (span_ms * 1e-3) / 1e9}


def _mark(stream: torch.cuda.Stream) -> Event:
    event = Event(enable_timing=True)
    event.record(stream)
    return event


def _median_or_none(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _sum_or_none(xs: list[float | None]) -> float | None:
    return None if None in xs else sum(xs)


# --------------------------------------------------------------------------- CUDA runtime extras


class AccessPolicyWindow(ctypes.Structure):
    """``struct cudaAccessPolicyWindow``."""

    _fields_ = [("base_ptr", ctypes.c_void_p), ("num_bytes", ctypes.c_size_t),
                ("hitRatio", ctypes.c_float), ("hitProp", ctypes.c_int), ("missProp", ctypes.c_int)]


class StreamAttrValue(ctypes.Union):
    """``cudaStreamAttrValue`` (= ``cudaLaunchAttributeValue``, 64 bytes of padding)."""

    _fields_ = [("window", AccessPolicyWindow), ("pad", ctypes.c_char * 64)]


ATTR_L2_SIZE, ATTR_MAX_PERSISTING_L2, ATTR_MAX_WINDOW = 38, 108, 109  # cudaDeviceAttr
LIMIT_PERSISTING_L2 = 6  # cudaLimitPersistingL2CacheSize
STREAM_ATTR_ACCESS_POLICY_WINDOW = 1  # cudaStreamAttributeAccessPolicyWindow
ACCESS_NORMAL, ACCESS_PERSISTING = 0, 2  # cudaAccessProperty
SRC_ACCESS_ORDER_ANY = 3  # cudaMemcpySrcAccessOrderAny
FLAG_PREFER_OVERLAP_WITH_COMPUTE = 1  # cudaMemcpyFlagPreferOverlapWithCompute (CUDA 13.0 header)
MEMCPY_DEFAULT = 4  # cudaMemcpyDefault


class CudaRuntime(BaseRuntime):
    """The package's runtime binding plus what only the diagnostics use: 2D copies, device
    attributes and persisting-L2 windows."""

    def __init__(self) -> None:
        super().__init__()
        self._2d = self.lib.cudaMemcpy2DAsync
        self._2d.restype = ctypes.c_int
        self._2d.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                             ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]

    def memcpy2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int,
                 stream: torch.cuda.Stream) -> None:
        """``cudaMemcpy2DAsync`` with ``cudaMemcpyDefault`` (unified addressing picks the way)."""
        err = self._2d(dst, dpitch, src, spitch, width, height, MEMCPY_DEFAULT, stream.cuda_stream)
        if err != 0:
            name = self.lib.cudaGetErrorString(err).decode()
            raise RuntimeError(f"cudaMemcpy2DAsync: error {err} ({name})")

    def device_attr(self, attr: int) -> int:
        value = ctypes.c_int(0)
        err = self.lib.cudaDeviceGetAttribute(ctypes.byref(value), attr,
                                              torch.cuda.current_device())
        if err != 0:
            raise RuntimeError(f"cudaDeviceGetAttribute({attr}): error {err}")
        return value.value

    def l2_persist(self, streams: list[torch.cuda.Stream], base: int, num_bytes: int) -> dict:
        """Set aside persisting L2 for ``[base, base+num_bytes)`` and give every kernel launched
        into ``streams`` an access-policy window over it (hit: persisting, miss: normal)."""
        max_persist = self.device_attr(ATTR_MAX_PERSISTING_L2)
        max_window = self.device_attr(ATTR_MAX_WINDOW)
        limit = min(max_persist, num_bytes)
        err = self.lib.cudaDeviceSetLimit(LIMIT_PERSISTING_L2, ctypes.c_size_t(limit))
        if err != 0:
            raise RuntimeError(f"cudaDeviceSetLimit(persisting L2): error {err}")
        window = min(num_bytes, max_window)
        value = StreamAttrValue()
        value.window = AccessPolicyWindow(base, window, min(1.0, limit / window),
                                          ACCESS_PERSISTING, ACCESS_NORMAL)
        for stream in streams:
            err = self.lib.cudaStreamSetAttribute(ctypes.c_void_p(stream.cuda_stream),
                                                  STREAM_ATTR_ACCESS_POLICY_WINDOW,
                                                  ctypes.byref(value))
            if err != 0:
                raise RuntimeError(f"cudaStreamSetAttribute(access policy window): error {err}")
        return {"l2_bytes": self.device_attr(ATTR_L2_SIZE), "max_persisting_l2": max_persist,
                "max_window": max_window, "persist_limit": limit, "window_bytes": window,
                "hit_ratio": value.window.hitRatio}


class PageBatchCopier:
    """Per-page copies between the layer-first device KV and a page-major pinned host buffer
    ``[pages, layers, 2, PAGE, heads*head_dim]``: each (page, layer, K/V) is one contiguous
    32 KiB piece on both sides. One unit = ``pages_per_unit`` random pages = one batch call."""

    def __init__(self, rt: CudaRuntime, bench: Bench, pages_per_unit: int, flags: int = 0,
                 page_tokens: int = PAGE, order: int = 1) -> None:
        self.rt, self.bench, self.flags, self.order = rt, bench, flags, order
        lay = bench.layout
        self.page_tokens = page_tokens
        self.row = lay.num_heads * lay.head_dim
        self.page_bytes = page_tokens * self.row * lay.itemsize
        self.ptrs = torch.tensor([b.data_ptr() for kv in zip(bench.k, bench.v, strict=False)
                                  for b in kv],
                                 dtype=torch.int64)  # k0, v0, k1, v1, ...: the host order too
        shape = (pages_per_unit, lay.num_layers, 2, page_tokens, self.row)
        self.host_out = torch.empty(shape, dtype=torch.bfloat16, pin_memory=True)
        self.host_in = torch.empty(shape, dtype=torch.bfloat16, pin_memory=True)
        fill = torch.empty(shape, dtype=torch.bfloat16, device="cuda").uniform_(0.5, 1.5)
        self.host_in.copy_(fill)  # never zeros: a missed copy must show
        if page_tokens == PAGE:
            out_pages, in_pages = ((s[::PAGE] // PAGE).cpu()
                                   for s in (bench.out_slots, bench.in_slots))
        else:  # bigger pages (64 KiB+ pieces): their own random disjoint sets
            pages = torch.randperm((bench.k[0].shape[0] - PAGE) // page_tokens)
            n = bench.out_slots.numel() // page_tokens
            out_pages, in_pages = pages[:n], pages[n : 2 * n]
        self.out_pages = self._units(out_pages, pages_per_unit)
        self.in_pages = self._units(in_pages, pages_per_unit)
        count = pages_per_unit * 2 * lay.num_layers
        self.sizes = torch.full((count,), self.page_bytes, dtype=torch.int64)
        self.d2h = [(self._host_addrs(self.host_out), self._dev_addrs(p)) for p in self.out_pages]
        self.h2d = [(self._dev_addrs(p), self._host_addrs(self.host_in)) for p in self.in_pages]
        self.hints = "proper"
        self.unit_bytes = count * self.page_bytes

    def attrs(self, to_host: bool) -> MemcpyAttributes:
        a = MemcpyAttributes()
        a.srcAccessOrder, a.flags = self.order, self.flags
        if self.hints == "proper":  # only read for managed memory; set anyway, zeroed on fallback
            dev = MemLocation(LOC_DEVICE, torch.cuda.current_device())
            host = MemLocation(LOC_HOST, 0)
            a.srcLocHint, a.dstLocHint = (dev, host) if to_host else (host, dev)
        return a

    def copy(self, to_host: bool, unit: int, stream: torch.cuda.Stream) -> int:
        dsts, srcs = (self.d2h if to_host else self.h2d)[unit]
        self.rt.memcpy_batch_with(dsts, srcs, self.sizes, self.attrs(to_host), stream)
        return self.unit_bytes

    def verify(self, stream: torch.cuda.Stream) -> dict:
        """Unit 0 each way, compared bit for bit with torch's view of the same pages; falls back
        to zeroed location hints if the runtime rejects the proper ones."""
        out = {}
        try:
            out["d2h_equal"] = self._verify_d2h(stream)
        except RuntimeError as exc:
            out["proper_hints_error"] = str(exc)
            self.hints = "zeroed"
            out["d2h_equal"] = self._verify_d2h(stream)
        out["h2d_equal"] = self._verify_h2d(stream)
        out["hints"] = self.hints
        return out

    def _verify_d2h(self, stream: torch.cuda.Stream) -> bool:
        self.host_out.zero_()
        torch.cuda.synchronize()
        self.copy(True, 0, stream)
        stream.synchronize()
        return torch.equal(self.host_out.to("cuda"), self._device_pages(self.out_pages[0]))

    def _verify_h2d(self, stream: torch.cuda.Stream) -> bool:
        torch.cuda.synchronize()
        self.copy(False, 0, stream)
        stream.synchronize()
        return torch.equal(self._device_pages(self.in_pages[0]), self.host_in.to("cuda"))

    def _device_pages(self, pages: torch.Tensor) -> torch.Tensor:
        idx = pages.to("cuda")
        per_layer = [torch.stack([buf[: buf.shape[0] // self.page_tokens * self.page_tokens]
                                  .view(-1, self.page_tokens, self.row)[idx] for buf in kv])
                     for kv in zip(self.bench.k, self.bench.v, strict=False)]
        return torch.stack(per_layer).permute(2, 0, 1, 3, 4)  # [pages, layers, 2, PAGE, row]

    @staticmethod
    def _units(pages: torch.Tensor, per_unit: int) -> list[torch.Tensor]:
        return [pages[i : i + per_unit] for i in range(0, pages.numel() - per_unit + 1, per_unit)]

    def _dev_addrs(self, pages: torch.Tensor) -> torch.Tensor:
        return (self.ptrs[None, :] + pages[:, None] * self.page_bytes).reshape(-1).contiguous()

    def _host_addrs(self, host: torch.Tensor) -> torch.Tensor:
        n = host.numel() * host.element_size() // self.page_bytes
        return host.data_ptr() + torch.arange(n, dtype=torch.int64) * self.page_bytes


# --------------------------------------------------------------------------- loads


class RunCopier2D:
    """Kernel-free rotation of runs of ``run_tokens`` consecutive device slots between the
    layer-first device KV and the token-major host pool (``HostKVPool``'s layout): one
    ``cudaMemcpy2DAsync`` per (run, layer, K/V), ``run_tokens`` rows of one token's head rows
    (2 KiB here) with the host pitch of a whole token. Copy engines only, no SMs; the question
    is how well they do strided 2 KiB rows, and how many calls the CPU can issue."""

    def __init__(self, rt: CudaRuntime, bench: Bench, unit_tokens: int, run_tokens: int) -> None:
        self.rt, self.bench, self.run = rt, bench, run_tokens
        lay = bench.layout
        self.row = lay.num_heads * lay.head_dim * lay.itemsize
        self.pitch = lay.bytes_per_token
        pool = bench.k[0].shape[0] - PAGE
        runs = 2 * (bench.host.size // 2 // run_tokens)
        starts = torch.randperm(pool // run_tokens)[:runs] * run_tokens
        half = starts.numel() // 2
        self.out_starts, self.in_starts = starts[:half].tolist(), starts[half:].tolist()
        self.runs_per_unit = unit_tokens // run_tokens
        self.unit_bytes = unit_tokens * lay.bytes_per_token
        self.host_half = bench.host.size // 2  # d2h writes rows [0, half), h2d reads [half, size)
        self._next = {True: 0, False: 0}

    def _ptrs(self, to_host: bool, run: int, layer: int, kv: int) -> tuple[int, int]:
        starts = self.out_starts if to_host else self.in_starts
        dev = (self.bench.k if kv == 0 else self.bench.v)[layer]
        dev_ptr = dev.data_ptr() + starts[run] * self.row
        host_row = (0 if to_host else self.host_half) + run * self.run
        host_ptr = self.bench.host.buffer[host_row, layer, kv].data_ptr()
        return dev_ptr, host_ptr

    def copy(self, to_host: bool, stream: torch.cuda.Stream) -> int:
        """One unit: the next ``runs_per_unit`` runs, every layer, K and V."""
        total = len(self.out_starts if to_host else self.in_starts)
        first = self._next[to_host]
        self._next[to_host] = (first + self.runs_per_unit) % (total - self.runs_per_unit + 1)
        for run in range(first, first + self.runs_per_unit):
            for layer in range(self.bench.layout.num_layers):
                for kv in (0, 1):
                    dev, host = self._ptrs(to_host, run, layer, kv)
                    if to_host:
                        self.rt.memcpy2d(host, self.pitch, dev, self.row, self.row, self.run,
                                         stream)
                    else:
                        self.rt.memcpy2d(dev, self.row, host, self.pitch, self.row, self.run,
                                         stream)
        return self.unit_bytes

    def verify(self, stream: torch.cuda.Stream) -> dict:
        """One unit each way, then sampled runs compared bit for bit."""
        self._next = {True: 0, False: 0}
        self.copy(True, stream)
        self.copy(False, stream)
        stream.synchronize()
        self._next = {True: 0, False: 0}
        ok = {"d2h_equal": True, "h2d_equal": True}
        host = self.bench.host.buffer
        for run in (0, self.runs_per_unit - 1):
            for layer in (0, self.bench.layout.num_layers - 1):
                for kv, bufs in ((0, self.bench.k), (1, self.bench.v)):
                    a, b = self.out_starts[run], self.in_starts[run]
                    h = run * self.run
                    ok["d2h_equal"] &= torch.equal(bufs[layer][a : a + self.run].flatten(1).cpu(),
                                                   host[h : h + self.run, layer, kv])
                    hb = self.host_half + h
                    ok["h2d_equal"] &= torch.equal(bufs[layer][b : b + self.run].flatten(1).cpu(),
                                                   host[hb : hb + self.run, layer, kv])
        return {k: bool(v) for k, v in ok.items()}


class PageLayers2D:
    """Kernel-free, per page: one ``cudaMemcpy2DAsync`` per (page, K/V) moves that page's
    32 KiB piece of every layer at once (rows of 32 KiB, one row per layer), which needs the
    layer buffers at a constant pitch: its own pool ``[2, layers, tokens, row]`` here. The
    host side is page-major ``[pages, layers, 2, PAGE, row]``. Question: do 32 KiB rows in
    2D copies (regular copy engines) reach full duplex, where 32 KiB batch copies cap at ~65?"""

    def __init__(self, rt: CudaRuntime, bench: Bench, unit_tokens: int) -> None:
        self.rt, lay = rt, bench.layout
        self.row = lay.num_heads * lay.head_dim
        self.piece = PAGE * self.row * lay.itemsize
        tokens = bench.k[0].shape[0] // PAGE * PAGE
        self.pool = torch.empty((2, lay.num_layers, tokens, self.row), dtype=torch.bfloat16,
                                device="cuda").uniform_(0.5, 1.5)
        self.layer_pitch = tokens * self.row * lay.itemsize
        self.L = lay.num_layers
        per_unit = unit_tokens // 2 // PAGE
        shape = (per_unit, lay.num_layers, 2, PAGE, self.row)
        self.host_out = torch.empty(shape, dtype=torch.bfloat16, pin_memory=True)
        self.host_in = torch.empty(shape, dtype=torch.bfloat16, pin_memory=True)
        fill = torch.empty(shape, dtype=torch.bfloat16, device="cuda").uniform_(0.5, 1.5)
        self.host_in.copy_(fill)
        pages = torch.randperm(tokens // PAGE)
        units = (pages.numel() // 2) // per_unit
        self.units = {True: [pages[i * per_unit : (i + 1) * per_unit].tolist()
                             for i in range(units)],
                      False: [pages[(units + i) * per_unit : (units + i + 1) * per_unit].tolist()
                              for i in range(units)]}
        self.unit_bytes = per_unit * 2 * lay.num_layers * self.piece
        self._next = {True: 0, False: 0}

    def copy(self, to_host: bool, stream: torch.cuda.Stream, unit: int | None = None) -> int:
        if unit is None:
            unit = self._next[to_host]
            self._next[to_host] = (unit + 1) % len(self.units[to_host])
        base = self.pool.data_ptr()
        host = (self.host_out if to_host else self.host_in).data_ptr()
        page_bytes = self.L * 2 * self.piece
        for j, page in enumerate(self.units[to_host][unit]):
            for kv in (0, 1):
                dev = base + kv * self.L * self.layer_pitch + page * self.piece
                hst = host + j * page_bytes + kv * self.piece
                if to_host:
                    self.rt.memcpy2d(hst, 2 * self.piece, dev, self.layer_pitch, self.piece, self.L,
                                     stream)
                else:
                    self.rt.memcpy2d(dev, self.layer_pitch, hst, 2 * self.piece, self.piece, self.L,
                                     stream)
        return self.unit_bytes

    def verify(self, stream: torch.cuda.Stream) -> dict:
        self.host_out.zero_()
        torch.cuda.synchronize()
        self.copy(True, stream, 0)
        self.copy(False, stream, 0)
        stream.synchronize()
        ok = {}
        for to_host, host in ((True, self.host_out), (False, self.host_in)):
            idx = torch.tensor(self.units[to_host][0], device="cuda")
            # [2, L, pages, PAGE, row]
            view = self.pool.view(2, self.L, -1, PAGE, self.row)[:, :, idx]
            ok["d2h_equal" if to_host else "h2d_equal"] = torch.equal(
                view.permute(2, 1, 0, 3, 4).contiguous(), host.to("cuda"))
        return ok

    def lanes(self, d2h: bool, h2d: bool) -> list[Lane]:
        return copy_lanes(self.copy, d2h, h2d)


class GraphPipeline:
    """The staging path for one ``unit_tokens`` unit of one direction, chunk by chunk, captured
    once into a CUDA graph (the page sets are fixed), so no host work limits small chunks.
    Two staging buffers per direction, all four in one ``ring`` tensor; with ``l2`` the
    kernels mark the ring persisting in L2. Chunk i's kernel waits for the DMA of chunk i-2
    (buffer reuse) and the DMA of chunk i for kernel i (d2h; the reverse for h2d)."""

    def __init__(self, res: Resources, chunk: int, l2: bool, programs: int = 32) -> None:
        from superinfer.triton_kernels.kv_gather_scatter import gather_kv, make_kv_table, scatter_kv

        from superinfer.host_tier.jobs import contiguous_runs

        b, n = res.bench, res.unit_tokens
        host = b.host
        self.ring = torch.empty((4 * chunk, *host.buffer.shape[1:]), dtype=host.buffer.dtype,
                                device="cuda")
        bufs = list(self.ring.split(chunk))
        table = make_kv_table(mha_planes(b.k, b.v))
        self.info = {"chunk_tokens": chunk, "ring_mib": self.ring.numel() * 2 / MiB, "l2": l2}
        self.kernel_streams = {True: torch.cuda.Stream(), False: torch.cuda.Stream()}
        self.dma_streams = {True: torch.cuda.Stream(), False: torch.cuda.Stream()}
        if l2:
            self.info.update(res.runtime().l2_persist(list(self.kernel_streams.values()),
                                                      self.ring.data_ptr(),
                                                      self.ring.numel() * self.ring.element_size()))
        elif res.runtime().lib.cudaDeviceSetLimit(LIMIT_PERSISTING_L2, ctypes.c_size_t(0)) != 0:
            raise RuntimeError("cudaDeviceSetLimit(persisting L2, 0) failed")
        gather_kv(table, b.out_slots[:chunk], bufs[0], num_programs=programs)  # compile outside
        scatter_kv(table, b.in_slots[:chunk], bufs[2], num_programs=programs)  # the capture
        self.graphs = {}
        for to_host, dev, hst, ring in ((True, b.out_slots, b.out_host, bufs[:2]),
                                        (False, b.in_slots, b.in_host, bufs[2:])):
            dev, hst = dev[:n], hst[:n]
            ks, ds = self.kernel_streams[to_host], self.dma_streams[to_host]
            first, second = (ks, ds) if to_host else (ds, ks)
            graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize()
            with torch.cuda.graph(graph, stream=first):
                second.wait_stream(first)
                free: list[Event | None] = [None, None]
                for i, start in enumerate(range(0, n, chunk)):
                    staged = ring[i % 2]
                    if free[i % 2] is not None:
                        first.wait_event(free[i % 2])
                    runs = contiguous_runs(hst[start : start + chunk], host.dma_chunk_tokens)
                    if to_host:
                        with torch.cuda.stream(ks):
                            gather_kv(table, dev[start : start + chunk], staged,
                                      num_programs=programs)
                        ds.wait_stream(ks)
                        with torch.cuda.stream(ds):
                            for off, h0, length in runs:
                                host.buffer[h0 : h0 + length].copy_(staged[off : off + length],
                                                                    non_blocking=True)
                    else:
                        with torch.cuda.stream(ds):
                            for off, h0, length in runs:
                                staged[off : off + length].copy_(host.buffer[h0 : h0 + length],
                                                                 non_blocking=True)
                        ks.wait_stream(ds)
                        with torch.cuda.stream(ks):
                            scatter_kv(table, dev[start : start + chunk], staged,
                                       num_programs=programs)
                    free[i % 2] = second.record_event()
                first.wait_stream(second)
            self.graphs[to_host] = graph
        torch.cuda.synchronize()
        self.unit_bytes = n * LAYOUT.bytes_per_token
        self.lane_streams = {True: torch.cuda.Stream(), False: torch.cuda.Stream()}

    def lanes(self) -> list[Lane]:
        def submit(to_host: bool) -> int:
            with torch.cuda.stream(self.lane_streams[to_host]):
                self.graphs[to_host].replay()
            return self.unit_bytes

        return [Lane("d2h", lambda: submit(True), self.lane_streams[True]),
                Lane("h2d", lambda: submit(False), self.lane_streams[False])]


class Resources:
    """The bench (device KV pool, host pool, random page sets) and lazily built loads: a
    scenario that fails to build its load fails alone."""

    def __init__(self, bench: Bench, unit_tokens: int, rt: CudaRuntime | None) -> None:
        self.bench, self.unit_tokens, self._rt = bench, unit_tokens, rt
        self.submit_stream = torch.cuda.Stream()  # idle: the mover's caller-stream wait is a no-op
        self._mover = self._dma = self._staging = None
        self.copiers: dict[tuple[int, int, int], PageBatchCopier] = {}
        self.copiers2d: dict[int, RunCopier2D] = {}
        self.small_movers: dict[tuple[int, bool], tuple] = {}
        self.pipelines: dict[tuple[int, bool], GraphPipeline] = {}
        self._pages2d: PageLayers2D | None = None

    def pages2d(self) -> PageLayers2D:
        if self._pages2d is None:
            self._pages2d = PageLayers2D(self.runtime(), self.bench, self.unit_tokens)
        return self._pages2d

    def pipeline(self, chunk: int, l2: bool) -> GraphPipeline:
        if (chunk, l2) not in self.pipelines:
            self.pipelines[(chunk, l2)] = GraphPipeline(self, chunk, l2)
            log(f"graph pipeline: {self.pipelines[(chunk, l2)].info}")
        return self.pipelines[(chunk, l2)]

    @property
    def mover(self):
        if self._mover is None:
            from superinfer.host_tier.staging import StagingKVMover

            self._mover = StagingKVMover(mha_planes(self.bench.k, self.bench.v), self.bench.host,
                                         path="staging")
        return self._mover

    def small_chunk_mover(self, chunk_tokens: int, l2: bool):
        """A staging mover whose four staging buffers (2 per direction) are one tensor small
        enough for L2; with ``l2`` its kernels mark that tensor persisting in L2. Question: does
        the DMA then read (and write) the staged bytes in L2 instead of HBM, cutting the
        staging path's HBM traffic from 3x the payload towards 1x?"""
        key = (chunk_tokens, l2)
        if key not in self.small_movers:
            from superinfer.host_tier.staging import StagingKVMover

            b = self.bench
            mover = StagingKVMover(mha_planes(b.k, b.v), b.host, path="staging",
                                   max_chunk_tokens=chunk_tokens)
            ring = torch.empty((4 * chunk_tokens, *b.host.buffer.shape[1:]),
                               dtype=b.host.buffer.dtype, device="cuda")
            bufs = list(ring.split(chunk_tokens))
            # NOTE: private attributes, diagnostic only.
            mover._d2h_staging._bufs, mover._h2d_staging._bufs = bufs[:2], bufs[2:]
            info = {"ring_mib": ring.numel() * ring.element_size() / MiB}
            if l2:
                info.update(self.runtime().l2_persist([mover._d2h_stream,
                                                       mover._h2d_scatter_stream],
                                                      ring.data_ptr(),
                                                      ring.numel() * ring.element_size()))
            log(f"small-chunk mover {key}: {info}")
            self.small_movers[key] = (mover, ring, info)
        return self.small_movers[key][0]

    def mover_end_streams(self, mover=None) -> list[torch.cuda.Stream]:
        # NOTE: private attributes: a staging d2h job ends with its DMA, h2d with its scatter.
        mover = mover or self.mover
        return [mover._d2h_dma_stream, mover._h2d_scatter_stream]

    def mover_lanes(self, mover=None) -> list[Lane]:
        b, n, mover = self.bench, self.unit_tokens, mover or self.mover
        starts = range(0, b.out_slots.numel() - n + 1, n)
        d2h_at, h2d_at = itertools.cycle(starts), itertools.cycle(starts)

        def d2h() -> int:
            a = next(d2h_at)
            with torch.cuda.stream(self.submit_stream):
                return mover.submit_d2h("d2h", b.out_slots[a : a + n], b.out_host[a : a + n], None)

        def h2d() -> int:
            a = next(h2d_at)
            with torch.cuda.stream(self.submit_stream):
                return mover.submit_h2d("h2d", b.in_host[a : a + n], b.in_slots[a : a + n])

        d2h_end, h2d_end = self.mover_end_streams(mover)
        return [Lane("d2h", d2h, d2h_end), Lane("h2d", h2d, h2d_end)]

    def dma_lanes(self, d2h: bool, h2d: bool, chunk_bytes: int = 256 * MiB) -> list[Lane]:
        """Contiguous pinned<->device copies, one stream per direction."""
        if self._dma is None:
            n = chunk_bytes // 2
            dev_src = torch.empty(n, dtype=torch.bfloat16, device="cuda").uniform_(0.5, 1.5)
            host_src = torch.empty(n, dtype=torch.bfloat16, pin_memory=True)
            host_src.copy_(dev_src)
            host_dst = torch.empty(n, dtype=torch.bfloat16, pin_memory=True)
            self._dma = {"dev_src": dev_src, "host_dst": host_dst,
                         "host_src": host_src, "dev_dst": torch.empty_like(dev_src),
                         "streams": (torch.cuda.Stream(), torch.cuda.Stream())}
        buf = self._dma
        lanes = []
        if d2h:
            lanes.append(Lane("d2h", _copier(buf["host_dst"], buf["dev_src"], buf["streams"][0]),
                              buf["streams"][0]))
        if h2d:
            lanes.append(Lane("h2d", _copier(buf["dev_dst"], buf["host_src"], buf["streams"][1]),
                              buf["streams"][1]))
        return lanes

    def gather_lane(self, num_programs: int, priority: int = 0) -> list[Lane]:
        """The staging path's Triton gather alone: random device pages into a device buffer."""
        from superinfer.triton_kernels.kv_gather_scatter import gather_kv, make_kv_table

        b, n = self.bench, self.unit_tokens
        if self._staging is None:
            staged = torch.empty((n, *b.host.buffer.shape[1:]), dtype=torch.bfloat16, device="cuda")
            self._staging = (make_kv_table(mha_planes(b.k, b.v)), staged)
        table, staged = self._staging
        stream = torch.cuda.Stream(priority=priority)
        starts = itertools.cycle(range(0, b.out_slots.numel() - n + 1, n))

        def gather() -> int:
            a = next(starts)
            with torch.cuda.stream(stream):
                gather_kv(table, b.out_slots[a : a + n], staged, num_programs=num_programs)
            return n * LAYOUT.bytes_per_token

        return [Lane(f"gather_g{num_programs}", gather, stream)]

    def runtime(self) -> CudaRuntime:
        if self._rt is None:
            self._rt = CudaRuntime()
        return self._rt

    def copier(self, flags: int, page_tokens: int = PAGE, order: int = SRC_ACCESS_ORDER_STREAM
               ) -> PageBatchCopier:
        key = (flags, page_tokens, order)
        if key not in self.copiers:
            pages = self.unit_tokens // 2 // page_tokens  # 256 MiB per batch call
            copier = PageBatchCopier(self.runtime(), self.bench, pages, flags, page_tokens, order)
            first = self.copiers.get((0, PAGE, SRC_ACCESS_ORDER_STREAM))
            if first is not None:  # the location hints the verified copier settled on
                copier.hints = first.hints
            self.copiers[key] = copier
        return self.copiers[key]

    def run2d(self, run_tokens: int) -> RunCopier2D:
        if run_tokens not in self.copiers2d:
            self.copiers2d[run_tokens] = RunCopier2D(self.runtime(), self.bench, self.unit_tokens,
                                                     run_tokens)
        return self.copiers2d[run_tokens]

    def run2d_lanes(self, run_tokens: int, d2h: bool, h2d: bool) -> list[Lane]:
        return copy_lanes(self.run2d(run_tokens).copy, d2h, h2d)

    def batch_lanes(self, d2h: bool, h2d: bool, flags: int = 0, streams: int = 1,
                    page_tokens: int = PAGE, order: int = SRC_ACCESS_ORDER_STREAM) -> list[Lane]:
        """One lane per stream and direction. With several streams a direction's batch calls
        may land on several copy engines: are 32 KiB copies engine-bound or PCIe-bound?"""
        copier = self.copier(flags, page_tokens, order)
        lanes = []
        for on, to_host, name, units in ((d2h, True, "d2h", copier.d2h),
                                         (h2d, False, "h2d", copier.h2d)):
            for k in range(streams if on else 0):
                stream = torch.cuda.Stream()
                idx = itertools.cycle(range(k % len(units), len(units)))
                submit = lambda s=stream, t=to_host, i=idx: copier.copy(t, next(i), s)  # noqa: E731
                lanes.append(Lane(f"{name}{k}" if streams > 1 else name, submit, stream))
        return lanes


def copy_lanes(copy: Callable[[bool, torch.cuda.Stream], int], d2h: bool, h2d: bool) -> list[Lane]:
    """One lane per direction asked for, each on its own stream, submitting
    ``copy(to_host, stream)``."""
    lanes = []
    for on, to_host, name in ((d2h, True, "d2h"), (h2d, False, "h2d")):
        if on:
            stream = torch.cuda.Stream()
            lanes.append(Lane(name, lambda s=stream, t=to_host: copy(t, s), stream))
    return lanes


def _copier(dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream) -> Callable[[], int]:
    def submit() -> int:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
        return dst.numel() * dst.element_size()

    return submit


# --------------------------------------------------------------------------- main


def scenario_plan(res: Resources, graph: Decode, eager: Decode,
                  args: argparse.Namespace) -> list[tuple[str, Callable[[], dict]]]:
    """Most telling first: the JSON is rewritten after each, so a late crash loses little.
    The memcpy_batch ones come last (a wrong ctypes ABI could take the process down)."""
    s, t = args.steps, args.trials

    def loaded(decode: Decode, lanes: Callable[[], list[Lane]], poll=None) -> Callable[[], dict]:
        return lambda: loaded_scenario(
            decode, LoadRunner(lanes(), on_poll=poll() if poll else None), s, t)

    mover_poll = lambda: res.mover.poll  # noqa: E731
    plan = [
        ("graph/baseline", lambda: baseline(graph, s, t)),
        ("eager/baseline", lambda: baseline(eager, s, t)),
        ("graph/staging_mover", loaded(graph, res.mover_lanes, mover_poll)),
        ("eager/staging_mover", loaded(eager, res.mover_lanes, mover_poll)),
        ("graph/dma_only", loaded(graph, lambda: res.dma_lanes(True, True))),
        *((f"graph/gather_only_g{n}", loaded(graph, lambda n=n: res.gather_lane(n)))
          for n in args.gather_grids),
        ("graph/gather_only_g32_hiprio", loaded(graph, lambda: res.gather_lane(32, priority=-1))),
        ("graph/dma_d2h_only", loaded(graph, lambda: res.dma_lanes(True, False))),
        ("graph/dma_h2d_only", loaded(graph, lambda: res.dma_lanes(False, True))),
        *((f"graph/staging_mover_capped_{round(f * 100)}pct",
           lambda f=f: capped_scenario(graph, res, f, s, t)) for f in args.cap_fractions),
        *(item for n in args.small_chunks for l2 in (False, True) for item in (
            (f"graph/staging_c{n}{'_l2' if l2 else ''}", lambda n=n, l2=l2: loaded_scenario(
                graph, LoadRunner(res.mover_lanes(res.small_chunk_mover(n, l2)),
                                  on_poll=res.small_chunk_mover(n, l2).poll), s, t)),)),
        *(item for n in args.pipe_chunks for l2 in ((False, True) if n <= 64 else (False,))
          for item in (
            (f"graph/pipe_c{n}{'_l2' if l2 else ''}",
             loaded(graph, lambda n=n, l2=l2: res.pipeline(n, l2).lanes())),)),
        ("graph/pages2d_verify", lambda: res.pages2d().verify(torch.cuda.Stream())),
        ("graph/pages2d", loaded(graph, lambda: res.pages2d().lanes(True, True))),
        ("graph/pages2d_d2h_only", loaded(graph, lambda: res.pages2d().lanes(True, False))),
        ("graph/pages2d_h2d_only", loaded(graph, lambda: res.pages2d().lanes(False, True))),
        ("graph/memcpy_batch_verify", lambda: res.copier(0).verify(torch.cuda.Stream())),
        ("graph/memcpy_batch", loaded(graph, lambda: res.batch_lanes(True, True))),
        ("graph/memcpy_batch_d2h_only", loaded(graph, lambda: res.batch_lanes(True, False))),
        ("graph/memcpy_batch_h2d_only", loaded(graph, lambda: res.batch_lanes(False, True))),
        *((f"graph/memcpy_batch_x{n}streams",
           loaded(graph, lambda n=n: res.batch_lanes(True, True, streams=n)))
          for n in (2, 4, 8)),
        ("graph/memcpy_batch_order_any", loaded(
            graph, lambda: res.batch_lanes(True, True, order=SRC_ACCESS_ORDER_ANY))),
        *((f"graph/memcpy_batch_page{p}",
           loaded(graph, lambda p=p: res.batch_lanes(True, True, page_tokens=p)))
          for p in (32, 64)),
        ("graph/memcpy_batch_d2h_dma_h2d", loaded(
            graph, lambda: res.batch_lanes(True, False) + res.dma_lanes(False, True))),
        ("graph/memcpy_batch_h2d_dma_d2h", loaded(
            graph, lambda: res.dma_lanes(True, False) + res.batch_lanes(False, True))),
        ("graph/memcpy_batch_prefer_overlap_flag", loaded(
            graph, lambda: res.batch_lanes(True, True, flags=FLAG_PREFER_OVERLAP_WITH_COMPUTE))),
        *(item for n in args.run2d_tokens for item in (
            (f"graph/run2d_{n}_verify", lambda n=n: res.run2d(n).verify(torch.cuda.Stream())),
            (f"graph/run2d_{n}", loaded(graph, lambda n=n: res.run2d_lanes(n, True, True))),
            (f"graph/run2d_{n}_d2h_only",
             loaded(graph, lambda n=n: res.run2d_lanes(n, True, False))),
            (f"graph/run2d_{n}_h2d_only",
             loaded(graph, lambda n=n: res.run2d_lanes(n, False, True))),
        )),
    ]
    return [(name, fn) for name, fn in plan if not args.only or any(o in name for o in args.only)]


def run_scenario(name: str, fn: Callable[[], dict], verified: dict) -> dict:
    """Never raises: a failure becomes {"error", "traceback"}. memcpy_batch and run2d timing
    runs only after its family's bit-for-bit check passed."""
    family = re.match(r"graph/(memcpy_batch|run2d_\d+|pages2d)", name)
    if family and not name.endswith("_verify"):
        check = verified.get(f"graph/{family.group(1)}_verify", {})
        if not (check.get("d2h_equal") and check.get("h2d_equal")):
            return {"error": f"skipped: memcpy_batch verification did not pass ({check})"}
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - one broken scenario must not cost the others
        torch.cuda.synchronize()
        return {"error": repr(exc), "traceback": traceback.format_exc()}


def describe(name: str, r: dict) -> str:
    if "error" in r:
        return f"{name}: ERROR {r['error'][:300]}"
    if "loaded_ms" in r:
        gbps = f"{r['gbps']:6.1f}" if r.get("gbps") is not None else "   n/a"
        alone = r.get("load_alone_gbps")
        extra = f" (alone {alone:.1f})" if alone is not None else ""
        cov = f", covered {r['windows_covered']}/{r['trials']}" if "windows_covered" in r else ""
        return (f"{name}: alone {r['alone_ms']:.3f} ms, loaded {r['loaded_ms']:.3f} ms, "
                f"slowdown {r['slowdown']:+.1%}, load {gbps} GB/s{extra}{cov}")
    if "alone_ms" in r:
        return f"{name}: alone {r['alone_ms']:.3f} ms"
    return f"{name}: {r}"


def write(out: Path, summary: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("eval/results/diag_interference_h200.json"))
    ap.add_argument("--pool-tokens", type=int, default=100_000,
                    help="device KV pool (128 KiB/token)")
    ap.add_argument("--max-tokens", type=int, default=16_384,
                    help="tokens in each random page set (out and in); host pool holds twice this")
    ap.add_argument("--unit-tokens", type=int, default=4096, help="tokens per mover/gather submit")
    ap.add_argument("--steps", type=int, default=20, help="decode steps per timed window")
    ap.add_argument("--trials", type=int, default=5, help="alone+loaded window pairs per scenario")
    ap.add_argument("--gather-grids", type=int, nargs="+", default=[8, 32, 132])
    ap.add_argument("--cap-fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    ap.add_argument("--run2d-tokens", type=int, nargs="*", default=[16, 256, 4096],
                    help="run lengths (consecutive device slots) for the cudaMemcpy2DAsync "
                         "scenarios")
    ap.add_argument("--small-chunks", type=int, nargs="*", default=[32, 64],
                    help="staging chunk sizes (tokens) for the L2-resident staging scenarios")
    ap.add_argument("--pipe-chunks", type=int, nargs="*", default=[32, 64, 2048],
                    help="chunk sizes (tokens) for the graph-captured staging pipelines")
    ap.add_argument("--only", nargs="+", help="run only scenarios whose name contains one of these")
    ap.add_argument("--budget-s", type=float, default=65.0,
                    help="skip scenarios not started within this many seconds of main() "
                         "(python + torch import and CUDA init come on top, ~5-10 s)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("diag_interference.py needs a CUDA GPU (torch.cuda.is_available() is False)",
              file=sys.stderr)
        sys.exit(2)
    if args.pool_tokens % PAGE or args.max_tokens % args.unit_tokens or args.unit_tokens % 32:
        ap.error("pool-tokens must be a multiple of 16, max-tokens of unit-tokens, "
                 "unit-tokens of 32")

    t_start = time.perf_counter()
    gpu = torch.cuda.get_device_name()
    summary = {"gpu": gpu, "torch": torch.__version__, "cuda_runtime": None, "cuda_driver": None,
               "cudart_path": None, "torch_cuda": torch.version.cuda,
               "num_sms": torch.cuda.get_device_properties(0).multi_processor_count,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": command_line("eval.diagnostics.diag_interference"),
               "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "scenarios": {}}
    log(f"{gpu}, {summary['num_sms']} SMs, torch {torch.__version__}")
    rt = None
    try:
        rt = CudaRuntime()
        abi = "9 args (failIdx)" if rt.has_fail_idx else "8 args (CUDA 13)"
        summary.update(cuda_runtime=rt.version, cuda_driver=rt.driver_version, cudart_path=rt.path,
                       memcpy_batch_abi=abi)
    except Exception as exc:  # noqa: BLE001 - only the memcpy_batch scenarios need it
        summary["cuda_runtime_error"] = repr(exc)
    log(f"cuda runtime {summary['cuda_runtime']} ({summary['cudart_path']}), "
        f"driver {summary['cuda_driver']}")

    bench = Bench(LAYOUT, args.pool_tokens, args.max_tokens, "cuda")
    res = Resources(bench, args.unit_tokens, rt)
    model = DecodeStandIn(bench.device)
    graph = Decode(model, "graph", torch.cuda.Stream())
    eager = Decode(model, "eager", graph.stream)
    log(f"setup done in {time.perf_counter() - t_start:.1f} s")

    for name, fn in scenario_plan(res, graph, eager, args):
        if time.perf_counter() - t_start > args.budget_s:
            summary["scenarios"][name] = {"error": f"skipped: past the {args.budget_s:.0f} s"}
            log(f"{name}: skipped (budget)")
            continue
        t0 = time.perf_counter()
        result = run_scenario(name, fn, summary["scenarios"])
        result["wall_s"] = round(time.perf_counter() - t0, 2)
        summary["scenarios"][name] = result
        log(describe(name, result))
        write(args.out, summary)

    done = summary["scenarios"]
    summary["slowdowns"] = {n: r["slowdown"] for n, r in done.items() if "slowdown" in r}
    g, e = (done.get(k, {}).get("alone_ms") for k in ("graph/baseline", "eager/baseline"))
    summary["eager_over_graph_alone"] = e / g if g and e else None
    summary["wall_s"] = round(time.perf_counter() - t_start, 1)
    write(args.out, summary)
    log(f"wrote {args.out} in {summary['wall_s']} s")


if __name__ == "__main__":
    main()
