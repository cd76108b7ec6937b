"""What one forward costs on a modelled GPU, for eval.sim_policy: the built-in H200 Llama-3.1-8B
constants, or a per-model, per-GPU profile that eval.profile_model fitted from SGLang's own
one-batch benchmark (eval/models/<model>/profile_<gpu>.json).

Stdlib and the policy's step formula (superinfer.policy.step_profile) only, so it loads
anywhere the simulator runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from superinfer.policy.step_profile import DecodeStepProfile
from superinfer.profiles import gpu_slug

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
PROFILE_GLOB = "profile_*.json"

# What moving KV costs a decode step (eval/plot_duplexkv_tradeoff.py, H200): every GB/s read
# from HBM 0.0153%, written 0.0495% (priced by one-way contiguous DMAs); staging passes each byte
# through HBM three times, the direct path once; on top, what each path's measured full-duplex
# slowdown has beyond its traffic (staging 11.6% measured, direct 3.7%): its kernels' SM time.
HBM_COST_PER_GBPS = (0.000153, 0.000495)  # (read, write)
HBM_PASSES = {"staging": ((2, 1), (1, 2)), "direct": ((1, 0), (0, 1))}  # (read, write): d2h, h2d
EXTRA_BEYOND_TRAFFIC = {"staging": 0.019, "direct": 0.0045}  # both directions at full rate
MOVERS = tuple(HBM_PASSES)
DEFAULT_LINK_BYTES_PER_S = 50e9  # PCIe Gen5 x16, each way, as measured on the H200


@dataclass(frozen=True)
class GpuModel:
    """Costs of one Llama-3.1-8B-shaped forward on an H200 (../shared/gpu/README.md: prefill
    ~42k tokens/s in 8k chunks, decode ~7.5k tokens/s at 64 requests; PCIe ~50 GB/s each way)
    and what a decode step pays while KV moves one or both ways on ``mover``'s data path.

    ``from_profile`` replaces the forward costs (and the KV bytes per token, the chunk sizes)
    with a fitted profile's; the copy slowdown stays the H200's measured HBM-traffic model."""

    prefill_overhead_s: float = 0.012
    prefill_s_per_token: float = 24e-6
    decode_base_s: float = 0.005
    decode_s_per_req: float = 3e-5
    decode_s_per_kv_token: float = 2.7e-8
    # MoE: the decode term in the share of routed experts a batch touches (profile_fit)
    decode_s_per_expert_share: float = 0.0
    moe_experts: int = 0
    moe_top_k: int = 0
    # a step of a batch past the largest captured CUDA graph runs eagerly (0: not modelled)
    decode_eager_s: float = 0.0
    cuda_graph_max_bs: int = 0
    link_bytes_per_s: float = DEFAULT_LINK_BYTES_PER_S
    bytes_per_token: int = 131072
    mover: str = "staging"
    max_prefill_tokens: int = 16384
    chunked_prefill_size: int = 8192
    # attention's share of a prefill: per (query, key) pair of a causal chunk (see attn_pairs);
    # 0 in the built-in model, fitted where the profile shows it
    prefill_s_per_token_pair: float = 0.0
    model_name: str = "llama-3.1-8b"
    gpu_name: str = "h200"
    profile: str | None = None  # the profile file it came from; None: the built-in constants

    def prefill_s(self, tokens: int, pairs: int = 0) -> float:
        """One prefill batch of ``tokens`` new tokens whose attention covers ``pairs`` (query,
        key) pairs in all (the sum of ``attn_pairs`` over its chunks)."""
        t = self.prefill_overhead_s + tokens * self.prefill_s_per_token
        if pairs and self.prefill_s_per_token_pair:
            t += pairs * self.prefill_s_per_token_pair
        return t

    @staticmethod
    def attn_pairs(take: int, prefix: int = 0) -> int:
        """(query, key) pairs a causal chunk of ``take`` tokens after ``prefix`` cached ones
        attends over: each new token sees the prefix, the chunk's earlier tokens and itself."""
        return take * prefix + take * (take + 1) // 2

    @cached_property
    def decode_profile(self) -> DecodeStepProfile:
        """The decode step's terms as the policy reads a served model's profile."""
        return DecodeStepProfile(
            base_s=self.decode_base_s, s_per_req=self.decode_s_per_req,
            s_per_kv_token=self.decode_s_per_kv_token,
            s_per_expert_share=self.decode_s_per_expert_share, experts=self.moe_experts,
            top_k=self.moe_top_k, eager_s=self.decode_eager_s,
            graph_max_bs=self.cuda_graph_max_bs)

    def decode_s(self, batch: int, kv_tokens: int) -> float:
        """One decode step with no copy alongside (``copy_slowdown`` prices one)."""
        return self.decode_profile.step_s(batch, kv_tokens)

    def copy_slowdown(self, d2h: float, h2d: float) -> float:
        """Decode-step slowdown while the link runs full rate for these shares of the step in
        each direction (measured with copies all through the step: a copy through part of
        it pays that part)."""
        gbps = self.link_bytes_per_s / 1e9
        cost = 0.0
        for share, (reads, writes) in zip((d2h, h2d), HBM_PASSES[self.mover], strict=False):
            cost += float(share) * (gbps * (reads * HBM_COST_PER_GBPS[0]
                                            + writes * HBM_COST_PER_GBPS[1])
                                    + EXTRA_BEYOND_TRAFFIC[self.mover] / 2)
        return cost

    @classmethod
    def from_profile(cls, path: str | Path, **overrides: Any) -> GpuModel:
        """The model a profile file (eval.profile_model's output) describes; ``overrides``
        (e.g. ``link_bytes_per_s``, ``mover``) replace any field."""
        path = Path(path)
        doc = json.loads(path.read_text())
        try:
            p, d = doc["fit"]["prefill"], doc["fit"]["decode"]
            values: dict[str, Any] = {
                "prefill_overhead_s": p["overhead_s"],
                "prefill_s_per_token": p["s_per_token"],
                "prefill_s_per_token_pair": p.get("s_per_token_pair", 0.0),
                "decode_base_s": d["base_s"],
                "decode_s_per_req": d["s_per_req"],
                "decode_s_per_kv_token": d["s_per_kv_token"],
                "decode_s_per_expert_share": d.get("s_per_expert_share", 0.0),
                "moe_experts": int((d.get("moe") or {}).get("experts", 0)),
                "moe_top_k": int((d.get("moe") or {}).get("top_k", 0)),
                "decode_eager_s": d.get("eager_s", 0.0),
                "cuda_graph_max_bs": int(d.get("graph_max_bs") or 0),
                "bytes_per_token": int(doc["kv"]["bytes_per_token"]),
            }
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a profile from eval.profile_model (missing {e})") from e
        sched = doc.get("scheduler") or {}
        for key in ("chunked_prefill_size", "max_prefill_tokens"):
            if isinstance(sched.get(key), int) and sched[key] > 0:
                values[key] = sched[key]
        values["model_name"] = str(doc.get("model") or path.parent.name)
        values["gpu_name"] = str(doc.get("gpu") or path.stem.removeprefix("profile_"))
        values["profile"] = str(path)
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown GpuModel fields: {sorted(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def profile_path(model: str, gpu: str, models_dir: Path = MODELS_DIR) -> Path:
    return Path(models_dir) / model / f"profile_{gpu_slug(gpu)}.json"


def available_profiles(models_dir: Path = MODELS_DIR) -> list[tuple[str, str]]:
    """(model, gpu slug) of every profile file under ``models_dir``."""
    out = []
    for p in sorted(Path(models_dir).glob(f"*/{PROFILE_GLOB}")):
        out.append((p.parent.name, p.stem.removeprefix("profile_")))
    return out


class ProfileNotFound(LookupError):
    pass


def resolve_gpu_model(model: str | None = None, gpu: str | None = None, *,
                      models_dir: Path = MODELS_DIR, **overrides: Any) -> GpuModel:
    """The built-in model when neither ``model`` nor ``gpu`` is given, else the profile
    ``models_dir/<model>/profile_<gpu>.json``. Given one of the two, the other may be left out
    where exactly one profile matches. ``overrides`` go to the model (None keeps a field)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if model is None and gpu is None:
        return replace(GpuModel(), **overrides)
    have = available_profiles(models_dir)
    slug = gpu_slug(gpu) if gpu is not None else None
    matches = [(m, g) for m, g in have
               if (model is None or m == model) and (slug is None or g == slug)]
    if len(matches) == 1 and (model is None or slug is None):
        model, slug = matches[0]
    if model is not None and slug is not None:
        path = Path(models_dir) / model / f"profile_{slug}.json"
        if path.exists():
            return GpuModel.from_profile(path, **overrides)
    listing = ", ".join(f"--model {m} --gpu {g}" for m, g in have) or "none"
    want = f"model {model or '?'} on gpu {slug or '?'}"
    hint = (" (several match: name both)" if len(matches) > 1 else "")
    raise ProfileNotFound(
        f"no GPU profile for {want}{hint} under {models_dir}; available: {listing}. "
        f"Make one on the GPU with: python -m eval.profile_model --model "
        f"{model or 'NAME'} (see eval/README.md)")
