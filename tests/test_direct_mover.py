"""DirectKVMover on the CPU: its page-piece plan runs through memmove, so the addressing (the
part that would silently corrupt KV on the GPU) is checked byte for byte here."""

from __future__ import annotations

import pytest
import torch

from superinfer.host_tier.direct import DirectKVMover, pages_of, piece_addresses
from superinfer.host_tier.interface import KVLayout, mha_planes
from superinfer.host_tier.pool import HostKVPool
from superinfer.host_tier.torch_mover import TorchMover

NUM_LAYERS, NUM_HEADS, HEAD_DIM = 3, 2, 5


def make(dtype: torch.dtype, page_size: int, device_pages: int = 12, host_pages: int = 8,
         seed: int = 0, **mover_args):
    gen = torch.Generator().manual_seed(seed)
    # SGLang: size + page
    shape = (NUM_LAYERS, 2, device_pages * page_size + page_size, NUM_HEADS, HEAD_DIM)
    if dtype == torch.uint8:
        kv = torch.randint(1, 256, shape, generator=gen, dtype=torch.uint8)
    else:
        kv = (torch.rand(shape, generator=gen) + 0.5).to(dtype)
    layout = KVLayout(NUM_LAYERS, NUM_HEADS, HEAD_DIM, kv.element_size())
    host = HostKVPool(layout, host_pages * page_size, page_size, dtype, pin_memory=False,
                      page_major=True)
    host.buffer.view(torch.uint8).fill_(0xA5)  # poison: an unwritten piece shows
    mover = DirectKVMover(mha_planes(kv[:, 0], kv[:, 1]), host, **mover_args)
    return kv, host, mover, gen


def slots_of(pages: list[int], page_size: int, num_tokens: int) -> torch.Tensor:
    slots = torch.tensor(pages)[:, None] * page_size + torch.arange(page_size)
    return slots.reshape(-1)[:num_tokens]


