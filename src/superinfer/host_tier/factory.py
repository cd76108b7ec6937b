"""Builds a host tier for one rank's device KV planes: picks the data path, sizes the pinned
pool in whole pages of that path, and wires the mover into a ``HostTierManager``."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from .direct import DIRECT_MIN_PIECE_BYTES, mover_path
from .interface import KVLayout, KVMover, LayerPlanes
from .manager import HostTierManager
from .pool import HostKVPool
from .sizing import HostMemory, check_host_tier_size, read_host_memory

logger = logging.getLogger("superinfer")
TOKEN_MAJOR_PAGE = 16  # host page of the token-major paths (torch, staging, zerocopy)


@dataclass(frozen=True, slots=True)
class TierSpec:
    """What was built, for the start record and the logs."""

    path: str  # torch | staging | zerocopy | direct
    mover: str  # the mover's class name
    host_page: int  # tokens per host page
    host_tokens: int
    bytes_per_token: int


def build_host_tier(planes: LayerPlanes, device_page_size: int, host_kv_gb: float,
                    mover_flag: str, keep_copies: bool, numa_node: int | None = None,
                    ranks_on_host: int = 1, ranks_on_node: int | None = None,
                    memory: HostMemory | None = None,
                    fail_copies: dict[bool, frozenset[int]] | None = None
                    ) -> tuple[HostTierManager, TierSpec]:
    """A host tier of about ``host_kv_gb`` GB beside SGLang's layer-first device KV ``planes``
    (per layer, its ``[slots, heads, head_dim]`` buffers: K and V of an MHA pool, the latent of
    an MLA pool). Raises HostTierSizeError, before anything is pinned, if ``ranks_on_host``
    such tiers do not fit the host's ``memory`` (read from this machine by default), or
    ``ranks_on_node`` of them (default: all) the free memory of ``numa_node``."""
    layout = KVLayout.of(planes)
    p0 = planes[0][0]
    piece = device_page_size * p0[0].numel() * p0.element_size()  # one page of one plane
    path = mover_path(mover_flag, p0.is_cuda, piece)
    # The direct path copies whole device pages into host pages of the same size.
    page = device_page_size if path == "direct" else TOKEN_MAJOR_PAGE
    num_tokens = int(host_kv_gb * 1e9 / layout.bytes_per_token) // page * page
    if num_tokens < page:
        raise ValueError(f"--rota-host-kv-gb {host_kv_gb} holds less than one {page}-token page "
                         f"({layout.bytes_per_token} bytes per token)")
    memory = memory if memory is not None else read_host_memory(numa_node)
    if not p0.is_cuda:  # nothing is pinned, so the locked-memory limit does not apply
        memory = dataclasses.replace(memory, memlock_limit=None)
    check_host_tier_size(num_tokens * layout.bytes_per_token, ranks_on_host, memory,
                         ranks_on_node=ranks_on_node)
    pool = HostKVPool(layout, num_tokens, page, p0.dtype, pin_memory=p0.is_cuda,
                      numa_node=numa_node, page_major=path == "direct")
    mover = _make_mover(path, planes, pool)
    if path == "direct" and p0.is_cuda and piece < DIRECT_MIN_PIECE_BYTES:
        logger.warning("rotasched: --rota-mover direct with %.0f KiB page pieces: copy engines "
                       "move far less than full duplex with small pieces; a larger --page-size "
                       "or --rota-mover staging moves more", piece / 1024)
    warm_up(mover, pool, device_page_size, p0.device)
    manager = HostTierManager(pool, mover, layout.bytes_per_token, keep_copies, fail_copies)
    return manager, TierSpec(path, type(mover).__name__, page, num_tokens, layout.bytes_per_token)


def warm_up(mover: KVMover, pool: HostKVPool, device_page_size: int,
            device: torch.device) -> None:
    """Move the device's first page (SGLang keeps it for padding and never serves from it) to
    the host and back, before serving starts. A mover's kernels compile on first use, which
    takes seconds; on the first rotation mid-serving the scheduler's loop would stall that long
    (no batch runs while requests queue up)."""
    device_slots = torch.arange(device_page_size, device=device)
    host_slots = pool.alloc(device_page_size)
    assert host_slots is not None  # a fresh pool holds at least one page (checked above)
    try:
        mover.submit_d2h("superinfer-warm-up", device_slots, host_slots, None)
        mover.synchronize()
        mover.submit_h2d("superinfer-warm-up", host_slots, device_slots, None)
        mover.synchronize()
        mover.poll()  # its completions are nobody's to report
    finally:
        pool.free(host_slots)


def _make_mover(path: str, planes: LayerPlanes, host: HostKVPool) -> KVMover:
    if path == "torch":
        from .torch_mover import TorchMover

        return TorchMover(planes, host)
    if path == "direct":
        from .direct import DirectKVMover

        return DirectKVMover(planes, host)
    from .staging import StagingKVMover

    return StagingKVMover(planes, host, path=path)
