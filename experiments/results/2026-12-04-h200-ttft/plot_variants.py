"""The second call's run-score / run-extrema variants as tune_op's stacked bars (one process
each, so cuDNN's line is the first process's).
  run: PYTHONPATH=. python experiments/results/2026-12-04-h200-ttft/plot_variants.py
"""
import json
from experiments.benchmarks import tune_op
R = "experiments/results/2026-12-04-h200-ttft/call2"
labels = {"twodots": "two dots (kept),\nextrema untransposed",
          "join": "one dot, stacked,\nextrema untransposed",
          "dup": "one dot, q loaded twice,\nextrema untransposed",
          "transposed": "one dot, stacked,\nextrema transposed (kept)"}
records = []
for name, label in labels.items():
  recs = json.load(open(f"{R}/tune_{name}.json"))["records"]
  if not records:
    records.append(recs[0])  # cuDNN of the first process
  rec = dict(next(r for r in recs if "kernel_ms" in r), field=label)
  records.append(rec)
tune_op.plot(records, "experiments/results/2026-12-04-h200-ttft/run_score_variants.png")
