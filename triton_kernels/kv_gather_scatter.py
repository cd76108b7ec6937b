"""Gather / scatter the KV of token slots between SGLang's layer-first buffers and a
token-major one.

Device side: per layer, its *planes* of ``[slots, heads, head_dim]`` (MHA: ``k_buffer[l]`` and
``v_buffer[l]``; MLA: the one ``kv_buffer[l]``), reached through a pointer table (the pattern of
sglang's ``kvcache/cache_move.py``), so one launch covers every layer. Token-major side:
``[rows, layers, planes_per_layer, heads * head_dim]``, either a device staging buffer (row =
position in the batch) or pinned host memory addressed straight from the kernel (row = host
slot; zero copy through unified addressing).

Values are moved as raw machine words (int64 down to int8, the widest that divides a row), so
bf16, fp16 and fp8-stored-as-uint8 are all the same kernel.

A persistent grid walks work items ``(token tile, (layer, plane) row, word tile)`` with the row and
word tile fastest, so programs running side by side fill one contiguous span of token-major
memory: long PCIe bursts on the zero-copy path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_WORD_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


@dataclass(frozen=True)
class KVTable:
    """Device pointer table over the layer buffers, built once per KV pool (it never moves)."""

    ptrs: torch.Tensor  # int64 [layers * planes] on the device, (layer, plane) order: k_0, v_0, ...
    buffers: tuple[torch.Tensor, ...]  # keeps the buffers alive as long as the table
    word_dtype: torch.dtype
    row_words: int  # words in one (layer, plane) row of one token

    @property
    def num_rows(self) -> int:
        return self.ptrs.numel()


def make_kv_table(planes: Sequence[Sequence[torch.Tensor]]) -> KVTable:
    """Check the planes (per layer, equally many; equal shape and dtype, contiguous, one
    device) and build the table."""
    assert len(planes) > 0 and len({len(layer) for layer in planes}) == 1 and len(planes[0]) > 0
    buffers = tuple(b for layer in planes for b in layer)
    first = buffers[0]
    for buf in buffers:
        assert buf.shape == first.shape and buf.dtype == first.dtype, "KV buffers differ"
        assert buf.is_contiguous() and buf.device == first.device, "KV buffers must be contiguous"
    row_bytes = first[0].numel() * first.element_size()
    word = _widest_word(row_bytes, [b.data_ptr() for b in buffers])
    ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64, device=first.device)
    return KVTable(ptrs, buffers, _WORD_DTYPES[word], row_bytes // word)


def gather_kv(
    table: KVTable,
    device_slots: torch.Tensor,
    out: torch.Tensor,
    out_rows: torch.Tensor | None = None,
    *,
    page_size: int = 1,
    num_programs: int | None = None,
) -> None:
    """``out[out_rows[i]] = KV of device_slots[i]`` for every layer and plane (``out_rows``
    defaults to ``arange``). Launches on the current stream.

    ``page_size > 1`` promises that each aligned group of ``page_size`` batch positions holds
    consecutive slots (whole device pages in order); only the group's first slot is then read.
    """
    _launch(_gather_kernel, table, device_slots, out, out_rows, page_size, num_programs)


def scatter_kv(
    table: KVTable,
    device_slots: torch.Tensor,
    src: torch.Tensor,
    src_rows: torch.Tensor | None = None,
    *,
    page_size: int = 1,
    num_programs: int | None = None,
) -> None:
    """KV of ``device_slots[i]`` = ``src[src_rows[i]]``; the inverse of ``gather_kv``."""
    _launch(_scatter_kernel, table, device_slots, src, src_rows, page_size, num_programs)


def _launch(kernel, table: KVTable, device_slots: torch.Tensor, buf: torch.Tensor,
            rows: torch.Tensor | None, page_size: int, num_programs: int | None) -> None:
    """Checks and launch shared by both directions (the kernels differ only in copy direction)."""
    words = _token_major_words(table, buf)
    _check_index(table, device_slots, rows, buf)
    num_tokens = device_slots.numel()
    if num_tokens == 0:
        return
    grid, meta = _launch_config(table, num_tokens, num_programs)
    kernel[grid](
        table.ptrs, device_slots, words, rows if rows is not None else device_slots,
        num_tokens, ROW_WORDS=table.row_words, NUM_ROWS=table.num_rows, PAGE=page_size,
        ROWS_INDEXED=rows is not None, **meta,
    )


def _widest_word(row_bytes: int, ptrs: list[int]) -> int:
    return next(w for w in (8, 4, 2, 1) if row_bytes % w == 0 and all(p % w == 0 for p in ptrs))


def _token_major_words(table: KVTable, buf: torch.Tensor) -> torch.Tensor:
    """View a ``[rows, layers, planes, heads*head_dim]`` buffer as words, checking it fits the
    table."""
    assert buf.dim() == 4 and buf.shape[1] * buf.shape[2] == table.num_rows, "not token-major KV"
    assert buf.is_contiguous() and buf.dtype == table.buffers[0].dtype, "dtype or layout mismatch"
    assert buf.data_ptr() % table.word_dtype.itemsize == 0
    words = buf.view(table.word_dtype)
    assert words.shape[-1] == table.row_words, "row width mismatch"
    return words


def _check_index(table: KVTable, device_slots: torch.Tensor, rows: torch.Tensor | None,
                 buf: torch.Tensor) -> None:
    """Indices live with the KV buffers; the token-major side may be pinned host memory, which a
    CUDA kernel reaches through unified addressing (the zero-copy path)."""
    device = table.ptrs.device
    assert device_slots.dim() == 1 and device_slots.dtype in (torch.int32, torch.int64)
    assert device_slots.device == device, "device_slots must be on the KV buffers' device"
    if rows is not None:
        assert rows.shape == device_slots.shape and rows.dtype in (torch.int32, torch.int64)
        assert rows.device == device, "row indices must be on the KV buffers' device"
    assert buf.device == device or (device.type == "cuda" and buf.is_pinned()), (
        "the token-major buffer must be on the KV device or in pinned host memory"
    )


def _launch_config(table: KVTable, num_tokens: int, num_programs: int | None) -> tuple:
    """Tiles of ~16 KiB (enough bytes in flight per program to cover PCIe latency) and a
    persistent grid, by default two programs per SM."""
    word = table.word_dtype.itemsize
    block_w = min(triton.next_power_of_2(table.row_words), max(1, 4096 // word))
    # NOTE: independent of num_tokens, so a short last chunk does not compile another variant.
    block_t = max(1, 16384 // (block_w * word))
    num_items = (triton.cdiv(num_tokens, block_t) * table.num_rows
                 * triton.cdiv(table.row_words, block_w))
    if num_programs is None:
        kv_device = table.ptrs.device
        num_sms = (
            torch.cuda.get_device_properties(kv_device).multi_processor_count
            if kv_device.type == "cuda" else 4
        )
        num_programs = 2 * num_sms
    grid = (max(1, min(num_items, num_programs)),)
    return grid, dict(BLOCK_T=block_t, BLOCK_W=block_w, num_warps=4)


@triton.jit
def _tile(item, num_tokens, ROW_WORDS: tl.constexpr, NUM_ROWS: tl.constexpr,
          BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr):
    """Decode a work item into (row, token positions, word offsets, mask)."""
    W_TILES: tl.constexpr = (ROW_WORDS + BLOCK_W - 1) // BLOCK_W
    w_tile = item % W_TILES
    row = (item // W_TILES) % NUM_ROWS
    toks = (item // (W_TILES * NUM_ROWS)) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = w_tile * BLOCK_W + tl.arange(0, BLOCK_W)
    tok_mask = toks < num_tokens
    mask = tok_mask[:, None] & (cols < ROW_WORDS)[None, :]
    return row, toks, tok_mask, cols, mask


@triton.jit
def _slots(slots_ptr, toks, tok_mask, PAGE: tl.constexpr):
    if PAGE == 1:
        slots = tl.load(slots_ptr + toks, mask=tok_mask, other=0).to(tl.int64)
    else:
        in_page = toks % PAGE
        slots = tl.load(slots_ptr + (toks - in_page), mask=tok_mask, other=0).to(tl.int64) + in_page
    return slots


# NOTE: num_tokens is not specialized on (Triton would compile separate variants for 1, for
# multiples of 16 and for the rest): every batch size runs the one variant compiled at start-up.
@triton.jit(do_not_specialize=["num_tokens"])
def _gather_kernel(table_ptr, slots_ptr, out_ptr, out_rows_ptr, num_tokens,
                   ROW_WORDS: tl.constexpr, NUM_ROWS: tl.constexpr, PAGE: tl.constexpr,
                   ROWS_INDEXED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr):
    W_TILES: tl.constexpr = (ROW_WORDS + BLOCK_W - 1) // BLOCK_W
    num_items = tl.cdiv(num_tokens, BLOCK_T) * NUM_ROWS * W_TILES
    for item in tl.range(tl.program_id(0), num_items, tl.num_programs(0)):
        row, toks, tok_mask, cols, mask = _tile(item, num_tokens, ROW_WORDS, NUM_ROWS, BLOCK_T,
                                                BLOCK_W)
        slots = _slots(slots_ptr, toks, tok_mask, PAGE)
        base = tl.cast(tl.load(table_ptr + row), tl.pointer_type(out_ptr.dtype.element_ty))
        vals = tl.load(base + slots[:, None] * ROW_WORDS + cols[None, :], mask=mask)
        if ROWS_INDEXED:
            out_tok = tl.load(out_rows_ptr + toks, mask=tok_mask, other=0).to(tl.int64)
        else:
            out_tok = toks.to(tl.int64)
        dst = out_ptr + out_tok[:, None] * (NUM_ROWS * ROW_WORDS) + row * ROW_WORDS + cols[None, :]
        tl.store(dst, vals, mask=mask)


@triton.jit(do_not_specialize=["num_tokens"])
def _scatter_kernel(table_ptr, slots_ptr, src_ptr, src_rows_ptr, num_tokens,
                    ROW_WORDS: tl.constexpr, NUM_ROWS: tl.constexpr, PAGE: tl.constexpr,
                    ROWS_INDEXED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr):
    W_TILES: tl.constexpr = (ROW_WORDS + BLOCK_W - 1) // BLOCK_W
    num_items = tl.cdiv(num_tokens, BLOCK_T) * NUM_ROWS * W_TILES
    for item in tl.range(tl.program_id(0), num_items, tl.num_programs(0)):
        row, toks, tok_mask, cols, mask = _tile(item, num_tokens, ROW_WORDS, NUM_ROWS, BLOCK_T,
                                                BLOCK_W)
        if ROWS_INDEXED:
            src_tok = tl.load(src_rows_ptr + toks, mask=tok_mask, other=0).to(tl.int64)
        else:
            src_tok = toks.to(tl.int64)
        src = src_ptr + src_tok[:, None] * (NUM_ROWS * ROW_WORDS) + row * ROW_WORDS + cols[None, :]
        vals = tl.load(src, mask=mask)
        slots = _slots(slots_ptr, toks, tok_mask, PAGE)
        base = tl.cast(tl.load(table_ptr + row), tl.pointer_type(src_ptr.dtype.element_ty))
        tl.store(base + slots[:, None] * ROW_WORDS + cols[None, :], vals, mask=mask)
