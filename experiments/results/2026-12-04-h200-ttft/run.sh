#!/usr/bin/env bash
# Issue 25, nineteenth session, first call (H200, 2026-12-04): where the 28-layer model's
# time to first token at 131k goes. (1) XLA's command-buffer (CUDA graph) flags and defaults;
# (2) exact vs sel 12 x 64 in all layers but the first, with the per-kernel profile of one
# prefill of each; (3) hyper only: the paper's settings and sel 8 x 64; (4) sel 12 x 64 with
# custom calls (the Pallas kernels, sorts, top-k) and loops added to the command buffers, and
# with command buffers off.
#   run: bash experiments/results/2026-12-04-h200-ttft/run.sh
set -u
START=$(date +%s)
left() { local s=$((START + ${BUDGET:-560} - $(date +%s))); [ $s -lt 1 ] && s=1; echo $s; }
L=/tmp/logs; mkdir -p $L
T() { echo "$(date +%T) $*" >> $L/timeline.txt; }
filter() { grep -v "INFO\|^I1\|^W1"; }
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 PYTHONUNBUFFERED=1
T start
XLA_FLAGS=--help python3 -c "import jax; jax.numpy.zeros(1).block_until_ready()" 2>&1 \
  | grep -i -A3 "command_buffer\|graph_min\|graph_level" > $L/xla_command_buffer_flags.txt
T flags
G="python3 -m experiments.benchmarks.bench_generate --num_layers=28 --prompt_lens=131072
  --select_block_size=64"
gen() {  # name, XLA_FLAGS, then the script's flags
  local name=$1 xla=$2; shift 2
  [ $(left) -gt 40 ] || { T "$name skipped"; return; }
  XLA_FLAGS="$xla" timeout $(left) $G "$@" --out=$L/gen_$name.json 2>&1 | filter > $L/gen_$name.log
  T "$name rc=${PIPESTATUS[0]}"
}
gen sel12 "" --select_blocks=12 --profile_out=$L/prof_sel12
gen sel0 "" --attentions=hyper --select_blocks=0
gen sel8 "" --attentions=hyper --select_blocks=8
gen sel12_cb_custom --xla_gpu_enable_command_buffer=+CUSTOM_CALL,+WHILE --attentions=hyper \
  --select_blocks=12
gen sel12_cb_off --xla_gpu_enable_command_buffer= --attentions=hyper --select_blocks=12
nvidia-smi -L > $L/device.txt
tar -cf $OUT/logs.tar -C $L .
cat $L/timeline.txt $L/xla_command_buffer_flags.txt; grep -h "first token\|Error\|error" $L/gen_*.log
