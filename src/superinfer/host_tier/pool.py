"""Host KV tier: one pinned buffer plus a page allocator with exact accounting.

Two layouts of the same bytes, chosen by the mover that fills them:

- token-major (default) ``[num_tokens, num_layers, planes_per_layer, num_heads * head_dim]``:
  all of one token's KV (every layer, its planes: K then V, or MLA's latent) is one contiguous
  row, so a run of host slots is one contiguous byte range and a batch moves with few large
  DMAs (the device side is layer-first; the gather kernels of the staging and zero-copy paths
  bridge the two layouts);
- page-major ``[num_pages, num_layers, planes_per_layer, page_size, num_heads * head_dim]``:
  one page of one plane (a layer's K or V; MLA: its latent) is contiguous, exactly like the
  same page in SGLang's layer-first device buffers, so the direct path copies page pieces with
  the copy engines alone.

Pages are the unit of ownership: ``alloc`` hands out whole pages (the tail of the last page is
owned but unused) and ``free`` returns the pages that the given slots belong to.
"""

from __future__ import annotations

import ctypes
import os
import weakref

import torch

from superinfer.host_tier.interface import KVLayout

# NOTE: cudaHostRegister on hundreds of GiB in one call can take minutes or fail outright;
# registering in ~1 GiB chunks bounds each call and each failure.
_REGISTER_CHUNK_BYTES = 1 << 30


