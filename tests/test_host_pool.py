"""HostKVPool on the CPU: page accounting, contiguity preference, double free, pinning errors."""

from __future__ import annotations

import pytest
import torch

from superinfer.host_tier.interface import KVLayout
from superinfer.host_tier.jobs import contiguous_runs
from superinfer.host_tier.pool import HostKVPool

LAYOUT = KVLayout(num_layers=3, num_heads=2, head_dim=8, itemsize=2)


def make_pool(num_tokens: int = 64, page_size: int = 4) -> HostKVPool:
    return HostKVPool(LAYOUT, num_tokens, page_size, torch.bfloat16, pin_memory=False)


def test_buffer_is_token_major_and_sized_exactly() -> None:
    pool = make_pool()
    assert pool.buffer.shape == (64, 3, 2, 16)
    assert pool.buffer[0].numel() * pool.buffer.element_size() == LAYOUT.bytes_per_token
    assert (pool.size, pool.page_size, pool.available_size()) == (64, 4, 64)
    pool.check_integrity()


@pytest.mark.parametrize("bad", [dict(num_tokens=10, page_size=4), dict(num_tokens=2, page_size=4)])
def test_rejects_sizes_that_are_not_whole_pages(bad: dict) -> None:
    with pytest.raises(ValueError):
        HostKVPool(LAYOUT, dtype=torch.bfloat16, pin_memory=False, **bad)


def test_rejects_dtype_that_disagrees_with_layout() -> None:
    with pytest.raises(ValueError):
        HostKVPool(LAYOUT, 16, 4, torch.uint8, pin_memory=False)


def test_alloc_rounds_up_to_pages_and_returns_one_run() -> None:
    pool = make_pool()
    slots = pool.alloc(6)
    assert slots.dtype == torch.int64 and slots.tolist() == list(range(6))
    assert pool.available_size() == 64 - 8  # two pages, the second half used
    pool.check_integrity()


def test_alloc_prefers_smallest_fitting_run_over_lowest_pages() -> None:
    pool = make_pool(num_tokens=40, page_size=4)  # 10 pages
    runs = [pool.alloc(4) for _ in range(10)]
    for page in (1, 5, 6, 8, 9):  # free runs: [1], [5, 6], [8, 9]
        pool.free(runs[page])
    slots = pool.alloc(8)
    assert slots.tolist() == list(range(20, 28))  # the run [5, 6], not pages 1 and 5
    pool.check_integrity()


def test_alloc_falls_back_to_scattered_pages_when_no_run_fits() -> None:
    pool = make_pool(num_tokens=40, page_size=4)
    runs = [pool.alloc(4) for _ in range(10)]
    for page in (2, 4, 7):
        pool.free(runs[page])
    slots = pool.alloc(9)
    assert slots.tolist() == [*range(8, 12), *range(16, 20), 28]
    assert pool.available_size() == 0 and pool.alloc(1) is None
    pool.check_integrity()


def test_alloc_returns_none_when_full_and_changes_nothing() -> None:
    pool = make_pool()
    assert pool.alloc(60) is not None
    assert pool.alloc(5) is None
    assert pool.available_size() == 4
    pool.check_integrity()


def test_free_returns_pages_and_rejects_double_free_atomically() -> None:
    pool = make_pool()
    a, b = pool.alloc(8), pool.alloc(8)
    pool.free(a)
    assert pool.available_size() == 56
    with pytest.raises(ValueError, match="double free"):
        pool.free(torch.cat([b, a]))  # b is live, a is not: nothing may be freed
    assert pool.available_size() == 56
    pool.free(b)
    assert pool.available_size() == 64
    pool.check_integrity()


@pytest.mark.parametrize("slot", [-1, 64])
def test_free_rejects_out_of_range(slot: int) -> None:
    pool = make_pool()
    pool.alloc(4)
    with pytest.raises(ValueError, match="out of range"):
        pool.free(torch.tensor([0, slot]))
    assert pool.available_size() == 60


