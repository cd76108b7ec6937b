"""Rotation mechanics on one scheduler's SGLang memory objects: which device slots hold a
request's KV, how to give them back after a rotate-out, and how to get slots again for a
rotate-in (batch_surgery.py puts the request back into the running batch).

The KV of a decoding request covers positions [0, kv_len) with
``kv_len = len(origin_input_ids) + len(output_ids) - 1``: the newest token's KV is written by
the next decode step, which reads that token from the FutureMap relay::

    positions  0 ........ P ................ kv_len   kv_len+1
               |<-radix->|<- private KV ---->|<- next decode writes here
    rotate-in: P tokens re-matched in the radix tree (no copy), [P, kv_len) copied host->device
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from sglang.srt.mem_cache.allocation import alloc_paged_token_slots_extend, alloc_token_slots

from ...host_tier.interface import mha_planes
from . import compat

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.managers.scheduler import Scheduler
    from sglang.srt.mem_cache.memory_pool import KVCache


def device_planes(kv_pool: KVCache) -> list[list[torch.Tensor]]:
    """The device KV a rotation moves, as the host tier's per-layer planes: K and V of
    SGLang's MHA pool, the one latent buffer (compressed KV and rope key,
    ``[slots, 1, kv_lora_rank + qk_rope_head_dim]``) of its MLA pool.

    Only these two exact classes: their planes hold all of a token's KV. Any other pool
    (hybrid SWA or linear-attention, DSA with its indexer keys, FP4/MXFP8 with scale buffers,
    page-interleaved layouts...) keeps state a rotation would lose, so it is refused."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool

    kind = type(kv_pool)
    if kind is MHATokenToKVPool:
        planes = mha_planes(kv_pool.k_buffer, kv_pool.v_buffer)
    elif kind is MLATokenToKVPool:
        planes = [[kv] for kv in kv_pool.kv_buffer]
    else:
        raise RuntimeError(
            f"--schedule-policy rotasched supports SGLang's MHATokenToKVPool and "
            f"MLATokenToKVPool; this model uses {kind.__name__} (hybrid/SWA/sparse/quantized "
            "pools are not supported)")
    shapes = {tuple(p.shape) for layer in planes for p in layer}
    if any(len(shape) != 3 for shape in shapes):
        raise RuntimeError(
            f"--schedule-policy rotasched needs {kind.__name__} buffers of [slots, heads, dim] "
            f"(the NHD layout); got {sorted(shapes)} "
            f"(kv_cache_layout={getattr(kv_pool, 'kv_cache_layout', None)!r})")
    return planes


class SglangKV:
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.req_to_token_pool = scheduler.req_to_token_pool
        self.tree_cache = scheduler.tree_cache
        self.allocator = scheduler.token_to_kv_pool_allocator
        self.page_size = scheduler.page_size
        self.device = self.req_to_token_pool.req_to_token.device

    @staticmethod
    def kv_len(req: Req) -> int:
        return compat.kv_committed_len(req)

    def device_slots(self, req: Req) -> torch.Tensor:
        row = self.req_to_token_pool.req_to_token[compat.req_pool_idx(req)]
        return row[: compat.kv_committed_len(req)].to(torch.int64)

    def release(self, req: Req) -> None:
        """Give a rotated-out request's device KV and request slot back. With the radix cache
        its tokens are inserted as evictable entries, so a quick rotate-in may find them still
        there; without it (or in deterministic mode) everything past the protected prefix is
        freed. Call only once its device→host copy is done."""
        compat.release_kv_cache(req, self.tree_cache, insert=True)
        compat.forget_prefix(req)

    def discard(self, req: Req) -> None:
        """Give back a restored request's device KV and request slot without caching it (its
        bytes are not to be trusted, e.g. after a failed rotate-in copy)."""
        compat.release_kv_cache(req, self.tree_cache, insert=False)
        compat.forget_prefix(req)

    def can_restore(self, num_tokens: int) -> bool:
        return (
            self.req_to_token_pool.available_size() > 0
            and self.allocator.available_size() + self.tree_cache.evictable_size()
            >= num_tokens + self.page_size
        )

    def restore(self, req: Req, kv_len: int) -> tuple[int, torch.Tensor]:
        """Allocate a request slot and device KV for positions [0, kv_len). Returns the prefix
        length P still held by the radix tree and the new slots for [P, kv_len)."""
        token_ids = (req.origin_input_ids + req.output_ids)[:kv_len]
        prefix = compat.match_and_lock(req, self.tree_cache, token_ids)
        prefix_len = len(prefix)
        if self.req_to_token_pool.alloc([req]) is None:
            raise RuntimeError("no free request slot for a rotate-in (checked by can_restore)")
        new_slots = self._alloc(req, prefix, kv_len)
        row = self.req_to_token_pool.req_to_token[compat.req_pool_idx(req)]
        if prefix_len:
            row[:prefix_len] = prefix.to(row.dtype)
        row[prefix_len:kv_len] = new_slots.to(row.dtype)
        compat.set_restored_kv(req, prefix_len, kv_len)
        return prefix_len, new_slots.to(torch.int64)

    def _alloc(self, req: Req, prefix: torch.Tensor, kv_len: int) -> torch.Tensor:
        num_new = kv_len - len(prefix)
        if self.page_size == 1:
            return alloc_token_slots(self.tree_cache, num_new)
        # The radix tree matches whole pages only, so the new run starts on a fresh page.
        last_loc = prefix[-1:] if len(prefix) else torch.full((1,), -1, dtype=torch.int64)
        prefix_lens = torch.tensor([len(prefix)], dtype=torch.int64)
        seq_lens = torch.tensor([kv_len], dtype=torch.int64)
        return alloc_paged_token_slots_extend(
            tree_cache=self.tree_cache,
            prefix_lens=prefix_lens.to(self.device), prefix_lens_cpu=prefix_lens,
            seq_lens=seq_lens.to(self.device), seq_lens_cpu=seq_lens,
            last_loc=last_loc.to(self.device), extend_num_tokens=num_new,
        )
