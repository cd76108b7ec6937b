"""The contract between who decides (the SGLang adapter) and who moves bytes (a KV mover).

Device KV is a list of *planes* per layer: device buffers of one shape ``[slots, heads, dim]``
(SGLang's MHA pool: ``k_buffer[l]`` and ``v_buffer[l]``, two per layer; its MLA pool:
``kv_buffer[l]``, one per layer, ``heads`` 1 and ``dim`` kv_lora_rank + qk_rope_head_dim).
Slots are token indices: a *device slot* indexes every plane (the values stored in
``req_to_token``); a *host slot* indexes a ``HostKVPool``. A mover copies, for every plane, the
row of ``device_slots[i]`` to or from ``host_slots[i]``. Nothing here imports SGLang.

Ordering rules every mover keeps:
- ``submit_d2h`` copies nothing before ``ready`` (an event recorded on the forward stream after
  the last forward that wrote those slots) has fired, nor before the work already queued on the
  caller's current stream (which computed the index tensors); the caller frees the device
  slots only after ``poll`` reports the job done.
- ``submit_h2d`` jobs become visible to compute only through ``fence_compute(stream)``, which
  makes that stream wait on the copies on the device; the host never synchronizes. A mover may
  hold a job back until its slot numbers reach the host (``DirectKVMover``); the fence covers
  every job issued so far, so fence a job once ``poll`` has reported it done.
- Jobs of one direction finish in submission order; the two directions run concurrently.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Per layer, its planes, in the order a token's host row holds them: layer 0's planes, then
# layer 1's... Every plane is a contiguous ``[slots, heads, dim]`` tensor of one shape and dtype.
LayerPlanes = Sequence[Sequence["torch.Tensor"]]


@dataclass(frozen=True, slots=True)
class KVLayout:
    """Shape of the KV of one token on one rank:
    ``num_layers`` × ``planes_per_layer`` × ``num_heads`` × ``head_dim``
    (MHA: 2 planes per layer, K then V; MLA: 1, the latent with the rope key)."""

    num_layers: int
    num_heads: int
    head_dim: int
    itemsize: int  # bytes per element as stored (fp8 is 1)
    planes_per_layer: int = 2

    @classmethod
    def of(cls, planes: LayerPlanes) -> KVLayout:
        """The layout of device planes (their shapes are checked by the movers)."""
        first = planes[0][0]
        if first.dim() != 3:
            raise ValueError(f"KV planes must be [slots, heads, dim], got {tuple(first.shape)}")
        return cls(len(planes), first.shape[1], first.shape[2], first.element_size(),
                   len(planes[0]))

    @property
    def num_planes(self) -> int:
        return self.num_layers * self.planes_per_layer

    @property
    def bytes_per_token(self) -> int:
        return self.num_planes * self.num_heads * self.head_dim * self.itemsize


def mha_planes(k_buffers: Sequence[torch.Tensor],
               v_buffers: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The planes of an MHA pool: per layer, its K and V buffers."""
    return [[k, v] for k, v in zip(k_buffers, v_buffers, strict=True)]


@dataclass(slots=True)
class TransferReport:
    """Jobs completed since the previous ``poll``, in submission order per direction."""

    done_d2h: list[str] = field(default_factory=list)
    done_h2d: list[str] = field(default_factory=list)
    bytes_d2h: int = 0
    bytes_h2d: int = 0
    # Job id: (bytes, seconds the copy itself ran), for jobs the mover could time (CUDA
    # events); the link's rate, where the time from submission to poll is mostly waiting.
    timings: dict[str, tuple[int, float]] = field(default_factory=dict)


class KVMover(abc.ABC):
    """Moves the KV of token slots between a device pool and a host pool, asynchronously."""

    @abc.abstractmethod
    def submit_d2h(
        self,
        job_id: str,
        device_slots: torch.Tensor,
        host_slots: torch.Tensor,
        ready: object | None,
    ) -> int:
        """Queue device→host; ``ready`` is a ``torch.cuda.Event`` (or None on the CPU).
        Returns bytes."""

    @abc.abstractmethod
    def submit_h2d(
        self,
        job_id: str,
        host_slots: torch.Tensor,
        device_slots: torch.Tensor,
        ready: object | None = None,
    ) -> int:
        """Queue host→device into already-allocated device slots. Returns bytes.

        ``ready`` (optional, added after the first version) is an event after which the device
        slots may be overwritten: freshly reallocated slots can still be read by an in-flight
        forward of their previous owner. On CUDA, None means "after the work queued so far on
        the caller's current stream"; the same holds for ``submit_d2h``.
        """

    @abc.abstractmethod
    def poll(self) -> TransferReport:
        """Non-blocking: the jobs that have finished since the last call (``event.query()``)."""

    @abc.abstractmethod
    def fence_compute(self, stream: object | None) -> None:
        """Make ``stream`` wait, on the device, for every h2d job issued so far (every job
        ``poll`` has reported done is issued)."""

    @abc.abstractmethod
    def synchronize(self) -> None:
        """Block until every submitted job is done (tests and shutdown only)."""
