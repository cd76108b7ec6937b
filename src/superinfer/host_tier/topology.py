"""Which NUMA node a GPU hangs off, so each rank's host tier sits in the memory nearest its
GPU: a copy that crosses the socket link runs slower and takes that link from everyone else.

Read from sysfs (the PCI device's ``numa_node``), which every Linux kernel publishes; a machine
with one memory node (most single-socket hosts) needs no binding at all.
"""

from __future__ import annotations

import ctypes
from pathlib import Path


def pci_address(domain: int, bus: int, device: int) -> str:
    """The sysfs name of a GPU's PCI function 0, e.g. ``0000:1b:00.0``."""
    return f"{domain:04x}:{bus:02x}:{device:02x}.0"


def pci_numa_node(address: str, root: Path = Path("/")) -> int | None:
    """The NUMA node the kernel reports for PCI device ``address`` (None: unknown, -1 in sysfs)."""
    try:
        node = int((root / "sys/bus/pci/devices" / address / "numa_node").read_text().strip())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


def memory_nodes(root: Path = Path("/")) -> list[int]:
    """NUMA nodes that hold memory (``has_memory``), in order; [] where sysfs has no NUMA."""
    try:
        text = (root / "sys/devices/system/node/has_memory").read_text().strip()
    except OSError:
        return []
    return parse_node_list(text)


def parse_node_list(text: str) -> list[int]:
    """A sysfs node list such as ``0-1,4`` as ``[0, 1, 4]``."""
    nodes: list[int] = []
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        nodes.extend(range(int(first), int(last or first) + 1))
    return nodes


def tier_numa_node(gpu_node: int | None, nodes_with_memory: list[int]) -> int | None:
    """Where ``--rota-host-numa-node auto`` puts a tier: its GPU's node where the host has more
    than one memory node and the GPU's is one of them; else None (first touch, the default
    placement, which on one node is the same thing)."""
    if gpu_node is None or len(nodes_with_memory) < 2 or gpu_node not in nodes_with_memory:
        return None
    return gpu_node


def libnuma_loadable() -> bool:
    """Whether binding can work here (the host tier binds through libnuma.so.1)."""
    try:
        ctypes.CDLL("libnuma.so.1")
    except OSError:
        return False
    return True
