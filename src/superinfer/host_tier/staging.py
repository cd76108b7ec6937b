"""StagingKVMover: KV rotation on CUDA with both directions in flight at once.

Two data paths, picked by ``path``:

- ``"staging"``: a Triton gather packs a chunk of tokens into a device staging buffer, then a
  copy engine DMAs it to pinned host memory (h2d: DMA, then scatter). Two staging buffers per
  direction and a second stream let the kernel of chunk i+1 overlap the DMA of chunk i::

      d2h  gather stream :  [g0][g1]      [g2]      [g3] ...   (g_i waits for DMA i-2: buffer reuse)
           DMA stream    :      [ d0 ][ d1 ][ d2 ][ d3 ] ...   (d_i waits for g_i)

  Copy engines do the PCIe work, so SMs stay free for the model; each direction has its own engine.
- ``"zerocopy"``: the Triton kernel reads/writes pinned host memory itself (unified addressing),
  a persistent grid of ``num_programs`` programs per launch; no staging memory, but SMs are busy
  for the whole transfer.

Work is cut into chunks of at most ``max_chunk_tokens``: it bounds staging memory and the length
of any single launch, so high-priority h2d work interleaves with a long d2h job.
"""

from __future__ import annotations

import torch

from superinfer.host_tier.interface import LayerPlanes
from superinfer.host_tier.jobs import contiguous_runs
from superinfer.host_tier.pool import HostKVPool
from superinfer.host_tier.stream_mover import (
    D2H_PRIORITY,
    H2D_PRIORITY,
    CopyMover,
    CopyResult,
    timing_event,
)
from superinfer.triton_kernels.kv_gather_scatter import gather_kv, make_kv_table, scatter_kv

# Defaults: the staging kernels only have to outrun the DMA, so a few programs leave most SMs
# to the model; chunks are large enough for full-rate DMAs, and staging holds 4 of them.
# The runs behind these numbers: eval/results/INDEX.md (DuplexKV bench).
DEFAULT_CHUNK_BYTES = 256 << 20
DEFAULT_STAGING_PROGRAMS = 32
PATHS = ("staging", "zerocopy")


class StagingKVMover(CopyMover):
    """Fast KVMover for CUDA device pools; see the module docstring for the two paths."""

    def __init__(
        self,
        planes: LayerPlanes,
        host: HostKVPool,
        path: str = "staging",
        max_chunk_tokens: int | None = None,
        num_programs: int | None = None,
    ) -> None:
        super().__init__(planes, host)
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        if not self._on_cuda:
            raise ValueError("StagingKVMover needs CUDA KV buffers; use TorchMover on the CPU")
        if not host.pinned:
            raise ValueError("StagingKVMover needs a pinned HostKVPool")
        self.path = path
        self.max_chunk_tokens = (max_chunk_tokens
                                 or max(1, DEFAULT_CHUNK_BYTES // host.bytes_per_token))
        # NOTE: None on the zero-copy path means the kernel's own default (2 programs per SM):
        # there the kernel is the transfer, and fewer programs cannot cover PCIe latency.
        self.num_programs = num_programs or (
            DEFAULT_STAGING_PROGRAMS if path == "staging" else None)
        self._table = make_kv_table(planes)
        if path == "staging":
            self._d2h_dma_stream = torch.cuda.Stream(self.device, priority=D2H_PRIORITY)
            self._h2d_scatter_stream = torch.cuda.Stream(self.device, priority=H2D_PRIORITY)
            self._d2h_staging = _StagingRing(self.max_chunk_tokens, host, self.device)
            self._h2d_staging = _StagingRing(self.max_chunk_tokens, host, self.device)

    def synchronize(self) -> None:
        super().synchronize()
        if self.path == "staging":
            self._d2h_dma_stream.synchronize()
            self._h2d_scatter_stream.synchronize()

    def _chunks(self, num_tokens: int) -> range:
        return range(0, num_tokens, self.max_chunk_tokens)

    def _copy_d2h(self, device_slots: torch.Tensor, host_slots: torch.Tensor) -> CopyResult:
        if self.path == "zerocopy":
            return self._zerocopy(gather_kv, device_slots, host_slots)
        gather_stream, dma_stream = torch.cuda.current_stream(self.device), self._d2h_dma_stream
        done = None
        for start in self._chunks(host_slots.numel()):
            chunk = slice(start, start + self.max_chunk_tokens)
            buf, buf_free = self._d2h_staging.next()
            gather_stream.wait_event(buf_free)
            staged = buf[: host_slots[chunk].numel()]
            gather_kv(self._table, device_slots[chunk], staged, num_programs=self.num_programs)
            dma_stream.wait_event(gather_stream.record_event())
            with torch.cuda.stream(dma_stream):
                self._dma(host_slots[chunk], staged, to_host=True)
            done = timing_event(dma_stream)
            self._d2h_staging.release(done)
        return (), done

    def _copy_h2d(self, device_slots: torch.Tensor, host_slots: torch.Tensor) -> CopyResult:
        if self.path == "zerocopy":
            return self._zerocopy(scatter_kv, device_slots, host_slots)
        dma_stream = torch.cuda.current_stream(self.device)
        scatter_stream = self._h2d_scatter_stream
        done = None
        for start in self._chunks(host_slots.numel()):
            chunk = slice(start, start + self.max_chunk_tokens)
            buf, buf_free = self._h2d_staging.next()
            dma_stream.wait_event(buf_free)
            staged = buf[: host_slots[chunk].numel()]
            self._dma(host_slots[chunk], staged, to_host=False)
            scatter_stream.wait_event(dma_stream.record_event())
            with torch.cuda.stream(scatter_stream):
                scatter_kv(self._table, device_slots[chunk], staged, num_programs=self.num_programs)
            done = timing_event(scatter_stream)
            self._h2d_staging.release(done)
        return (), done

    def _dma(self, host_slots: torch.Tensor, staged: torch.Tensor, to_host: bool) -> None:
        """One copy-engine DMA per run of consecutive host slots, on the current stream."""
        for offset, host_start, length in contiguous_runs(host_slots, self.host.dma_chunk_tokens):
            host_rows = self.host.buffer[host_start : host_start + length]
            dev_rows = staged[offset : offset + length]
            (host_rows.copy_(dev_rows, non_blocking=True) if to_host
             else dev_rows.copy_(host_rows, non_blocking=True))

    def _zerocopy(self, kernel, device_slots: torch.Tensor, host_slots: torch.Tensor) -> CopyResult:
        host_idx = host_slots.to(self.device, non_blocking=True)
        for start in self._chunks(host_slots.numel()):
            chunk = slice(start, start + self.max_chunk_tokens)
            kernel(self._table, device_slots[chunk], self.host.buffer, host_idx[chunk],
                   num_programs=self.num_programs)
        return (host_idx,), None


class _StagingRing:
    """Two device staging buffers used in turn; each remembers the event after which its last
    reader or writer is done, so the next user waits for exactly that."""

    def __init__(self, num_tokens: int, host: HostKVPool, device: torch.device) -> None:
        shape = (num_tokens, *host.buffer.shape[1:])
        self._bufs = [torch.empty(shape, dtype=host.buffer.dtype, device=device) for _ in range(2)]
        self._free = [torch.cuda.Event(), torch.cuda.Event()]  # unrecorded events count as done
        self._next = 0

    def next(self) -> tuple[torch.Tensor, torch.cuda.Event]:
        return self._bufs[self._next], self._free[self._next]

    def release(self, event: torch.cuda.Event) -> None:
        self._free[self._next] = event
        self._next ^= 1
