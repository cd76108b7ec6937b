"""Fitting a GPU profile (eval.profile_model) from SGLang one-batch benchmark rows.

A row is one ``(batch_size, input_len, output_len)`` run of ``sglang.benchmark.one_batch``'s
``latency_test_run_once``: ``prefill_latency`` (the whole batch prefilled in one forward) and,
with ``output_len > 1``, ``median_decode_latency`` over its ``output_len - 1`` decode steps.

    prefill_s = overhead + s_per_token * tokens [+ s_per_token_pair * pairs]
    decode_s  = base [+ s_per_expert_share * expert_share] + s_per_req * batch
                + s_per_kv_token * kv_tokens [+ eager_s if batch > graph_max_bs]

``tokens`` = batch * input_len, ``pairs`` = the causal (query, key) pairs its attention covers
(batch * L * (L + 1) / 2), ``kv_tokens`` = the KV the median decode step reads, batch *
(input_len + output_len / 2). ``expert_share`` (MoE models only; routing from
``superinfer.profiles.moe_routing``): the share of the routed experts a decode step of
``batch`` tokens reads, 1 - (1 - top_k / experts) ** batch under uniform routing; a step's
weight reads grow with it and stop growing once every expert is touched, which a term linear
in the batch cannot follow. ``eager_s``: what a step pays
when its batch is larger than the largest CUDA graph SGLang captured and runs without one
(fitted only where rows beyond ``graph_max_bs`` exist; a profile without them models such steps
as captured, too fast). Fits minimize the relative error (short prefills matter as much as
long ones: they set TTFT), with every coefficient kept >= 0; the pair term is kept only where it
clearly lowers the residual of the long prompts (``choose_prefill``). numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from superinfer.policy.step_profile import expert_share

LONG_PROMPT = 4096  # input_len from which a prompt counts as long for the pair-term decision
# Keep the pair term when the linear fit misses long prompts by more than this (RMS relative)...
PAIR_MIN_LINEAR_MISS = 0.03
# ...and the pair term cuts that residual to at most this fraction of it.
PAIR_MAX_RESIDUAL_RATIO = 0.7

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4,
               "fp8_e4m3": 1, "fp8_e5m2": 1, "float8_e4m3fn": 1, "float8_e5m2": 1}


# --- KV bytes per token ----------------------------------------------------------------------
def kv_bytes_per_token(config: dict[str, Any], tp_size: int = 1,
                       kv_cache_dtype: str | None = None) -> dict[str, Any]:
    """Device KV bytes per token on one GPU of ``tp_size`` from a HF ``config.json``.

    MLA (``kv_lora_rank`` set, DeepSeek-V2/V3): layers * (kv_lora_rank + qk_rope_head_dim) *
    dtype bytes, the same on every TP rank (the latent is not split). MHA/GQA: layers *
    kv_heads_per_rank * head_dim * 2 (K and V) * dtype bytes, kv_heads_per_rank =
    max(1, kv_heads // tp_size) (SGLang replicates KV heads when TP exceeds them). The dtype is
    ``kv_cache_dtype`` unless None/"auto", else the model's."""
    cfg = config.get("text_config") or config
    layers = int(cfg["num_hidden_layers"])
    dtype = (kv_cache_dtype if kv_cache_dtype not in (None, "auto")
             else cfg.get("torch_dtype") or cfg.get("dtype") or config.get("torch_dtype")
             or "bfloat16")
    nbytes = DTYPE_BYTES.get(str(dtype).removeprefix("torch."), 2)
    if cfg.get("kv_lora_rank"):
        width = int(cfg["kv_lora_rank"]) + int(cfg.get("qk_rope_head_dim") or 0)
        return {"bytes_per_token": layers * width * nbytes, "kind": "mla",
                "dtype": str(dtype), "dtype_bytes": nbytes, "tp_size": tp_size,
                "formula": f"{layers} layers * ({cfg['kv_lora_rank']} kv_lora_rank + "
                           f"{cfg.get('qk_rope_head_dim') or 0} qk_rope_head_dim) * {nbytes} B"}
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    per_rank = max(1, kv_heads // tp_size)
    return {"bytes_per_token": layers * per_rank * head_dim * 2 * nbytes, "kind": "mha",
            "dtype": str(dtype), "dtype_bytes": nbytes, "tp_size": tp_size,
            "formula": f"{layers} layers * {per_rank} kv heads per rank ({kv_heads} / tp "
                       f"{tp_size}) * {head_dim} head_dim * 2 (K, V) * {nbytes} B"}


# --- points from rows ------------------------------------------------------------------------
def causal_pairs(batch: int, input_len: int) -> int:
    return batch * input_len * (input_len + 1) // 2


def decode_kv_tokens(batch: int, input_len: int, output_len: int) -> float:
    """KV tokens the median decode step of a one-batch run reads: step i (0-based, of
    output_len - 1) attends over input_len + 1 + i tokens per request; the median i is
    (output_len - 2) / 2."""
    return batch * (input_len + output_len / 2)


def prefill_points(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per (batch, input_len) among the prefill rows (``kind`` "prefill", or
    output_len 1 without a kind): the fastest of its repeats (a first run may include JIT)."""
    groups: dict[tuple[int, int], list[float]] = {}
    for r in rows:
        if r.get("prefill_latency") is None:
            continue
        kind = r.get("kind") or ("prefill" if r["output_len"] <= 1 else "decode")
        if kind != "prefill":
            continue
        groups.setdefault((r["batch_size"], r["input_len"]), []).append(r["prefill_latency"])
    return [{"batch_size": b, "input_len": n, "tokens": b * n, "pairs": causal_pairs(b, n),
             "latency_s": min(v), "samples": sorted(v)} for (b, n), v in sorted(groups.items())]


def decode_points(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        if r.get("median_decode_latency") is None:
            continue
        b, n, o = r["batch_size"], r["input_len"], r["output_len"]
        out.append({"batch_size": b, "input_len": n, "output_len": o,
                    "kv_tokens": decode_kv_tokens(b, n, o),
                    "latency_s": r["median_decode_latency"]})
    return out


# --- least squares ---------------------------------------------------------------------------
def nonneg_relative_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Coefficients >= 0 minimizing sum(((x @ c - y) / y) ** 2): least squares on the rows
    scaled by 1/y, dropping the most negative term and solving again until none is negative
    (an active set that is exact for the few terms used here)."""
    xs = x / y[:, None]
    ones = np.ones_like(y)
    active = list(range(x.shape[1]))
    while True:
        coef = np.zeros(x.shape[1])
        if active:
            sol, *_ = np.linalg.lstsq(xs[:, active], ones, rcond=None)
            coef[active] = sol
        neg = [i for i in active if coef[i] < 0]
        if not neg:
            return coef
        active.remove(min(neg, key=lambda i: coef[i]))


def _residuals(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (pred - y) / y


def _rms(v: np.ndarray) -> float | None:
    return float(np.sqrt(np.mean(v * v))) if v.size else None


@dataclass
class LinearFit:
    terms: tuple[str, ...]
    coef: dict[str, float]
    rel_residuals: list[float]
    rms_rel: float
    max_abs_rel: float
    rms_rel_long: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"terms": list(self.terms), "coef": self.coef, "rms_rel": self.rms_rel,
                "max_abs_rel": self.max_abs_rel, "rms_rel_long": self.rms_rel_long}


def _fit(points: list[dict[str, Any]], terms: tuple[str, ...], long_mask: np.ndarray
         ) -> LinearFit:
    y = np.array([p["latency_s"] for p in points], dtype=float)
    x = np.array([[1.0 if t == "const" else float(p[t]) for t in terms] for p in points])
    coef = nonneg_relative_lstsq(x, y)
    res = _residuals(x @ coef, y)
    return LinearFit(terms, {t: float(c) for t, c in zip(terms, coef, strict=True)},
                     [float(v) for v in res], float(_rms(res) or 0.0),
                     float(np.max(np.abs(res))), _rms(res[long_mask]))


def fit_prefill(rows: list[dict[str, Any]], terms: str = "auto") -> dict[str, Any]:
    """The prefill fit: ``terms`` "linear", "quadratic" (with the pair term) or "auto"
    (``choose_prefill``)."""
    pts = prefill_points(rows)
    if len(pts) < 3:
        raise ValueError(f"prefill fit needs >= 3 distinct (batch, input_len) points, got "
                         f"{len(pts)}")
    long_mask = np.array([p["input_len"] >= LONG_PROMPT for p in pts])
    lin = _fit(pts, ("const", "tokens"), long_mask)
    quad = _fit(pts, ("const", "tokens", "pairs"), long_mask) if len(pts) >= 4 else None
    if terms == "linear" or quad is None:
        chosen, why = lin, ("forced: linear" if terms == "linear"
                            else "too few points for the pair term")
    elif terms == "quadratic":
        chosen, why = quad, "forced: quadratic"
    elif terms == "auto":
        chosen, why = choose_prefill(lin, quad)
    else:
        raise ValueError(f"terms must be auto, linear or quadratic, got {terms!r}")
    for p, r in zip(pts, chosen.rel_residuals, strict=True):
        p["rel_residual"] = r
    return {"overhead_s": chosen.coef["const"], "s_per_token": chosen.coef["tokens"],
            "s_per_token_pair": chosen.coef.get("pairs", 0.0), "terms": list(chosen.terms),
            "decision": why, "rms_rel": chosen.rms_rel, "max_abs_rel": chosen.max_abs_rel,
            "rms_rel_long": chosen.rms_rel_long, "long_prompt_from": LONG_PROMPT,
            "candidates": {"linear": lin.as_dict(),
                           "quadratic": quad.as_dict() if quad else None},
            "points": pts}


def choose_prefill(lin: LinearFit, quad: LinearFit) -> tuple[LinearFit, str]:
    """The pair term stays if it is positive, the linear fit misses the long prompts by more
    than PAIR_MIN_LINEAR_MISS (RMS relative; all prompts if none is long) and the pair term cuts
    that miss to at most PAIR_MAX_RESIDUAL_RATIO of it."""
    scope = "long prompts" if lin.rms_rel_long is not None else "all prompts"
    lin_miss = lin.rms_rel_long if lin.rms_rel_long is not None else lin.rms_rel
    quad_miss = quad.rms_rel_long if quad.rms_rel_long is not None else quad.rms_rel
    facts = (f"{scope}: RMS relative residual linear {100 * lin_miss:.1f}%, with the pair term "
             f"{100 * quad_miss:.1f}%")
    if quad.coef.get("pairs", 0.0) <= 0:
        return lin, f"linear: the pair term fits to 0 ({facts})"
    if lin_miss <= PAIR_MIN_LINEAR_MISS:
        return lin, f"linear: already within {100 * PAIR_MIN_LINEAR_MISS:.0f}% ({facts})"
    if quad_miss > PAIR_MAX_RESIDUAL_RATIO * lin_miss:
        return lin, f"linear: the pair term helps too little ({facts})"
    return quad, f"quadratic: the pair term clearly helps ({facts})"


def fit_decode(rows: list[dict[str, Any]], moe: tuple[int, int] | None = None,
               graph_max_bs: int | None = None) -> dict[str, Any]:
    """The decode fit; ``moe`` (``moe_routing``) adds the expert-share term, and rows of
    batches past ``graph_max_bs`` (the largest captured CUDA graph) the eager term."""
    pts = decode_points(rows)
    for p in pts:
        p["batch"] = p["batch_size"]
        p["eager"] = float(bool(graph_max_bs) and p["batch_size"] > graph_max_bs)
        if moe:
            p["expert_share"] = float(expert_share(p["batch_size"], *moe))
    eager_rows = int(sum(p["eager"] for p in pts))
    terms = ("const", *(("expert_share",) if moe else ()), "batch", "kv_tokens",
             *(("eager",) if eager_rows else ()))
    if len(pts) < len(terms):
        raise ValueError(f"decode fit needs >= {len(terms)} rows with a decode latency, got "
                         f"{len(pts)}")
    fit = _fit(pts, terms, np.zeros(len(pts), dtype=bool))
    for p, r in zip(pts, fit.rel_residuals, strict=True):
        for t in ("batch", "eager", "expert_share"):
            p.pop(t, None)
        p["rel_residual"] = r
    return {"base_s": fit.coef["const"], "s_per_req": fit.coef["batch"],
            "s_per_kv_token": fit.coef["kv_tokens"],
            "s_per_expert_share": fit.coef.get("expert_share", 0.0),
            "moe": {"experts": moe[0], "top_k": moe[1]} if moe else None,
            "eager_s": fit.coef.get("eager", 0.0), "graph_max_bs": graph_max_bs,
            "eager_rows": eager_rows,
            "rms_rel": fit.rms_rel, "max_abs_rel": fit.max_abs_rel, "points": pts}


def fit_rows(rows: list[dict[str, Any]], prefill_terms: str = "auto",
             moe: tuple[int, int] | None = None, graph_max_bs: int | None = None
             ) -> dict[str, Any]:
    return {"prefill": fit_prefill(rows, prefill_terms),
            "decode": fit_decode(rows, moe, graph_max_bs)}


def captured_graph_max_bs(server_args: dict[str, Any]) -> int | None:
    """The largest decode batch SGLang captured a CUDA graph for, from its resolved server
    args (None: unknown, or graphs off)."""
    if server_args.get("disable_cuda_graph"):
        return None
    sizes = server_args.get("decode_cuda_graph_bs") or server_args.get("cuda_graph_bs")
    if sizes:
        return int(max(sizes))
    top = server_args.get("cuda_graph_max_bs") or server_args.get("decode_cuda_graph_max_bs")
    return int(top) if top else None


def describe_fit(fit: dict[str, Any]) -> str:
    p, d = fit["prefill"], fit["decode"]
    pair = (f" + {p['s_per_token_pair']:.3g} s/pair" if p["s_per_token_pair"] else "")
    return (f"prefill_s = {1e3 * p['overhead_s']:.2f} ms + {1e6 * p['s_per_token']:.3f} us/token"
            f"{pair}  (RMS {100 * p['rms_rel']:.1f}%, worst {100 * p['max_abs_rel']:.1f}%; "
            f"{p['decision']})\n"
            f"decode_s  = {1e3 * d['base_s']:.2f} ms + "
            + (f"{1e3 * d['s_per_expert_share']:.2f} ms * expert share (of "
               f"{d['moe']['experts']}, top {d['moe']['top_k']}) + "
               if d.get("moe") else "")
            + f"{1e6 * d['s_per_req']:.2f} us/request + "
            f"{1e9 * d['s_per_kv_token']:.3f} ns/KV token"
            + (f" + {1e3 * d['eager_s']:.2f} ms past a batch of {d['graph_max_bs']}"
               if d.get("eager_s") else "")
            + f"  (RMS {100 * d['rms_rel']:.1f}%, worst {100 * d['max_abs_rel']:.1f}%)"
            + ("" if d.get("eager_rows") or not d.get("graph_max_bs") else
               f"; no rows past the CUDA-graph batch limit {d['graph_max_bs']}: larger "
               "batches modelled as captured"))

