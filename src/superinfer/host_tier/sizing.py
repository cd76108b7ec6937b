"""Is there room on this machine for the host tier? Checked before anything is pinned.

Pinned memory cannot be swapped or reclaimed: a tier larger than what the host can spare ends
in the kernel's OOM killer taking the whole node, not in an error. So the size asked for (per
rank, times the ranks on this host) is compared with what the host has before pinning:
``MemAvailable``, the cgroup's memory limit, the locked-memory limit, and the NUMA node's free
memory when the tier is bound to one. Failing this check ends start-up with a message that
names the flag, the size asked for and what is available.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

# Room left to everything else (SGLang's processes, the tokenizer, the page cache): a tier may
# take at most this share of what is available.
MAX_SHARE_OF_AVAILABLE = 0.8
GB = 1e9


class HostTierSizeError(RuntimeError):
    """The host tier does not fit this machine; the message says why and what would."""


@dataclass(frozen=True, slots=True)
class HostMemory:
    """What the host can give, in bytes (None: no such limit)."""

    mem_available: int
    cgroup_room: int | None = None  # the cgroup's limit minus its current use
    memlock_limit: int | None = None  # RLIMIT_MEMLOCK (None: unlimited)
    numa_free: int | None = None  # free memory of the bound NUMA node


def read_host_memory(numa_node: int | None = None, root: Path = Path("/")) -> HostMemory:
    """This machine's figures (``root`` lets tests point at a fake /proc and /sys)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    memlock = None if soft == resource.RLIM_INFINITY else int(soft)
    numa = _numa_free(root, numa_node) if numa_node is not None else None
    return HostMemory(_meminfo_kb(root / "proc/meminfo", "MemAvailable") * 1024,
                      _cgroup_room(root), memlock, numa)


def check_host_tier_size(asked_bytes: int, ranks_on_host: int, memory: HostMemory,
                         flag: str = "--rota-host-kv-gb", ranks_on_node: int | None = None
                         ) -> None:
    """Raise HostTierSizeError unless ``ranks_on_host`` tiers of ``asked_bytes`` fit the host,
    and ``ranks_on_node`` of them (default: all) the bound NUMA node."""
    share = MAX_SHARE_OF_AVAILABLE
    limits = [("this host", "MemAvailable", memory.mem_available, ranks_on_host)]
    if memory.cgroup_room is not None:
        limits.append(("this host", "the cgroup's memory limit", memory.cgroup_room,
                       ranks_on_host))
    if memory.numa_free is not None:
        limits.append(("its NUMA node", "the NUMA node's free memory", memory.numa_free,
                       ranks_on_node or ranks_on_host))
    for where, name, room, ranks in limits:
        total = asked_bytes * ranks
        if total > share * room:
            raise HostTierSizeError(
                f"{flag} {asked_bytes / GB:g} per rank x {ranks} rank(s) on {where} = "
                f"{total / GB:.1f} GB of pinned memory, but {name} leaves {room / GB:.1f} GB "
                f"(a tier may take {share:.0%} of it: at most "
                f"{share * room / ranks / GB:.1f} GB per rank); lower {flag}")
    if memory.memlock_limit is not None and asked_bytes > memory.memlock_limit:
        raise HostTierSizeError(
            f"{flag} {asked_bytes / GB:g} per rank exceeds the locked-memory limit of "
            f"{memory.memlock_limit / GB:.3f} GB (ulimit -l); raise it (e.g. "
            "`--ulimit memlock=-1` for a container) or lower " + flag)


def _meminfo_kb(path: Path, key: str) -> int:
    for line in path.read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == key:
            return int(rest.split()[0])
    raise HostTierSizeError(f"cannot read {key} from {path}")


def _cgroup_room(root: Path) -> int | None:
    """cgroup v2's memory.max minus memory.current for this process's cgroup (None: none)."""
    try:
        rel = next(line.split("::", 1)[1] for line in
                   (root / "proc/self/cgroup").read_text().splitlines() if line.startswith("0::"))
    except (OSError, StopIteration):
        return None
    base = root / "sys/fs/cgroup" / rel.strip().lstrip("/")
    try:
        limit = (base / "memory.max").read_text().strip()
        used = int((base / "memory.current").read_text().strip())
    except OSError:
        return None
    return None if limit == "max" else max(int(limit) - used, 0)


def _numa_free(root: Path, node: int) -> int | None:
    path = root / f"sys/devices/system/node/node{node}/meminfo"
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if "MemFree:" in line:
            return int(line.split("MemFree:")[1].split()[0]) * 1024
    return None
