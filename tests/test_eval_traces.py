"""eval/lib/traces.py: the real Azure CSVs load as documented; arrivals and ids are as specified."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from eval.lib.traces import (
    SYNTHETIC,
    TOKEN_HI,
    TOKEN_LO,
    TraceRow,
    load_azure,
    make_specs,
    model_vocab_size,
    prompt_ids,
    synthetic_rows,
    trace_rate,
)

AZURE = Path(__file__).resolve().parents[1] / "eval" / "data" / "azure_llm_2023"
CONV = AZURE / "AzureLLMInferenceTrace_conv.csv"
CODE = AZURE / "AzureLLMInferenceTrace_code.csv"


def _rows(gaps: list[float]) -> list[TraceRow]:
    t, rows = 0.0, []
    for i, g in enumerate([0.0] + gaps):
        t += g
        rows.append(TraceRow(t, 100 + i, 10 + i))
    return rows


def _cv(xs: list[float]) -> float:
    return statistics.pstdev(xs) / statistics.fmean(xs)


def test_conv_trace_matches_its_readme():
    rows = load_azure(CONV)
    assert len(rows) == 19366
    assert rows[0] == TraceRow(0.0, 374, 44)
    # 18:15:50.9951690 - 18:15:46.6805900 (7 fractional digits in the CSV).
    assert rows[1].t == pytest.approx(4.314579, abs=1e-6)
    assert all(a.t <= b.t for a, b in zip(rows, rows[1:], strict=False))
    assert 55 * 60 < rows[-1].t < 60 * 60  # "58 min"
    assert statistics.fmean(r.prompt_len for r in rows) == pytest.approx(1155, abs=1)
    assert statistics.fmean(r.output_len for r in rows) == pytest.approx(211, abs=1)


def test_code_trace_loads_and_rescales_to_a_rate():
    rows = load_azure(CODE)
    assert len(rows) == 8819
    specs = make_specs(rows, num=600, arrival="trace", rate=20.0)
    assert len(specs) == 600 and specs[0].arrival == 0.0
    assert 599 / specs[-1].arrival == pytest.approx(20.0)
    assert [s.prompt_len for s in specs] == [r.prompt_len for r in rows[:600]]


def test_rescaling_keeps_the_traces_burstiness():
    rows = _rows([1.0, 0.1, 0.1, 3.0, 0.2, 0.5])
    specs = make_specs(rows, arrival="trace", rate=12.0)
    gaps = [b.arrival - a.arrival for a, b in zip(specs, specs[1:], strict=False)]
    orig = [b.t - a.t for a, b in zip(rows, rows[1:], strict=False)]
    scale = trace_rate(rows) / 12.0
    assert gaps == pytest.approx([g * scale for g in orig])
    assert _cv(gaps) == pytest.approx(_cv(orig))
    assert make_specs(rows, arrival="trace")[3].arrival == pytest.approx(rows[3].t)


def test_poisson_and_gamma_hit_rate_and_burstiness_deterministically():
    rows = _rows([1.0] * 19999)
    for arrival, cv in (("poisson", 1.0), ("gamma", 3.0), ("gamma", 0.5)):
        specs = make_specs(rows, arrival=arrival, rate=16.0, cv=cv, seed=7)
        gaps = [b.arrival - a.arrival for a, b in zip(specs, specs[1:], strict=False)]
        assert len(gaps) / specs[-1].arrival == pytest.approx(16.0, rel=0.08)
        assert _cv(gaps) == pytest.approx(cv, rel=0.1)
        assert specs == make_specs(rows, arrival=arrival, rate=16.0, cv=cv, seed=7)
        assert specs != make_specs(rows, arrival=arrival, rate=16.0, cv=cv, seed=8)
        # Lengths come from the trace rows in order.
        assert [s.prompt_len for s in specs[:3]] == [100, 101, 102]


def test_first_n_start_and_length_caps():
    rows = _rows([1.0] * 9)
    specs = make_specs(rows, num=4, start=2, max_prompt=103, max_output=12)
    assert [s.idx for s in specs] == [2, 3, 4, 5]
    assert [s.prompt_len for s in specs] == [102, 103, 103, 103]
    assert [s.output_len for s in specs] == [12, 12, 12, 12]
    with pytest.raises(ValueError):
        make_specs(rows, arrival="poisson")  # synthetic arrivals need a rate


def test_prompt_ids_are_deterministic_in_range_and_salted():
    a = prompt_ids(5, 2000)
    assert a == prompt_ids(5, 2000)
    assert all(TOKEN_LO <= x < TOKEN_HI for x in a)
    assert len(set(a)) > 1900  # random-ish, not a ramp of repeats
    assert prompt_ids(6, 2000)[:50] != a[:50]
    assert prompt_ids(5, 2000, salt=1)[:50] != a[:50]
    assert prompt_ids(5, 10) == a[:10]


@pytest.mark.parametrize("model,vocab", [("llama-3.1-8b", 128256), ("deepseek-v2-lite", 102400),
                                         ("mixtral-8x7b", 32000), ("qwen2.5-32b", 152064)])
def test_every_shipped_models_requests_stay_inside_its_vocabulary(model, vocab):
    # with --skip-tokenizer-init SGLang checks no input id: one past the embedding table killed
    # a DeepSeek-V2-Lite server in its warm-up
    models = Path(__file__).resolve().parents[1] / "eval" / "models"
    assert model_vocab_size(models / model) == vocab
    ids = prompt_ids(5, 20000, vocab=model_vocab_size(models / model))
    assert TOKEN_LO <= min(ids) and max(ids) < min(vocab, TOKEN_HI)
    if vocab >= TOKEN_HI:  # the ids every earlier sweep sent
        assert ids == prompt_ids(5, 20000)


def test_no_config_means_the_default_range_and_a_tiny_vocab_is_refused(tmp_path):
    assert model_vocab_size(tmp_path) is None
    assert model_vocab_size("meta-llama/Llama-3.1-8B") is None
    with pytest.raises(ValueError, match="no token ids"):
        prompt_ids(0, 4, vocab=TOKEN_LO)


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
def test_synthetic_rows_have_their_mean_lengths_and_repeat(name):
    rows = synthetic_rows(name)
    prompt_mean, output_mean = SYNTHETIC[name]
    # lognormal means, within 10% over 1000 draws (the clips take a little off the top)
    assert statistics.mean(r.prompt_len for r in rows) == pytest.approx(prompt_mean, rel=0.1)
    assert statistics.mean(r.output_len for r in rows) == pytest.approx(output_mean, rel=0.1)
    assert all(8 <= r.prompt_len <= 30_000 and 1 <= r.output_len <= 4_000 for r in rows)
    assert rows == synthetic_rows(name) and rows != synthetic_rows(name, seed=2)
    with pytest.raises(ValueError, match="unknown synthetic trace"):
        synthetic_rows("chat")
