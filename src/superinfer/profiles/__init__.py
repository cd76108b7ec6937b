"""Decode-step profiles shipped with the package (``decode_steps.json``, written by
eval.ship_profiles from eval/models/*/profile_<gpu>.json), and which one fits a served model.

A profile is matched on the model's shape (its config's architecture numbers), not its name:
a fine-tune of Llama-3.1-8B steps like Llama-3.1-8B. The GPU is matched where a profile exists
for it; otherwise another GPU's profile of the same shape serves, since the policy reads only
how the step grows with the batch and takes its level from the measured step
(``Costs.decode_step_for``). A model of a shape without a profile gets none.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..policy.step_profile import DecodeStepProfile

SHIPPED = Path(__file__).with_name("decode_steps.json")

# The config.json numbers that set a decode step's cost (None where a model has no such field).
SHAPE_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
              "num_key_value_heads", "intermediate_size", "vocab_size", "kv_lora_rank")


def moe_routing(config: Mapping[str, Any]) -> tuple[int, int] | None:
    """(routed experts, experts per token) from a HF ``config.json`` (Mixtral
    ``num_local_experts``, DeepSeek ``n_routed_experts``, Qwen-MoE ``num_experts``); None for a
    dense model."""
    cfg = config.get("text_config") or config
    experts = (cfg.get("num_local_experts") or cfg.get("n_routed_experts")
               or cfg.get("num_experts"))
    top_k = cfg.get("num_experts_per_tok")
    return (int(experts), int(top_k)) if experts and top_k else None


def model_shape(config: Mapping[str, Any]) -> dict[str, Any]:
    """What a profile is matched on: SHAPE_KEYS, the MoE routing and the quantization method
    (profiles are taken unquantized)."""
    cfg = config.get("text_config") or config
    shape: dict[str, Any] = {k: cfg.get(k) for k in SHAPE_KEYS}
    if shape["num_key_value_heads"] is None:
        shape["num_key_value_heads"] = shape["num_attention_heads"]
    moe = moe_routing(config)
    shape["experts"], shape["top_k"] = moe if moe else (None, None)
    quant = cfg.get("quantization_config") or config.get("quantization_config")
    shape["quantization"] = (quant or {}).get("quant_method") if isinstance(quant, dict) else None
    return shape


def gpu_slug(name: str, tp_size: int = 1) -> str:
    """A short name for a GPU, as profile files are named: 'NVIDIA H100 80GB HBM3' -> 'h100',
    'NVIDIA H200' -> 'h200', 'NVIDIA A100-SXM4-80GB' -> 'a100'; an already short 'h100' stays.
    Anything without a letters-then-digits word becomes its lowercased words joined by '-'.
    Tensor parallel runs get '-tp<N>' (from ``tp_size`` or a 'tp<N>' word in ``name``):
    'h100-tp2'."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
    for w in list(words):
        if m := re.fullmatch(r"tp(\d+)", w):
            tp_size = max(tp_size, int(m.group(1)))
            words.remove(w)
    words = [w for w in words if w not in ("nvidia", "amd", "tesla", "geforce", "instinct")]
    base = next((w for w in words if re.fullmatch(r"[a-z]{1,3}\d{2,4}[a-z]{0,2}", w)), None)
    base = base or "-".join(words) or "gpu"
    return f"{base}-tp{tp_size}" if tp_size > 1 else base


@dataclass(frozen=True, slots=True)
class FoundProfile:
    profile: DecodeStepProfile
    source: str  # which profile, for the stats record: "llama-3.1-8b on h100", or a path


def load_profile_file(path: str | Path) -> FoundProfile:
    """A profile JSON from eval.profile_model (``--rota-decode-profile PATH``); ValueError
    naming the file if it cannot be read as one."""
    try:
        doc = json.loads(Path(path).read_text())
        return FoundProfile(DecodeStepProfile.from_fit(doc["fit"]["decode"]), str(path))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--rota-decode-profile {path}: not a profile from eval.profile_model "
                         f"({type(e).__name__}: {e})") from e


def shipped_profiles(path: Path = SHIPPED) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["profiles"]


def find_shipped(config: Mapping[str, Any], gpu_name: str | None, tp_size: int = 1,
                 path: Path = SHIPPED) -> FoundProfile | None:
    """The shipped profile of the served model's shape: for this GPU and TP size if there is
    one, else for another GPU at this TP size, else any of that shape; None if none is."""
    shape = model_shape(config)
    same = [p for p in shipped_profiles(path) if p["shape"] == shape]
    if not same:
        return None
    slug = gpu_slug(gpu_name, tp_size) if gpu_name else None

    def rank(p: dict[str, Any]) -> tuple[bool, bool]:
        return (p["gpu"] != slug, p["tp_size"] != tp_size)

    best = min(same, key=rank)
    source = f"{best['model']} on {best['gpu']}"
    if best["gpu"] != slug:
        source += f" (shape only: no profile for {slug or 'this device'})"
    return FoundProfile(DecodeStepProfile.from_fit(best["decode"]), source)
