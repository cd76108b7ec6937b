"""TpAgreement on two real CPU processes over gloo (127.0.0.1 only), and the no-group identity."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import traceback
from datetime import timedelta

import pytest
import torch.distributed as dist

from superinfer.adapters.sglang.tp_sync import Agreement, TpAgreement
from superinfer.policy.costs import CostModel

WORLD = 2
ITERATIONS = 4
LOCAL_DONE = {0: (3, 1), 1: (2, 4)}  # per rank: (d2h, h2d); the agreed counts are (2, 1)
DEADLINE_S = 60.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clock(rank: int, i: int) -> float:
    return 1000.0 * (rank + 1) + i


def _worker(rank: int, port: int, results: mp.Queue) -> None:
    """One TP rank: agrees ITERATIONS times, sends back what it got (or its traceback)."""
    try:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # keep gloo on the loopback
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=WORLD, timeout=timedelta(seconds=30))
        try:
            sync = TpAgreement(dist.group.WORLD)
            costs = CostModel()
            if rank == 1:
                costs.observe_decode(0.5)  # rank 1 timed its decode differently
            seen = []
            for i in range(ITERATIONS):
                if rank == 0:
                    costs.observe_decode(0.01 * (i + 1))  # rank 0's model changes every iteration
                d2h, h2d = LOCAL_DONE[rank]
                got = sync.agree(_clock(rank, i), costs, d2h, h2d)
                assert isinstance(got, Agreement)
                seen.append((got.now_s, got.costs.costs(), got.done_d2h, got.done_h2d,
                             costs.costs(), got.costs is costs))
                costs = got.costs  # as the adapter does: the agreed model is the one kept
        finally:
            dist.destroy_process_group()
        results.put(("ok", rank, seen))
    except BaseException:
        results.put(("error", rank, traceback.format_exc()))
        raise


@pytest.mark.timeout(120)
def test_two_gloo_ranks_agree_on_rank0_clock_costs_and_min_done() -> None:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, results), daemon=True)
             for r in range(WORLD)]
    for p in procs:
        p.start()
    got: dict[int, list] = {}
    try:
        for _ in range(WORLD):
            try:
                status, rank, payload = results.get(timeout=DEADLINE_S)
            except queue.Empty:
                codes = [p.exitcode for p in procs]
                pytest.fail(f"no result from a rank within {DEADLINE_S}s (exit codes {codes})")
            if status != "ok":
                pytest.fail(f"rank {rank} failed:\n{payload}")
            got[rank] = payload
        for p in procs:
            p.join(timeout=10)
        assert [p.exitcode for p in procs] == [0] * WORLD
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
        results.close()
        results.join_thread()

    rank0 = got[0]
    for rank in range(WORLD):
        assert len(got[rank]) == ITERATIONS
        for i, (now_s, agreed, d2h, h2d, _own, same_obj) in enumerate(got[rank]):
            assert now_s == _clock(0, i)
            assert agreed == rank0[i][4]  # rank 0's own costs() at that iteration
            assert (d2h, h2d) == (2, 1)
            assert same_obj == (rank == 0)  # rank 0 keeps its object, the others get a copy
    # Rank 0's estimates did move, and rank 1's own decode observation was overridden.
    assert rank0[0][1].decode_step_s != rank0[-1][1].decode_step_s
    assert all(row[1].decode_step_s != 0.5 for row in got[1])


def test_no_group_is_identity() -> None:
    sync = TpAgreement(None)
    costs = CostModel()
    got = sync.agree(12.5, costs, 3, 7)
    assert got == Agreement(12.5, costs, 3, 7)
    assert got.costs is costs
