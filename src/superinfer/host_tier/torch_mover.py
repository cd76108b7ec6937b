"""KVMover in plain torch indexing: the reference mover, and the CPU mover for tests.

A batch is gathered into a token-major device staging tensor with one indexing op per layer
and K/V, then copied to the host with one DMA per run of consecutive host slots (and the
reverse for h2d). Correct everywhere torch runs; StagingKVMover is the fast one on CUDA.
"""

from __future__ import annotations

import torch

from superinfer.host_tier.jobs import contiguous_runs
from superinfer.host_tier.stream_mover import CopyMover, CopyResult


class TorchMover(CopyMover):
    """Staging-path mover built from torch ops only (no Triton)."""

    def _staging(self, num_tokens: int) -> torch.Tensor:
        return torch.empty(
            (num_tokens, *self.host.buffer.shape[1:]),
            dtype=self.host.buffer.dtype,
            device=self.device,
        )

    def _copy_d2h(self, device_slots: torch.Tensor, host_slots: torch.Tensor) -> CopyResult:
        staging = self._staging(host_slots.numel())
        row = staging.shape[-1]
        for layer, (k, v) in enumerate(zip(self.k_buffers, self.v_buffers, strict=True)):
            staging[:, layer, 0] = k.view(-1, row)[device_slots]
            staging[:, layer, 1] = v.view(-1, row)[device_slots]
        for offset, host_start, length in contiguous_runs(host_slots, self.host.dma_chunk_tokens):
            self.host.buffer[host_start : host_start + length].copy_(
                staging[offset : offset + length], non_blocking=True
            )
        return (staging,), None

    def _copy_h2d(self, device_slots: torch.Tensor, host_slots: torch.Tensor) -> CopyResult:
        staging = self._staging(host_slots.numel())
        for offset, host_start, length in contiguous_runs(host_slots, self.host.dma_chunk_tokens):
            staging[offset : offset + length].copy_(
                self.host.buffer[host_start : host_start + length], non_blocking=True
            )
        row = staging.shape[-1]
        for layer, (k, v) in enumerate(zip(self.k_buffers, self.v_buffers, strict=True)):
            k.view(-1, row)[device_slots] = staging[:, layer, 0]
            v.view(-1, row)[device_slots] = staging[:, layer, 1]
        return (staging,), None
