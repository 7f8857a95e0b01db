#!/usr/bin/env bash
# Issues 24 + 25, sixteenth session (H200, 2026-12-03), after train.sh on the same machine (or with
# its params carried in .carry/s12-*.npz): the trained model scored exact and in its own mode at
# 32k and 131k (4 needles per depth bin, perplexity at 32k) once its run is at step 3400; then, on
# a quiet GPU, the op at 131k after the padding fix (select_blocks 12 x 64 vs cuDNN in the same
# call) and the time to first token of the 28-layer random model at 131k (sel 12 x 64, and 8 x 64
# as in the fourteenth session's record; exact beside). Each step runs only if time is left.
#   run: bash experiments/results/2026-12-03-h200-sel12-trained/measure.sh   (carry .whl [.carry])
set -u
source experiments/results/2026-12-03-h200-sel12-trained/common.sh
T measure call start
step=$(ls $W/checkpoints 2>/dev/null | sort -n | tail -n 1)
if [ "${step:-0}" = 3400 ] && [ ! -e $L/eval.done ] && [ $(left) -gt 150 ]; then
  timeout $(left) python3 -m experiments.lm.eval_retrieval --workdir=$W --out=$L/eval_s12_model.json \
    --lengths=32768,131072 --ppl_seq_len=32768 --modes=exact,hyper:-1 --samples=4 2>&1 \
    | filter > $L/eval_s12_model.log
  rc=${PIPESTATUS[0]}; T eval rc=$rc; [ $rc = 0 ] && touch $L/eval.done
fi
B="python3 -m experiments.benchmarks.bench_attention --ns=131072 --causal=true --modes=fwd,fwdbwd
  --reps=10 --select_block_size=64"
if [ ! -e $L/bench.done ] && [ $(left) -gt 60 ]; then
  timeout $(left) $B --impls=cudnn,hyper_pallas --select_blocks=12 --out=$L/bench_sel12x64.json \
    > $L/bench_sel12x64.log 2>&1; rc=$?; T bench sel12 rc=$rc; [ $rc = 0 ] && touch $L/bench.done
fi
for sel in 12 8; do
  [ -e $L/gen_sel$sel.done ] || [ $(left) -lt 100 ] && continue
  timeout $(left) python3 -m experiments.benchmarks.bench_generate --num_layers=28 \
    --prompt_lens=131072 --select_blocks=$sel --select_block_size=64 \
    --out=$L/gen_deep28_sel$sel.json 2>&1 | filter > $L/gen_deep28_sel$sel.log
  rc=${PIPESTATUS[0]}; T gen sel$sel rc=$rc; [ $rc = 0 ] && touch $L/gen_sel$sel.done
done
nvidia-smi -L > $L/device.txt
tar -cf $OUT/measure_logs.tar -C $L .
cat $L/timeline.txt; tail -n 12 $L/eval_s12_model.log $L/gen_deep28_sel*.log 2>/dev/null
grep -hv "^W\|^I\|wrote" $L/bench_sel12x64.log 2>/dev/null