def host_page_view(host: HostKVPool, kv: torch.Tensor,
                   device_page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: a device page in the page-major host layout [layers, 2, page, heads*dim]."""
    p = host.page_size
    ref = kv[:, :, device_page * p : (device_page + 1) * p].reshape(NUM_LAYERS, 2, p, -1)
    return ref


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.uint8])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("threaded", [False, True], ids=["inline", "issuer_threads"])
def test_d2h_then_h2d_moves_exact_pages(dtype: torch.dtype, page_size: int, threaded: bool) -> None:
    kv, host, mover, gen = make(dtype, page_size, issue_thread=threaded)
    out_pages = torch.randperm(12, generator=gen)[:5].tolist()
    num_tokens = 5 * page_size - (page_size // 2)  # last page partial when page_size > 1
    host_slots = host.alloc(num_tokens)
    nbytes = mover.submit_d2h("out", slots_of(out_pages, page_size, num_tokens), host_slots, None)
    assert nbytes == num_tokens * host.bytes_per_token
    mover.synchronize()
    assert mover.poll().done_d2h == ["out"]
    used = host_slots[::page_size] // page_size
    for hp, dp in zip(used.tolist(), out_pages, strict=False):
        assert torch.equal(host.buffer[hp], host_page_view(host, kv, dp))
    untouched = torch.ones(host.num_pages, dtype=torch.bool)
    untouched[used] = False
    assert (host.buffer[untouched].view(torch.uint8) == 0xA5).all()

    before = kv.clone()
    in_pages = [p for p in range(12) if p not in out_pages][:5]
    mover.submit_h2d("in", host_slots, slots_of(in_pages, page_size, num_tokens))
    mover.synchronize()
    assert mover.poll().done_h2d == ["in"]
    for dp_out, dp_in in zip(out_pages, in_pages, strict=False):
        a, b = dp_out * page_size, dp_in * page_size
        assert torch.equal(kv[:, :, b : b + page_size], before[:, :, a : a + page_size])
    others = [p for p in range(13) if p not in in_pages]
    for p in others:
        s = slice(p * page_size, (p + 1) * page_size)
        assert torch.equal(kv[:, :, s], before[:, :, s])


def test_pages_of_accepts_whole_pages_and_a_partial_last_one() -> None:
    assert pages_of(slots_of([7, 2, 5], 4, 10), 4, "device").tolist() == [7, 2, 5]
    assert pages_of(torch.tensor([3, 9, 1]), 1, "device").tolist() == [3, 9, 1]


@pytest.mark.parametrize("slots,where", [
    ([4, 5, 6, 8], 3),          # a gap inside a page
    ([5, 6, 7, 8], 0),          # a page that does not start at its first slot
    ([8, 9, 10, 11, 1], 4),     # the next page starts off its boundary
])
def test_pages_of_rejects_slots_that_are_not_page_runs(slots, where) -> None:
    with pytest.raises(ValueError, match=f"position {where}"):
        pages_of(torch.tensor(slots), 4, "device")


def test_piece_addresses_follow_both_layouts() -> None:
    ptrs = torch.tensor([1000, 2000, 3000, 4000])  # k0, v0, k1, v1
    dev, host = piece_addresses(ptrs, torch.tensor([3, 0]), 10_000, torch.tensor([1, 2]), 64)
    assert dev.tolist() == [1000 + 192, 2000 + 192, 3000 + 192, 4000 + 192, 1000, 2000, 3000, 4000]
    assert host.tolist() == [10_256, 10_320, 10_384, 10_448, 10_512, 10_576, 10_640, 10_704]


@pytest.mark.parametrize("threaded", [False, True], ids=["inline", "issuer_threads"])
def test_jobs_report_in_order_and_empty_jobs_are_done(threaded: bool) -> None:
    kv, host, mover, _ = make(torch.bfloat16, 4, issue_thread=threaded)
    a, b = host.alloc(8), host.alloc(4)
    mover.submit_d2h("a", slots_of([1, 2], 4, 8), a, None)
    mover.submit_d2h("empty", torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64),
                     None)
    mover.submit_d2h("b", slots_of([5], 4, 4), b, None)
    mover.synchronize()
    report = mover.poll()
    assert report.done_d2h == ["a", "empty", "b"] and report.bytes_d2h == 12 * host.bytes_per_token


def test_out_of_range_pages_and_mismatched_layouts_are_refused() -> None:
    kv, host, mover, _ = make(torch.bfloat16, 4)
    with pytest.raises(ValueError, match="device page 20"):
        mover.submit_d2h("x", slots_of([20], 4, 4), host.alloc(4), None)
    token_major = HostKVPool(host.layout, 32, 4, torch.bfloat16, pin_memory=False)
    with pytest.raises(ValueError, match="page-major"):
        DirectKVMover(mha_planes(kv[:, 0], kv[:, 1]), token_major)
    with pytest.raises(ValueError, match="token-major"):
        TorchMover(mha_planes(kv[:, 0], kv[:, 1]), host)


def test_page_major_pool_has_the_same_bytes_per_page() -> None:
    kv, host, _, _ = make(torch.bfloat16, 16)
    assert host.buffer.shape == (8, NUM_LAYERS, 2, 16, NUM_HEADS * HEAD_DIM)
    assert host.buffer[0].numel() * host.buffer.element_size() == 16 * host.bytes_per_token
    host.check_integrity()


@pytest.mark.parametrize("threaded", [False, True], ids=["inline", "issuer_threads"])
def test_a_job_goes_out_in_slices_and_is_done_with_its_last(threaded: bool) -> None:
    kv, host, _, gen = make(torch.bfloat16, 4)
    mover = DirectKVMover(mha_planes(kv[:, 0], kv[:, 1]), host, max_queued_pieces=8, slice_pieces=7,
                          issue_thread=threaded)
    pages = torch.randperm(12, generator=gen)[:5].tolist()  # 30 pieces: 4 slices of 7, one of 2
    host_slots = host.alloc(20)
    mover.submit_d2h("out", slots_of(pages, 4, 20), host_slots, None)
    mover.synchronize()
    assert mover.poll().done_d2h == ["out"]
    for hp, dp in zip((host_slots[::4] // 4).tolist(), pages, strict=False):
        assert torch.equal(host.buffer[hp], host_page_view(host, kv, dp))


def test_a_bad_job_is_refused_before_it_is_queued() -> None:
    kv, host, mover, _ = make(torch.bfloat16, 4)
    with pytest.raises(ValueError, match="whole 4-token pages"):
        mover.submit_d2h("bad", torch.tensor([1, 2, 3, 4]), host.alloc(4), None)
    good = host.alloc(4)
    mover.submit_d2h("good", slots_of([3], 4, 4), good, None)
    assert mover.poll().done_d2h == ["good"]  # nothing stuck ahead of it


@pytest.mark.parametrize("bad", [dict(slice_pieces=0), dict(slice_pieces=9, max_queued_pieces=8)])
def test_slice_and_queue_sizes_are_checked(bad) -> None:
    kv, host, _, _ = make(torch.bfloat16, 4)
    with pytest.raises(ValueError, match="slice_pieces"):
        DirectKVMover(mha_planes(kv[:, 0], kv[:, 1]), host, **bad)


def test_a_failed_copy_in_an_issuer_thread_surfaces_and_stops_the_mover(monkeypatch) -> None:
    kv, host, mover, _ = make(torch.bfloat16, 4, issue_thread=True)

    def broken(*args):  # stands in for a CUDA error from the batch call
        raise OSError("copy engine on fire")

    monkeypatch.setattr(mover, "_copy_slice", broken)
    mover.submit_d2h("lost", slots_of([1], 4, 4), host.alloc(4), None)
    with pytest.raises(RuntimeError, match="device->host copy failed") as info:
        mover.synchronize()
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(RuntimeError, match="unusable"):
        mover.poll()
    with pytest.raises(RuntimeError, match="unusable"):
        mover.submit_h2d("next", host.alloc(4), slots_of([2], 4, 4))


def test_issuer_threads_end_when_their_mover_is_dropped() -> None:
    import gc
    import weakref

    kv, host, mover, _ = make(torch.bfloat16, 4, issue_thread=True)
    mover.submit_d2h("out", slots_of([1], 4, 4), host.alloc(4), None)
    mover.synchronize()
    threads = [issuer.thread for issuer in mover._issuers.values()]
    assert [t.ident is not None for t in threads] == [True, False]  # h2d's: no job, no thread
    gone = weakref.ref(mover)
    del mover
    gc.collect()
    assert gone() is None  # nothing (a thread) keeps the mover, and its pinned pool, alive
    threads[0].join(timeout=5)
    assert not threads[0].is_alive()


def test_issuer_threads_under_interleaved_jobs_and_polls_keep_order_and_bytes() -> None:
    """Both directions' threads busy at once, the caller polling in between: every job is
    reported once, in submission order per direction, with its exact bytes."""
    kv, host, _, gen = make(torch.bfloat16, 2, device_pages=64, host_pages=64, seed=3)
    mover = DirectKVMover(mha_planes(kv[:, 0], kv[:, 1]), host, max_queued_pieces=10,
                          slice_pieces=5, issue_thread=True)
    pages = torch.randperm(64, generator=gen).tolist()
    out_pages, in_pages = pages[:32], pages[32:]
    host.buffer[32:] = (torch.rand(host.buffer[32:].shape, generator=gen) + 0.5).to(torch.bfloat16)
    before = kv.clone()
    expected_in = {}
    submitted = {True: [], False: []}
    reported = {True: [], False: []}
    for i in range(16):  # job i: two pages out to host pages 2i, 2i+1; two pages in from 32+2i..
        mover.submit_d2h(f"o{i}", slots_of(out_pages[2 * i : 2 * i + 2], 2, 4),
                         torch.arange(4 * i, 4 * i + 4), None)
        submitted[True].append(f"o{i}")
        mover.submit_h2d(f"i{i}", torch.arange(64 + 4 * i, 64 + 4 * i + 4),
                         slots_of(in_pages[2 * i : 2 * i + 2], 2, 4))
        submitted[False].append(f"i{i}")
        for k in range(2):
            expected_in[in_pages[2 * i + k]] = host.buffer[32 + 2 * i + k].clone()
        report = mover.poll()
        reported[True] += report.done_d2h
        reported[False] += report.done_h2d
    mover.synchronize()
    report = mover.poll()
    reported[True] += report.done_d2h
    reported[False] += report.done_h2d
    assert reported == submitted
    for i, page in enumerate(out_pages):
        assert torch.equal(host.buffer[i], host_page_view(host, before, page))
    for page, data in expected_in.items():
        assert torch.equal(host_page_view(host, kv, page), data)


def test_a_process_ends_cleanly_with_a_mover_still_alive() -> None:
    """Issuer threads are stopped and joined at exit: a daemon thread woken during
    interpreter finalization aborted the process (rc 134) in 3 of 5 runs before."""
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import torch\n"
        "from tests.test_direct_mover import make, slots_of\n"
        "kv, host, mover, _ = make(torch.bfloat16, 4, issue_thread=True)\n"
        "mover.submit_d2h('out', slots_of([1], 4, 4), host.alloc(4), None)\n"
        "mover.submit_h2d('in', host.alloc(4), slots_of([2], 4, 4))\n"
        "mover.synchronize()\n"
        "KEEP = mover\n"
    )
    for _ in range(3):
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             timeout=120, cwd=Path(__file__).resolve().parents[1], check=False)
        assert run.returncode == 0, run.stderr[-2000:]
