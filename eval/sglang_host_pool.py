"""SGLang's own host-pool transfer, the baseline issue 3 asks for "if it can be called there".

HiCache moves KV between SGLang's ``MHATokenToKVPool`` and an ``MHATokenToKVPoolHost``:
``backup_from_device_all_layer`` (device->host, every layer in one call) and
``load_to_device_per_layer`` (host->device, one call per layer, as HiCache overlaps loading
with the forward). ``measure`` times both on the bench's random 16-token pages, alone and at
once on two streams, with SGLang's own pools of the same shape. Its kernels (sgl_kernel and
HiCache's JIT kernels) are CUDA-only, so on the CPU ``measure`` reports why it measured
nothing instead of failing; on the GPU it needs sglang, which the GPU kit installs
(../shared/gpu/README.md).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from superinfer.host_tier.interface import KVLayout

HOST_LAYOUTS = ("layer_first", "page_first")  # HiCache's --hicache-mem-layout choices for MHA


def build(layout: KVLayout, pool_tokens: int, host_tokens: int, page: int, device: str,
          host_layout: str = "layer_first"):
    """SGLang's device pool (random, never zero KV) and a host pool of ``host_tokens``."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from superinfer.adapters.sglang.compat import mha_host_pool

    if layout.itemsize != 2:
        raise ValueError("the baseline is built for bf16 KV")
    dev = MHATokenToKVPool(size=pool_tokens, page_size=page, dtype=torch.bfloat16,
                           head_num=layout.num_heads, head_dim=layout.head_dim,
                           layer_num=layout.num_layers, device=device, enable_memory_saver=False)
    for buf in (*dev.k_buffer, *dev.v_buffer):
        buf.uniform_(0.5, 1.5)
    host = mha_host_pool(dev, host_tokens / pool_tokens, page, host_layout,
                         pin_memory=device == "cuda")
    return dev, host


def transfers(dev, host, io_backend: str = "kernel") -> tuple[Callable, Callable]:
    """``d2h(host_idx, dev_idx)`` and ``h2d(host_idx, dev_idx)`` the way HiCache calls them."""
    def d2h(host_idx: torch.Tensor, dev_idx: torch.Tensor) -> None:
        host.backup_from_device_all_layer(dev, host_idx, dev_idx, io_backend)

    def h2d(host_idx: torch.Tensor, dev_idx: torch.Tensor) -> None:
        for layer in range(dev.layer_num):
            host.load_to_device_per_layer(dev, host_idx, dev_idx, layer, io_backend)

    return d2h, h2d


def measure(layout: KVLayout, pool_tokens: int, out_slots: torch.Tensor, in_slots: torch.Tensor,
            sizes: list[int], reps: int, host_layout: str = "layer_first") -> dict:
    """GB/s per batch size for SGLang's transfers of ``out_slots`` (d2h) and ``in_slots``
    (h2d), whole 16-token pages; ``{"error": ...}`` where they cannot run."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict = {"host_layout": host_layout, "io_backend": "kernel",
                    "calls": "backup_from_device_all_layer / load_to_device_per_layer"}
    try:
        dev, host = build(layout, pool_tokens, 2 * max(sizes), 16, device, host_layout)
        d2h, h2d = transfers(dev, host)
        n_max = max(sizes)
        host_out = torch.arange(n_max, dtype=torch.int64, device=device)
        host_in = torch.arange(n_max, 2 * n_max, dtype=torch.int64, device=device)
        dev_out, dev_in = out_slots.to(device, torch.int64), in_slots.to(device, torch.int64)
        streams = (torch.cuda.Stream(), torch.cuda.Stream()) if device == "cuda" else (None, None)
        rows = []
        for n in sizes:
            nbytes = n * layout.bytes_per_token
            # The closures run inside this iteration, so the loop variables are the ones meant.
            one = {"d2h": lambda: d2h(host_out[:n], dev_out[:n]),  # noqa: B023
                   "h2d": lambda: h2d(host_in[:n], dev_in[:n])}  # noqa: B023
            row = {"tokens": n}
            for key, fn in one.items():
                row[f"{key}_gbps"] = _gbps(fn, nbytes, reps)
            both = lambda: _both(one["d2h"], one["h2d"], streams)  # noqa: B023, E731
            row["duplex_gbps"] = _gbps(both, 2 * nbytes, reps)
            rows.append(row)
        result["rows"] = rows
        result["verified"] = _verify(dev, host, host_out[: min(sizes)], dev_out[: min(sizes)],
                                     host_layout)
    except Exception as exc:  # noqa: BLE001 - a baseline that cannot run must not sink the bench
        result["error"] = f"{type(exc).__name__}: {exc}"
    return result


def _both(d2h: Callable, h2d: Callable, streams) -> None:
    if streams[0] is None:
        d2h(), h2d()
        return
    caller = torch.cuda.current_stream()
    for stream, fn in zip(streams, (d2h, h2d), strict=False):
        stream.wait_stream(caller)
        with torch.cuda.stream(stream):
            fn()
    for stream in streams:
        caller.wait_stream(stream)


def _gbps(fn: Callable[[], None], nbytes: int, reps: int) -> float:
    rates = []
    for _ in range(reps + 1):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        rates.append(nbytes / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates[1:])


def _verify(dev, host, host_idx: torch.Tensor, dev_idx: torch.Tensor, host_layout: str) -> bool:
    """After the runs, the host copy of the d2h tokens equals the device KV, bit for bit."""
    h, d = host_idx.cpu(), dev_idx
    ok = True
    for layer in range(dev.layer_num):
        for host_buf, dev_buf in ((host.k_buffer, dev.k_buffer), (host.v_buffer, dev.v_buffer)):
            rows = host_buf[layer][h] if host_layout == "layer_first" else host_buf[h, layer]
            ok &= torch.equal(rows, dev_buf[layer][d].cpu())
    return bool(ok)
