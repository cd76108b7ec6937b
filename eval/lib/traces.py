"""Request specs from the Azure LLM inference traces (or synthetic arrivals with trace lengths).

The traces publish only arrival times and token counts, so a request is replayed as
``prompt_len`` deterministic token ids with exactly ``output_len`` forced output tokens.
Everything here is stdlib so it runs unchanged on the GPU machine.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ARRIVALS = ("trace", "poisson", "gamma")
# Token ids are drawn from [TOKEN_LO, TOKEN_HI): clear of special tokens, inside Llama-3's vocab,
# and under the served model's vocabulary where that is smaller: with --skip-tokenizer-init SGLang
# does not check input ids, and one id past the embedding table kills the server.
TOKEN_LO, TOKEN_HI = 100, 120_000


@dataclass(frozen=True)
class TraceRow:
    """One CSV row: arrival time in seconds after the trace's first row, and lengths."""

    t: float
    prompt_len: int
    output_len: int


@dataclass(frozen=True)
class RequestSpec:
    """What the replay client sends: arrival offset (s from run start) and lengths."""

    idx: int
    arrival: float
    prompt_len: int
    output_len: int


def _parse_ts(text: str) -> float:
    # NOTE: the CSV has 7 fractional digits, more than strptime's %f accepts.
    whole, _, frac = text.strip().partition(".")
    base = datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc).timestamp()
    return base + (float("0." + frac) if frac else 0.0)


def load_azure(path: str | Path) -> list[TraceRow]:
    """Rows of an Azure 2023 CSV (TIMESTAMP, ContextTokens, GeneratedTokens), sorted by time."""
    with open(path, newline="") as f:
        raw = [
            (_parse_ts(r["TIMESTAMP"]), int(r["ContextTokens"]), int(r["GeneratedTokens"]))
            for r in csv.DictReader(f)
        ]
    if not raw:
        raise ValueError(f"{path}: no rows")
    raw.sort(key=lambda r: r[0])
    t0 = raw[0][0]
    return [TraceRow(t - t0, p, o) for t, p, o in raw]


# Length mixes the Azure traces do not have, for probing the policy off its own workloads:
# name -> (mean prompt, mean output) tokens, lognormal with sigma SYNTHETIC_SIGMA.
SYNTHETIC = {"long-output": (1500, 400), "rag": (6000, 150), "short-chat": (250, 120)}
SYNTHETIC_SIGMA = 0.8


def synthetic_rows(name: str, n: int = 1000, seed: int = 1) -> list[TraceRow]:
    """``n`` rows of the length mix ``name`` (see SYNTHETIC), one per second (replay them with
    drawn arrivals); prompts clipped to [8, 30000] tokens, outputs to [1, 4000]."""
    if name not in SYNTHETIC:
        raise ValueError(f"unknown synthetic trace {name!r}; have {sorted(SYNTHETIC)}")
    prompt_mean, output_mean = SYNTHETIC[name]
    rng = random.Random(seed)
    mu = -SYNTHETIC_SIGMA ** 2 / 2  # a lognormal of mean 1

    def draw(mean: int, lo: int, hi: int) -> int:
        return min(max(int(mean * rng.lognormvariate(mu, SYNTHETIC_SIGMA)), lo), hi)

    return [TraceRow(float(i), draw(prompt_mean, 8, 30_000), draw(output_mean, 1, 4_000))
            for i in range(n)]


def trace_rate(rows: list[TraceRow]) -> float:
    """Mean arrival rate (req/s) of ``rows``: (n - 1) gaps over the span."""
    span = rows[-1].t - rows[0].t
    if len(rows) < 2 or span <= 0:
        raise ValueError("need at least two rows with distinct times to define a rate")
    return (len(rows) - 1) / span


def _arrivals(rows: list[TraceRow], arrival: str, rate: float | None, cv: float,
              seed: int) -> list[float]:
    if arrival == "trace":
        t0 = rows[0].t
        # Scaling every gap by one factor keeps the trace's burstiness (its gap CV).
        scale = 1.0 if rate is None else trace_rate(rows) / rate
        return [(r.t - t0) * scale for r in rows]
    if rate is None or rate <= 0:
        raise ValueError(f"arrival={arrival!r} needs a positive rate")
    rng = random.Random(seed)
    if arrival == "poisson":
        gaps = [rng.expovariate(rate) for _ in rows]
    elif arrival == "gamma":
        if cv <= 0:
            raise ValueError(f"gamma arrivals need cv > 0, got {cv}")
        shape = 1.0 / (cv * cv)  # gamma gaps: CV = 1/sqrt(shape), mean = shape * scale
        gaps = [rng.gammavariate(shape, 1.0 / (rate * shape)) for _ in rows]
    else:
        raise ValueError(f"arrival must be one of {ARRIVALS}, got {arrival!r}")
    # The first request arrives at 0 so runs do not start with an idle pause.
    out, t = [], 0.0
    for g in [0.0] + gaps[1:]:
        t += g
        out.append(t)
    return out


def make_specs(rows: list[TraceRow], *, num: int | None = None, start: int = 0,
               arrival: str = "trace", rate: float | None = None, cv: float = 1.0,
               seed: int = 0, max_prompt: int | None = None,
               max_output: int | None = None) -> list[RequestSpec]:
    """Specs for rows[start:start+num].

    ``arrival``: "trace" replays the timestamps (rescaled so the mean rate is ``rate`` if given);
    "poisson"/"gamma" draw gaps at ``rate`` (gamma with coefficient of variation ``cv``) and keep
    only the trace's lengths. Lengths are clipped to ``max_prompt``/``max_output`` and to >= 1.
    """
    chosen = rows[start:] if num is None else rows[start:start + num]
    if not chosen:
        raise ValueError(f"no rows in [{start}, {start}+{num})")
    times = _arrivals(chosen, arrival, rate, cv, seed)
    specs = []
    for i, (r, t) in enumerate(zip(chosen, times, strict=False)):
        p = r.prompt_len if max_prompt is None else min(r.prompt_len, max_prompt)
        o = r.output_len if max_output is None else min(r.output_len, max_output)
        specs.append(RequestSpec(start + i, t, max(1, p), max(1, o)))
    return specs


def model_vocab_size(model_path: str | Path) -> int | None:
    """``vocab_size`` from the model folder's config.json (a multimodal config's text part), or
    None where there is no readable config (a hub name, say)."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    size = (config.get("text_config") or {}).get("vocab_size") or config.get("vocab_size")
    return int(size) if size else None


def prompt_ids(idx: int, n: int, salt: int = 0, vocab: int | None = None) -> list[int]:
    """``n`` deterministic pseudo-random token ids for request ``idx``, under ``vocab``.

    A different ``salt`` gives unrelated ids, so replaying the same requests again (another rate)
    does not hit the prefix cache left by the previous replay. Models whose vocabulary is at least
    TOKEN_HI all get the same ids.
    """
    hi = TOKEN_HI if vocab is None else min(TOKEN_HI, vocab)
    if hi <= TOKEN_LO:
        raise ValueError(f"vocab {vocab}: no token ids above the {TOKEN_LO} reserved ones")
    rng = random.Random(f"{salt}:{idx}")
    return [rng.randrange(TOKEN_LO, hi) for _ in range(n)]
