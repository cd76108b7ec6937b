"""Rotation of SGLang's MLA KV pool (DeepSeek family): one latent plane per layer,
``kv_buffer[l]`` of ``[size + page_size, 1, kv_lora_rank + qk_rope_head_dim]`` (fp8 stored as
uint8). Real ``MLATokenToKVPool`` objects on the CPU; every mover path that runs there (torch;
direct through memmove; the staging / zero-copy Triton kernels through the interpreter, see
conftest.py): random latents out to the host, device overwritten, back into other slots,
compared bitwise. With a GPU, the kernels and every path of ``build_host_tier`` run on it."""

from __future__ import annotations

import pytest
import torch
from sglang_parts import publish_cpu_server_args
from superinfer.triton_kernels.kv_gather_scatter import gather_kv, make_kv_table, scatter_kv

from superinfer.adapters.sglang.kv_ops import device_planes
from superinfer.host_tier.direct import DirectKVMover
from superinfer.host_tier.factory import build_host_tier
from superinfer.host_tier.interface import KVLayout
from superinfer.host_tier.pool import HostKVPool
from superinfer.host_tier.sizing import HostMemory
from superinfer.host_tier.torch_mover import TorchMover

LAYERS, RANK, ROPE, SIZE = 3, 32, 8, 256
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.bfloat16, torch.float8_e4m3fn]  # fp8: the pool stores uint8


def mla_pool(dtype: torch.dtype, page_size: int, device: torch.device | str = "cpu"):
    from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool

    publish_cpu_server_args(page_size=page_size)
    pool = MLATokenToKVPool(size=SIZE, page_size=page_size, dtype=dtype, kv_lora_rank=RANK,
                            qk_rope_head_dim=ROPE, layer_num=LAYERS, device=str(device),
                            enable_memory_saver=False)
    gen = torch.Generator().manual_seed(page_size)
    for buf in pool.kv_buffer:  # random bits, never zero: a missed or misplaced row shows
        buf.view(torch.uint8).copy_(torch.randint(1, 256, buf.view(torch.uint8).shape,
                                                  generator=gen, dtype=torch.uint8))
    return pool


def latents(pool, slots: torch.Tensor) -> torch.Tensor:
    """The bytes (random bits include NaNs, so compared as bytes) of ``slots``, per layer."""
    slots = slots.to(pool.kv_buffer[0].device)
    return torch.stack([buf[slots].view(torch.uint8) for buf in pool.kv_buffer]).cpu()


def host_bytes(rows: torch.Tensor) -> torch.Tensor:
    return rows.view(torch.uint8).cpu()


def page_slots(pages: list[int], page_size: int, num_tokens: int) -> torch.Tensor:
    """Whole device pages in the given order, cut to ``num_tokens`` (the direct path's rule)."""
    slots = torch.tensor(pages)[:, None] * page_size + torch.arange(page_size)
    return slots.reshape(-1)[:num_tokens]


def scramble(pool, slots: torch.Tensor) -> None:
    slots = slots.to(pool.kv_buffer[0].device)
    for buf in pool.kv_buffer:
        buf[slots] = torch.zeros_like(buf[slots])


def test_planes_layout_and_bytes_per_token() -> None:
    pool = mla_pool(torch.bfloat16, 16)
    planes = device_planes(pool)
    assert [len(layer) for layer in planes] == [1] * LAYERS
    assert planes[0][0].shape == (SIZE + 16, 1, RANK + ROPE)
    layout = KVLayout.of(planes)
    assert layout == KVLayout(LAYERS, 1, RANK + ROPE, 2, planes_per_layer=1)
    assert layout.bytes_per_token == LAYERS * (RANK + ROPE) * 2
    fp8 = KVLayout.of(device_planes(mla_pool(torch.float8_e4m3fn, 16)))
    assert fp8.itemsize == 1 and fp8.bytes_per_token == LAYERS * (RANK + ROPE)
    # The tier sized and priced by it: the host pool holds exactly that per token.
    tier, spec = build_host_tier(planes, 16, host_kv_gb=0.0001, mover_flag="auto",
                                 keep_copies=False, memory=HostMemory(mem_available=1 << 40))
    assert spec.bytes_per_token == layout.bytes_per_token
    assert tier.pages.buffer.shape == (spec.host_tokens, LAYERS, 1, RANK + ROPE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 16])
def test_torch_mover_round_trip(dtype: torch.dtype, page_size: int) -> None:
    pool = mla_pool(dtype, page_size)
    layout = KVLayout.of(device_planes(pool))
    host = HostKVPool(layout, 128, 16, pool.store_dtype, pin_memory=False)
    mover = TorchMover(device_planes(pool), host)
    out = torch.randperm(SIZE, generator=torch.Generator().manual_seed(1))[:45] + page_size
    before = latents(pool, out)
    host_slots = host.alloc(45)
    assert mover.submit_d2h("out", out, host_slots, None) == 45 * layout.bytes_per_token
    # Token-major host rows: a token's latents of every layer, back to back.
    assert torch.equal(host_bytes(host.buffer[host_slots]),
                       before.transpose(0, 1).reshape(45, LAYERS, 1, -1))
    scramble(pool, out)
    back = torch.arange(SIZE - 45, SIZE) + page_size  # other slots than they came from
    mover.submit_h2d("in", host_slots, back)
    assert mover.poll().done_h2d == ["in"]
    assert torch.equal(latents(pool, back), before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [4, 16])
