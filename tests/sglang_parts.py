"""Real SGLang memory objects on the CPU, wired the way a Scheduler wires them.

``SchedulerParts`` carries exactly the attributes the rotation adapter reads from a Scheduler;
every one of them is the real SGLang object (pools, allocator, radix/chunk cache, FutureMap,
ScheduleBatch machinery). Only the model forward is replaced: ``decode_step`` writes fresh
random KV where a forward would, so byte-for-byte checks mean something.
"""

from __future__ import annotations

import dataclasses
import time
import types
import zlib
from array import array

import torch
from sglang.srt.runtime_context import publish, reset_context
from sglang.srt.server_args import ServerArgs

from superinfer.adapters.sglang import compat

LAYERS, HEADS, HEAD_DIM = 3, 2, 8
MLA_RANK, MLA_ROPE = 16, 8  # kv_lora_rank, qk_rope_head_dim of the MLA pool (kv="mla")
VOCAB = 1000


def publish_cpu_server_args(**overrides) -> ServerArgs:
    args = ServerArgs(model_path="dummy", device="cpu", attention_backend="torch_native",
                      **overrides)
    reset_context()
    publish(args, role="scheduler")
    return args


def checkpoint_unfinished(req, tree_cache) -> None:
    """What SGLang's result processing does with a request after a prefill (chunk): its KV goes
    into the tree. 0.5.22 renamed maybe_cache_unfinished_req to checkpoint_kv_cache."""
    from sglang.srt.mem_cache import common

    if hasattr(common, "checkpoint_kv_cache"):
        common.checkpoint_kv_cache(req, tree_cache)
    else:
        common.maybe_cache_unfinished_req(req, tree_cache)


def has_parallel_state() -> bool:
    """Whether SGLang's Scheduler keeps its ranks in ``scheduler.ps`` (a ParallelState); 0.5.21
    dropped it for the runtime context's ``get_parallel()``."""
    import importlib.util

    return importlib.util.find_spec("sglang.srt.distributed.parallel_state_wrapper") is not None


def scheduler_tree_cache(server_args: ServerArgs, params, radix: bool):
    """The tree cache SGLang's scheduler builds for a plain MHA model with chunked prefill, by
    its own factory: RadixCache / ChunkCache on 0.5.17, UnifiedRadixCache on newer releases
    (0.5.19 for the radix cache, 0.5.22 without it: ChunkCache is gone)."""
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext, default_radix_cache_factory

    given = dict(server_args=server_args, params=params, is_hybrid_swa=False, is_hybrid_ssm=False,
                 enable_hierarchical_cache=False, disable_radix_cache=not radix,
                 effective_chunked_prefill_size=8192,  # 0.5.22 dropped it
                 tp_worker=None, model_config=None, tp_size=1, tp_rank=0, tp_group=None)
    names = {f.name for f in dataclasses.fields(TreeCacheBuildContext)}
    return default_radix_cache_factory(
        TreeCacheBuildContext(**{k: v for k, v in given.items() if k in names}))


