"""eval.profile_model and eval.lib.profile_fit on the CPU: the fit recovers known costs from noisy
synthetic one-batch rows, keeps the attention (pair) term only where the data needs it, the KV
bytes per token follow each config, the worker drives SGLang's one_batch functions as their
0.5.17 signatures take them, and the written profile loads into the simulator's GpuModel."""

from __future__ import annotations

import inspect
import json
import random
import sys
import types
from pathlib import Path

import pytest

from eval import profile_model
from eval.lib.gpu_model import (
    GpuModel,
    ProfileNotFound,
    available_profiles,
    gpu_slug,
    profile_path,
    resolve_gpu_model,
)
from eval.lib.profile_fit import (
    captured_graph_max_bs,
    causal_pairs,
    decode_kv_tokens,
    fit_decode,
    fit_prefill,
    kv_bytes_per_token,
    nonneg_relative_lstsq,
)
from superinfer.policy.step_profile import expert_share
from superinfer.profiles import moe_routing

ROOT = Path(__file__).resolve().parents[1]
LLAMA = json.loads((ROOT / "eval/models/llama-3.1-8b/config.json").read_text())

TRUE = {"overhead": 0.008, "per_token": 2.2e-5, "per_pair": 1.0e-9,
        "base": 0.006, "per_req": 4e-5, "per_kv": 3e-8}


def synthetic_rows(per_pair: float, noise: float = 0.02, seed: int = 1) -> list[dict]:
    """Rows as profile_worker writes them, from TRUE's costs with multiplicative noise."""
    rng = random.Random(seed)
    grid = profile_model.GRIDS["default"]
    points, _ = profile_model.build_points(grid["prefill"], grid["decode"], repeats=2,
                                           decode_steps=31, max_row_tokens=65536)
    rows = []
    for p in points:
        b, n, o = p["batch_size"], p["input_len"], p["output_len"]
        pre = (TRUE["overhead"] + TRUE["per_token"] * b * n + per_pair * causal_pairs(b, n))
        row = {**p, "prefill_latency": pre * (1 + rng.gauss(0, noise))}
        if o > 1:
            dec = TRUE["base"] + TRUE["per_req"] * b + TRUE["per_kv"] * decode_kv_tokens(b, n, o)
            row["median_decode_latency"] = dec * (1 + rng.gauss(0, noise))
        rows.append(row)
    return rows


def test_prefill_fit_recovers_known_costs_with_the_pair_term():
    fit = fit_prefill(synthetic_rows(TRUE["per_pair"]))
    assert fit["terms"] == ["const", "tokens", "pairs"], fit["decision"]
    assert fit["decision"].startswith("quadratic")
    assert fit["overhead_s"] == pytest.approx(TRUE["overhead"], rel=0.15)
    assert fit["s_per_token"] == pytest.approx(TRUE["per_token"], rel=0.05)
    assert fit["s_per_token_pair"] == pytest.approx(TRUE["per_pair"], rel=0.15)
    assert fit["rms_rel"] < 0.03  # what is left is the 2% noise
    lin = fit["candidates"]["linear"]
    assert lin["rms_rel_long"] > 2 * fit["rms_rel_long"]


def test_prefill_fit_stays_linear_without_attention_cost():
    fit = fit_prefill(synthetic_rows(0.0))
    assert fit["terms"] == ["const", "tokens"] and fit["s_per_token_pair"] == 0.0, fit["decision"]
    assert fit["decision"].startswith("linear")
    assert fit["overhead_s"] == pytest.approx(TRUE["overhead"], rel=0.15)
    assert fit["s_per_token"] == pytest.approx(TRUE["per_token"], rel=0.03)
    forced = fit_prefill(synthetic_rows(0.0), "quadratic")
    assert forced["terms"] == ["const", "tokens", "pairs"]


def test_prefill_fit_takes_the_fastest_repeat():
    rows = synthetic_rows(TRUE["per_pair"], noise=0.0)
    # a cold first run (JIT) 5x slower must not move the fit
    for r in rows:
        if r["kind"] == "prefill" and r["repeat"] == 0:
            r["prefill_latency"] *= 5
    fit = fit_prefill(rows)
    assert fit["s_per_token"] == pytest.approx(TRUE["per_token"], rel=1e-6)
    assert fit["overhead_s"] == pytest.approx(TRUE["overhead"], rel=1e-6)
    assert all(len(p["samples"]) == 2 for p in fit["points"])


