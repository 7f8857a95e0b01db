#!/usr/bin/env bash
# Issue 24, fourteenth session, call A (H200, 2026-12-03): the thirteenth session's 131k model
# (step 2900, carried as bf16 params in .carry/, ignored by git) imported into a workdir (the
# optimizer's step counts at 2900: the schedule continues at its final learning rate; fresh Adam
# moments) and trained on with retrieval_131k (now 3400 steps: 900 at 131k) until the call's time
# is up; SIGTERM makes it checkpoint, and call B (run_b.sh) resumes it on the same warm machine.
#   run: bash experiments/results/2026-12-03-h200-recipe4/run_a.sh   (carry .whl and .carry)
set -u
START=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
L=/tmp/logs; mkdir -p $L
T() { echo "$(date +%T) $*" >> $L/timeline.txt; }
quiet() { tr '\r' '\n' | grep -v "INFO\|^I1\|^W1" | awk 'NR%20==1 || /rror|Traceback|{/'; }
T start
python3 -m experiments.lm.params_file import --files='.carry/r131-*.npz' --workdir=/tmp/r131 2>&1 \
  | grep -v "INFO\|^I1\|^W1" > $L/import.log || exit
T imported
XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout -k 30 $((START + 545 - $(date +%s))) python3 -m experiments.lm.main \
  --config=experiments/lm/configs/retrieval_131k.py --workdir=/tmp/r131 2>&1 | quiet > $L/train_131k_a.log
T train 131k stopped
nvidia-smi -L > $L/device.txt
tar -cf $OUT/results_a.tar -C $L .
cat $L/timeline.txt $L/import.log; tail -n 4 $L/train_131k_a.log; ls /tmp/r131/checkpoints
