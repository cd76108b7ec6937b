"""Single requests an e2e run sends besides the replays: one greedy /generate (the first
request after start-up, the per-request SLO checks) and /metrics."""

from __future__ import annotations

import json
import re
from typing import Any

from eval.e2e.rotator_stats import rank_key
from eval.lib.http import http_request

SUPERINFER_SERIES = ("superinfer:rotations_out_total", "superinfer:rotations_in_total",
                     "superinfer:bytes_d2h_total", "superinfer:bytes_h2d_total",
                     "superinfer:host_tier_tokens_used", "superinfer:requests_rotated_out")
METRIC_RE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{([^}]*)\})?\s+(\S+)")
LABEL_RE = re.compile(r'(\w+)="([^"]*)"')
Samples = dict[str, list[tuple[dict[str, str], float]]]


def generate_once(url: str, ids: list[int], n: int, custom_params: dict[str, Any] | None = None,
                  stream: bool = False, timeout: float = 60.0) -> dict[str, Any]:
    """One greedy /generate request: HTTP status, tokens received, finish reason or error."""
    params: dict[str, Any] = {"max_new_tokens": n, "ignore_eos": True, "temperature": 0}
    if custom_params is not None:
        params["custom_params"] = custom_params
    status, text = http_request(url + "/generate", {"input_ids": ids, "sampling_params": params,
                                                    "stream": stream}, timeout)
    return {"status": status, **parse_generate_body(text, stream)}


def parse_generate_body(text: str, stream: bool) -> dict[str, Any]:
    """Token count, finish reason and error of a /generate answer (JSON, or SSE when streamed)."""
    events = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
    try:
        chunks = ([json.loads(e) for e in events if e and e != "[DONE]"] if stream and events
                  else [json.loads(text)])
    except ValueError:
        return {"n_ids": 0, "finish_reason": None, "error": text[:300]}
    chunks = [c for c in chunks if isinstance(c, dict)]
    meta = [c.get("meta_info") or {} for c in chunks]
    counts = [m["completion_tokens"] for m in meta if isinstance(m.get("completion_tokens"), int)]
    error = next((c["error"] for c in chunks if "error" in c), None)
    n_ids = counts[-1] if counts else sum(len(c.get("output_ids") or []) for c in chunks)
    return {"n_ids": n_ids, "finish_reason": meta[-1].get("finish_reason") if meta else None,
            "error": error if error is None or isinstance(error, str) else json.dumps(error)[:300]}


def parse_prometheus(text: str) -> Samples:
    """Samples of a Prometheus text exposition: name -> [(labels, value)]."""
    out: Samples = {}
    for line in text.splitlines():
        m = METRIC_RE.match(line)
        if m is None:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out.setdefault(m.group(1), []).append((dict(LABEL_RE.findall(m.group(2) or "")), value))
    return out


def rank_of(labels: dict[str, str]) -> str:
    """A series' scheduler, named as a stats record's (``rotator_stats.rank_key``)."""
    return rank_key(labels.get("tp_rank", "?"), labels.get("dp_rank"))


def check_metrics(series: Samples) -> dict[str, Any]:
    """Every superinfer:* series present (with a TP rank 0's), and rotations_out_total > 0; the
    ranks that export them are listed (every TP rank and DP replica publishes its own)."""
    missing = [n for n in SUPERINFER_SERIES if n not in series]
    labels = [lab for n in SUPERINFER_SERIES for lab, _ in series.get(n, []) if "tp_rank" in lab]
    ranks = sorted({rank_of(lab) for lab in labels})
    values = {n: {rank_of(lab): v for lab, v in series.get(n, [])} for n in SUPERINFER_SERIES}
    rotations = sum(values["superinfer:rotations_out_total"].values())
    sglang_series = sum(n.startswith("sglang:") for n in series)
    return {"missing": missing, "tp_ranks": ranks, "values": values, "sglang_series": sglang_series,
            "ok": not missing and rotations > 0 and any(lab["tp_rank"] == "0" for lab in labels)}