def test_random_alloc_free_keeps_exact_accounting() -> None:
    gen = torch.Generator().manual_seed(0)
    pool = make_pool(num_tokens=256, page_size=4)
    live: list[torch.Tensor] = []
    owned = torch.zeros(256, dtype=torch.bool)
    for _ in range(300):
        if live and torch.rand(1, generator=gen).item() < 0.45:
            slots = live.pop(int(torch.randint(len(live), (1,), generator=gen)))
            pool.free(slots)
            owned[(slots // 4).unique()[:, None] * 4 + torch.arange(4)] = False
        else:
            slots = pool.alloc(int(torch.randint(1, 30, (1,), generator=gen)))
            if slots is None:
                continue
            pages = (slots // 4).unique()[:, None] * 4 + torch.arange(4)
            assert not owned[pages].any(), "a page was handed out twice"
            owned[pages] = True
            live.append(slots)
        pool.check_integrity()
        assert pool.available_size() == 256 - int(owned.sum())


def test_check_integrity_catches_a_corrupted_counter() -> None:
    pool = make_pool()
    pool.alloc(4)
    pool._num_free_pages += 1
    with pytest.raises(AssertionError):
        pool.check_integrity()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_pinning_without_cuda_fails_clearly() -> None:
    with pytest.raises(RuntimeError, match="pin_memory=False"):
        HostKVPool(LAYOUT, 16, 4, torch.bfloat16, pin_memory=True)


def test_dma_runs_never_cross_a_pinned_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("superinfer.host_tier.pool._REGISTER_CHUNK_BYTES",
                        3 * 4 * LAYOUT.bytes_per_token)
    pool = make_pool(num_tokens=64, page_size=4)
    assert pool.dma_chunk_tokens == 12
    slots = torch.tensor([5, 6, 7, 8, 9, 10, 11, 12, 13, 30, 2, 3])
    runs = contiguous_runs(slots, pool.dma_chunk_tokens)
    assert runs == [(0, 5, 7), (7, 12, 2), (9, 30, 1), (10, 2, 2)]


def _libnuma():
    import ctypes

    try:
        lib = ctypes.CDLL("libnuma.so.1")
    except OSError:
        return None
    return lib if lib.numa_available() >= 0 else None


def _policy_at(lib, addr: int) -> tuple[int, int]:
    """The memory policy (mode, first word of its node mask) of the mapping holding ``addr``."""
    import ctypes

    mode, mask = ctypes.c_int(-1), (ctypes.c_ulong * 16)()
    rc = lib.get_mempolicy(ctypes.byref(mode), mask, ctypes.c_ulong(16 * 64), ctypes.c_void_p(addr),
                           ctypes.c_ulong(2))  # MPOL_F_ADDR
    assert rc == 0
    return mode.value, mask[0]


@pytest.mark.skipif(_libnuma() is None, reason="needs libnuma and a NUMA-capable kernel")
def test_numa_node_binds_the_pool_before_first_touch() -> None:
    lib = _libnuma()
    bound = HostKVPool(LAYOUT, 8192, 16, torch.bfloat16, pin_memory=False, numa_node=0)
    middle = bound.buffer.data_ptr() + bound.buffer.numel()  # half way, in bytes (bf16)
    mode, mask = _policy_at(lib, middle)
    assert mode in (1, 2) and mask & 1  # MPOL_PREFERRED or MPOL_BIND, on node 0
    free = HostKVPool(LAYOUT, 8192, 16, torch.bfloat16, pin_memory=False)
    assert _policy_at(lib, free.buffer.data_ptr() + free.buffer.numel())[0] == 0  # MPOL_DEFAULT
    with pytest.raises(RuntimeError, match="NUMA node 4096 is not available"):
        HostKVPool(LAYOUT, 64, 16, torch.bfloat16, pin_memory=False, numa_node=4096)