def test_decode_fit_recovers_known_costs():
    fit = fit_decode(synthetic_rows(TRUE["per_pair"]))
    assert fit["base_s"] == pytest.approx(TRUE["base"], rel=0.05)
    assert fit["s_per_req"] == pytest.approx(TRUE["per_req"], rel=0.25)
    assert fit["s_per_kv_token"] == pytest.approx(TRUE["per_kv"], rel=0.05)
    assert fit["rms_rel"] < 0.03
    # the KV of a row's median step: 128 x (512 + 32 / 2)
    pt = next(p for p in fit["points"] if p["batch_size"] == 128 and p["input_len"] == 512)
    assert pt["kv_tokens"] == 128 * 528


def moe_rows(experts: int, top_k: int, per_share: float, eager_s: float, graph_max_bs: int,
             noise: float = 0.02) -> list[dict]:
    """Decode rows of an MoE model: TRUE's costs plus ``per_share`` x the share of experts the
    batch touches, plus ``eager_s`` past the CUDA-graph limit."""
    rng = random.Random(2)
    rows = []
    for r in synthetic_rows(0.0, noise=0.0):
        if "median_decode_latency" in r:
            b = r["batch_size"]
            t = (r["median_decode_latency"] + per_share * expert_share(b, experts, top_k)
                 + (eager_s if b > graph_max_bs else 0.0))
            r["median_decode_latency"] = t * (1 + rng.gauss(0, noise))
        rows.append(r)
    return rows


def test_decode_fit_follows_the_experts_a_batch_touches_and_eager_steps():
    rows = moe_rows(8, 2, per_share=0.015, eager_s=0.03, graph_max_bs=128)
    fit = fit_decode(rows, (8, 2), graph_max_bs=128)
    assert fit["s_per_expert_share"] == pytest.approx(0.015, rel=0.15)
    assert fit["eager_s"] == pytest.approx(0.03, rel=0.15) and fit["eager_rows"] > 0
    assert fit["base_s"] == pytest.approx(TRUE["base"], rel=0.3)
    assert fit["rms_rel"] < 0.03
    # the dense fit of the same rows cannot follow them
    assert fit_decode(rows)["rms_rel"] > 3 * fit["rms_rel"]
    # and the simulator's model of a profile with these terms costs steps the same way
    model = GpuModel(decode_base_s=fit["base_s"], decode_s_per_req=fit["s_per_req"],
                     decode_s_per_kv_token=fit["s_per_kv_token"],
                     decode_s_per_expert_share=fit["s_per_expert_share"], moe_experts=8,
                     moe_top_k=2, decode_eager_s=fit["eager_s"], cuda_graph_max_bs=128)
    for b, kv in ((1, 512), (16, 8192), (256, 32768)):
        true = (TRUE["base"] + TRUE["per_req"] * b + TRUE["per_kv"] * kv
                + 0.015 * expert_share(b, 8, 2) + (0.03 if b > 128 else 0.0))
        assert model.decode_s(b, kv) == pytest.approx(true, rel=0.1)


def test_moe_routing_and_graph_limit_from_configs():
    assert moe_routing(LLAMA) is None
    assert moe_routing(json.loads((ROOT / "eval/models/mixtral-8x7b/config.json").read_text())
                       ) == (8, 2)
    assert moe_routing(json.loads(
        (ROOT / "eval/models/deepseek-v2-lite/config.json").read_text())) == (64, 6)
    assert expert_share(1, 8, 2) == pytest.approx(0.25) and expert_share(64, 8, 2) > 0.99
    assert captured_graph_max_bs({"decode_cuda_graph_bs": [1, 2, 4, 128]}) == 128
    assert captured_graph_max_bs({"cuda_graph_max_bs": 256}) == 256
    assert captured_graph_max_bs({"disable_cuda_graph": True, "cuda_graph_max_bs": 8}) is None


