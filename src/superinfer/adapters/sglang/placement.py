"""Where one scheduler process's host tier goes, and how many tiers share that memory.

Every TP/PP rank and every DP replica (``--dp-size``) runs its own scheduler process with its
own host tier of ``--rota-host-kv-gb``; the size check before pinning must count them all, and
``--rota-host-numa-node auto`` puts each in the NUMA node of its own GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from ...host_tier.topology import (
    libnuma_loadable,
    memory_nodes,
    pci_address,
    pci_numa_node,
    tier_numa_node,
)

logger = logging.getLogger("superinfer")


@dataclass(frozen=True, slots=True)
class TierPlacement:
    numa_node: int | None  # None: first touch
    ranks_on_host: int  # host tiers this server pins on this host
    ranks_on_node: int  # of them, those bound to ``numa_node`` (all of them when unbound)


def ranks_on_host(server_args: object) -> int:
    """Scheduler processes on this host, each with its own host tier: TP x PP ranks, times DP
    replicas unless DP attention shares the TP ranks, over the nodes."""
    tp = getattr(server_args, "tp_size", 1) or 1
    pp = getattr(server_args, "pp_size", 1) or 1
    dp = getattr(server_args, "dp_size", 1) or 1
    if getattr(server_args, "enable_dp_attention", False):
        dp = 1
    return max(tp * pp * dp // max(getattr(server_args, "nnodes", 1) or 1, 1), 1)


def server_gpus(server_args: object) -> list[int]:
    """The GPU ids this server's scheduler processes use on this host (SGLang gives rank k the
    GPU ``base_gpu_id + k * gpu_id_step``; a step of 0 puts every rank on one GPU)."""
    base = getattr(server_args, "base_gpu_id", 0) or 0
    step = getattr(server_args, "gpu_id_step", 1)
    step = 1 if step is None else step
    return [base + k * step for k in range(ranks_on_host(server_args))]


def cuda_gpu_numa_node(gpu_id: int) -> int | None:
    """The NUMA node of CUDA device ``gpu_id`` (as this process numbers it), from sysfs; None
    for a device this process cannot see (placement then falls back to first touch rather
    than failing the server's start)."""
    import torch

    try:
        props = torch.cuda.get_device_properties(gpu_id)
    except (AssertionError, RuntimeError):  # torch: "Invalid device id"
        return None
    return pci_numa_node(pci_address(props.pci_domain_id, props.pci_bus_id,
                                     props.pci_device_id))


def tier_placement(server_args: object, gpu_id: int | None, numa_flag: str,
                   gpu_node: Callable[[int], int | None] = cuda_gpu_numa_node,
                   nodes_with_memory: list[int] | None = None,
                   can_bind: Callable[[], bool] = libnuma_loadable) -> TierPlacement:
    """This rank's placement under ``--rota-host-numa-node numa_flag`` ('auto', 'off' or a
    node number); ``gpu_id`` None: the KV is not on a GPU. 'auto' without libnuma leaves
    placement to first touch, with a warning; an explicit node without it fails when the tier
    binds."""
    on_host = ranks_on_host(server_args)
    if numa_flag == "off" or (numa_flag == "auto" and gpu_id is None):
        return TierPlacement(None, on_host, on_host)
    if numa_flag != "auto":  # every rank's tier on one node
        return TierPlacement(int(numa_flag), on_host, on_host)
    nodes = memory_nodes() if nodes_with_memory is None else nodes_with_memory
    if len(nodes) < 2:  # one memory node: binding changes nothing (and needs no libnuma)
        return TierPlacement(None, on_host, on_host)
    node = tier_numa_node(gpu_node(gpu_id), nodes)
    if node is None:
        return TierPlacement(None, on_host, on_host)
    if not can_bind():
        logger.warning("rotasched: GPU %d is on NUMA node %d, but libnuma.so.1 is missing: the "
                       "host tier is not bound to it (install libnuma1)", gpu_id, node)
        return TierPlacement(None, on_host, on_host)
    sharing = sum(tier_numa_node(gpu_node(g), nodes) == node for g in server_gpus(server_args))
    return TierPlacement(node, on_host, max(sharing, 1))
