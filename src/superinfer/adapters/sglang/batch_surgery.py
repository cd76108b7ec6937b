"""Taking requests out of SGLang's running batch and putting them back as plain decode
requests (no re-prefill): the only code that edits a ScheduleBatch."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from sglang.srt.managers.overlap_utils import RelayPayload
from sglang.srt.managers.schedule_batch import ScheduleBatch
from sglang.srt.sampling.sampling_batch_info import SamplingBatchInfo

from . import compat

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.managers.scheduler import Scheduler


def keep_only(running: ScheduleBatch, keep_indices: list[int]) -> ScheduleBatch:
    """``running`` without the requests not in ``keep_indices`` (their KV stays allocated)."""
    running.filter_batch(keep_indices=sorted(keep_indices))
    running.batch_is_full = False
    return running


def rejoin(scheduler: Scheduler, running: ScheduleBatch, reqs: list[Req]) -> ScheduleBatch:
    """``running`` with the restored ``reqs`` merged in as decode requests."""
    batch = decode_batch(scheduler, reqs)
    if running.is_empty():
        return batch
    running.merge_batch(batch)
    running.batch_is_full = False
    return running


def decode_batch(scheduler: Scheduler, reqs: list[Req]) -> ScheduleBatch:
    """A ScheduleBatch of restored requests, ready to merge into the running batch; their
    last token goes into the FutureMap relay like after any decode step."""
    s = scheduler
    device = s.req_to_token_pool.req_to_token.device
    batch = ScheduleBatch.init_new(
        reqs=reqs, req_to_token_pool=s.req_to_token_pool,
        token_to_kv_pool_allocator=s.token_to_kv_pool_allocator, tree_cache=s.tree_cache,
        model_config=s.model_config, enable_overlap=s.enable_overlap,
        spec_algorithm=s.spec_algorithm,
    )
    pool_idx = [compat.req_pool_idx(r) for r in reqs]
    seq_lens = [compat.kv_committed_len(r) for r in reqs]
    batch.req_pool_indices_cpu = torch.tensor(pool_idx, dtype=torch.int64)
    batch.req_pool_indices = batch.req_pool_indices_cpu.to(device)
    batch.seq_lens_cpu = torch.tensor(seq_lens, dtype=torch.int64)
    batch.seq_lens = batch.seq_lens_cpu.to(device)
    batch.orig_seq_lens = batch.seq_lens.to(torch.int32)
    batch.seq_lens_sum = sum(seq_lens)
    last = torch.tensor([r.output_ids[-1] for r in reqs], dtype=torch.int64, device=device)
    s.future_map.stash(batch.req_pool_indices, RelayPayload(bonus_tokens=last))
    batch.input_ids = None
    batch.multimodal_inputs = [r.multimodal_inputs for r in reqs]
    if batch.return_logprob:
        batch.top_logprobs_nums = [r.logprob.top_logprobs_num for r in reqs]
        batch.token_ids_logprobs = [r.logprob.token_ids_logprob for r in reqs]
    batch.sampling_info = SamplingBatchInfo.from_schedule_batch(batch, s.model_config.vocab_size)
    return batch
