#!/usr/bin/env bash
# Issue 25, nineteenth session, third call (H200, 2026-12-04): time to first token of the random
# 28-layer model with the library's default HyperAttentionConfig (the paper's settings, no
# selection) in all layers but the first against exact (cuDNN) in every layer, both in one
# process: 131k, then 32k and 64k while the call's time lasts. Compile times are the warm-up
# run's.
#   run: bash experiments/results/2026-12-04-h200-ttft/run3.sh
set -u
START=$(date +%s)
left() { local s=$((START + ${BUDGET:-430} - $(date +%s))); [ $s -lt 1 ] && s=1; echo $s; }
L=/tmp/logs3; mkdir -p $L
T() { echo "$(date +%T) $*" >> $L/timeline.txt; }
filter() { grep -v "INFO\|^I1\|^W1"; }
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 PYTHONUNBUFFERED=1
G="python3 -m experiments.benchmarks.bench_generate --num_layers=28 --select_blocks=0"
T start
for n in 131072 32768 65536; do
  [ $(left) -gt 60 ] || { T "$n skipped"; continue; }
  timeout $(left) $G --prompt_lens=$n --out=$L/gen_sel0_$n.json 2>&1 | filter > $L/gen_sel0_$n.log
  T "$n rc=${PIPESTATUS[0]}"
done
nvidia-smi -L > $L/device.txt
tar -cf $OUT/logs3.tar -C $L .
cat $L/timeline.txt; grep -h "first token" $L/gen_*.log
