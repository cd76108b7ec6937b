"""The decode-step profile: its formula, the shipped profiles and how a served model finds one,
and what pacing does with the step a waiting queue will make."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from test_policy import COSTS, add, cap, plan_at, running

from eval import ship_profiles
from eval.lib.gpu_model import GpuModel, resolve_gpu_model
from superinfer.config import RotaConfig
from superinfer.policy import SloPolicy
from superinfer.policy.costs import CostModel
from superinfer.policy.step_profile import DecodeStepProfile
from superinfer.profiles import find_shipped, load_profile_file, model_shape

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "eval" / "models"
H100 = "NVIDIA H100 80GB HBM3"


def config(model: str) -> dict:
    return json.loads((MODELS / model / "config.json").read_text())


# --- the formula -----------------------------------------------------------------------------
def test_moe_step_grows_with_the_experts_touched_then_saturates():
    moe = DecodeStepProfile(base_s=0.005, s_per_req=0.0, s_per_kv_token=0.0,
                            s_per_expert_share=0.02, experts=8, top_k=2)
    one, many, more = moe.step_s(1, 0), moe.step_s(64, 0), moe.step_s(256, 0)
    assert one == pytest.approx(0.005 + 0.02 * 2 / 8)
    assert many == pytest.approx(0.025, rel=1e-6) and more == pytest.approx(many, rel=1e-6)


def test_a_batch_past_the_largest_cuda_graph_pays_the_eager_step():
    p = DecodeStepProfile(base_s=0.01, s_per_req=1e-4, s_per_kv_token=1e-7, eager_s=0.03,
                          graph_max_bs=128)
    assert p.step_s(129, 0) - p.step_s(128, 0) == pytest.approx(0.03 + 1e-4)


def test_the_simulators_step_is_the_profiles():
    gpu = resolve_gpu_model("mixtral-8x7b", "h200")
    assert gpu.decode_profile.experts == 8
    assert gpu.decode_s(40, 30_000) == gpu.decode_profile.step_s(40, 30_000)
    assert GpuModel().decode_s(64, 0) == pytest.approx(0.005 + 64 * 3e-5)


@pytest.mark.parametrize("fit,needle", [
    ({"base_s": 0.0, "s_per_req": 1e-4, "s_per_kv_token": 1e-7}, "base_s > 0"),
    ({"base_s": 0.01, "s_per_req": -1e-4, "s_per_kv_token": 1e-7}, "no negative term"),
    ({"base_s": 0.01, "s_per_req": 0, "s_per_kv_token": 0, "s_per_expert_share": 0.01,
      "moe": {"experts": 2, "top_k": 4}}, "top_k <= experts"),
])
def test_a_fit_that_cannot_be_a_cost_is_refused(fit, needle):
    with pytest.raises(ValueError, match=needle):
        DecodeStepProfile.from_fit(fit)


def test_the_step_of_a_batch_is_the_profiles_calibrated_by_the_measured_steps():
    """The profile gives the shape, the measured steps the level: a profile measured on
    another backend or GPU still says by how much the step grows. Calibrated per measured
    step against that step's own batch, so a step estimate that lags a growing batch does not
    read as a faster GPU."""
    prof = DecodeStepProfile(base_s=0.01, s_per_req=0.001, s_per_kv_token=1e-7)
    model = CostModel(alpha=1.0, decode_profile=prof)
    assert model.costs().decode_step_for(30, 10_000) == pytest.approx(0.041)  # not measured yet
    model.observe_decode(0.042, 10, 10_000)  # the profile says 21 ms for that batch: 2x
    costs = model.costs()
    assert costs.decode_profile is prof and costs.decode_calibration == pytest.approx(2.0)
    assert costs.decode_step_for(30, 10_000) == pytest.approx(0.082)
    model.observe_decode(0.05)  # a step of an unknown batch: the step, not the calibration
    assert model.costs().decode_calibration == pytest.approx(2.0)
    assert COSTS.decode_step_for(30, 10_000) == COSTS.decode_step_s  # no profile: the step


# --- pacing with it ----------------------------------------------------------------------------
def paced_budget(profile: DecodeStepProfile | None, burst: int, free: int = 100_000):
    """One stream with 30 ms of slack at 1.0 (token #1 due at 1.05), ``burst`` 1,000-token
    prompts waiting; the step of now is 20 ms."""
    p = SloPolicy(RotaConfig(reserve_window_s=0.0))
    running(p, "s", tokens=100, first_s=0.95, out=1)
    for i in range(burst):
        add(p, f"n{i}", 0.9, 1000, 1.0, 0.1, 10)
    costs = dataclasses.replace(COSTS, decode_profile=profile, decode_calibration=2.0)
    return plan_at(p, 1.0, cap(free), costs, 16384).prefill_token_budget


def test_a_stream_the_joined_queue_puts_past_its_tbt_does_not_hold_prefill_back():
    """Once the 50 waiting requests have joined, the step is 10 + 51 x 1 = 61 ms, times the
    calibration 2 (steps measured twice the profile's) = 122 ms, past the stream's 100 ms TBT:
    pacing for it would only postpone that, at the queue's TTFT. With 30 waiting (82 ms), or
    only 10 that fit free memory, or no profile, it paces as before."""
    prof = DecodeStepProfile(base_s=0.01, s_per_req=0.001, s_per_kv_token=0.0)
    assert paced_budget(None, 50) is not None
    assert paced_budget(prof, 50) is None
    assert paced_budget(prof, 30) == paced_budget(None, 30) is not None
    assert paced_budget(prof, 50, free=10_000) == paced_budget(None, 50, free=10_000)


def test_the_joined_batch_is_the_queue_in_deadline_order_not_the_most_that_could_fit():
    """10,000 tokens free: a 9,000-token prompt due first, then 40 of 100 tokens. As many as
    could fit would be 41 streams (a 104 ms step, past the 100 ms TBT), but admission takes
    the long one first and 10 short ones after it: 11 join, a 44 ms step, so the stream paces."""
    prof = DecodeStepProfile(base_s=0.01, s_per_req=0.001, s_per_kv_token=0.0)
    p = SloPolicy(RotaConfig(reserve_window_s=0.0))
    running(p, "s", tokens=100, first_s=0.95, out=1)
    add(p, "long", 0.8, 9000, 1.0, 0.1, 10)
    for i in range(40):
        add(p, f"n{i}", 0.9, 100, 1.0, 0.1, 10)
    costs = dataclasses.replace(COSTS, decode_profile=prof, decode_calibration=2.0)
    assert plan_at(p, 1.0, cap(10_000), costs, 16384).prefill_token_budget is not None


# --- shipped profiles ------------------------------------------------------------------------
def test_shipped_profiles_are_current():
    assert ship_profiles.main(["--check"]) == 0


@pytest.mark.parametrize("model,gpu,source", [
    ("llama-3.1-8b", H100, "llama-3.1-8b on h100"),
    ("qwen2.5-32b", H100, "qwen2.5-32b on h100"),
    ("deepseek-v2-lite", H100, "deepseek-v2-lite on h100"),
    ("mixtral-8x7b", "NVIDIA H200", "mixtral-8x7b on h200"),
    ("mixtral-8x7b", H100, "mixtral-8x7b on h200 (shape only: no profile for h100)"),
    ("llama-3.1-8b", None, "llama-3.1-8b on h100 (shape only: no profile for this device)"),
])
def test_a_served_model_finds_the_profile_of_its_shape(model, gpu, source):
    found = find_shipped(config(model), gpu)
    assert found is not None and found.source == source
    own = json.loads((MODELS / model / f"profile_{source.split()[2]}.json").read_text())
    assert found.profile == DecodeStepProfile.from_fit(own["fit"]["decode"])


def test_a_shape_without_a_profile_gets_none():
    assert find_shipped(config("llama-3.2-1b"), H100) is None
    quantized = {**config("llama-3.1-8b"), "quantization_config": {"quant_method": "fp8"}}
    assert find_shipped(quantized, H100) is None  # profiles are taken unquantized


def test_the_shape_reads_a_multimodal_models_text_config():
    text = config("qwen2.5-32b")
    assert model_shape({"model_type": "vl", "text_config": text}) == model_shape(text)
    assert model_shape(config("mixtral-8x7b"))["experts"] == 8


def test_a_profile_file_is_read_or_refused_naming_it(tmp_path):
    own = MODELS / "llama-3.1-8b" / "profile_h100.json"
    assert load_profile_file(own).source == str(own)
    bad = tmp_path / "p.json"
    bad.write_text('{"fit": {}}')
    with pytest.raises(ValueError, match=f"--rota-decode-profile {bad}: not a profile"):
        load_profile_file(bad)
