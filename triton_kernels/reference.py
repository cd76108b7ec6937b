"""Torch references for the gather / scatter kernels (tests only)."""

from __future__ import annotations

import torch


def gather_kv_ref(
    k_buffers: list[torch.Tensor], v_buffers: list[torch.Tensor], device_slots: torch.Tensor
) -> torch.Tensor:
    """Token-major ``[n, layers, 2, heads*head_dim]`` KV of ``device_slots``."""
    rows = [torch.stack([k[device_slots], v[device_slots]], dim=1)
            for k, v in zip(k_buffers, v_buffers, strict=True)]
    return torch.stack(rows, dim=1).flatten(3)


def scatter_kv_ref(
    k_buffers: list[torch.Tensor],
    v_buffers: list[torch.Tensor],
    device_slots: torch.Tensor,
    src: torch.Tensor,
) -> None:
    """Write token-major ``src`` into the layer buffers at ``device_slots``."""
    for layer, (k, v) in enumerate(zip(k_buffers, v_buffers, strict=True)):
        k[device_slots] = src[:, layer, 0].view(-1, *k.shape[1:])
        v[device_slots] = src[:, layer, 1].view(-1, *v.shape[1:])
