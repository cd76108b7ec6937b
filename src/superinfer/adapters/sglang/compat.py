"""The SGLang releases SuperInfer supports (0.5.17 through 0.5.23), bridged in one place.

Each function picks the call the installed SGLang understands by feature detection (a
signature, an attribute, SGLang's own rule asked directly), never by its version string, and
names the release that changed it. The rest of the adapter (and eval's HiCache baseline) calls
these instead of the changed SGLang API; tests/test_compat.py checks each against the installed
SGLang. Imports of SGLang stay inside the functions: ``cli`` imports this module when SGLang loads
the plugin, before the parser is built.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

# --- ServerArgs ------------------------------------------------------------------------------


def is_struct(cls: type) -> bool:
    """0.5.20: ``ServerArgs`` became a msgspec Struct (before: a dataclass)."""
    return not dataclasses.is_dataclass(cls)


def subclass_server_args(base: type, namespace: dict[str, Any]) -> type:
    """A subclass of SGLang's ``ServerArgs`` adding the annotated fields in ``namespace``.
    0.5.20: a Struct subclass takes its fields from a plain class body (its metaclass reads the
    annotations); a dataclass needs ``dataclasses.dataclass`` on top."""
    cls = type(base.__name__, (base,), namespace)
    return cls if is_struct(base) else dataclasses.dataclass(cls)


def server_args_fields(cls: type) -> tuple[str, ...]:
    """Field names of a ``ServerArgs`` class. 0.5.20: msgspec Struct fields."""
    if is_struct(cls):
        return tuple(cls.__struct_fields__)
    return tuple(f.name for f in dataclasses.fields(cls))


def server_args_default(cls: type, name: str) -> Any:
    """A ``ServerArgs`` field's default. 0.5.20: a Struct's class attribute is a slot
    descriptor, the default lives in ``__struct_defaults__``."""
    if is_struct(cls):
        import msgspec.structs

        field = next(f for f in msgspec.structs.fields(cls) if f.name == name)
        return field.default
    return getattr(cls, name)


def server_args_state(args: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """What rebuilds ``args`` in another process: (fields, everything else). 0.5.20: a Struct
    keeps its fields in slots and only resolution bookkeeping in ``__dict__``."""
    if is_struct(type(args)):
        import msgspec.structs

        return msgspec.structs.asdict(args), dict(vars(args))
    return dict(vars(args)), {}


def rebuild_server_args(cls: type, fields: dict[str, Any], extra: dict[str, Any]) -> Any:
    """``server_args_state``'s inverse, without running resolution again. 0.5.20: a Struct goes
    through its constructor, as SGLang's own ``_rebuild_server_args`` does (construction stopped
    resolving in 0.5.19); a dataclass is filled in directly (0.5.17's ``__post_init__``
    resolves)."""
    if is_struct(cls):
        args = cls(**fields)
    else:
        args = cls.__new__(cls)
        vars(args).update(fields)
    vars(args).update(extra)
    return args


# --- a request's KV record -------------------------------------------------------------------


@functools.cache
def _record_holds_row() -> bool:
    """0.5.19: ``req_pool_idx``, ``cache_protected_len`` and ``kv_committed_len`` moved from the
    ``Req`` into its KV record ``req.kv`` (a ``ReqKvInfo`` every request has)."""
    from sglang.srt.managers.schedule_batch import ReqKvInfo

    return "req_pool_idx" in {f.name for f in dataclasses.fields(ReqKvInfo)}


def _holder(req: Any) -> Any:
    return req.kv if _record_holds_row() else req


def req_pool_idx(req: Any) -> int | None:
    """The request's req_to_token row (0.5.19: on ``req.kv``)."""
    return _holder(req).req_pool_idx


def kv_committed_len(req: Any) -> int:
    """KV positions written so far (0.5.19: on ``req.kv``)."""
    return _holder(req).kv_committed_len