def test_fit_keeps_coefficients_non_negative():
    import numpy as np

    x = np.array([[1.0, t] for t in (1, 2, 3, 4)])
    y = np.array([1.0, 1.0, 1.0, 1.0]) - 0.1 * np.arange(4)  # falls with t: slope < 0
    coef = nonneg_relative_lstsq(x, y)
    assert coef[1] == 0.0 and coef[0] > 0


def test_kv_bytes_per_token_per_architecture():
    assert kv_bytes_per_token(LLAMA)["bytes_per_token"] == 131072  # the built-in model's
    assert kv_bytes_per_token(LLAMA, tp_size=2)["bytes_per_token"] == 65536
    assert kv_bytes_per_token(LLAMA, tp_size=16)["bytes_per_token"] == 16384  # heads replicated
    assert kv_bytes_per_token(LLAMA, kv_cache_dtype="fp8_e4m3")["bytes_per_token"] == 65536
    qwen32 = {"num_hidden_layers": 64, "num_attention_heads": 40, "num_key_value_heads": 8,
              "hidden_size": 5120, "torch_dtype": "bfloat16"}
    assert kv_bytes_per_token(qwen32)["bytes_per_token"] == 64 * 8 * 128 * 2 * 2
    mixtral = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
               "hidden_size": 4096, "head_dim": None, "torch_dtype": "bfloat16"}
    assert kv_bytes_per_token(mixtral)["bytes_per_token"] == 131072
    dsv2_lite = {"num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
                 "hidden_size": 2048, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
                 "torch_dtype": "bfloat16"}
    mla = kv_bytes_per_token(dsv2_lite, tp_size=2)
    assert mla["kind"] == "mla" and mla["bytes_per_token"] == 27 * 576 * 2  # not split by TP


@pytest.mark.parametrize("name,slug", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
                                       ("h100", "h100"), ("NVIDIA A100-SXM4-80GB", "a100"),
                                       ("NVIDIA L40S", "l40s"), ("h100-tp2", "h100-tp2")])
def test_gpu_slug(name, slug):
    assert gpu_slug(name) == slug
    assert gpu_slug(name, 2) == slug.removesuffix("-tp2") + "-tp2"  # TP runs are their own


def test_build_points_skips_what_cannot_fit():
    points, skipped = profile_model.build_points(
        [(1, 1024), (1, 32768), (64, 2048)], [(8, 512), (2, 32760), (8, 8000)], repeats=2,
        decode_steps=31, max_row_tokens=65536, context_len=32768, kv_capacity=60_000)
    run = {(p["kind"], p["batch_size"], p["input_len"]) for p in points}
    assert run == {("prefill", 1, 1024), ("decode", 8, 512)}
    why = {(s["batch_size"], s["input_len"]): s["skipped"] for s in skipped}
    assert "context" in why[(1, 32768)] and "max-row-tokens" in why[(64, 2048)]
    assert "context" in why[(2, 32760)] and "KV pool" in why[(8, 8000)]
    assert [p["repeat"] for p in points if p["kind"] == "prefill"] == [0, 1]
    assert next(p for p in points if p["kind"] == "decode")["output_len"] == 32


def test_worker_calls_match_the_installed_one_batch():
    """Every one_batch function profile_worker calls exists and takes the arguments it passes
    (sglang 0.5.17's signatures), and one_batch.main still dispatches to latency_test."""
    ob = pytest.importorskip("sglang.benchmark.one_batch")
    params = inspect.signature(ob.latency_test_run_once).parameters
    passed = {"run_name", "model_runner", "rank_print", "reqs", "batch_size", "input_len",
              "output_len", "log_decode_step", "profile", "profile_record_shapes",
              "profile_activities", "profile_prefix", "profile_stage", "tp_rank"}
    required = {n for n, p in params.items() if p.default is inspect.Parameter.empty}
    assert required <= passed <= set(params)
    assert list(inspect.signature(ob.load_model).parameters) == [
        "server_args", "port_args", "gpu_id", "tp_rank"]
    assert list(inspect.signature(ob.latency_test).parameters) == list(
        inspect.signature(profile_model.profile_worker).parameters)
    src = inspect.getsource(ob.main)
    assert "work_func = latency_test" in src
    for name in ("initialize_moe_config", "initialize_fp8_gemm_config",
                 "initialize_fp4_gemm_config", "configure_logger", "get_tokenizer",
                 "prepare_synthetic_inputs_for_latency_test"):
        assert hasattr(ob, name), name
    assert "get_tokenizer(" in inspect.getsource(ob.load_model)


