"""Profile a model on this GPU with SGLang's own one-batch benchmark and fit the simulator's costs.

Runs ``sglang.benchmark.one_batch`` (``python -m sglang.bench_one_batch``) in-process over a grid
of (batch, prompt length) points, the model loaded once: prefill rows (output 1, each repeated,
the fastest kept) and decode rows (``--decode-steps`` steps, the median kept). The server flags
are the eval servers' (eval.lib.server.DUMMY_SERVER_FLAGS: dummy weights, triton attention,
decode CUDA graphs up to ``--cuda-graph-max-bs``, no prefill CUDA graph). Every row is written
to ``--rows`` (JSON lines) as it finishes; then eval.lib.profile_fit fits

    prefill_s = overhead + s_per_token * tokens [+ s_per_token_pair * causal pairs]
    decode_s  = base + s_per_req * batch + s_per_kv_token * kv_tokens

and the profile goes to eval/models/<model>/profile_<gpu>.json (<gpu>: e.g. h100, h100-tp2;
rows, fit, residuals, KV bytes per token, SGLang's max_total_num_tokens, resolved server args,
command, versions, date), which ``python -m eval.sim_policy --model <model> --gpu <gpu>`` then
simulates.

    python -m eval.profile_model --model llama-3.1-8b --out-dir $OUT  # on the GPU, ~2 min
    python -m eval.profile_model --model qwen2.5-32b --tp 2 --repeats 1 --out-dir $OUT
    python -m eval.profile_model --model llama-3.1-8b --dry-run       # the grid, anywhere
    python -m eval.profile_model --model llama-3.1-8b --fit-only ROWS.jsonl --gpu-name h100
    python -m eval.profile_model --model mixtral-8x7b \\
        --refit eval/models/mixtral-8x7b/profile_h200.json      # the rows fitted again

Arguments after ``--`` go to SGLang's ServerArgs as they are (they come last, so they win).
Rows beyond the context are skipped up front, rows beyond the KV pool once SGLang has sized it;
a row that runs out of GPU memory is recorded as skipped and so is every later one at least as
large (with TP > 1 an
out-of-memory on one rank may hang the others: keep ``--max-row-tokens`` lower there).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from eval.lib.gpu_model import MODELS_DIR, GpuModel, gpu_slug
from eval.lib.jsonfiles import command_line, read_jsonl, write_json
from eval.lib.profile_fit import (
    captured_graph_max_bs,
    describe_fit,
    fit_rows,
    kv_bytes_per_token,
)
from eval.lib.server import DUMMY_SERVER_FLAGS
from superinfer.profiles import moe_routing

PLAN_ENV = "EVAL_PROFILE_PLAN"  # the worker's plan (spawned TP ranks inherit the environment)
BUDGET_MARGIN_S = 20.0  # kept for the fit and the write after the last row

# (batch, input_len) points. Prefill rows separate the per-token and the attention (pair) terms:
# the same tokens as one long prompt or many short ones (the replayed Azure prompts reach ~7.5k
# tokens, the chunks 8k). Decode rows vary batch and KV apart, KV up to 64k tokens (the sweeps'
# KV cap is 60,000).
GRIDS: dict[str, dict[str, list[tuple[int, int]]]] = {
    "default": {
        "prefill": [(1, n) for n in (64, 256, 1024, 2048, 4096, 8192, 16384)]
        + [(4, n) for n in (256, 1024, 4096, 8192)]
        + [(16, n) for n in (128, 512, 1024, 2048)]
        + [(64, n) for n in (64, 128, 256, 512)],
        # up to 512 streams: a model with little KV per token (MLA) runs batches that large
        # under the sweeps' cap, and a fit past its rows extrapolates (MoE steps flatten once
        # every expert is active)
        "decode": [(b, n) for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
                   for n in (128, 512, 2048, 8192) if b * n <= 65536]
        # past the eval servers' CUDA-graph limit (--cuda-graph-max-bs 128), short enough to
        # stay under a lowered --max-row-tokens: what an eager step costs (profile_fit)
        + [(256, 32), (512, 32)],
    },
    "quick": {
        "prefill": [(1, 256), (1, 2048), (1, 8192), (16, 512), (4, 2048)],
        "decode": [(1, 128), (1, 4096), (16, 512), (16, 2048), (64, 128), (64, 512)],
    },
}
WARMUP = [(1, 256, 8), (8, 512, 8)]  # plus the largest batch at 128 tokens, unrecorded


def log(msg: str) -> None:
    print(f"[profile {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- the plan --------------------------------------------------------------------------------
def parse_point(text: str) -> tuple[int, int]:
    try:
        b, n = text.lower().split("x")
        point = int(b), int(n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: want BATCHxINPUT_LEN, e.g. 16x512") from None
    if min(point) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: batch and length must be >= 1")
    return point


def build_points(prefill: list[tuple[int, int]], decode: list[tuple[int, int]], *,
                 repeats: int, decode_steps: int, max_row_tokens: int,
                 context_len: int | None = None, kv_capacity: int | None = None
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows to run, rows skipped and why). Prefill rows have output_len 1 and come first,
    repeat by repeat (a first occurrence's JIT only hits repeat 0), smallest first; decode rows
    follow, fewest prefill tokens first, so a cut budget loses the largest."""
    todo, skipped = [], []
    planned = ([("prefill", b, n, 1) for b, n in sorted(set(prefill), key=lambda p: p[0] * p[1])]
               + [("decode", b, n, decode_steps + 1)
                  for b, n in sorted(set(decode), key=lambda p: (p[0] * p[1], p[0]))])
    for kind, b, n, o in planned:
        row = {"kind": kind, "batch_size": b, "input_len": n, "output_len": o}
        why = None
        if b * n > max_row_tokens:
            why = f"batch * input_len {b * n} > --max-row-tokens {max_row_tokens}"
        elif context_len is not None and n + o > context_len:
            why = f"input_len + output_len {n + o} > context length {context_len}"
        elif kv_capacity is not None and b * (n + o) > kv_capacity:
            why = f"batch * (input_len + output_len) {b * (n + o)} > KV pool {kv_capacity}"
        if why:
            skipped.append({**row, "skipped": why})
        else:
            todo.append(row)
    prefills = [r for r in todo if r["kind"] == "prefill"]
    decodes = [r for r in todo if r["kind"] == "decode"]
    ordered = [{**r, "repeat": k} for k in range(repeats) for r in prefills]
    return ordered + [{**r, "repeat": 0} for r in decodes], skipped