def kv_allocated_len(req: Any) -> int:
    """KV positions allocated; 0 before the first allocation (0.5.19: ``req.kv`` always exists;
    before, it is None until then)."""
    kv = getattr(req, "kv", None)
    return kv.kv_allocated_len if kv is not None else 0


def release_kv_cache(req: Any, tree_cache: Any, insert: bool) -> None:
    """Give back a request's device KV and row; with ``insert`` the radix tree keeps what it
    can. 0.5.22: ``is_insert=`` became the keyword-only, required ``checkpoint=``."""
    from sglang.srt.mem_cache.common import release_kv_cache as release

    if _release_takes_checkpoint():
        release(req, tree_cache, checkpoint=insert)
    else:
        release(req, tree_cache, is_insert=insert)


def forget_prefix(req: Any) -> None:
    """Drop a released request's prefix match (its tree lock went with the release).
    0.5.22: the matched prefix is ``prefix_len`` (and ``req.lock``), no ``prefix_indices``."""
    req.last_node = None
    if _prefix_by_lock():
        req.prefix_len = 0
        req.lock = None
    else:
        import torch

        req.prefix_indices = torch.empty((0,), dtype=torch.int64)


def match_and_lock(req: Any, tree_cache: Any, token_ids: Any) -> Any:
    """Match ``token_ids`` in the radix tree as the request's prefix and lock its last node for
    the request; returns the prefix's device slots (int64). 0.5.22: ``match_kv_cache`` adopts the
    match (``prefix_len``, ``last_node``) and ``tree_cache.lock`` takes a ``TreeLock`` the
    release drops; before, ``inc_lock_ref`` on ``last_node``, which the release decrements.
    0.5.18: the radix key carries the request's ``cache_salt``."""
    import torch

    if _prefix_by_lock():
        from sglang.srt.mem_cache.common import match_kv_cache

        match = match_kv_cache(req, tree_cache, token_ids)
        if match.cache_protected_len is None:
            req.kv.cache_protected_len = req.prefix_len
        req.lock = tree_cache.lock(req.last_node)
        if req.prefix_len == 0:
            return torch.empty((0,), dtype=torch.int64)
        return tree_cache.prefix_device_indices(req).to(torch.int64)
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    salt = {"cache_salt": req.cache_salt} if "cache_salt" in RadixKey.__slots__ else {}
    match = tree_cache.match_prefix(
        MatchPrefixParams(key=RadixKey(token_ids, req.extra_key, **salt)))
    node = match.last_device_node
    locked = tree_cache.inc_lock_ref(node) if node is not None else None
    req.last_node = node
    # As SGLang's PrefillAdder takes the lock: 0.5.20 keeps the acquire's receipt, which the
    # release replays (without it the lock is never dropped); before, a stale skip set goes.
    if hasattr(req, "lock_receipt") and locked is not None:
        req.lock_receipt = locked.to_dec_params()
    if hasattr(req, "skip_lock_node_ids"):
        req.skip_lock_node_ids = {}
    prefix = match.device_indices.to(torch.int64)
    req.prefix_indices = prefix
    return prefix


def set_restored_kv(req: Any, prefix_len: int, kv_len: int) -> None:
    """After a rotate-in allocated the request's row: the tree owns [0, prefix_len), the request
    [prefix_len, kv_len), all of it written. 0.5.19: the lengths live on ``req.kv``, which
    also carries the row; before, ``req.kv`` is a fresh ``ReqKvInfo`` of the allocation."""
    from sglang.srt.managers.schedule_batch import ReqKvInfo

    if _record_holds_row():
        kv = req.kv
        kv.cache_protected_len = prefix_len
        if hasattr(kv, "cache_inserted_len"):  # 0.5.22: what this request inserted itself
            kv.cache_inserted_len = prefix_len
        kv.kv_committed_len = kv.kv_allocated_len = kv_len
        return
    req.cache_protected_len = prefix_len
    req.kv_committed_len = kv_len
    req.kv = ReqKvInfo(kv_allocated_len=kv_len, swa_evicted_seqlen=0)


