"""StagingKVMover (both paths) and TorchMover on CUDA: bytes, ordering fences, polling.

Delays come from ``torch.cuda._sleep`` on a side stream: a mover that ignored an event would
copy too early and the check would see the old bytes.
"""

from __future__ import annotations

import pytest
import torch

from superinfer.host_tier.interface import KVLayout, mha_planes
from superinfer.host_tier.jobs import contiguous_runs
from superinfer.host_tier.pool import HostKVPool

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
LAYERS, HEADS, HEAD_DIM, SLOTS, PAGE = 4, 8, 128, 8192, 16
SLEEP_CYCLES = 200_000_000  # ~0.1 s at H200 clocks: far longer than any copy here
MOVERS = ["staging", "zerocopy", "torch"]


def make_mover(kind: str, dtype=torch.bfloat16, max_chunk_tokens: int = 300):
    from superinfer.host_tier.staging import StagingKVMover
    from superinfer.host_tier.torch_mover import TorchMover

    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (LAYERS, 2, SLOTS + PAGE, HEADS, HEAD_DIM)
    if dtype == torch.uint8:
        kv = torch.randint(1, 256, shape, generator=gen, device="cuda", dtype=torch.uint8)
    else:
        kv = (torch.rand(shape, generator=gen, device="cuda") + 0.5).to(dtype)
    layout = KVLayout(LAYERS, HEADS, HEAD_DIM, kv.element_size())
    host = HostKVPool(layout, 4096, PAGE, dtype, pin_memory=True)
    host.buffer.view(torch.uint8).fill_(0xA5)
    planes = mha_planes(kv[:, 0], kv[:, 1])
    torch.cuda.synchronize()  # side streams in the tests do not wait for this set-up
    if kind == "torch":
        return kv, host, TorchMover(planes, host)
    return kv, host, StagingKVMover(planes, host, path=kind, max_chunk_tokens=max_chunk_tokens)


