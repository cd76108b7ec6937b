#!/bin/bash
# The SLO sweep on a 2-GPU machine: two systems per GPU at the same time (each GPU runs its
# systems one after another, so no two servers ever share a GPU), then one merged result.
#   usage: bash eval/run_sweep_2gpu.sh TRACE OUTDIR [sweep_slo.py flags... [--server-extra ...]]
set -u
trace=$1; out=$2; shift 2
mkdir -p "$out"
CUDA_VISIBLE_DEVICES=0 python3 eval/sweep_slo.py --trace "$trace" --systems fcfs rotasched-lvf \
  --port 30000 --out "$out/part0.json" --raw-dir "$out/raw0" "$@" > "$out/part0.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1 python3 eval/sweep_slo.py --trace "$trace" --systems rotasched lpm \
  --port 30500 --out "$out/part1.json" --raw-dir "$out/raw1" "$@" > "$out/part1.log" 2>&1 &
wait
python3 eval/merge_slo.py "$out/slo.json" "$out/part0.json" "$out/part1.json"