def _fake_one_batch(monkeypatch, capacity: int, oom_at: int | None):
    """A stand-in for sglang.benchmark.one_batch and torch.cuda: rows cost TRUE's latencies."""
    calls = []

    class Oom(RuntimeError):
        pass

    runner = types.SimpleNamespace(torch_runner=types.SimpleNamespace(
        max_total_num_tokens=capacity, model_config=types.SimpleNamespace(context_len=131072),
        token_to_kv_pool=types.SimpleNamespace(mem_usage=16.0),
        server_args=types.SimpleNamespace(attention_backend="triton", chunked_prefill_size=8192,
                                          max_prefill_tokens=16384, tp_size=1)))

    def run_once(**kw):
        b, n, o = kw["batch_size"], kw["input_len"], kw["output_len"]
        calls.append((b, n, o))
        if oom_at is not None and b * n >= oom_at:
            raise Oom("CUDA out of memory. Tried to allocate 8 GiB")
        res = {"prefill_latency": TRUE["overhead"] + TRUE["per_token"] * b * n
               + TRUE["per_pair"] * causal_pairs(b, n)}
        if o > 1:
            res["median_decode_latency"] = (TRUE["base"] + TRUE["per_req"] * b
                                            + TRUE["per_kv"] * decode_kv_tokens(b, n, o))
        return res

    ob = types.SimpleNamespace(
        initialize_moe_config=lambda sa: None, initialize_fp8_gemm_config=lambda sa: None,
        initialize_fp4_gemm_config=lambda sa: None, configure_logger=lambda sa, prefix: None,
        load_model=lambda *a: (runner, None),
        prepare_synthetic_inputs_for_latency_test=lambda b, n: [object()] * b,
        latency_test_run_once=run_once)
    cuda = types.SimpleNamespace(OutOfMemoryError=Oom, empty_cache=lambda: None,
                                 get_device_name=lambda i: "NVIDIA H100 80GB HBM3")
    torch = types.SimpleNamespace(cuda=cuda, __version__="2.x", version=types.SimpleNamespace(
        cuda="13.0"))
    bench = types.ModuleType("sglang.benchmark")
    bench.one_batch = ob
    sglang = types.ModuleType("sglang")
    sglang.__version__ = "0.5.17"
    sglang.benchmark = bench
    monkeypatch.setitem(sys.modules, "sglang", sglang)
    monkeypatch.setitem(sys.modules, "sglang.benchmark", bench)
    monkeypatch.setitem(sys.modules, "sglang.benchmark.one_batch", ob)
    monkeypatch.setitem(sys.modules, "torch", torch)
    return calls


def _run_worker(monkeypatch, tmp_path, points, capacity=400_000, oom_at=None, deadline=1e12):
    calls = _fake_one_batch(monkeypatch, capacity, oom_at)
    rows_path = tmp_path / "rows.jsonl"
    monkeypatch.setenv(profile_model.PLAN_ENV, json.dumps(
        {"points": points, "rows_path": str(rows_path), "deadline_unix": deadline}))
    sa = types.SimpleNamespace(tp_size=1)
    profile_model.profile_worker(sa, None, None, 0, 0)
    return calls, [json.loads(line) for line in rows_path.read_text().splitlines()]


