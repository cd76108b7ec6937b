"""How contiguous is a running request's KV in SGLang's device pool? A kernel-free mover (one
DMA per run of consecutive slots and layer, eval/results/diag_run2d_h200.json) is only fast
if the runs are long, so this replays a trace through SGLang 0.5.17's own page-size-1
allocator (``TokenToKVPoolAllocator``, CPU, ``need_sort=False`` as in normal serving) the way
its scheduler calls it: one ``alloc`` per prompt, one ``alloc`` of batch-size slots per decode
step, a finished request's slots freed in token order. No radix cache (with one, finished
requests' slots return on eviction instead, in LRU order) and no model: only the allocation
pattern. Samples every running request every ``--sample-every`` steps. ``--page-size P``
replays SGLang's paged allocator instead: would merging adjacent pages give the direct path
(eval/results/duplexkv_h200.json) bigger pieces?

    python -m eval.diagnostics.slot_runs \\
        --trace eval/data/azure_llm_2023/AzureLLMInferenceTrace_conv.csv \\
        --cap 60000 --num 600 --out eval/results/slot_runs_azure_conv.json   # --page-size 16 / 64
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from eval.lib.traces import load_azure
from superinfer.host_tier.jobs import contiguous_runs

RUN_BUCKETS = (1, 16, 256, 2048)  # report the share of tokens in runs of at least this length


def run_lengths(slots: torch.Tensor) -> torch.Tensor:
    """Lengths of the maximal runs of consecutive slot numbers, in order (the host tier's own
    run splitter, with no DMA boundary inside the pool)."""
    runs = contiguous_runs(slots, boundary=1 << 62)
    return torch.tensor([length for _, _, length in runs], dtype=torch.int64)


def replay(rows: list[tuple[int, int]], cap: int, max_running: int, sample_every: int,
           page_size: int = 1) -> dict:
    """Admit in order while the prompt plus the whole output fits (no retraction needed),
    decode everyone each step, finish at the output length. With ``page_size`` > 1 it is
    SGLang's ``PagedTokenToKVPoolAllocator``: a prompt takes whole pages, a request takes a new
    page when its next token starts one (in batch order, as ``alloc_decode`` hands them out),
    and runs are of consecutive pages (counted in tokens)."""
    from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator

    if page_size == 1:
        alloc = TokenToKVPoolAllocator(size=cap, dtype=torch.int64, device="cpu", kvcache=None,
                                       need_sort=False)
    else:
        alloc = PagedTokenToKVPoolAllocator(size=cap // page_size * page_size, page_size=page_size,
                                            dtype=torch.int64, device="cpu", kvcache=None,
                                            need_sort=False)
    pages = lambda n: -(-n // page_size)  # noqa: E731
    waiting = list(rows)
    running: list[dict] = []
    reserved = 0
    tokens_in = {b: 0 for b in RUN_BUCKETS}
    runs_per_req: list[int] = []
    step = 0
    while waiting or running:
        while waiting and len(running) < max_running:
            prompt, out = waiting[0]
            if reserved + pages(prompt + out) * page_size > cap:
                break
            waiting.pop(0)
            running.append({"slots": [alloc.alloc(pages(prompt) * page_size)], "len": prompt,
                            "left": out})
            reserved += pages(prompt + out) * page_size
        if page_size == 1:
            new = alloc.alloc(len(running))  # one slot per running request, in batch order
            for r, s in zip(running, new.split(1), strict=False):
                r["slots"].append(s)
        else:
            for r in running:  # a new page for each request whose next token starts one
                if r["len"] % page_size == 0:
                    r["slots"].append(alloc.alloc(page_size))
        for r in running:
            r["len"] += 1
            r["left"] -= 1
        step += 1
        if step % sample_every == 0:
            for r in running:
                lengths = run_lengths(torch.cat(r["slots"])[::page_size] // page_size) * page_size
                runs_per_req.append(int(lengths.numel()))
                for b in RUN_BUCKETS:
                    tokens_in[b] += int(lengths[lengths >= b].sum())
        done = [r for r in running if r["left"] <= 0]
        for r in done:
            slots = torch.cat(r["slots"])
            alloc.free(slots)
            reserved -= slots.numel()
        running = [r for r in running if r["left"] > 0]
    total = tokens_in[1]
    runs = torch.tensor(runs_per_req, dtype=torch.float64)
    return {"steps": step, "samples": len(runs_per_req), "page_size": page_size,
            "token_share_in_runs_at_least": {str(b): tokens_in[b] / total for b in RUN_BUCKETS},
            "runs_per_request_p50": float(runs.median()),
            "runs_per_request_mean": float(runs.mean()),
            "mean_tokens_per_run": total / float(runs.sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", type=Path, required=True)
    ap.add_argument("--cap", type=int, default=60000, help="device KV pool, tokens")
    ap.add_argument("--num", type=int, default=600, help="first N requests of the trace")
    ap.add_argument("--max-running", type=int, default=256)
    ap.add_argument("--sample-every", type=int, default=50)
    ap.add_argument("--page-size", type=int, default=1,
                    help="SGLang --page-size (1: token allocator)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = [(r.prompt_len, r.output_len) for r in load_azure(args.trace)[: args.num]]
    rows = [(p, o) for p, o in rows if p + o <= args.cap]
    result = {"trace": args.trace.name, "cap": args.cap, "num": len(rows),
              "max_running": args.max_running, "note": __doc__.split("\n\n")[0],
              **replay(rows, args.cap, args.max_running, args.sample_every, args.page_size)}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
