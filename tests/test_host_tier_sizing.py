"""The host tier's size check against a fake /proc and /sys: clear errors before pinning."""

from __future__ import annotations

from pathlib import Path

import pytest

from superinfer.host_tier.sizing import (
    HostMemory,
    HostTierSizeError,
    check_host_tier_size,
    read_host_memory,
)

GB = 10**9


def fake_root(tmp_path: Path, available_kb: int, cgroup: tuple[str, int] | None = None,
              numa_free_kb: int | None = None) -> Path:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/meminfo").write_text(
        f"MemTotal:       99999999 kB\nMemFree:  1 kB\nMemAvailable:   {available_kb} kB\n")
    (tmp_path / "proc/self/cgroup").write_text("0::/job\n")
    if cgroup is not None:
        base = tmp_path / "sys/fs/cgroup/job"
        base.mkdir(parents=True)
        (base / "memory.max").write_text(cgroup[0] + "\n")
        (base / "memory.current").write_text(f"{cgroup[1]}\n")
    if numa_free_kb is not None:
        node = tmp_path / "sys/devices/system/node/node1"
        node.mkdir(parents=True)
        (node / "meminfo").write_text(
            f"Node 1 MemTotal: 9 kB\nNode 1 MemFree:  {numa_free_kb} kB\n")
    return tmp_path


def test_reads_meminfo_cgroup_and_numa(tmp_path: Path):
    root = fake_root(tmp_path, 100 * 10**6, cgroup=(str(60 * GB), 10 * GB), numa_free_kb=30 * 10**6)
    mem = read_host_memory(numa_node=1, root=root)
    assert mem.mem_available == 100 * 10**9 * 1024 // 1000
    assert mem.cgroup_room == 50 * GB and mem.numa_free == 30 * 10**6 * 1024
    unlimited = read_host_memory(root=fake_root(tmp_path / "b", 1000, cgroup=("max", 5)))
    assert unlimited.cgroup_room is None and unlimited.numa_free is None


def test_a_tier_that_fits_passes_and_one_that_does_not_names_the_flag_and_the_room():
    mem = HostMemory(mem_available=100 * GB)
    check_host_tier_size(10 * GB, 8, mem)  # 80 GB of 100: exactly the share allowed
    with pytest.raises(HostTierSizeError) as err:
        check_host_tier_size(64 * GB, 8, mem)  # the 8 ranks x 64 GB
    msg = str(err.value)
    assert "--rota-host-kv-gb 64" in msg and "8 rank(s)" in msg and "512.0 GB" in msg
    assert "MemAvailable leaves 100.0 GB" in msg and "at most 10.0 GB per rank" in msg


@pytest.mark.parametrize("memory,where", [
    (HostMemory(1000 * GB, cgroup_room=20 * GB), "cgroup"),
    (HostMemory(1000 * GB, numa_free=20 * GB), "NUMA node"),
])
def test_the_tightest_limit_decides(memory: HostMemory, where: str):
    with pytest.raises(HostTierSizeError, match=where):
        check_host_tier_size(20 * GB, 1, memory)
    check_host_tier_size(16 * GB, 1, memory)


def test_memlock_limit_is_per_rank_and_says_how_to_raise_it():
    mem = HostMemory(1000 * GB, memlock_limit=8 * 2**20)
    with pytest.raises(HostTierSizeError, match="ulimit -l"):
        check_host_tier_size(1 * GB, 1, mem)
    check_host_tier_size(8 * 2**20, 1, mem)


def test_ranks_on_host_counts_every_scheduler_process_of_this_host():
    from types import SimpleNamespace

    from superinfer.adapters.sglang.placement import ranks_on_host

    assert ranks_on_host(SimpleNamespace(tp_size=8, pp_size=1, dp_size=1, nnodes=1)) == 8
    assert ranks_on_host(SimpleNamespace(tp_size=2, pp_size=1, dp_size=2, nnodes=1)) == 4
    assert ranks_on_host(SimpleNamespace(tp_size=4, pp_size=1, dp_size=4, nnodes=1,
                                         enable_dp_attention=True)) == 4
    assert ranks_on_host(SimpleNamespace(tp_size=16, pp_size=1, dp_size=1, nnodes=2)) == 8


def test_the_factory_refuses_before_pinning():
    import torch

    from superinfer.host_tier.factory import build_host_tier
    from superinfer.host_tier.interface import mha_planes

    kv = [torch.zeros(64, 2, 8) for _ in range(2)]
    with pytest.raises(HostTierSizeError, match="--rota-host-kv-gb"):
        build_host_tier(mha_planes(kv, kv), 1, host_kv_gb=50.0, mover_flag="auto",
                        keep_copies=False, ranks_on_host=4,
                        memory=HostMemory(mem_available=100 * GB))
    tier, spec = build_host_tier(mha_planes(kv, kv), 1, host_kv_gb=0.0001, mover_flag="auto",
                                 keep_copies=False, memory=HostMemory(mem_available=100 * GB))
    assert spec.host_tokens > 0


@pytest.mark.parametrize("page_size", [1, 16])
def test_the_factory_warms_the_mover_up_on_the_padding_page(page_size, monkeypatch):
    """The tier's first copies run at start-up (kernels compile then, not mid-serving), on the
    device page SGLang keeps for padding: its bytes come back unchanged, nothing else is
    touched, and the host pool and the mover are left as if nothing had happened."""
    import torch

    from superinfer.host_tier.factory import build_host_tier
    from superinfer.host_tier.interface import mha_planes
    from superinfer.host_tier.torch_mover import TorchMover

    moved = []
    for name in ("submit_d2h", "submit_h2d"):
        real = getattr(TorchMover, name)

        def spy(self, job_id, src, dst, ready=None, _real=real, _name=name):
            moved.append((_name, (src if _name == "submit_d2h" else dst).tolist()))
            return _real(self, job_id, src, dst, ready)

        monkeypatch.setattr(TorchMover, name, spy)

    g = torch.Generator().manual_seed(0)
    k = [torch.randn(64, 2, 8, generator=g) for _ in range(2)]
    v = [torch.randn(64, 2, 8, generator=g) for _ in range(2)]
    before = [t.clone() for t in k + v]
    tier, spec = build_host_tier(mha_planes(k, v), page_size, host_kv_gb=0.0001,
                                 mover_flag="auto", keep_copies=False,
                                 memory=HostMemory(mem_available=100 * GB))
    page0 = list(range(page_size))
    assert moved == [("submit_d2h", page0), ("submit_h2d", page0)]
    assert all(torch.equal(a, b) for a, b in zip(before, k + v, strict=True))
    assert tier.pages.available_size() == spec.host_tokens
    assert tier.mover.poll().done_d2h == [] and tier.stats.bytes_d2h == 0
    tier.check()
