"""Why is the direct path slower inside bench_duplexkv.py than in diag_interference.py? Times one
``cudaMemcpyBatchAsync`` call on the host (how long the submit blocks) against its copy on the
GPU, by host memory kind (a ``HostKVPool`` registered with cudaHostRegister, as the package
pins it, vs torch's ``pin_memory=True`` cudaHostAlloc) and pieces per call, one direction.

    python -m eval.diagnostics.diag_direct_submit --out eval/results/diag_direct_submit_h200.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

from eval.lib.jsonfiles import command_line
from superinfer.host_tier.cudart import runtime
from superinfer.host_tier.interface import KVLayout
from superinfer.host_tier.pool import HostKVPool

MiB = 1 << 20


def host_buffer(kind: str, num_bytes: int, page_tokens: int) -> tuple[torch.Tensor, object]:
    if kind == "registered":
        layout = KVLayout(32, 8, 128, 2)
        tokens = num_bytes // layout.bytes_per_token // page_tokens * page_tokens
        pool = HostKVPool(layout, tokens, page_tokens, torch.bfloat16, pin_memory=True,
                          page_major=True)
        return pool.buffer.view(-1).view(torch.uint8), pool
    return torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True), None


def one_call(dev: torch.Tensor, host: torch.Tensor, piece: int, pieces: int, to_host: bool) -> dict:
    rt, stream = runtime(), torch.cuda.Stream()
    dev_slots = torch.randperm(dev.numel() // piece)[:pieces]
    dev_addr = dev.data_ptr() + dev_slots * piece
    host_addr = host.data_ptr() + torch.arange(pieces, dtype=torch.int64) * piece
    sizes = torch.full((pieces,), piece, dtype=torch.int64)
    dsts, srcs = (host_addr, dev_addr) if to_host else (dev_addr, host_addr)
    out = []
    for _ in range(3):  # first call warms up; report the last
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        t0 = time.perf_counter()
        rt.memcpy_batch(dsts, srcs, sizes, to_host, stream, torch.cuda.current_device())
        call_ms = (time.perf_counter() - t0) * 1e3
        end.record(stream)
        end.synchronize()
        gpu_ms = start.elapsed_time(end)
        out.append({"call_ms": call_ms, "gpu_ms": gpu_ms,
                    "gbps": pieces * piece / (max(gpu_ms, call_ms) * 1e-3) / 1e9,
                    "call_us_per_piece": call_ms * 1e3 / pieces})
    return out[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--pieces", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--piece-kib", type=int, nargs="+", default=[32, 128])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    largest = max(args.pieces) * max(args.piece_kib) * 1024
    dev = torch.empty(2 * largest, dtype=torch.uint8, device="cuda")
    results = {"gpu": torch.cuda.get_device_name(),
               "command": command_line("eval.diagnostics.diag_direct_submit"),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "runs": []}
    for kind in ("hostalloc", "registered"):
        for kib in args.piece_kib:
            host, keep = host_buffer(kind, largest, kib // 2)  # 2 KiB per token-row of one layer
            for n in args.pieces:
                for to_host in (True, False):
                    r = {"host": kind, "piece_kib": kib, "pieces": n, "d2h": to_host,
                         **one_call(dev, host, kib * 1024, n, to_host)}
                    results["runs"].append(r)
                    print(f"{kind:10s} {kib:4d} KiB x {n:6d} {'d2h' if to_host else 'h2d'}: call "
                          f"{r['call_ms']:8.2f} ms ({r['call_us_per_piece']:.2f} us/piece), gpu "
                          f"{r['gpu_ms']:8.2f} ms, {r['gbps']:6.1f} GB/s", flush=True)
            del host, keep
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