def test_worker_writes_rows_and_survives_out_of_memory(monkeypatch, tmp_path):
    grid = profile_model.GRIDS["default"]
    points, _ = profile_model.build_points(grid["prefill"], grid["decode"], repeats=2,
                                           decode_steps=31, max_row_tokens=65536)
    calls, rows = _run_worker(monkeypatch, tmp_path, points, capacity=60_000, oom_at=32768)
    meta = rows[0]["meta"]
    assert meta["max_total_num_tokens"] == 60_000 and meta["gpu_name"].startswith("NVIDIA H100")
    assert meta["server_args"]["chunked_prefill_size"] == 8192
    body = rows[1:]
    assert len(body) == len(points)  # one record per planned row, measured or skipped
    oom = [r for r in body if "out of memory" in r.get("skipped", "")]
    assert oom and all(r["batch_size"] * r["input_len"] >= 32768 for r in oom)
    kv = [r for r in body if "KV pool" in r.get("skipped", "")]
    assert kv and all(r["batch_size"] * (r["input_len"] + r["output_len"]) > 60_000 for r in kv)
    ok = [r for r in body if "skipped" not in r]
    assert all(r["batch_size"] * r["input_len"] < 32768 for r in ok)
    assert len(ok) > 30
    # warm-up ran first and is not recorded
    assert calls[:2] == [(1, 256, 8), (8, 512, 8)]


def test_worker_stops_at_the_deadline(monkeypatch, tmp_path):
    points, _ = profile_model.build_points([(1, 256), (1, 512)], [(4, 128)], repeats=1,
                                           decode_steps=7, max_row_tokens=65536)
    _, rows = _run_worker(monkeypatch, tmp_path, points, deadline=0.0)
    assert [r["skipped"] for r in rows[1:]] == ["budget"] * 3


