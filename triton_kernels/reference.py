"""Torch references for the gather / scatter kernels (tests only)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def gather_kv_ref(planes: Sequence[Sequence[torch.Tensor]], device_slots: torch.Tensor
                  ) -> torch.Tensor:
    """Token-major ``[n, layers, planes, heads*head_dim]`` KV of ``device_slots``."""
    rows = [torch.stack([p[device_slots] for p in layer], dim=1) for layer in planes]
    return torch.stack(rows, dim=1).flatten(3)


def scatter_kv_ref(planes: Sequence[Sequence[torch.Tensor]], device_slots: torch.Tensor,
                   src: torch.Tensor) -> None:
    """Write token-major ``src`` into the layer planes at ``device_slots``."""
    for layer, layer_planes in enumerate(planes):
        for i, p in enumerate(layer_planes):
            p[device_slots] = src[:, layer, i].view(-1, *p.shape[1:])
