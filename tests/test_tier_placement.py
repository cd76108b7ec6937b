"""Each rank's host tier near its own GPU, and the size check counting the tiers that share
that memory: real ServerArgs for the layouts, a fake sysfs for the topology."""

from __future__ import annotations

from pathlib import Path

import pytest

from superinfer.adapters.sglang.cli import install
from superinfer.adapters.sglang.placement import (
    TierPlacement,
    ranks_on_host,
    server_gpus,
    tier_placement,
)
from superinfer.host_tier.sizing import GB, HostMemory, HostTierSizeError, check_host_tier_size
from superinfer.host_tier.topology import memory_nodes, parse_node_list, pci_numa_node

ServerArgs = install()


def _args(**kw) -> object:
    return ServerArgs(model_path="dummy", device="cpu", schedule_policy="rotasched", **kw)


def test_ranks_on_host_counts_every_scheduler_process_of_this_host():
    assert ranks_on_host(_args(tp_size=8)) == 8
    assert ranks_on_host(_args(tp_size=2, dp_size=2)) == 4
    assert ranks_on_host(_args(dp_size=2)) == 2


def test_server_gpus_follow_sglangs_numbering():
    assert server_gpus(_args(dp_size=2)) == [0, 1]
    assert server_gpus(_args(tp_size=2, dp_size=2, base_gpu_id=4)) == [4, 5, 6, 7]
    assert server_gpus(_args(dp_size=2, base_gpu_id=1, gpu_id_step=2)) == [1, 3]


# Two sockets, GPUs 0-3 on node 0 and 4-7 on node 1 (a typical 8-GPU PCIe host).
def _node_of(gpu: int) -> int:
    return gpu // 4


def test_auto_binds_each_dp_rank_to_its_gpus_node_and_counts_its_neighbours():
    args = _args(dp_size=8)
    got = [tier_placement(args, g, "auto", _node_of, [0, 1], lambda: True) for g in range(8)]
    assert got[0] == TierPlacement(0, 8, 4) and got[5] == TierPlacement(1, 8, 4)
    assert {p.numa_node for p in got} == {0, 1}
    # a server on GPUs 2..3 only: two tiers on node 0
    two = _args(dp_size=2, base_gpu_id=2)
    assert tier_placement(two, 3, "auto", _node_of, [0, 1], lambda: True) == TierPlacement(0, 2, 2)


def test_auto_leaves_placement_alone_where_binding_changes_nothing_or_cannot_work(caplog):
    args = _args(dp_size=2)
    assert tier_placement(args, 1, "auto", _node_of, [0], lambda: True) == TierPlacement(None, 2, 2)
    # the GPU's node unknown (sysfs says -1), or a node without memory
    assert tier_placement(args, 1, "auto", lambda g: None, [0, 1], lambda: True).numa_node is None
    assert tier_placement(args, 1, "auto", lambda g: 3, [0, 1], lambda: True).numa_node is None
    with caplog.at_level("WARNING", logger="superinfer"):
        assert tier_placement(args, 1, "auto", _node_of, [0, 1], lambda: False).numa_node is None
    assert "libnuma" in caplog.text


def test_explicit_node_and_off():
    args = _args(dp_size=2)
    assert tier_placement(args, 1, "1", _node_of, [0, 1]) == TierPlacement(1, 2, 2)
    assert tier_placement(args, 1, "off", _node_of, [0, 1]) == TierPlacement(None, 2, 2)


def test_the_node_check_counts_only_the_tiers_bound_to_that_node():
    # 8 ranks of 40 GB: 320 GB fits 1 TB available, and 4 per node fit 200 GB free per node...
    mem = HostMemory(1000 * GB, numa_free=200 * GB)
    check_host_tier_size(40 * GB, 8, mem, ranks_on_node=4)
    # ...but not all 8 on one node, and the message says where and how many
    with pytest.raises(HostTierSizeError, match=r"x 8 rank\(s\) on its NUMA node"):
        check_host_tier_size(40 * GB, 8, mem)
    with pytest.raises(HostTierSizeError, match=r"x 8 rank\(s\) on this host"):
        check_host_tier_size(110 * GB, 8, mem, ranks_on_node=1)


def _sysfs(root: Path, has_memory: str, devices: dict[str, str]) -> Path:
    (root / "sys/devices/system/node").mkdir(parents=True)
    (root / "sys/devices/system/node/has_memory").write_text(has_memory + "\n")
    for address, node in devices.items():
        (root / "sys/bus/pci/devices" / address).mkdir(parents=True)
        (root / "sys/bus/pci/devices" / address / "numa_node").write_text(node + "\n")
    return root


def test_sysfs_reading(tmp_path: Path):
    root = _sysfs(tmp_path, "0-1,4", {"0000:1b:00.0": "1", "0000:2c:00.0": "-1"})
    assert memory_nodes(root) == [0, 1, 4]
    assert pci_numa_node("0000:1b:00.0", root) == 1
    assert pci_numa_node("0000:2c:00.0", root) is None  # the kernel does not know
    assert pci_numa_node("0000:3d:00.0", root) is None  # no such device
    assert memory_nodes(tmp_path / "nowhere") == []
    assert parse_node_list("0") == [0] and parse_node_list("") == []


def test_a_pool_off_the_gpu_is_never_bound_by_auto():
    args = _args(dp_size=2)
    assert tier_placement(args, None, "auto", _node_of, [0, 1], lambda: True).numa_node is None


def test_a_gpu_this_process_cannot_see_has_no_node():
    """torch raises for a device id it cannot see (or without a driver): placement falls back
    to first touch instead of failing the server's start."""
    from superinfer.adapters.sglang.placement import cuda_gpu_numa_node

    assert cuda_gpu_numa_node(10_000) is None


def test_data_parallel_ranks_can_share_one_gpu_under_the_eval_launcher():
    """eval.e2e.shared_gpu_server lets SGLang take --gpu-id-step 0 (the --dp-size 2 check on a
    one-GPU machine); every rank's host tier then counts as beside the same GPU. SGLang checks
    its arguments when the engine launches (check_server_args), as here."""
    from eval.e2e.shared_gpu_server import allow_shared_gpu

    # a shipped config, as on the GPU: SGLang 0.5.17 then resolves and seals the arguments
    # (read-only), which a plain assignment in the launcher broke there
    model = Path(__file__).resolve().parents[1] / "eval" / "models" / "llama-3.2-1b"
    args = ServerArgs(model_path=str(model), device="cpu", schedule_policy="rotasched",
                      dp_size=2, gpu_id_step=0, chunked_prefill_size=8192, page_size=1,
                      skip_tokenizer_init=True, load_format="dummy", served_model_name="dummy")
    with pytest.raises(AssertionError, match="gpu_id_step"):
        args.check_server_args()
    allow_shared_gpu()
    allow_shared_gpu()  # idempotent: one wrapper, not two
    args.check_server_args()
    assert args.gpu_id_step == 0
    assert server_gpus(args) == [0, 0]
    bad = _args(dp_size=2, gpu_id_step=0, base_gpu_id=-1, served_model_name="dummy",
                chunked_prefill_size=8192, page_size=1)
    with pytest.raises(AssertionError, match="base_gpu_id"):  # SGLang's other checks still run
        bad.check_server_args()
