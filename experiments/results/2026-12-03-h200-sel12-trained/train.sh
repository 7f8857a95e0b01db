#!/usr/bin/env bash
# Issue 24, sixteenth session (H200, 2026-12-03): the "trained with the best option set" row: the
# full recipe (retrieval_32k, then retrieval_131k on the same workdir, 3400 steps, as the exact
# model) trained with HyperAttention + select_blocks 12 x 64 in all layers but the first.
# Resumable across calls and sessions: the run trains until this call's time is up (SIGTERM makes
# it checkpoint), then exports its bf16 params to $OUT/s12-*.npz; copy those to .carry/ and carry
# them: a call that finds no workdir imports them (the exact model went through the same round
# trip at step 2900: fresh Adam moments, the schedule continued). STOP=N ends the 131k phase at
# step N (2900: where the exact model's was exported).
#   run: STOP=2900 bash experiments/results/2026-12-03-h200-sel12-trained/train.sh  (carry .whl [.carry])
set -u
source experiments/results/2026-12-03-h200-sel12-trained/common.sh
quiet() { tr '\r' '\n' | filter | awk 'NR%20==1 || /rror|Traceback|{/'; }
HYPER="--config.attention=hyper --config.hyper_last_layers=5 --config.hyper.select_blocks=12
  --config.hyper.select_block_size=64"
T train call start
step=$(awk '$1 == "step" {print $2}' $L/import.log 2>/dev/null | tail -n 1)
[ "${step:-0}" -ge 2500 ] && touch $L/train_32k.done  # imported past the 32k phase
for phase in 32k 131k; do
  [ -e $L/train_$phase.done ] && continue
  extra=; [ $phase = 131k ] && [ -n "${STOP:-}" ] && extra=--config.num_steps=$STOP
  timeout -k 30 $(left) python3 -m experiments.lm.main \
    --config=experiments/lm/configs/retrieval_$phase.py --workdir=$W $HYPER $extra 2>&1 \
    | quiet >> $L/train_$phase.log
  rc=${PIPESTATUS[0]}; T train $phase rc=$rc
  [ $rc = 0 ] || break
  [ $phase = 131k ] && [ -n "${STOP:-}" ] || touch $L/train_$phase.done
done
cp $W/metrics.jsonl $L/metrics_s12.jsonl 2>/dev/null
python3 -m experiments.lm.params_file export --workdir=$W --out=$OUT/s12 --parts=3 \
  2>&1 | filter >> $L/export.log; T export rc=${PIPESTATUS[0]}
nvidia-smi -L > $L/device.txt
tar -cf $OUT/train_logs.tar -C $L .
cat $L/timeline.txt; tail -n 3 $L/train_*.log $L/export.log