class SchedulerParts:
    def __init__(self, size: int = 512, page_size: int = 1, radix: bool = True,
                 dtype: torch.dtype = torch.bfloat16, schedule_policy: str = "rotasched",
                 kv: str = "mha") -> None:
        """``kv``: "mha" (MHATokenToKVPool) or "mla" (MLATokenToKVPool, DeepSeek's)."""
        from sglang.srt.managers.overlap_utils import FutureMap
        from sglang.srt.mem_cache.allocator import (
            PagedTokenToKVPoolAllocator,
            TokenToKVPoolAllocator,
        )
        from sglang.srt.mem_cache.cache_init_params import CacheInitParams
        from sglang.srt.mem_cache.memory_pool import (
            MHATokenToKVPool,
            MLATokenToKVPool,
            ReqToTokenPool,
        )
        from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

        self.server_args = publish_cpu_server_args(
            schedule_policy=schedule_policy, page_size=page_size, disable_radix_cache=not radix)
        self.page_size = page_size
        self.req_to_token_pool = ReqToTokenPool(size=32, max_context_len=size, device="cpu",
                                                enable_memory_saver=False)
        if kv == "mla":
            self.kv_pool = MLATokenToKVPool(size=size, page_size=page_size, dtype=dtype,
                                            kv_lora_rank=MLA_RANK, qk_rope_head_dim=MLA_ROPE,
                                            layer_num=LAYERS, device="cpu",
                                            enable_memory_saver=False)
        else:
            self.kv_pool = MHATokenToKVPool(size=size, page_size=page_size, dtype=dtype,
                                            head_num=HEADS, head_dim=HEAD_DIM, layer_num=LAYERS,
                                            device="cpu", enable_memory_saver=False)
        if page_size == 1:
            self.token_to_kv_pool_allocator = TokenToKVPoolAllocator(
                size=size, dtype=dtype, device="cpu", kvcache=self.kv_pool, need_sort=False)
        else:
            self.token_to_kv_pool_allocator = PagedTokenToKVPoolAllocator(
                size=size, page_size=page_size, dtype=dtype, device="cpu", kvcache=self.kv_pool,
                need_sort=False)
        params = CacheInitParams(disable=not radix, req_to_token_pool=self.req_to_token_pool,
                                 token_to_kv_pool_allocator=self.token_to_kv_pool_allocator,
                                 page_size=page_size)
        self.tree_cache = scheduler_tree_cache(self.server_args, params, radix)
        self.spec_algorithm = SpeculativeAlgorithm.NONE
        self.future_map = FutureMap(torch.device("cpu"), self.spec_algorithm,
                                    self.req_to_token_pool,
                                    needs_cpu_seq_lens=False)
        self.model_config = types.SimpleNamespace(vocab_size=VOCAB, is_encoder_decoder=False,
                                                  is_multimodal=False)
        self.enable_overlap = False
        self.forward_stream = None
        self.max_total_num_tokens = size
        self.max_prefill_tokens = 16384
        self.chunked_prefill_size = None
        self.new_token_ratio_tracker = types.SimpleNamespace(current=0.0)
        self.waiting_queue: list = []
        self.chunked_req = None
        self.last_batch = None
        self.tp_cpu_group = None
        if has_parallel_state():
            self.ps = types.SimpleNamespace(tp_rank=0, gpu_id=0)
        else:  # what the launcher writes for a scheduler process
            from sglang.srt.runtime_context import get_parallel

            get_parallel().override_permanently(tp_rank=0)
        self.sent: list = []  # what would go to the tokenizer
        self.ipc_channels = types.SimpleNamespace(
            send_to_tokenizer=types.SimpleNamespace(
                send_output=lambda out, req=None: self.sent.append(out)))
        self.initial_free = self.free_tokens()

    # --- helpers standing in for the model and the event loop -----------------------------
    def free_tokens(self) -> int:
        return self.token_to_kv_pool_allocator.available_size() + self.tree_cache.evictable_size()

    def make_req(self, rid: str, prompt_len: int, max_new_tokens: int = 64, custom_params=None):
        from sglang.srt.managers.schedule_batch import Req
        from sglang.srt.sampling.sampling_params import SamplingParams

        # Seeded by the rid (not hash(), which is randomized per process): every run has the
        # same prompts, and no two of the tests' prompts share a first token (a radix match).
        g = torch.Generator().manual_seed(zlib.crc32(rid.encode()))
        ids = torch.randint(100, VOCAB, (prompt_len,), generator=g).tolist()
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0, ignore_eos=True,
                                custom_params=custom_params)
        params.normalize(None)
        return Req(rid, "", array("q", ids), params, vocab_size=VOCAB)

    def prefill(self, reqs: list, running=None, chunk: int | None = None):
        """SGLang's own admission and extend path (PrefillAdder, match, allocate, write
        req_to_token), then random KV where the forward would write it and a first token
        (none for a request whose prompt was cut by ``chunk``: it becomes ``chunked_req``).
        Returns the prefill batch (None if nothing fit)."""
        from sglang.srt.managers.schedule_batch import ScheduleBatch
        from sglang.srt.managers.schedule_policy import AddReqResult, PrefillAdder

        running = running or self.empty_batch()
        adder = PrefillAdder(self.page_size, self.tree_cache, self.token_to_kv_pool_allocator,
                             running, self.new_token_ratio_tracker.current,
                             self.max_prefill_tokens, chunk)
        for r in reqs:
            r.init_next_round_input(self.tree_cache)
            added = adder.add_one_req(r, has_chunked_req=False, truncation_align_size=None)
            if added != AddReqResult.CONTINUE:
                break
        reqs = list(adder.can_run_list)
        if not reqs:
            return None
        batch = ScheduleBatch.init_new(reqs, self.req_to_token_pool,
                                       self.token_to_kv_pool_allocator,
                                       self.tree_cache, self.model_config, False,
                                       self.spec_algorithm)
        batch.prepare_for_extend()
        batch.launch_ts = time.monotonic()  # what Scheduler.run_batch records
        self._write_random_kv(batch.out_cache_loc)
        self.chunked_req = adder.new_chunked_req
        for r in reqs:
            if r is not self.chunked_req:
                r.output_ids.append(int(torch.randint(100, VOCAB, (1,))))
            checkpoint_unfinished(r, self.tree_cache)
        return batch

    def empty_batch(self):
        from sglang.srt.managers.schedule_batch import ScheduleBatch

        return ScheduleBatch(reqs=[], batch_is_full=False)

    def decode_step(self, batch) -> None:
        """One decode step: SGLang allocates and bookkeeps; we write the KV and the token."""
        from sglang.srt.managers.overlap_utils import RelayPayload

        batch.prepare_for_decode()
        batch.launch_ts = time.monotonic()
        self._write_random_kv(batch.out_cache_loc)
        tokens = torch.randint(100, VOCAB, (len(batch.reqs),))
        for r, t in zip(batch.reqs, tokens.tolist(), strict=False):
            r.output_ids.append(t)
        self.future_map.stash(batch.req_pool_indices, RelayPayload(bonus_tokens=tokens))

    def kv_planes(self) -> list[list[torch.Tensor]]:
        """Per layer, the pool's buffers: K and V (MHA), or the one latent buffer (MLA)."""
        if hasattr(self.kv_pool, "kv_buffer"):
            return [[kv] for kv in self.kv_pool.kv_buffer]
        return [[k, v] for k, v in zip(self.kv_pool.k_buffer, self.kv_pool.v_buffer, strict=True)]

    def _write_random_kv(self, slots: torch.Tensor) -> None:
        for layer in self.kv_planes():
            for buf in layer:
                buf[slots.long()] = torch.randn(len(slots), *buf.shape[1:]).to(buf.dtype)

    def kv_of(self, req) -> torch.Tensor:
        row = compat.req_pool_idx(req)
        slots = self.req_to_token_pool.req_to_token[row, : compat.kv_committed_len(req)].long()
        return torch.stack([torch.stack([buf[slots] for buf in layer])
                            for layer in self.kv_planes()]).clone()

    def finish(self, batch, rids=None) -> None:
        """Finish requests of the batch the way SGLang's result processing does (release,
        insert into the tree); the caller filters the batch after observing it."""
        from sglang.srt.managers.schedule_batch import FINISH_LENGTH

        for r in batch.reqs:
            if rids is None or r.rid in rids:
                r.finished_reason = FINISH_LENGTH(length=len(r.output_ids))
                compat.release_kv_cache(r, self.tree_cache, insert=True)
