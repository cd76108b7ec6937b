"""TorchMover on the CPU: exact bytes moved, nothing else touched, jobs reported in order."""

from __future__ import annotations

import pytest
import torch

from superinfer.host_tier.interface import KVLayout, mha_planes
from superinfer.host_tier.pool import HostKVPool
from superinfer.host_tier.torch_mover import TorchMover

NUM_LAYERS, NUM_HEADS, HEAD_DIM, DEVICE_SLOTS = 3, 2, 5, 97


def random_kv(dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random bits for every element, never zero, so unwritten or misplaced rows show."""
    shape = (NUM_LAYERS, 2, DEVICE_SLOTS, NUM_HEADS, HEAD_DIM)
    if dtype == torch.uint8:
        return torch.randint(1, 256, shape, generator=gen, dtype=torch.uint8)
    return (torch.rand(shape, generator=gen) + 0.5).to(dtype)


def make(dtype: torch.dtype, page_size: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    kv = random_kv(dtype, gen)
    itemsize = torch.empty((), dtype=dtype).element_size()
    layout = KVLayout(NUM_LAYERS, NUM_HEADS, HEAD_DIM, itemsize)
    host = HostKVPool(layout, 128, page_size, dtype, pin_memory=False)
    poison(host.buffer)
    mover = TorchMover(mha_planes(kv[:, 0], kv[:, 1]), host)
    return kv, host, mover, gen


def poison(t: torch.Tensor) -> None:
    t.view(torch.uint8).fill_(0xA5)


def host_rows_of(kv: torch.Tensor, device_slots: torch.Tensor) -> torch.Tensor:
    """Reference: token-major [n, layers, 2, heads*dim] rows for ``device_slots``."""
    rows = kv[:, :, device_slots].permute(2, 0, 1, 3, 4)
    return rows.reshape(len(device_slots), NUM_LAYERS, 2, -1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.uint8])
@pytest.mark.parametrize("page_size", [1, 16])
def test_d2h_writes_exactly_the_allocated_rows(dtype: torch.dtype, page_size: int) -> None:
    kv, host, mover, gen = make(dtype, page_size)
    device_slots = torch.randperm(DEVICE_SLOTS, generator=gen)[:37]
    host_slots = host.alloc(37)
    nbytes = mover.submit_d2h("out", device_slots, host_slots, None)
    assert nbytes == 37 * host.bytes_per_token
    assert torch.equal(host.buffer[host_slots], host_rows_of(kv, device_slots))
    untouched = torch.ones(host.size, dtype=torch.bool)
    untouched[host_slots] = False
    assert (host.buffer[untouched].view(torch.uint8) == 0xA5).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("page_size", [1, 16])
def test_round_trip_into_other_device_slots(dtype: torch.dtype, page_size: int) -> None:
    kv, host, mover, gen = make(dtype, page_size, seed=1)
    perm = torch.randperm(DEVICE_SLOTS, generator=gen)
    src, dst = perm[:29], perm[29:58]
    expected = kv[:, :, src].clone()
    before = kv.clone()
    host_slots = host.alloc(29)
    mover.submit_d2h("out", src, host_slots, None)
    kv.view(torch.uint8)[:, :, dst] = 0xA5
    mover.submit_h2d("in", host_slots, dst.to(torch.int32))
    assert torch.equal(kv[:, :, dst], expected)
    others = torch.ones(DEVICE_SLOTS, dtype=torch.bool)
    others[dst] = False
    assert torch.equal(kv[:, :, others], before[:, :, others])


def test_scattered_host_slots_are_split_into_runs() -> None:
    kv, host, mover, gen = make(torch.bfloat16, 4, seed=2)
    blocks = [host.alloc(4) for _ in range(8)]
    host.free(blocks[1])
    host.free(blocks[5])
    host_slots = host.alloc(8)  # pages 1 and 5: two runs
    device_slots = torch.randperm(DEVICE_SLOTS, generator=gen)[:8]
    mover.submit_d2h("out", device_slots, host_slots, None)
    assert torch.equal(host.buffer[host_slots], host_rows_of(kv, device_slots))


def test_poll_reports_each_job_once_in_submission_order() -> None:
    kv, host, mover, gen = make(torch.bfloat16, 1, seed=3)
    a, b = host.alloc(3), host.alloc(5)
    mover.submit_d2h("a", torch.arange(3), a, None)
    mover.submit_d2h("b", torch.arange(3, 8), b, None)
    mover.submit_h2d("c", a, torch.arange(10, 13))
    report = mover.poll()
    assert report.done_d2h == ["a", "b"] and report.done_h2d == ["c"]
    assert report.bytes_d2h == 8 * host.bytes_per_token
    assert report.bytes_h2d == 3 * host.bytes_per_token
    assert mover.poll().done_d2h == []
    mover.fence_compute(None)
    mover.synchronize()


@pytest.mark.parametrize(
    "device_slots, host_slots",
    [
        (torch.arange(3), torch.arange(4)),
        (torch.arange(4), torch.arange(4, dtype=torch.int32)),
        (torch.arange(4).float(), torch.arange(4)),
    ],
)
def test_rejects_mismatched_slots(device_slots: torch.Tensor, host_slots: torch.Tensor) -> None:
    _, _, mover, _ = make(torch.bfloat16, 1)
    with pytest.raises(ValueError):
        mover.submit_d2h("x", device_slots, host_slots, None)


def test_rejects_buffers_that_do_not_match_the_host_layout() -> None:
    _, host, _, gen = make(torch.bfloat16, 1)
    kv = random_kv(torch.float16, gen)
    with pytest.raises(ValueError):
        TorchMover(mha_planes(kv[:, 0], kv[:, 1]), host)
    with pytest.raises(ValueError):
        TorchMover(mha_planes(kv[:2, 0].bfloat16(), kv[:2, 1].bfloat16()), host)
