"""Real SGLang 0.5.17 memory objects on the CPU, wired the way a Scheduler wires them.

``SchedulerParts`` carries exactly the attributes the rotation adapter reads from a Scheduler;
every one of them is the real SGLang object (pools, allocator, radix/chunk cache, FutureMap,
ScheduleBatch machinery). Only the model forward is replaced: ``decode_step`` writes fresh
random KV where a forward would, so byte-for-byte checks mean something.
"""

from __future__ import annotations

import time
import types
from array import array

import torch
from sglang.srt.runtime_context import publish, reset_context
from sglang.srt.server_args import ServerArgs

LAYERS, HEADS, HEAD_DIM = 3, 2, 8
VOCAB = 1000


def publish_cpu_server_args(**overrides) -> ServerArgs:
    args = ServerArgs(model_path="dummy", device="cpu", attention_backend="torch_native",
                      **overrides)
    reset_context()
    publish(args, role="scheduler")
    return args


class SchedulerParts:
    def __init__(self, size: int = 512, page_size: int = 1, radix: bool = True,
                 dtype: torch.dtype = torch.bfloat16, schedule_policy: str = "rotasched") -> None:
        from sglang.srt.managers.overlap_utils import FutureMap
        from sglang.srt.mem_cache.allocator import (
            PagedTokenToKVPoolAllocator,
            TokenToKVPoolAllocator,
        )
        from sglang.srt.mem_cache.cache_init_params import CacheInitParams
        from sglang.srt.mem_cache.chunk_cache import ChunkCache
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
        from sglang.srt.mem_cache.radix_cache import RadixCache
        from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

        self.server_args = publish_cpu_server_args(
            schedule_policy=schedule_policy, page_size=page_size, disable_radix_cache=not radix)
        self.page_size = page_size
        self.req_to_token_pool = ReqToTokenPool(size=32, max_context_len=size, device="cpu",
                                                enable_memory_saver=False)
        self.kv_pool = MHATokenToKVPool(size=size, page_size=page_size, dtype=dtype, head_num=HEADS,
                                        head_dim=HEAD_DIM, layer_num=LAYERS, device="cpu",
                                        enable_memory_saver=False)
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
        self.tree_cache = RadixCache(params) if radix else ChunkCache(params)
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
        self.ps = types.SimpleNamespace(tp_rank=0)
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

        g = torch.Generator().manual_seed(hash(rid) % (1 << 31))
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
        from sglang.srt.mem_cache.common import maybe_cache_unfinished_req

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
            maybe_cache_unfinished_req(r, self.tree_cache)
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

    def _write_random_kv(self, slots: torch.Tensor) -> None:
        for layer in range(LAYERS):
            k, v = self.kv_pool.k_buffer[layer], self.kv_pool.v_buffer[layer]
            k[slots.long()] = torch.randn(len(slots), HEADS, HEAD_DIM).to(k.dtype)
            v[slots.long()] = torch.randn(len(slots), HEADS, HEAD_DIM).to(v.dtype)

    def kv_of(self, req) -> torch.Tensor:
        slots = self.req_to_token_pool.req_to_token[req.req_pool_idx, : req.kv_committed_len].long()
        return torch.stack([torch.stack([self.kv_pool.k_buffer[layer][slots],
                                         self.kv_pool.v_buffer[layer][slots]])
                            for layer in range(LAYERS)]).clone()

    def finish(self, batch, rids=None) -> None:
        """Finish requests of the batch the way SGLang's result processing does (release,
        insert into the tree); the caller filters the batch after observing it."""
        from sglang.srt.managers.schedule_batch import FINISH_LENGTH
        from sglang.srt.mem_cache.common import release_kv_cache

        for r in batch.reqs:
            if rids is None or r.rid in rids:
                r.finished_reason = FINISH_LENGTH(length=len(r.output_ids))
                release_kv_cache(r, self.tree_cache)