class HostPages:
    """Page accounting of a host tier: who may use which pages, with exact counts.

    Kept apart from the bytes so the same accounting serves the pinned pool and the
    simulator's modelled tier (eval/), which needs pages but no memory behind them.
    """

    def __init__(self, num_tokens: int, page_size: int) -> None:
        if page_size < 1 or num_tokens < page_size or num_tokens % page_size:
            raise ValueError(
                f"num_tokens={num_tokens} must be a positive multiple of page_size={page_size}")
        self.size = num_tokens
        self.page_size = page_size
        self.num_pages = num_tokens // page_size
        self._page_free = torch.ones(self.num_pages, dtype=torch.bool)
        self._num_free_pages = self.num_pages

    def available_size(self) -> int:
        """Free capacity in tokens (whole free pages only)."""
        return self._num_free_pages * self.page_size

    def alloc(self, num_tokens: int) -> torch.Tensor | None:
        """Reserve ``ceil(num_tokens / page_size)`` pages; return ``num_tokens`` int64 host slots.

        Prefers the smallest single free run that fits (one DMA per batch, little
        fragmentation), else the lowest-numbered free pages. None when too few pages are free.
        """
        if num_tokens <= 0:
            raise ValueError(f"num_tokens must be positive, got {num_tokens}")
        num_pages = -(-num_tokens // self.page_size)
        if num_pages > self._num_free_pages:
            return None
        page_ids = self._pick_pages(num_pages)
        self._page_free[page_ids] = False
        self._num_free_pages -= num_pages
        slots = page_ids[:, None] * self.page_size + torch.arange(self.page_size)
        return slots.reshape(-1)[:num_tokens].contiguous()

    def free(self, host_slots: torch.Tensor) -> None:
        """Free every page that ``host_slots`` touches; all-or-nothing.

        Raises ValueError (and frees nothing) on a slot out of range or a page already free.
        Freeing the slots of one allocation in two calls that share a page is a double free.
        """
        slots = host_slots.reshape(-1).to("cpu", torch.int64)
        if slots.numel() == 0:
            return
        if int(slots.min()) < 0 or int(slots.max()) >= self.size:
            raise ValueError(f"host slot out of range [0, {self.size})")
        page_ids = torch.unique(slots // self.page_size)
        if bool(self._page_free[page_ids].any()):
            bad = page_ids[self._page_free[page_ids]][:8].tolist()
            raise ValueError(f"double free of host pages {bad}")
        self._page_free[page_ids] = True
        self._num_free_pages += page_ids.numel()

    def used_pages(self) -> torch.Tensor:
        """Ids of the pages in use (for ownership checks)."""
        return torch.nonzero(~self._page_free).reshape(-1)

    def check_integrity(self) -> None:
        """Raise AssertionError unless free + used pages equal the total and the counter matches."""
        num_free = int(self._page_free.sum())
        assert num_free == self._num_free_pages, (num_free, self._num_free_pages)
        assert 0 <= num_free <= self.num_pages, (num_free, self.num_pages)

    def _pick_pages(self, num_pages: int) -> torch.Tensor:
        free_ids = torch.nonzero(self._page_free).reshape(-1)
        # Runs of consecutive free page ids: starts where the gap to the previous id is not 1.
        breaks = torch.ones(free_ids.numel(), dtype=torch.bool)
        breaks[1:] = free_ids[1:] - free_ids[:-1] != 1
        run_starts = torch.nonzero(breaks).reshape(-1)
        run_lens = torch.diff(run_starts, append=torch.tensor([free_ids.numel()]))
        fits = run_lens >= num_pages
        if bool(fits.any()):
            best = torch.argmin(torch.where(fits, run_lens, run_lens.max() + 1))
            first = int(free_ids[run_starts[best]])
            return torch.arange(first, first + num_pages, dtype=torch.int64)
        return free_ids[:num_pages].to(torch.int64)


class HostKVPool(HostPages):
    """Pinned host memory for rotated-out KV, allocated in pages of ``page_size`` tokens."""

    def __init__(
        self,
        layout: KVLayout,
        num_tokens: int,
        page_size: int,
        dtype: torch.dtype,
        pin_memory: bool = True,
        numa_node: int | None = None,
        page_major: bool = False,
    ) -> None:
        super().__init__(num_tokens, page_size)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if itemsize != layout.itemsize:
            raise ValueError(
                f"dtype {dtype} has {itemsize} bytes per element, layout says {layout.itemsize}")
        self.layout = layout
        self.page_major = page_major
        # Whole pages per pinned registration; a DMA never spans two (see ``dma_chunk_tokens``).
        pages_per_chunk = max(1, _REGISTER_CHUNK_BYTES // (layout.bytes_per_token * page_size))
        self.dma_chunk_tokens = pages_per_chunk * page_size
        row = layout.num_heads * layout.head_dim
        planes = (layout.num_layers, layout.planes_per_layer)
        shape = ((self.num_pages, *planes, page_size, row) if page_major
                 else (num_tokens, *planes, row))
        self.buffer = torch.empty(shape, dtype=dtype)
        if numa_node is not None:
            _bind_to_numa_node(self.buffer, numa_node)
        if pin_memory:
            chunk_bytes = self.dma_chunk_tokens * layout.bytes_per_token
            _pin(self.buffer, chunk_bytes)
            weakref.finalize(self, _unpin, self.buffer, chunk_bytes)
        self.pinned = pin_memory

    @property
    def bytes_per_token(self) -> int:
        return self.layout.bytes_per_token

    def check_integrity(self) -> None:
        super().check_integrity()
        assert self.buffer.numel() * self.buffer.element_size() == self.size * self.bytes_per_token


def _nbytes(buffer: torch.Tensor) -> int:
    return buffer.numel() * buffer.element_size()


def _pin(buffer: torch.Tensor, chunk_bytes: int) -> None:
    """Page-lock ``buffer`` in place with cudaHostRegister, ``chunk_bytes`` at a time.

    NOTE: not ``torch.empty(pin_memory=True)``: torch's caching host allocator rounds a request
    up to a power of two, which can nearly double a pool of hundreds of GiB.
    """
    if not torch.cuda.is_available():
        raise RuntimeError(
            "HostKVPool(pin_memory=True) needs CUDA; pass pin_memory=False on the CPU")
    cudart = torch.cuda.cudart()
    base, total = buffer.data_ptr(), _nbytes(buffer)
    for offset in range(0, total, chunk_bytes):
        err = cudart.cudaHostRegister(base + offset, min(chunk_bytes, total - offset), 0)
        if int(err) != 0:
            _unregister(base, offset, chunk_bytes)
            raise RuntimeError(
                f"cannot pin {total / 2**30:.1f} GiB of host memory for the KV host pool "
                f"(cudaHostRegister: {cudart.cudaGetErrorString(err)} "
                f"after {offset / 2**30:.1f} GiB); "
                "make the host pool smaller or raise the locked-memory limit (ulimit -l)"
            )


def _unpin(buffer: torch.Tensor, chunk_bytes: int) -> None:
    _unregister(buffer.data_ptr(), _nbytes(buffer), chunk_bytes)


def _unregister(base: int, total: int, chunk_bytes: int) -> None:
    cudart = torch.cuda.cudart()
    for offset in range(0, total, chunk_bytes):
        cudart.cudaHostUnregister(base + offset)


def _bind_to_numa_node(buffer: torch.Tensor, node: int) -> None:
    """Place the (not yet touched) pages of ``buffer`` on NUMA ``node``, e.g. Grace's memory.

    Must run before the first write or pin touches the pages; libnuma's mbind wrapper only
    moves whole OS pages, so the partial pages at both ends stay where first touch puts them.
    """
    try:
        libnuma = ctypes.CDLL("libnuma.so.1")
    except OSError as exc:
        raise RuntimeError(f"numa_node={node} needs libnuma.so.1: {exc}") from exc
    if libnuma.numa_available() < 0 or not 0 <= node <= libnuma.numa_max_node():
        raise RuntimeError(f"NUMA node {node} is not available on this machine")
    os_page = os.sysconf("SC_PAGE_SIZE")  # 64 KiB on many Grace kernels
    start = -(-buffer.data_ptr() // os_page) * os_page
    end = (buffer.data_ptr() + _nbytes(buffer)) // os_page * os_page
    if end > start:
        libnuma.numa_tonode_memory.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libnuma.numa_tonode_memory(ctypes.c_void_p(start), ctypes.c_size_t(end - start), node)
