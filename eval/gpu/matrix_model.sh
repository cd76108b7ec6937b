#!/bin/bash
# One model's matrix points on this GPU (issue 14), one step per device call, each inside the
# 10-minute limit; results and logs under $OUT. Needs the sglang kit in /tmp/site
# (../shared/gpu/README.md). Profiles live in /tmp/models (a copy of eval/models) while the
# machine stays warm, so a sweep can follow a profile with no idle gap in between; commit the
# profile that comes back to eval/models/<model>/ and later sweeps start from it.
#   bash eval/gpu/matrix_model.sh profile MODEL [PROFILE FLAGS...]   # eval.profile_model, ~3 min
#   bash eval/gpu/matrix_model.sh sweep MODEL TRACE [SYSTEMS...]     # knee from the calibrated
#       simulator (eval.knee_plan), then TRACE (conv|code) at 1/1.4/1.8 x knee, SYSTEMS (default
#       lpm rotasched) back to back: ~6 min for an 8B-16B model. KV_GB=<GB> sets the device KV
#       the knee and the cap assume (default 7.86: 60,000 Llama-3.1-8B tokens) where the card
#       holds less beside the weights (Qwen2.5-32B on an H100); NUM=<n> sets the requests per rate
#       (default 300) where device time is short (the knee is simulated at that count: a trace's
#       first requests are not its average); KNEE_METRIC=ttft places the rates around the TTFT
#       knee where fcfs misses TBT long before memory binds (eval.knee_plan --knee-metric);
#       BUDGET=<s> the sweep's seconds (default 430; a device call's limit is 600). A model that
#       starts slowly (Mixtral-8x7B: ~150 s per server) fits one system per call: `sweep MODEL conv lpm`, then
#       `sweep MODEL conv rotasched` on the same warm machine (the knee is kept in /tmp); merge
#       the two results with `python -m eval.merge_slo OUT --pick lpm=...@SHA --pick ...`.
set -uo pipefail
cd "$(dirname "$0")/../.."
step=${1:-} model=${2:-}
if [[ -z "$model" || ! -f "eval/models/$model/config.json" ]] || \
   [[ "$step" != profile && "$step" != sweep ]]; then
  echo "usage: bash eval/gpu/matrix_model.sh profile MODEL | sweep MODEL conv|code [SYSTEMS...]" >&2
  exit 2
fi
shift 2
out=${OUT:-/tmp/out}
models=/tmp/models
mkdir -p "$out" "$models"
cp -rn eval/models/. "$models/"
run=(bash eval/gpu/env.sh)
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
gpu=$(python3 -c "import sys; from eval.lib.gpu_model import gpu_slug; print(gpu_slug(sys.argv[1]))" "$name")
echo "$name ($gpu) at $(git rev-parse --short HEAD 2>/dev/null)" | tee -a "$out/gpu.txt"
case "$step" in
  profile)
    timeout 570 "${run[@]}" python3 -m eval.profile_model --model "$model" --out-dir "$models" \
      --budget 540 "$@" 2>&1 | tee "$out/profile_$model.log" | tail -25
    cp "$models/$model/profile_$gpu.json" "$models/$model/profile_rows.jsonl" "$out/" ;;
  sweep)
    trace=${1:?trace: conv or code}
    shift
    systems=(lpm rotasched)
    [[ $# -gt 0 ]] && systems=("$@")
    plan="$out/plan_${gpu}_${model}_${trace}.json"
    timeout 120 "${run[@]}" python3 -m eval.knee_plan --model "$model" --gpu "$gpu" \
      --traces "$trace" --systems "${systems[@]}" --models-dir "$models" \
      --sim-out "/tmp/knees_${gpu}_$model.json" --resume --out "$plan" ${KV_GB:+--kv-gb "$KV_GB"} \
      ${NUM:+--num "$NUM"} ${KNEE_METRIC:+--knee-metric "$KNEE_METRIC"} \
      2>&1 | tail -4 || exit 1
    cp "/tmp/knees_${gpu}_$model.json" "$out/sim_knees_${gpu}_$model.json"
    bash eval/gpu/run_plan.sh "$plan" "${BUDGET:-430}" ;;
esac
