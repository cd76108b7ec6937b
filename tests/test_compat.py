"""Every bridge of superinfer.adapters.sglang.compat against the installed SGLang. CI runs the
suite on 0.5.17 and on 0.5.23, so each bridge's two sides run, one per venv; the tests check what
the bridge promises, not which side it took."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
import re
import types

import pytest
import sglang.srt.server_args as server_args_module
import torch
from sglang_parts import SchedulerParts, has_parallel_state

from superinfer.adapters.sglang import compat

PUBLIC = [f for name, f in vars(compat).items()
          if callable(f) and not inspect.isclass(f) and not name.startswith("_")
          and getattr(f, "__module__", None) == compat.__name__]


def test_every_bridge_names_the_release_that_changed_it():
    assert len(PUBLIC) >= 15
    for f in PUBLIC:
        assert re.search(r"0\.5\.(1[89]|2[0-3])", f.__doc__ or ""), f.__name__


# --- ServerArgs --------------------------------------------------------------------------------

def sglang_server_args() -> type:
    """SGLang's own ServerArgs (conftest installed our subclass of it)."""
    cls = server_args_module.ServerArgs
    return cls.__mro__[1] if getattr(cls, "__superinfer__", False) else cls


def test_a_server_args_subclass_adds_fields_with_defaults_and_keeps_sglang_s():
    base = sglang_server_args()
    assert compat.is_struct(base) != dataclasses.is_dataclass(base)
    ns = {"__annotations__": {"compat_probe": float}, "compat_probe": 0.25,
          "__module__": __name__, "__qualname__": "ServerArgs"}
    cls = compat.subclass_server_args(base, ns)
    fields = compat.server_args_fields(cls)
    assert "compat_probe" in fields and set(compat.server_args_fields(base)) < set(fields)
    assert compat.server_args_default(cls, "compat_probe") == 0.25
    assert compat.server_args_default(cls, "schedule_policy") == "fcfs"
    args = cls(model_path="dummy", device="cpu", compat_probe=0.5)
    assert (args.compat_probe, args.schedule_policy) == (0.5, "fcfs")


def test_server_args_state_rebuilds_an_equal_record_without_resolving_it():
    cls = server_args_module.ServerArgs  # ours: what crosses to spawned schedulers
    args = cls(model_path="dummy", device="cpu", schedule_policy="rotasched", rota_tbt_slo=0.05)
    args._launch_command = "sglang serve ..."  # bookkeeping, not a field (a Struct's __dict__)
    fields, extra = compat.server_args_state(args)
    assert fields["rota_tbt_slo"] == 0.05 and fields["schedule_policy"] == "rotasched"
    again = compat.rebuild_server_args(cls, *pickle.loads(pickle.dumps((fields, extra))))
    assert type(again) is cls and compat.server_args_state(again) == (fields, extra)
    assert again._launch_command == "sglang serve ..."


# --- a request's KV record ---------------------------------------------------------------------

def prefilled(radix: bool = True, prompt: int = 24, n: int = 1, steps: int = 0):
    """Requests prefilled as one batch (their prompts go into the tree), then decode steps
    (whose KV only the request holds)."""
    parts = SchedulerParts(size=256, radix=radix)
    reqs = [parts.make_req(f"r{i}", prompt + i) for i in range(n)]
    batch = parts.prefill(reqs)
    for _ in range(steps):
        parts.decode_step(batch)
    return parts, reqs[0], batch


def test_row_and_lengths_are_read_where_sglang_keeps_them():
    parts = SchedulerParts(size=256)
    req = parts.make_req("r", 24)
    assert compat.req_pool_idx(req) is None and compat.kv_allocated_len(req) == 0
    parts.prefill([req])
    row = compat.req_pool_idx(req)
    assert isinstance(row, int) and row >= 0
    assert compat.kv_committed_len(req) == compat.kv_allocated_len(req) == 24
    assert bool((parts.req_to_token_pool.req_to_token[row, :24] >= 0).all())


@pytest.mark.parametrize("insert", [True, False])
def test_release_gives_the_row_back_and_inserts_only_when_asked(insert):
    parts, req, _ = prefilled(steps=8)  # 24 prompt tokens in the tree, 8 decoded ones not
    assert compat.kv_committed_len(req) == 32
    free_before = parts.token_to_kv_pool_allocator.available_size()
    compat.release_kv_cache(req, parts.tree_cache, insert=insert)
    compat.forget_prefix(req)
    assert compat.req_pool_idx(req) is None and req.last_node is None
    assert parts.tree_cache.protected_size() == 0
    assert parts.free_tokens() == parts.initial_free
    # Inserted: the decoded tokens join the tree (evictable); else they are free at once.
    freed = parts.token_to_kv_pool_allocator.available_size() - free_before
    assert freed == (0 if insert else 8)