def test_fit_only_writes_a_profile_the_simulator_loads(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    meta = {"meta": {"gpu_name": "NVIDIA H100 80GB HBM3", "max_total_num_tokens": 450_000,
                     "kv_pool_gb": 54.9, "sglang_version": "0.5.17",
                     "server_args": {"chunked_prefill_size": 8192, "max_prefill_tokens": 16384,
                                     "attention_backend": "triton"}}}
    data = [meta, *synthetic_rows(TRUE["per_pair"]),
            {"kind": "decode", "batch_size": 128, "input_len": 8192, "output_len": 32,
             "skipped": "budget"}]
    rows.write_text("".join(json.dumps(r) + "\n" for r in data))
    models = tmp_path / "models"
    (models / "llama-3.1-8b").mkdir(parents=True)
    (models / "llama-3.1-8b" / "config.json").write_text(json.dumps(LLAMA))
    assert profile_model.main(["--model", "llama-3.1-8b", "--models-dir", str(models),
                               "--fit-only", str(rows)]) == 0
    out = models / "llama-3.1-8b" / "profile_h100.json"
    doc = json.loads(out.read_text())
    assert doc["gpu"] == "h100" and doc["model"] == "llama-3.1-8b"
    assert doc["kv"]["bytes_per_token"] == 131072 and doc["kv"]["max_total_num_tokens"] == 450_000
    assert len(doc["rows"]) == len(data) - 2 and doc["skipped"][0]["skipped"] == "budget"
    assert doc["sglang_version"] == "0.5.17" and "--fit-only" in doc["command"]
    assert "prefill_s =" in capsys.readouterr().out
    g = GpuModel.from_profile(out, link_bytes_per_s=25e9)
    assert g.prefill_s_per_token == doc["fit"]["prefill"]["s_per_token"]
    assert g.prefill_s_per_token_pair == pytest.approx(TRUE["per_pair"], rel=0.15)
    assert g.decode_s_per_kv_token == pytest.approx(TRUE["per_kv"], rel=0.05)
    assert g.link_bytes_per_s == 25e9 and g.chunked_prefill_size == 8192
    # the modelled costs are the measured ones, within the noise
    assert g.decode_s(64, 64 * 528) == pytest.approx(
        TRUE["base"] + 64 * TRUE["per_req"] + TRUE["per_kv"] * 64 * 528, rel=0.03)
    assert g.prefill_s(8192, GpuModel.attn_pairs(8192)) == pytest.approx(
        TRUE["overhead"] + TRUE["per_token"] * 8192 + TRUE["per_pair"] * causal_pairs(1, 8192),
        rel=0.03)
    # resolved by name
    assert available_profiles(models) == [("llama-3.1-8b", "h100")]
    assert profile_path("llama-3.1-8b", "NVIDIA H100 80GB HBM3", models) == out
    r = resolve_gpu_model("llama-3.1-8b", "h100", models_dir=models, mover="direct")
    assert r.mover == "direct" and r.decode_s_per_kv_token == g.decode_s_per_kv_token
    assert resolve_gpu_model("llama-3.1-8b", models_dir=models) == resolve_gpu_model(
        gpu="NVIDIA H100 80GB HBM3", models_dir=models)
    with pytest.raises(ProfileNotFound, match="available: --model llama-3.1-8b --gpu h100"):
        resolve_gpu_model("llama-3.1-8b", "h200", models_dir=models)


def test_builtin_model_unchanged():
    """The built-in model: no profile, no pair term, the committed constants."""
    g = resolve_gpu_model()
    assert g == GpuModel() and g.prefill_s_per_token_pair == 0.0
    assert g.prefill_s(8192) == g.prefill_s(8192, GpuModel.attn_pairs(8192)) == 0.012 + 8192 * 24e-6
    assert GpuModel.attn_pairs(2, 3) == 2 * 3 + 3  # two new tokens after three cached


def test_simulator_runs_on_a_profile_and_names_missing_ones(tmp_path):
    import subprocess

    from eval.lib.traces import load_azure, make_specs
    from eval.sim_policy import simulate

    rows = tmp_path / "rows.jsonl"
    meta = {"meta": {"gpu_name": "NVIDIA H100 80GB HBM3", "server_args": {}}}
    rows.write_text("".join(json.dumps(r) + "\n"
                            for r in [meta, *synthetic_rows(TRUE["per_pair"])]))
    out = tmp_path / "p.json"
    assert profile_model.main(["--model", "llama-3.1-8b", "--fit-only", str(rows),
                               "--out", str(out)]) == 0
    g = GpuModel.from_profile(out)
    conv = ROOT / "eval/data/azure_llm_2023/AzureLLMInferenceTrace_conv.csv"
    specs = make_specs(load_azure(conv), num=40, arrival="poisson", rate=16, seed=0)
    for system in ("fcfs", "rotasched"):
        res = simulate(specs, system, 10_000, g, 1.0, 0.1, 100_000, 600)
        assert res["summary"]["n"] == 40 and res["summary"]["errors"] == 0
    # the pair term is charged: the same replay on a model without it runs faster
    no_pairs = GpuModel.from_profile(out, prefill_s_per_token_pair=0.0)
    slow = simulate(specs, "fcfs", 10_000, g, 1.0, 0.1, 100_000, 600)["sim_seconds"]
    fast = simulate(specs, "fcfs", 10_000, no_pairs, 1.0, 0.1, 100_000, 600)["sim_seconds"]
    assert fast < slow
    run = subprocess.run([sys.executable, "-m", "eval.sim_policy", "--trace", str(conv),
                          "--cap", "10000", "--rates", "16", "--num", "5",
                          "--model", "no-such-model", "--gpu", "h100"],
                         capture_output=True, text=True, cwd=ROOT, check=False)
    assert run.returncode == 2 and "no GPU profile for model no-such-model" in run.stderr


def test_a_warm_up_out_of_memory_skips_those_rows_instead_of_ending_the_profile(
        monkeypatch, tmp_path):
    """DeepSeek-V2-Lite beside a 1.25M-token pool on an H100: the warm-up's largest batch ran
    out of memory, and the profile ended with no row measured."""
    grid = profile_model.GRIDS["default"]
    points, _ = profile_model.build_points(grid["prefill"], grid["decode"], repeats=1,
                                           decode_steps=31, max_row_tokens=65536)
    max_b = max(p["batch_size"] for p in points)
    oom_at = max_b * 128  # the warm-up's (largest batch, 128 tokens) fails, its small rows do not
    calls, rows = _run_worker(monkeypatch, tmp_path, points, oom_at=oom_at)
    assert (max_b, 128, 4) in calls[:3]
    body = rows[1:]
    assert len(body) == len(points)
    skipped = [r for r in body if "skipped" in r]
    assert all(f"out of memory at {oom_at}" in r["skipped"] for r in skipped)
    assert {r["batch_size"] * r["input_len"] >= oom_at for r in skipped} == {True}
    assert sum("skipped" not in r for r in body) > 20
