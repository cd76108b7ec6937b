"""eval/diagnostics/slot_runs.py: run lengths, and a replay through SGLang's real allocator."""

from __future__ import annotations

import torch

from eval.diagnostics.slot_runs import replay, run_lengths


def test_run_lengths_split_at_every_gap_and_descent():
    slots = torch.tensor([5, 6, 7, 9, 10, 4, 11])
    assert run_lengths(slots).tolist() == [3, 2, 1, 1]
    assert run_lengths(torch.zeros(0, dtype=torch.int64)).tolist() == []


def test_lone_request_keeps_one_run_and_interleaved_decodes_fragment():
    alone = replay([(100, 10)], cap=1000, max_running=8, sample_every=1)
    assert alone["token_share_in_runs_at_least"]["16"] == 1.0  # prompt and decodes consecutive
    two = replay([(100, 40), (100, 40)], cap=1000, max_running=8, sample_every=1)
    # both decode in the same steps: each step's two slots go one to each request
    assert two["token_share_in_runs_at_least"]["16"] < 1.0
    assert two["runs_per_request_p50"] > 10


def test_paged_allocator_runs_are_whole_pages():
    alone = replay([(100, 40)], cap=1024, max_running=8, sample_every=1, page_size=16)
    assert alone["runs_per_request_p50"] == 1  # prompt pages and decode pages consecutive
    two = replay([(100, 80), (100, 80)], cap=1024, max_running=8, sample_every=1, page_size=16)
    # their decode pages alternate: each request's KV breaks into runs of whole pages
    assert two["runs_per_request_p50"] > 1