@pytest.mark.parametrize("radix", [True, False])
def test_match_and_lock_finds_a_released_prefix_and_its_release_unlocks_it(radix):
    parts, req, _ = prefilled(radix=radix)
    row = compat.req_pool_idx(req)
    slots = parts.req_to_token_pool.req_to_token[row, :24].to(torch.int64).clone()
    compat.release_kv_cache(req, parts.tree_cache, insert=True)
    compat.forget_prefix(req)
    prefix = compat.match_and_lock(req, parts.tree_cache, req.origin_input_ids[:24])
    if not radix:
        assert prefix.numel() == 0
        return
    assert prefix.dtype == torch.int64 and torch.equal(prefix, slots[: len(prefix)])
    assert len(prefix) >= 16 and parts.tree_cache.protected_size() == len(prefix)
    # Restore the row the way kv_ops does, then release again: nothing stays locked.
    parts.req_to_token_pool.alloc([req])
    parts.req_to_token_pool.req_to_token[compat.req_pool_idx(req), : len(prefix)] = prefix.to(
        parts.req_to_token_pool.req_to_token.dtype)
    compat.set_restored_kv(req, len(prefix), len(prefix))
    assert compat.kv_committed_len(req) == compat.kv_allocated_len(req) == len(prefix)
    compat.release_kv_cache(req, parts.tree_cache, insert=False)
    compat.forget_prefix(req)
    assert parts.tree_cache.protected_size() == 0 and parts.free_tokens() == parts.initial_free


def test_retract_decode_runs_sglang_s_retraction():
    parts, _, batch = prefilled(n=2, steps=2)
    assert len(batch.reqs) == 2
    retracted, _, aborted = compat.retract_decode(batch, parts.server_args)
    assert len(retracted) == len(batch.reqs) == 1 and not aborted
    assert all(compat.req_pool_idx(r) is None for r in retracted)


# --- the scheduler -----------------------------------------------------------------------------

def test_scheduler_ranks_from_the_scheduler_or_the_runtime_context():
    assert compat.scheduler_ranks(types.SimpleNamespace(ps=types.SimpleNamespace(tp_rank=3))) \
        == (3, 0)
    assert compat.scheduler_ranks(
        types.SimpleNamespace(ps=types.SimpleNamespace(tp_rank=1, dp_rank=2))) == (1, 2)
    parts = SchedulerParts(size=64)  # wired like this SGLang's scheduler
    assert compat.scheduler_ranks(parts) == (0, 0)
    assert hasattr(parts, "ps") == has_parallel_state()


# --- admission ---------------------------------------------------------------------------------

@pytest.mark.parametrize("ignore_eos", [True, False])
def test_fixed_length_ratio_is_what_sglang_s_prefill_adder_reserves(ignore_eos):
    from sglang.srt.managers.schedule_policy import PrefillAdder

    parts = SchedulerParts(size=256)
    req = parts.make_req("r", 24, max_new_tokens=40)
    req.sampling_params.ignore_eos = ignore_eos
    batch = parts.prefill([req])  # "r" has its first token: 39 left

    def room(running) -> float:
        adder = PrefillAdder(parts.page_size, parts.tree_cache, parts.token_to_kv_pool_allocator,
                             running, 0.0, parts.max_prefill_tokens, None)
        return adder.rem_total_tokens

    ratio = compat.fixed_length_reservation_ratio()
    assert ratio in (None, 1.0)
    expected = 39 * ratio if (ignore_eos and ratio is not None) else 0
    assert room(parts.empty_batch()) - room(batch) == expected


# --- HiCache (eval's baseline) -----------------------------------------------------------------

def test_mha_host_pool_is_built_for_the_device_pool():
    parts = SchedulerParts(size=256, page_size=16)
    host = compat.mha_host_pool(parts.kv_pool, 2.0, 16, "layer_first", pin_memory=False)
    assert host.size >= 2 * 256 and host.page_size == 16
    assert host.k_buffer[0].shape[-1] == parts.kv_pool.k_buffer[0].shape[-1]
