#!/bin/bash
# After a change to the policy, the host tier or the adapter: does serving still behave on a
# GPU? One step per device call (each ends inside the 10-minute limit), logs under $OUT. Needs
# the sglang kit installed in /tmp/site (../shared/gpu/README.md) and `.gpu` (model configs)
# carried along (the traces are in the repo, eval/data); `tests` also needs `.stage/pt` (pytest
# wheels).
#   bash eval/gpu/serving_check.sh tests  # GPU tests (movers, kernels), ~2 min
#   bash eval/gpu/serving_check.sh e2e    # greedy outputs vs uncapped baseline at page 1 and 64,
#                                         # overload soak with aborts, leaks, metrics; ~9 min
#   bash eval/gpu/serving_check.sh slo    # conv trace at 22 req/s, KV cap 60,000: lpm then
#                                         # rotasched back to back on this GPU; ~8 min
#   bash eval/gpu/serving_check.sh mla    # DeepSeek-V2-Lite (MLA pool, triton attention): greedy
#                                         # outputs vs uncapped baseline with rotations, soak; ~8 min
set -uo pipefail
cd "$(dirname "$0")/../.."
case "${1:-}" in
  tests|e2e|slo|mla) ;;
  *) echo "usage: bash eval/gpu/serving_check.sh tests|e2e|slo|mla" >&2; exit 2 ;;
esac
out=${OUT:-/tmp/out}
mkdir -p "$out"
run=(bash eval/gpu/env.sh)
trace=eval/data/azure_llm_2023/AzureLLMInferenceTrace_conv.csv
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$out/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee "$out/commit.txt"
case "$1" in
  tests)
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .stage/pt/*.whl > /dev/null
    timeout 400 "${run[@]}" python3 -m pytest -m gpu tests -q -p no:cacheprovider \
      2>&1 | tee "$out/gpu_tests.log" | tail -15 ;;
  e2e)
    # Three servers share one GPU: a 100-request burst keeps the uncapped baseline inside an
    # 80 GB card (300 requests did not fit beside two rotasched servers on an H100).
    timeout 580 "${run[@]}" python3 -m eval.e2e_rotation --servers baseline rota_p1 rota_p64 \
      --num 100 --max-prompt 1000 --max-output 128 \
      --model-path .gpu/models/llama-3.1-8b --trace "$trace" --budget 540 \
      --out "$out/e2e.json" --out-dir /tmp/e2e_raw 2>&1 | tee "$out/e2e.log" | tail -40
    tar czf "$out/e2e_raw.tgz" -C /tmp e2e_raw ;;
  mla)
    # The kit's sglang-kernel has no FA3/FlashMLA ops: triton attention (eval's servers' default)
    # runs MLA decode and, without a cached prefix, its prefill.
    timeout 580 "${run[@]}" python3 -m eval.e2e_rotation --servers baseline rota_p1 \
      --soak-servers rota_p1 --num 40 --max-prompt 1000 --max-output 600 --cap 6000 \
      --model-path eval/models/deepseek-v2-lite --trace "$trace" --budget 540 \
      --out "$out/e2e_mla.json" --out-dir /tmp/e2e_mla_raw \
      --server-extra="--cuda-graph-max-bs 16" 2>&1 | tee "$out/e2e_mla.log" | tail -40
    tar czf "$out/e2e_mla_raw.tgz" -C /tmp e2e_mla_raw ;;
  slo)
    timeout 580 "${run[@]}" python3 -m eval.sweep_slo --trace "$trace" --systems lpm rotasched \
      --rates 22 --num 300 --cap 60000 --tail 20 --budget 560 --gpu "$(head -c 40 "$out/gpu.txt")" \
      --out "$out/slo_conv_22.json" --raw-dir /tmp/slo_raw \
      --server-extra --cuda-graph-max-bs 128 --rota-host-kv-gb 64 2>&1 | tee "$out/slo.log" | tail -30
    tar czf "$out/slo_raw.tgz" -C /tmp slo_raw ;;
esac