def estimate_s(points: list[dict[str, Any]], gpu: GpuModel) -> float:
    """Seconds the rows take on ``gpu`` (prefill, then every decode step)."""
    total = 0.0
    for r in points:
        b, n, o = r["batch_size"], r["input_len"], r["output_len"]
        total += gpu.prefill_s(b * n, b * n * (n + 1) // 2)
        total += sum(gpu.decode_s(b, b * (n + 1 + i)) for i in range(o - 1))
    return total


# --- the GPU side ----------------------------------------------------------------------------
def _json_safe(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    return str(v)


SERVER_ARG_KEYS = ("model_path", "load_format", "tp_size", "dtype", "kv_cache_dtype",
                   "attention_backend", "prefill_attention_backend", "decode_attention_backend",
                   "sampling_backend", "mem_fraction_static", "max_total_tokens",
                   "chunked_prefill_size", "max_prefill_tokens", "page_size",
                   "disable_cuda_graph", "cuda_graph_max_bs", "disable_prefill_cuda_graph",
                   "disable_overlap_schedule", "enable_dp_attention", "ep_size",
                   "moe_runner_backend")


def server_args_summary(sa: Any) -> dict[str, Any]:
    out = {k: _json_safe(getattr(sa, k, None)) for k in SERVER_ARG_KEYS if hasattr(sa, k)}
    try:  # the decode CUDA graph batch sizes (0.5.17: cuda_graph_config[Phase.DECODE])
        from sglang.srt.model_executor.cuda_graph_config import Phase

        dec = sa.cuda_graph_config[Phase.DECODE]
        out["decode_cuda_graph_max_bs"] = _json_safe(getattr(dec, "max_bs", None))
        out["decode_cuda_graph_bs"] = _json_safe(getattr(dec, "bs", None))
    except Exception:  # noqa: BLE001 - informational only
        pass
    return out


def _quiet(*_: Any, **__: Any) -> None:
    pass


def profile_worker(server_args: Any, port_args: Any, bench_args: Any, gpu_id: int,
                   tp_rank: int) -> None:
    """Stands in for one_batch.latency_test (same signature, run by one_batch.main once per TP
    rank): load the model once, warm up, run the plan's rows, rank 0 writing each as it ends."""
    import torch
    from sglang.benchmark import one_batch as ob

    plan = json.loads(os.environ[PLAN_ENV])
    ob.initialize_moe_config(server_args)
    ob.initialize_fp8_gemm_config(server_args)
    ob.initialize_fp4_gemm_config(server_args)
    ob.configure_logger(server_args, prefix=f" TP{tp_rank}")
    # The eval models are a config.json without a tokenizer; the benchmark's synthetic inputs
    # are token ids, so no tokenizer is needed.
    ob.get_tokenizer = lambda *a, **k: None
    runner, _ = ob.load_model(server_args, port_args, gpu_id, tp_rank)
    mr = runner.torch_runner
    lead = tp_rank == 0
    out = open(plan["rows_path"], "a") if lead else None  # noqa: SIM115 - closed below

    def emit(rec: dict[str, Any]) -> None:
        if out is not None:
            out.write(json.dumps(rec) + "\n")
            out.flush()

    def agree(flag: bool) -> bool:
        """Rank 0's decision, on every rank (a row skipped on one rank only would hang)."""
        if server_args.tp_size == 1:
            return flag
        box = [flag]
        torch.distributed.broadcast_object_list(box, src=0, group=mr.tp_group.cpu_group)
        return bool(box[0])

    capacity = int(mr.max_total_num_tokens)
    context = int(getattr(mr.model_config, "context_len", 0) or 0) or None
    pool = getattr(getattr(mr, "token_to_kv_pool", None), "mem_usage", None)
    import sglang

    emit({"meta": {"gpu_name": torch.cuda.get_device_name(gpu_id),
                   "max_total_num_tokens": capacity, "context_len": context,
                   "kv_pool_gb": pool, "sglang_version": sglang.__version__,
                   "torch_version": torch.__version__, "cuda_version": torch.version.cuda,
                   "server_args": server_args_summary(mr.server_args)}})
    if lead:
        log(f"loaded on {torch.cuda.get_device_name(gpu_id)}: max_total_num_tokens {capacity}, "
            f"context {context}, KV pool {pool} GB")

    def run_once(b: int, n: int, o: int) -> dict[str, Any] | None:
        reqs = ob.prepare_synthetic_inputs_for_latency_test(b, n)
        return ob.latency_test_run_once(
            run_name="profile", model_runner=runner, rank_print=_quiet, reqs=reqs,
            batch_size=b, input_len=n, output_len=o, log_decode_step=0, profile=False,
            profile_record_shapes=False, profile_activities=("CPU", "GPU"), profile_prefix="",
            profile_stage="all", tp_rank=tp_rank)

    t0 = time.monotonic()
    max_b = max([r["batch_size"] for r in plan["points"]] + [1])
    oom_from: int | None = None  # prefill tokens (batch x input) that ran out of memory
    for b, n, o in [*WARMUP, (max_b, 128, 4)]:
        if b * (n + o) <= capacity and (context is None or n + o <= context):
            try:
                run_once(b, n, o)
            except torch.cuda.OutOfMemoryError as e:
                # e.g. a MoE model's workspace for the largest batch beside a full KV pool:
                # the rows that big are skipped below instead of ending the profile
                oom_from = b * n if oom_from is None else min(oom_from, b * n)
                torch.cuda.empty_cache()
                if lead:
                    log(f"warm-up {b}x{n}: out of memory ({str(e).splitlines()[0][:120]}); "
                        f"rows from {oom_from} prefill tokens on are skipped")
    if lead:
        log(f"warm-up done in {time.monotonic() - t0:.0f}s; {len(plan['points'])} rows")
    for i, row in enumerate(plan["points"], 1):
        b, n, o = row["batch_size"], row["input_len"], row["output_len"]
        why = None
        if b * (n + o) > capacity:
            why = f"batch * (input_len + output_len) {b * (n + o)} > KV pool {capacity}"
        elif context is not None and n + o > context:
            why = f"input_len + output_len {n + o} > context length {context}"
        elif oom_from is not None and b * n >= oom_from:
            why = f"out of memory at {oom_from} prefill tokens before"
        if agree(time.time() > plan["deadline_unix"]):
            why = "budget"
        if why:
            emit({**row, "skipped": why})
            continue
        tic = time.monotonic()
        try:
            res = run_once(b, n, o)
        except torch.cuda.OutOfMemoryError as e:
            oom_from = b * n if oom_from is None else min(oom_from, b * n)
            torch.cuda.empty_cache()
            emit({**row, "skipped": f"out of memory: {str(e).splitlines()[0][:200]}"})
            if lead:
                log(f"[{i}/{len(plan['points'])}] {row['kind']} {b}x{n}: out of memory")
            continue
        if res is None:
            emit({**row, "skipped": "one_batch skipped it (KV pool)"})
            continue
        rec = {**row, **{k: res[k] for k in ("prefill_latency", "median_decode_latency")
                         if k in res}, "wall_s": round(time.monotonic() - tic, 3)}
        emit(rec)
        if lead:
            dec = rec.get("median_decode_latency")
            log(f"[{i}/{len(plan['points'])}] {row['kind']:>7} batch {b:3d} x {n:5d} tokens: "
                f"prefill {1e3 * rec['prefill_latency']:8.2f} ms"
                + (f", decode step {1e3 * dec:6.2f} ms" if dec is not None else "")
                + f"  ({time.monotonic() - tic:.1f}s)")
    if out is not None:
        out.close()


def run_benchmark(args: argparse.Namespace, points: list[dict[str, Any]]) -> None:
    """one_batch.main with profile_worker as its latency test: it sets SGLang's environment,
    the decode CUDA graphs' largest batch and (TP > 1) one process per rank."""
    from sglang.benchmark import one_batch as ob
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(prog="sglang ServerArgs")
    ServerArgs.add_cli_args(parser)
    ob.BenchArgs.add_cli_args(parser)
    batches = sorted({p["batch_size"] for p in points}) or [1]
    argv = [*args.sglang_argv, "--batch-size", *map(str, batches), "--result-filename", ""]
    sa_ns = parser.parse_args(argv)
    server_args = ServerArgs.from_cli_args(sa_ns)
    bench_args = ob.BenchArgs.from_cli_args(sa_ns)
    os.environ[PLAN_ENV] = json.dumps({"points": points, "rows_path": str(args.rows),
                                       "deadline_unix": args.deadline_unix})
    ob.latency_test = profile_worker
    ob.main(server_args, bench_args)


# --- the profile -----------------------------------------------------------------------------
def build_profile(rows_all: list[dict[str, Any]], *, model: str, config: dict[str, Any],
                  tp_size: int, gpu_name: str | None, prefill_terms: str, command: str,
                  grid: dict[str, Any], wall_s: float | None = None) -> dict[str, Any]:
    metas = [r["meta"] for r in rows_all if "meta" in r]
    meta = metas[-1] if metas else {}
    rows = [r for r in rows_all if "meta" not in r and "skipped" not in r]
    skipped = [r for r in rows_all if "skipped" in r]
    gpu_name = gpu_name or meta.get("gpu_name")
    if not gpu_name:
        raise ValueError("no GPU name in the rows (no meta record): pass --gpu-name")
    sa = meta.get("server_args", {})
    tp_size = int(sa.get("tp_size") or tp_size)  # what SGLang ran (e.g. --tp-size after --)
    kv = kv_bytes_per_token(config, tp_size, sa.get("kv_cache_dtype"))
    kv["max_total_num_tokens"] = meta.get("max_total_num_tokens")
    kv["pool_gb"] = meta.get("kv_pool_gb")
    if kv["pool_gb"] and kv["max_total_num_tokens"]:
        kv["sglang_bytes_per_token"] = round(kv["pool_gb"] * 2**30 / kv["max_total_num_tokens"])
    fit = fit_rows(rows, prefill_terms, moe_routing(config), captured_graph_max_bs(sa))
    return {
        "model": model, "gpu": gpu_slug(gpu_name, tp_size), "gpu_name": gpu_name,
        "tp_size": tp_size,
        "sglang_version": meta.get("sglang_version"), "torch_version": meta.get("torch_version"),
        "cuda_version": meta.get("cuda_version"),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command, "wall_s": wall_s,
        "server_args": sa,
        "scheduler": {"chunked_prefill_size": sa.get("chunked_prefill_size"),
                      "max_prefill_tokens": sa.get("max_prefill_tokens")},
        "kv": kv, "fit": fit, "grid": grid, "rows": rows, "skipped": skipped,
        "note": ("eval.profile_model: sglang.benchmark.one_batch rows (prefill = the whole batch "
                 "in one forward, fastest repeat; decode = median step, synchronous, no overlap "
                 "scheduling) fitted by eval.lib.profile_fit; the simulator's copy-slowdown model "
                 "is the H200's and not part of this profile"),
    }


def refit(path: Path, args: argparse.Namespace, command: str) -> int:
    """Fit a written profile's rows again (``--refit``) and rewrite it in place."""
    doc = json.loads(path.read_text())
    before = describe_fit(doc["fit"])
    doc["fit"] = fit_rows(doc["rows"], args.prefill_terms, moe_routing(args.config),
                          captured_graph_max_bs(doc.get("server_args") or {}))
    doc["refit"] = {"command": command,
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "before": before}
    write_json(path, doc)
    print(f"was:\n{before}\nnow:\n{describe_fit(doc['fit'])}", flush=True)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a folder of eval/models (its config.json)")
    ap.add_argument("--model-path", type=Path, default=None,
                    help="default eval/models/<model>")
    ap.add_argument("--tp", type=int, default=1, help="tensor parallel size (--tp-size)")
    ap.add_argument("--grid", choices=sorted(GRIDS), default="default")
    ap.add_argument("--prefill-points", type=parse_point, nargs="+", default=None,
                    metavar="BxL", help="replace the grid's prefill points, e.g. 1x8192 16x512")
    ap.add_argument("--decode-points", type=parse_point, nargs="+", default=None,
                    metavar="BxL", help="replace the grid's decode points")
    ap.add_argument("--repeats", type=int, default=2, help="runs per prefill point (fastest kept)")
    ap.add_argument("--decode-steps", type=int, default=31,
                    help="decode steps per decode row (the median is kept)")
    ap.add_argument("--max-row-tokens", type=int, default=65536,
                    help="largest batch * input_len (prefilled in one forward)")
    ap.add_argument("--cuda-graph-max-bs", type=int, default=128,
                    help="as the eval servers (--server-extra --cuda-graph-max-bs 128)")
    ap.add_argument("--prefill-terms", choices=("auto", "linear", "quadratic"), default="auto")
    ap.add_argument("--budget", type=float, default=540.0,
                    help="wall seconds for the whole run; rows left at the end are skipped")
    ap.add_argument("--gpu-name", default=None,
                    help="name the GPU (default: torch.cuda.get_device_name); slugged for the file")
    ap.add_argument("--out", type=Path, default=None,
                    help="default <out-dir>/<model>/profile_<gpu>.json")
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="where profiles go, as <model>/profile_<gpu>.json (default: "
                         "--models-dir, i.e. eval/models; on the GPU machine e.g. $OUT)")
    ap.add_argument("--rows", type=Path, default=None,
                    help="raw rows, JSON lines (default <out-dir>/<model>/profile_rows.jsonl "
                         "with --out-dir, else /tmp/profile_<model>_<pid>.jsonl)")
    ap.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    ap.add_argument("--fit-only", type=Path, default=None, metavar="ROWS_JSONL",
                    help="no GPU: fit rows written before (by --rows) and write the profile")
    ap.add_argument("--refit", type=Path, default=None, metavar="PROFILE_JSON",
                    help="no GPU: fit a written profile's rows again with this fitting code and "
                         "rewrite it in place (the rows and all else kept; `refit` records when)")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the grid and its estimated time (built-in H200 8B model)")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.decode_steps < 2 or args.tp < 1:
        ap.error("--repeats >= 1, --decode-steps >= 2, --tp >= 1")
    args.model_path = args.model_path or args.models_dir / args.model
    config_path = args.model_path / "config.json"
    if not config_path.exists():
        ap.error(f"{config_path} not found (models: "
                 f"{', '.join(p.name for p in sorted(args.models_dir.glob('*/config.json')))})")
    args.config = json.loads(config_path.read_text())
    if args.rows is None:
        args.rows = (args.out_dir / args.model / "profile_rows.jsonl" if args.out_dir
                     else Path(f"/tmp/profile_{args.model}_{os.getpid()}.jsonl"))
    args.out_dir = args.out_dir or args.models_dir
    args.sglang_argv = ["--model-path", str(args.model_path), *DUMMY_SERVER_FLAGS,
                        "--tp-size", str(args.tp),
                        "--cuda-graph-max-bs", str(args.cuda_graph_max_bs), *extra]
    args.extra = extra
    return args


def main(argv: list[str] | None = None) -> int:
    start = time.monotonic()
    args = parse_args(argv)
    command = command_line("eval.profile_model", argv)
    grid = GRIDS[args.grid]
    prefill = args.prefill_points or grid["prefill"]
    decode = args.decode_points or grid["decode"]
    cfg = args.config.get("text_config") or args.config
    context = cfg.get("max_position_embeddings")
    points, skipped = build_points(prefill, decode, repeats=args.repeats,
                                   decode_steps=args.decode_steps,
                                   max_row_tokens=args.max_row_tokens, context_len=context)
    grid_doc = {"name": args.grid, "prefill": [list(p) for p in prefill],
                "decode": [list(p) for p in decode], "repeats": args.repeats,
                "decode_steps": args.decode_steps, "max_row_tokens": args.max_row_tokens,
                "sglang_argv": args.sglang_argv}
    kv = kv_bytes_per_token(args.config, args.tp)
    log(f"{args.model}: {len(points)} rows ({len(skipped)} skipped up front), KV "
        f"{kv['bytes_per_token']} B/token ({kv['formula']}); "
        f"~{estimate_s(points, GpuModel()):.0f}s of GPU work for Llama-3.1-8B on an H200, "
        f"plus start-up")
    if args.dry_run:
        for r in skipped:
            print("  skip", r)
        for r in points:
            print("  run ", r)
        print("sglang args:", " ".join(args.sglang_argv))
        return 0
    if args.refit:
        return refit(args.refit, args, command)
    failed = None
    if args.fit_only:
        rows_all = read_jsonl(args.fit_only)
    else:
        args.deadline_unix = time.time() + args.budget - BUDGET_MARGIN_S - (time.monotonic()
                                                                           - start)
        args.rows.parent.mkdir(parents=True, exist_ok=True)
        args.rows.write_text("")
        with open(args.rows, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in skipped)
        log(f"rows -> {args.rows}; sglang {' '.join(args.sglang_argv)}")
        # A SIGTERM (a command's time limit) unwinds, so what was measured is still fitted.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        try:
            run_benchmark(args, points)
        except BaseException as e:  # noqa: BLE001 - fit what was measured, then fail
            failed = e
            log(f"benchmark stopped: {type(e).__name__}: {e}")
        rows_all = read_jsonl(args.rows)
    wall = None if args.fit_only else round(time.monotonic() - start, 1)
    try:
        doc = build_profile(rows_all, model=args.model, config=args.config, tp_size=args.tp,
                            gpu_name=args.gpu_name, prefill_terms=args.prefill_terms,
                            command=command, grid=grid_doc, wall_s=wall)
    except ValueError as e:
        log(f"no profile written: {e} (rows in {args.fit_only or args.rows})")
        return 1
    out = args.out or args.out_dir / args.model / f"profile_{doc['gpu']}.json"
    write_json(out, doc)
    n_skip = sum(1 for r in doc["skipped"] if r["skipped"] != "budget")
    n_budget = len(doc["skipped"]) - n_skip
    log(f"{len(doc['rows'])} rows measured, {n_skip} skipped, {n_budget} cut by the budget")
    print(describe_fit(doc["fit"]), flush=True)
    log(f"profile -> {out}  (python -m eval.sim_policy --model {args.model} --gpu {doc['gpu']})")
    if failed is not None:
        log("the benchmark did not finish: the profile holds what it measured")
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # The profile is written; leave without waiting on threads SGLang may have left running.
    os._exit(code)
