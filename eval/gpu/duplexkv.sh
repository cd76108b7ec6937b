#!/bin/bash
# DuplexKV's GPU checks, one step per device call, logs under $OUT: the GPU tests of the movers,
# the bandwidth/interference bench (staging vs direct at 16/32/64-token pages), and the direct
# path, kept host copies and write-through inside SGLang (eval.e2e_rotation's extra servers).
# On a bare H200 the steps `tests` and `bench` need only torch (the bench also measures SGLang's
# own HiCache transfers when the sglang kit is installed); `e2e` needs the kit (../shared/gpu)
# and `.gpu` (model configs) carried along; the traces are in the repo (eval/data).
#   bash eval/gpu/duplexkv.sh tests    # GPU tests (carry .stage/pt: pytest wheels), ~1 min
#   bash eval/gpu/duplexkv.sh bench    # staging vs direct at 16/32/64-token pages, ~3-4 min
#   bash eval/gpu/duplexkv.sh e2e      # direct path (page 64) and kept host copies in SGLang, ~9 min
set -uo pipefail
cd "$(dirname "$0")/../.."
case "${1:-}" in
  tests|bench|e2e) ;;
  *) echo "usage: bash eval/gpu/duplexkv.sh tests|bench|e2e" >&2; exit 2 ;;
esac
out=${OUT:-/tmp/out}
mkdir -p "$out"
if [ -d /tmp/site ]; then  # the sglang kit is installed: use it (eval/gpu/env.sh installs superinfer)
  run=(bash eval/gpu/env.sh)
else
  python3 -m pip install -q --no-deps --no-build-isolation --no-index . > /dev/null
  run=()
fi
case "${1:-}" in
  tests)
    python3 -m pip install -q --no-index --find-links .stage/pt pytest > /dev/null
    timeout 300 "${run[@]}" python3 -m pytest -m gpu tests/test_movers_gpu.py -q -p no:cacheprovider \
      2>&1 | tee "$out/gpu_tests.log" | tail -15 ;;
  bench)
    timeout 560 "${run[@]}" python3 -m eval.bench_duplexkv --configs staging:2048:32 direct:16 direct:32 \
      direct:64 direct:64:0:cuda --out "$out/duplexkv_h200.json" 2>&1 | tee "$out/bench.log" | tail -40 ;;
  e2e)
    timeout 580 "${run[@]}" python3 -m eval.e2e_rotation --servers baseline rota_p64 rota_p16_keep \
      --model-path .gpu/models/llama-3.1-8b --trace eval/data/azure_llm_2023/AzureLLMInferenceTrace_conv.csv \
      --budget 540 --out "$out/e2e_p64_keep.json" --out-dir "$out/e2e_raw" 2>&1 | tee "$out/e2e.log" | tail -40 ;;
esac
