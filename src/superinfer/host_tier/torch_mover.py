"""KVMover in plain torch indexing: the reference mover, and the CPU mover for tests.

A batch is gathered into a token-major device staging tensor with one indexing op per plane
(per layer, K and V, or MLA's one latent buffer), then copied to the host with one DMA per run
of consecutive host slots (and the reverse for h2d). Correct everywhere torch runs;
StagingKVMover is the fast one on CUDA.
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
        rows = staging.flatten(1, 2)  # [tokens, (layer, plane), row]: a view
        for i, plane in enumerate(self.planes):
            rows[:, i] = plane.view(-1, rows.shape[-1])[device_slots]
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
        rows = staging.flatten(1, 2)
        for i, plane in enumerate(self.planes):
            plane.view(-1, rows.shape[-1])[device_slots] = rows[:, i]
        return (staging,), None
