"""A decode step's cost as a function of the batch it runs, fitted offline for one model on one
GPU (eval.profile_model). The measured step (costs.CostModel) says what the batch of now costs;
a profile says how the step grows as the batch does, so pacing can see the step a waiting queue
will make once it has joined, before that batch exists. An online fit cannot: it only knows the
batches seen so far, and a straight line through them misjudges steps that are not linear in the
batch (an MoE model's step grows with the experts the batch touches, which saturate).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def expert_share(batch: Any, experts: int, top_k: int) -> Any:
    """Expected share of ``experts`` that ``batch`` tokens, each routed to ``top_k`` of them
    uniformly, touch together (a number or a numpy array)."""
    return 1.0 - (1.0 - top_k / experts) ** batch


@dataclass(frozen=True, slots=True)
class DecodeStepProfile:
    """step = base + streams × per_req + KV tokens read × per_kv_token
    (+ MoE: the share of routed experts the batch touches × per_expert_share)
    (+ a batch past the largest captured CUDA graph runs eagerly: eager_s)."""

    base_s: float
    s_per_req: float
    s_per_kv_token: float
    s_per_expert_share: float = 0.0
    experts: int = 0
    top_k: int = 0
    eager_s: float = 0.0
    graph_max_bs: int = 0

    def step_s(self, streams: int, kv_tokens: int) -> float:
        step = self.base_s + streams * self.s_per_req + kv_tokens * self.s_per_kv_token
        if self.experts:
            step += self.s_per_expert_share * expert_share(streams, self.experts, self.top_k)
        if self.graph_max_bs and streams > self.graph_max_bs:
            step += self.eager_s
        return step

    @classmethod
    def from_fit(cls, fit: Mapping[str, Any]) -> DecodeStepProfile:
        """From a profile's ``fit.decode`` (eval.profile_model's output). KeyError if a term
        the formula needs is missing, ValueError if a term cannot be a cost."""
        moe = fit.get("moe") or {}
        profile = cls(base_s=float(fit["base_s"]), s_per_req=float(fit["s_per_req"]),
                   s_per_kv_token=float(fit["s_per_kv_token"]),
                   s_per_expert_share=float(fit.get("s_per_expert_share") or 0.0),
                   experts=int(moe.get("experts") or 0), top_k=int(moe.get("top_k") or 0),
                   eager_s=float(fit.get("eager_s") or 0.0),
                   graph_max_bs=int(fit.get("graph_max_bs") or 0))
        terms = (profile.s_per_req, profile.s_per_kv_token, profile.s_per_expert_share,
                 profile.eager_s)
        if not profile.base_s > 0 or not all(x >= 0 for x in terms):
            raise ValueError(f"a decode fit needs base_s > 0 and no negative term: {profile}")
        if profile.s_per_expert_share and not 0 < profile.top_k <= profile.experts:
            raise ValueError(f"an expert term needs 0 < top_k <= experts: {profile}")
        return profile
