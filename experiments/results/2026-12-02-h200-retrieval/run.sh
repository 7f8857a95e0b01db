#!/usr/bin/env bash
# The retrieval study of 2026-12-02 on one H200, in one device call (10-minute limit):
#   exact model: retrieval_32k (1200 steps);
#   hyper model: the same run forked at step 1000 (steps 0-999 are at <= 4096 tokens, where
#     HyperAttention is exact by construction), its 32k phase with HyperAttention in all layers
#     but the first and the "local" options;
#   131k model: the exact run continued with retrieval_131k (100 steps at 131k);
# then the needle evaluations (parallel processes: compilation dominates), and the 131k prefill
# timings alone on the GPU at the end. Everything lands in $OUT.
set -u
cd "$(dirname "$0")/../../.."
L=/tmp/logs; mkdir -p $L
VARIANTS='{"local": {"sink_size": 16, "local_window": 256}, "blk1024": {"block_size": 1024}, "samp1024": {"sample_size": 1024}, "bits4": {"lsh_num_projs": 4}}'
T() { echo "$(date +%T) $*" >> $L/timeline.txt; }
train() {  # workdir config log [overrides...]
  local w=$1 c=$2 log=$3; shift 3
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.25 timeout 330 python3 experiments/train_lm.py --config=$c --workdir=$w "$@" 2>&1 \
    | tr '\r' '\n' | grep -v "INFO\|^I1\|^W1" | awk 'NR%20==1 || /rror|Traceback|{/' > $L/$log
}
evalr() {  # workdir out log [flags...]
  local w=$1 o=$2 log=$3; shift 3
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 timeout 240 python3 experiments/eval_retrieval.py --workdir=$w --out=$L/$o "$@" 2>&1 \
    | grep -v "INFO\|^I1\|^W1" > $L/$log
}
T start
train /tmp/r32 experiments/configs/retrieval_32k.py train_exact.log &
EXACT=$!
while [ ! -d /tmp/r32/checkpoints/1000 ] && kill -0 $EXACT 2>/dev/null; do sleep 1; done; sleep 1
cp -r /tmp/r32 /tmp/h32; rm -rf /tmp/h32/checkpoints/*tmp*; T fork hyper
train /tmp/h32 experiments/configs/retrieval_32k.py train_hyper.log --config.attention=hyper \
  --config.hyper_last_layers=5 --config.hyper.sink_size=16 --config.hyper.local_window=256 &
HYPER=$!
wait $EXACT; T exact done
cp -r /tmp/r32 /tmp/r131; rm -rf /tmp/r131/checkpoints/*tmp*
train /tmp/r131 experiments/configs/retrieval_131k.py train_131k.log --config.eval_every=1300 &
LONG=$!
python3 -m experiments.lm.params_file export --workdir=/tmp/r32 --out=$OUT/r32 --parts=3 > /dev/null 2>&1
evalr /tmp/r32 eval_exact_model.json eval_exact_model.log --lengths=8192,16384,32768 \
  --modes=exact,hyper:1,hyper:-1,hyper:0 --samples=3 &
E1=$!
evalr /tmp/r32 eval_exact_model_variants.json eval_exact_model_variants.log --lengths=16384,32768 \
  --modes=hyper:-1:local,hyper:-1:blk1024,hyper:-1:samp1024,hyper:-1:bits4 --variants="$VARIANTS" --samples=3 &
E2=$!
wait $HYPER; T hyper done
evalr /tmp/h32 eval_hyper_model.json eval_hyper_model.log --lengths=8192,16384,32768 \
  --modes=exact,hyper:-1,hyper:0 --samples=3 &
E3=$!
wait $LONG; T 131k done
wait $E1 $E2 $E3; T evals done
for w in r32 h32 r131; do cp /tmp/$w/metrics.jsonl $L/metrics_$w.jsonl; done
tar -cf $OUT/results.tar -C $L .
evalr /tmp/r131 eval_131k_model.json eval_131k_model.log --lengths=32768,131072 \
  --modes=exact,hyper:-1,hyper:-1:local --variants="$VARIANTS" --samples=2 --timing_reps=5
T 131k eval done
nvidia-smi -L > $L/device.txt
tar -cf $OUT/results.tar -C $L .
T end
cat $L/timeline.txt