def test_direct_mover_round_trip(dtype: torch.dtype, page_size: int) -> None:
    pool = mla_pool(dtype, page_size)
    layout = KVLayout.of(device_planes(pool))
    host = HostKVPool(layout, 8 * page_size, page_size, pool.store_dtype, pin_memory=False,
                      page_major=True)
    mover = DirectKVMover(device_planes(pool), host)
    num = 3 * page_size - 1  # the last page partial
    out = page_slots([5, 1, 7], page_size, num)
    before = latents(pool, out)
    host_slots = host.alloc(num)
    mover.submit_d2h("out", out, host_slots, None)
    # Page-major host pages: one page of one layer's latent is one piece, as on the device.
    first = int(host_slots[0]) // page_size
    assert torch.equal(host_bytes(host.buffer[first, :, 0, :page_size]),
                       before[:, :page_size].flatten(2))
    scramble(pool, out)
    back = page_slots([2, 9, 4], page_size, num)
    mover.submit_h2d("in", host_slots, back)
    mover.synchronize()
    assert torch.equal(latents(pool, back), before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("zero_copy", [False, True])
def test_triton_kernels_round_trip(dtype: torch.dtype, page_size: int, zero_copy: bool) -> None:
    """The staging path (gather into a staging buffer, DMA, scatter) and the zero-copy path
    (the kernel addresses host rows itself); StagingKVMover needs CUDA, so its two kernel
    calls run here one by one, on the same table and host pool."""
    pool = mla_pool(dtype, page_size, DEVICE)
    planes = device_planes(pool)
    host = HostKVPool(KVLayout.of(planes), 64, 16, pool.store_dtype,
                      pin_memory=DEVICE.type == "cuda")
    table = make_kv_table(planes)
    assert table.num_rows == LAYERS
    num = 2 * 16 - 3
    out = (page_slots([3, 11], 16, num) + page_size).to(DEVICE)
    before = latents(pool, out)
    host_slots = host.alloc(num)
    host_rows = host_slots.to(DEVICE)
    if zero_copy:
        gather_kv(table, out, host.buffer, host_rows, num_programs=3)
    else:
        staged = torch.empty((num, *host.buffer.shape[1:]), dtype=host.buffer.dtype,
                             device=DEVICE)
        gather_kv(table, out, staged, num_programs=3)
        host.buffer[host_slots] = staged.cpu()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(host_bytes(host.buffer[host_slots]),
                       before.transpose(0, 1).reshape(num, LAYERS, 1, -1))
    scramble(pool, out)
    back = (page_slots([6, 0], 16, num) + 2 * page_size).to(DEVICE)
    if zero_copy:
        scatter_kv(table, back, host.buffer, host_rows, num_programs=3)
    else:
        scatter_kv(table, back, host.buffer[host_slots].to(DEVICE), num_programs=3)
    assert torch.equal(latents(pool, back), before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mover_flag", ["auto", "direct", "staging", "zerocopy"])
def test_host_tier_round_trip(dtype: torch.dtype, mover_flag: str) -> None:
    """What the rotator builds (``build_host_tier`` on the pool's planes), every data path it
    can pick: the CPU has torch (``auto``) and direct; CUDA all four."""
    on_cuda = DEVICE.type == "cuda"
    if mover_flag in ("staging", "zerocopy") and not on_cuda:
        pytest.skip("needs CUDA (on the CPU the flag resolves to the torch path)")
    page_size = 16
    pool = mla_pool(dtype, page_size, DEVICE)
    tier, spec = build_host_tier(device_planes(pool), page_size, host_kv_gb=0.0002,
                                 mover_flag=mover_flag, keep_copies=False,
                                 memory=HostMemory(mem_available=1 << 40))
    expected = {"auto": "staging" if on_cuda else "torch"}.get(mover_flag, mover_flag)
    assert spec.path == expected
    mover, host = tier.mover, tier.pages
    num = 3 * page_size - 5
    out = page_slots([4, 1, 9], page_size, num).to(DEVICE)
    before = latents(pool, out)
    host_slots = host.alloc(num)
    mover.submit_d2h("out", out, host_slots, None)
    mover.synchronize()
    scramble(pool, out)
    back = page_slots([7, 2, 12], page_size, num).to(DEVICE)
    mover.submit_h2d("in", host_slots, back)
    mover.synchronize()
    report = mover.poll()
    assert report.done_d2h == ["out"] and report.done_h2d == ["in"]
    assert report.bytes_h2d == num * LAYERS * (RANK + ROPE) * pool.store_dtype.itemsize
    assert torch.equal(latents(pool, back), before)


@pytest.mark.parametrize("pool_class", ["DSATokenToKVPool", "MLATokenToKVPoolFP4",
                                        "MHATokenToKVPoolFP4", "HybridLinearKVPool"])
def test_other_pools_are_refused_by_name(pool_class: str) -> None:
    from sglang.srt.mem_cache import memory_pool

    pool = object.__new__(getattr(memory_pool, pool_class))  # the class is all that is read
    with pytest.raises(RuntimeError, match=pool_class):
        device_planes(pool)


def test_swa_pool_is_refused_by_name() -> None:
    from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool

    with pytest.raises(RuntimeError, match="SWAKVPool"):
        device_planes(object.__new__(SWAKVPool))