def retract_decode(batch: Any, server_args: Any) -> tuple:
    """SGLang's own retraction. 0.5.19: ``retract_decode`` no longer takes ``server_args``."""
    if "server_args" in inspect.signature(batch.retract_decode).parameters:
        return batch.retract_decode(server_args)
    return batch.retract_decode()


@functools.cache
def _release_takes_checkpoint() -> bool:
    from sglang.srt.mem_cache.common import release_kv_cache as release

    return "checkpoint" in inspect.signature(release).parameters


@functools.cache
def _prefix_by_lock() -> bool:
    from sglang.srt.mem_cache import common

    return hasattr(common, "match_kv_cache")


# --- the scheduler --------------------------------------------------------------------------


def scheduler_ranks(scheduler: Any) -> tuple[int, int]:
    """(TP rank, DP rank) of a scheduler process. 0.5.21: the Scheduler keeps no
    ``ParallelState`` (``scheduler.ps``); the ranks are in the runtime context's
    ``get_parallel()``, where an unset DP rank raises."""
    ps = getattr(scheduler, "ps", None)
    if ps is not None:
        return ps.tp_rank, getattr(ps, "dp_rank", None) or 0
    from sglang.srt.runtime_context import get_parallel

    parallel = get_parallel()
    try:
        dp_rank = parallel.dp_rank
    except (AttributeError, RuntimeError):
        dp_rank = None
    return parallel.tp_rank, dp_rank or 0


def scheduler_gpu_id(scheduler: Any) -> int:
    """The CUDA device a scheduler process runs on (``scheduler.ps.gpu_id``; from 0.5.21 the
    runtime context's ``get_device()``)."""
    ps = getattr(scheduler, "ps", None)
    if ps is not None:
        return ps.gpu_id
    from sglang.srt.runtime_context import get_device

    return get_device().gpu_id


# --- admission -------------------------------------------------------------------------------


@functools.cache
def fixed_length_reservation_ratio() -> float | None:
    """The share of a running fixed-length (``ignore_eos``) request's remaining output that
    SGLang's PrefillAdder keeps free, where it differs from ``new_token_ratio`` (None: it does
    not). 0.5.22: all of it. Asked of SGLang's own offset rule with ``new_token_ratio`` 0."""
    import types

    from sglang.srt.managers.schedule_policy import PrefillAdder

    offset = getattr(PrefillAdder, "_get_running_request_total_token_offset", None)
    if offset is None:
        return None
    probe = types.SimpleNamespace(
        sampling_params=types.SimpleNamespace(ignore_eos=True, max_new_tokens=8), output_ids=[])
    reserved = offset(types.SimpleNamespace(new_token_ratio=0.0), probe)
    return reserved / 8 if reserved else None


# --- HiCache (eval's baseline only) ----------------------------------------------------------


def mha_host_pool(device_pool: Any, host_to_device_ratio: float, page_size: int, layout: str,
                  pin_memory: bool, device: str = "cpu") -> Any:
    """HiCache's host pool for an ``MHATokenToKVPool``. 0.5.23: it is built from the device
    pool's buffer description (``get_device_pool_infos``) plus its capacity and layer range,
    no longer from the pool itself."""
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

    if "buffer_info" not in inspect.signature(MHATokenToKVPoolHost).parameters:
        return MHATokenToKVPoolHost(device_pool, host_to_device_ratio, 0, page_size, layout,
                                    pin_memory=pin_memory, device=device)
    capacity = getattr(device_pool, "host_capacity_tokens", None)
    return MHATokenToKVPoolHost(
        device_pool.get_device_pool_infos()[0].buffer_info, host_to_device_ratio, 0, page_size,
        layout, pin_memory=pin_memory, device=device,
        device_capacity_tokens=device_pool.size if capacity is None else capacity,
        start_layer=device_pool.start_layer, end_layer=device_pool.end_layer,
        write_back_staging=getattr(device_pool, "hicache_write_back_staging", None))
