#!/bin/bash
# Run one eval.sweep_plan plan on this GPU inside one device call; the merged results, the log and
# the raw records (a tarball) land in $OUT. Needs the sglang kit in /tmp/site.
#   bash eval/gpu/run_plan.sh PLAN.json [BUDGET_S (default 540)] [sweep_plan flags, e.g. --systems lpm]
set -uo pipefail
cd "$(dirname "$0")/../.."
plan=${1:?usage: bash eval/gpu/run_plan.sh PLAN.json [BUDGET_S] [sweep_plan flags]}
budget=${2:-540}
shift $(( $# < 2 ? $# : 2 ))
out=${OUT:-/tmp/out}
tag=$(basename "$plan" .json)
sweep=/tmp/sweep_$tag
mkdir -p "$out"
timeout $(( budget + 20 )) bash eval/gpu/env.sh python3 -m eval.sweep_plan --plan "$plan" \
  --out-dir "$sweep" --budget "$budget" "$@" 2>&1 | tee "$out/sweep_$tag.log" | tail -30
cp "$sweep"/slo_*.json "$out/"
tar czf "$out/raw_$tag.tgz" -C "$sweep" raw
