"""Gather / scatter kernels against the torch reference: on the GPU if there is one, else through
the Triton interpreter (tests/conftest.py). Random non-zero data, poisoned outputs."""

from __future__ import annotations

import pytest
import torch
from superinfer.triton_kernels.kv_gather_scatter import gather_kv, make_kv_table, scatter_kv
from superinfer.triton_kernels.reference import gather_kv_ref, scatter_kv_ref

from superinfer.host_tier.interface import mha_planes

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
POISON = 0xA5
# (dtype, layers, heads, head_dim): bf16/fp16 with even and odd rows, fp8 stored as uint8.
SHAPES = [
    (torch.bfloat16, 3, 2, 8),
    (torch.float16, 2, 3, 7),
    (torch.uint8, 3, 1, 3),
    (torch.uint8, 2, 2, 16),
]


def random_buffers(dtype, num_layers, heads, head_dim, num_slots, gen):
    def one() -> torch.Tensor:
        if dtype == torch.uint8:
            t = torch.randint(1, 256, (num_slots, heads, head_dim), generator=gen,
                              dtype=torch.uint8)
        else:
            t = (torch.rand(num_slots, heads, head_dim, generator=gen) + 0.5).to(dtype)
        return t.to(DEVICE)

    return [one() for _ in range(num_layers)], [one() for _ in range(num_layers)]


def random_slots(num_tokens: int, num_slots: int, page_size: int, gen) -> torch.Tensor:
    """Whole device pages in random order (duplicate-free), cut to ``num_tokens``."""
    num_pages = -(-num_tokens // page_size)
    pages = torch.randperm(num_slots // page_size, generator=gen)[:num_pages]
    slots = (pages[:, None] * page_size + torch.arange(page_size)).reshape(-1)[:num_tokens]
    return slots.to(DEVICE)


def poisoned(shape, dtype) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=DEVICE)
    t.view(torch.uint8).fill_(POISON)
    return t


@pytest.mark.parametrize("dtype, num_layers, heads, head_dim", SHAPES)
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("num_tokens", [1, 37])
def test_gather_matches_reference(dtype, num_layers, heads, head_dim, page_size,
                                  num_tokens) -> None:
    gen = torch.Generator().manual_seed(num_tokens * 31 + page_size)
    k, v = random_buffers(dtype, num_layers, heads, head_dim, 128, gen)
    slots = random_slots(num_tokens, 128, page_size, gen)
    out = poisoned((num_tokens, num_layers, 2, heads * head_dim), dtype)
    gather_kv(make_kv_table(mha_planes(k, v)), slots, out, page_size=page_size)
    assert torch.equal(out, gather_kv_ref(mha_planes(k, v), slots))


@pytest.mark.parametrize("dtype, num_layers, heads, head_dim", SHAPES)
@pytest.mark.parametrize("page_size", [1, 16])
def test_scatter_matches_reference_and_touches_nothing_else(dtype, num_layers, heads, head_dim,
                                                            page_size) -> None:
    gen = torch.Generator().manual_seed(7 + page_size)
    k, v = random_buffers(dtype, num_layers, heads, head_dim, 96, gen)
    expect_k, expect_v = [t.clone() for t in k], [t.clone() for t in v]
    slots = random_slots(29, 96, page_size, gen)
    src_k, _ = random_buffers(dtype, 1, 29, num_layers * 2 * heads * head_dim, 1, gen)
    src = src_k[0].reshape(29, num_layers, 2, heads * head_dim)
    scatter_kv(make_kv_table(mha_planes(k, v)), slots.to(torch.int32), src, page_size=page_size)
    scatter_kv_ref(mha_planes(expect_k, expect_v), slots, src)
    assert all(torch.equal(a, b) for a, b in zip(k + v, expect_k + expect_v, strict=False))


@pytest.mark.parametrize("num_programs", [1, 3, None])
def test_indexed_rows_round_trip(num_programs) -> None:
    """Zero-copy addressing: rows of the token-major side chosen by an index, the rest untouched."""
    gen = torch.Generator().manual_seed(11)
    k, v = random_buffers(torch.bfloat16, 4, 2, 4, 64, gen)
    table = make_kv_table(mha_planes(k, v))
    perm = torch.randperm(64, generator=gen).to(DEVICE)
    src_slots, dst_slots = perm[:21], perm[21:42]
    rows = torch.randperm(50, generator=gen)[:21].to(DEVICE)
    host = poisoned((50, 4, 2, 8), torch.bfloat16)
    gather_kv(table, src_slots, host, rows, num_programs=num_programs)
    assert torch.equal(host[rows], gather_kv_ref(mha_planes(k, v), src_slots))
    untouched = torch.ones(50, dtype=torch.bool, device=DEVICE)
    untouched[rows] = False
    assert (host[untouched].view(torch.uint8) == POISON).all()

    for t in k + v:
        t.view(torch.uint8)[dst_slots] = POISON
    before = [t.clone() for t in k + v]
    scatter_kv(table, dst_slots, host, rows, num_programs=num_programs)
    assert torch.equal(gather_kv_ref(mha_planes(k, v), dst_slots),
                       gather_kv_ref(mha_planes(k, v), src_slots))
    others = torch.ones(64, dtype=torch.bool, device=DEVICE)
    others[dst_slots] = False
    assert all(torch.equal(a[others], b[others]) for a, b in zip(k + v, before, strict=False))


def test_empty_batch_is_a_no_op() -> None:
    gen = torch.Generator().manual_seed(3)
    k, v = random_buffers(torch.bfloat16, 2, 1, 8, 16, gen)
    out = poisoned((0, 2, 2, 8), torch.bfloat16)
    gather_kv(make_kv_table(mha_planes(k, v)), torch.empty(0, dtype=torch.int64, device=DEVICE),
              out)


def test_rejects_a_buffer_of_the_wrong_width() -> None:
    gen = torch.Generator().manual_seed(5)
    k, v = random_buffers(torch.bfloat16, 2, 1, 8, 16, gen)
    with pytest.raises(AssertionError):
        gather_kv(make_kv_table(mha_planes(k, v)), torch.arange(4, device=DEVICE),
                  poisoned((4, 2, 2, 4), torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_zero_copy_into_pinned_host_memory() -> None:
    gen = torch.Generator().manual_seed(13)
    k, v = random_buffers(torch.bfloat16, 4, 8, 128, 4096, gen)
    table = make_kv_table(mha_planes(k, v))
    slots = random_slots(1000, 4096, 16, gen)
    host = torch.empty((1200, 4, 2, 1024), dtype=torch.bfloat16, pin_memory=True)
    host.view(torch.uint8).fill_(POISON)
    rows = torch.randperm(1200, generator=gen)[:1000]
    gather_kv(table, slots, host, rows.to(DEVICE))
    torch.cuda.synchronize()
    assert torch.equal(host[rows], gather_kv_ref(mha_planes(k, v), slots).cpu())
    for t in k + v:
        t.view(torch.uint8)[slots] = POISON
    scatter_kv(table, slots, host, rows.to(DEVICE))
    torch.cuda.synchronize()
    assert torch.equal(gather_kv_ref(mha_planes(k, v), slots).cpu(), host[rows])