def page_slots(num_tokens: int, first_page: int = 0) -> torch.Tensor:
    pages = torch.randperm(SLOTS // PAGE)[: -(-num_tokens // PAGE)] + first_page
    return (pages[:, None] * PAGE + torch.arange(PAGE)).reshape(-1)[:num_tokens].cuda()


def delayed_event() -> torch.cuda.Event:
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        return side.record_event()


def rows(kv: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    return kv[:, :, slots].permute(2, 0, 1, 3, 4).reshape(len(slots), LAYERS, 2, -1)


@pytest.mark.parametrize("kind", MOVERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.uint8])
def test_round_trip_both_directions_at_once(kind: str, dtype) -> None:
    kv, host, mover = make_mover(kind, dtype)
    out_slots, in_slots = page_slots(1000), page_slots(777)
    in_slots = in_slots[~torch.isin(in_slots, out_slots)]
    out_host, in_host = host.alloc(len(out_slots)), host.alloc(len(in_slots))
    host.buffer[in_host] = (torch.rand(len(in_slots), LAYERS, 2, HEADS * HEAD_DIM) + 2).to(dtype)
    expected_in, expected_out = host.buffer[in_host].clone(), rows(kv, out_slots).cpu()
    others = torch.ones(SLOTS + PAGE, dtype=torch.bool, device="cuda")
    others[in_slots] = False
    before = kv[:, :, others].clone()

    mover.submit_d2h("out", out_slots, out_host, None)
    mover.submit_h2d("in", in_host, in_slots)
    mover.synchronize()
    assert torch.equal(host.buffer[out_host], expected_out)
    assert torch.equal(rows(kv, in_slots).cpu(), expected_in)
    assert torch.equal(kv[:, :, others], before)
    report = mover.poll()
    assert (report.done_d2h, report.done_h2d) == (["out"], ["in"])
    assert report.bytes_d2h == len(out_slots) * host.bytes_per_token


@pytest.mark.parametrize("kind", MOVERS)
def test_d2h_waits_for_ready_and_poll_does_not_block(kind: str) -> None:
    kv, host, mover = make_mover(kind)
    slots, host_slots = page_slots(500), host.alloc(500)
    compute = torch.cuda.Stream()
    compute.wait_event(delayed_event())
    with torch.cuda.stream(compute):
        kv[:, :, slots] += 1.0  # the "last forward" that writes these slots, late
        ready = compute.record_event()
    mover.submit_d2h("out", slots, host_slots, ready)
    assert mover.poll().done_d2h == []  # still waiting on the delayed write
    mover.synchronize()
    torch.cuda.synchronize()
    assert torch.equal(host.buffer[host_slots], rows(kv, slots).cpu())
    assert mover.poll().done_d2h == ["out"]


@pytest.mark.parametrize("kind", MOVERS)
def test_fence_compute_orders_reads_after_h2d(kind: str) -> None:
    kv, host, mover = make_mover(kind)
    slots, host_slots = page_slots(600), host.alloc(600)
    host.buffer[host_slots] = (torch.rand(600, LAYERS, 2, HEADS * HEAD_DIM) + 3).bfloat16()
    mover.submit_h2d("in", host_slots, slots, delayed_event())
    compute = torch.cuda.Stream()
    mover.fence_compute(compute)
    with torch.cuda.stream(compute):
        seen = rows(kv, slots)
    compute.synchronize()
    assert torch.equal(seen.cpu(), host.buffer[host_slots])


@pytest.mark.parametrize("kind", ["staging", "zerocopy"])
def test_jobs_finish_in_order_across_chunks_and_scattered_host_pages(kind: str) -> None:
    kv, host, mover = make_mover(kind, max_chunk_tokens=64)
    blocks = [host.alloc(PAGE * 4) for _ in range(host.size // (PAGE * 4))]
    for b in blocks[::2]:
        host.free(b)  # free runs of 4 pages only: every job below spans several runs
    jobs = []
    for i in range(5):
        slots = page_slots(130 + 17 * i)
        host_slots = host.alloc(len(slots))
        assert len(contiguous_runs(host_slots, host.dma_chunk_tokens)) > 1
        jobs.append((f"job{i}", slots, host_slots, rows(kv, slots).cpu()))
        mover.submit_d2h(f"job{i}", slots, host_slots, None)
    mover.synchronize()
    assert mover.poll().done_d2h == [j[0] for j in jobs]
    for _, _, host_slots, expected in jobs:
        assert torch.equal(host.buffer[host_slots], expected)


def test_rejects_unknown_path_and_unpinned_host() -> None:
    from superinfer.host_tier.staging import StagingKVMover

    kv, host, _ = make_mover("torch")
    with pytest.raises(ValueError):
        StagingKVMover(mha_planes(kv[:, 0], kv[:, 1]), host, path="magic")
    layout = KVLayout(LAYERS, HEADS, HEAD_DIM, 2)
    unpinned = HostKVPool(layout, 64, PAGE, torch.bfloat16, pin_memory=False)
    with pytest.raises(ValueError):
        StagingKVMover(mha_planes(kv[:, 0], kv[:, 1]), unpinned)


# --- DirectKVMover: page pieces by cudaMemcpyBatchAsync, page-major host pool -----------------


def make_direct(page: int = PAGE, dtype=torch.bfloat16, **mover_args):
    from superinfer.host_tier.direct import DirectKVMover

    gen = torch.Generator(device="cuda").manual_seed(1)
    kv = (torch.rand((LAYERS, 2, SLOTS + page, HEADS, HEAD_DIM), generator=gen,
                     device="cuda") + 0.5).to(dtype)
    layout = KVLayout(LAYERS, HEADS, HEAD_DIM, kv.element_size())
    host = HostKVPool(layout, 4096, page, dtype, pin_memory=True, page_major=True)
    host.buffer.view(torch.uint8).fill_(0xA5)
    torch.cuda.synchronize()
    return kv, host, DirectKVMover(mha_planes(kv[:, 0], kv[:, 1]), host, **mover_args)


def token_rows(host: HostKVPool, host_slots: torch.Tensor) -> torch.Tensor:
    """A page-major host pool read as token rows [n, layers, 2, heads*dim]."""
    b = host.buffer
    return b.permute(0, 3, 1, 2, 4).reshape(host.size, *b.shape[1:3], b.shape[-1])[host_slots]


def wait_done(mover, d2h: tuple[str, ...] = (), h2d: tuple[str, ...] = (),
              timeout_s: float = 10.0) -> None:
    """Poll until every named job has been reported (a report covers both directions)."""
    import time

    left_d2h, left_h2d = set(d2h), set(h2d)
    t0 = time.perf_counter()
    while left_d2h or left_h2d:
        if time.perf_counter() - t0 > timeout_s:
            raise AssertionError(f"not done within {timeout_s} s: d2h {left_d2h}, h2d {left_h2d}")
        report = mover.poll()
        left_d2h -= set(report.done_d2h)
        left_h2d -= set(report.done_h2d)
        time.sleep(1e-3)


@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("slots_on", ["cuda", "cpu"])
def test_direct_round_trip_both_directions_at_once(page: int, slots_on: str) -> None:
    kv, host, mover = make_direct(page)
    assert host.buffer.is_pinned()
    pages = torch.randperm(SLOTS // page)
    n_out, n_in = 20 * page - 3, 11 * page + 5  # partial last pages, copied whole
    out_slots = (pages[:20, None] * page + torch.arange(page)).reshape(-1)[:n_out]
    in_slots = (pages[20:32, None] * page + torch.arange(page)).reshape(-1)[:n_in]
    out_host, in_host = host.alloc(n_out), host.alloc(n_in)
    in_pages = torch.unique(in_host // page)
    host.buffer[in_pages] = (torch.rand(len(in_pages), *host.buffer.shape[1:]) + 2).to(kv.dtype)
    expected_in = token_rows(host, in_host).clone()
    expected_out = rows(kv, out_slots.cuda()).cpu()
    mover.submit_d2h("out", out_slots.to(slots_on), out_host, None)
    mover.submit_h2d("in", in_host, in_slots.to(slots_on))
    wait_done(mover, d2h=("out",), h2d=("in",))
    mover.fence_compute(torch.cuda.current_stream())
    assert torch.equal(token_rows(host, out_host), expected_out)
    assert torch.equal(rows(kv, in_slots.cuda()).cpu(), expected_in)


def test_direct_d2h_waits_for_ready_and_poll_does_not_block() -> None:
    kv, host, mover = make_direct()
    slots = page_slots(500)
    host_slots = host.alloc(500)
    compute = torch.cuda.Stream()
    compute.wait_event(delayed_event())
    with torch.cuda.stream(compute):
        kv[:, :, slots] += 1.0  # the late "last forward" writing these slots
        ready = compute.record_event()
    mover.submit_d2h("out", slots, host_slots, ready)  # slots on the device: deferred
    assert mover.poll().done_d2h == []
    wait_done(mover, d2h=("out",))
    torch.cuda.synchronize()
    assert torch.equal(token_rows(host, host_slots), rows(kv, slots).cpu())


def test_direct_jobs_finish_in_order_when_deferred_and_immediate_mix() -> None:
    kv, host, mover = make_direct()
    jobs = []
    for i in range(6):
        slots = page_slots(64 + 16 * i)
        host_slots = host.alloc(len(slots))
        jobs.append((f"job{i}", host_slots, rows(kv, slots).cpu()))
        ready = delayed_event() if i == 0 else None
        mover.submit_d2h(f"job{i}", slots if i % 2 == 0 else slots.cpu(), host_slots, ready)
    mover.synchronize()
    assert mover.poll().done_d2h == [j[0] for j in jobs]
    for _, host_slots, expected in jobs:
        assert torch.equal(token_rows(host, host_slots), expected)


def test_direct_issuer_threads_push_many_slices_through_a_small_queue() -> None:
    """A job of many slices through a queue of two: the issuer thread waits on the copy
    engine's progress itself, and every byte arrives."""
    kv, host, mover = make_direct(slice_pieces=64, max_queued_pieces=128)
    out_slots, in_slots = page_slots(1600), page_slots(1600, first_page=0)
    in_slots = in_slots[torch.isin(in_slots, out_slots, invert=True)][: 800]
    in_slots = in_slots[: in_slots.numel() // PAGE * PAGE]
    out_host, in_host = host.alloc(out_slots.numel()), host.alloc(in_slots.numel())
    host.buffer[torch.unique(in_host // PAGE)] = 3.0
    expected_out = rows(kv, out_slots).cpu()
    mover.submit_d2h("out", out_slots, out_host, None)  # 100 pages x 8 pieces = 13 slices
    mover.submit_h2d("in", in_host, in_slots)
    wait_done(mover, d2h=("out",), h2d=("in",))
    torch.cuda.synchronize()
    assert torch.equal(token_rows(host, out_host), expected_out)
    assert bool((rows(kv, in_slots) == 3.0).all())


# --- timing: what the cost model learns the link's rate from ---------------------------------


@pytest.mark.parametrize("kind", [*MOVERS, "direct"])
def test_copies_are_timed_alone_not_with_the_forward_they_waited_for(kind: str) -> None:
    """Both copies wait ~0.1 s for their ``ready`` event; their timings must hold only their
    own run on the link (a 32 MB copy: a few ms), so the policy's link budgets see the link."""
    import time

    kv, host, mover = make_direct() if kind == "direct" else make_mover(kind)
    out_slots, in_slots = page_slots(2000), page_slots(1000)
    in_slots = in_slots[~torch.isin(in_slots, out_slots)]
    out_host, in_host = host.alloc(len(out_slots)), host.alloc(len(in_slots))
    t0 = time.perf_counter()
    mover.submit_d2h("out", out_slots, out_host, delayed_event())
    mover.submit_h2d("in", in_host, in_slots, delayed_event())
    mover.synchronize()
    torch.cuda.synchronize()
    waited_s = time.perf_counter() - t0
    report = mover.poll()
    assert (report.done_d2h, report.done_h2d) == (["out"], ["in"])
    assert report.timings["out"][0] == len(out_slots) * host.bytes_per_token
    assert report.timings["in"][0] == len(in_slots) * host.bytes_per_token
    for num_bytes, seconds in report.timings.values():
        assert 0 < seconds < 0.25 * waited_s  # the wait is not in it
        assert num_bytes / seconds > 1e9  # bytes per second: a link's rate
