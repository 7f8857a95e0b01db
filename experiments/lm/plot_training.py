"""Loss curves and throughput of training runs from their ``metrics.jsonl`` files.

  python -m experiments.lm.plot_training --out=experiments/results/X.png \
      exact=path/metrics_exact.jsonl hyper=path/metrics_hyper.jsonl

A run continued in a fresh workdir (params imported, see ``params_file``) names its files in
order, comma-separated: ``hyper=first/metrics.jsonl,continued/metrics.jsonl``. Writes the PNG
(train/validation loss vs step, tokens/s) and a JSON summary beside it.
"""

import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position


def _load(paths):
  rows = [json.loads(line) for path in paths.split(",")
          for line in Path(path).read_text().splitlines() if line.strip()]
  last = {}
  for r in rows:  # a resumed run repeats steps: keep the last record of each (step, split)
    last[(r["split"], r["step"])] = r
  return sorted(last.values(), key=lambda r: r["step"])


def main(argv):
  out = Path(next(a.split("=", 1)[1] for a in argv if a.startswith("--out=")))
  runs = dict(a.split("=", 1) for a in argv if not a.startswith("--"))
  fig, (ax_loss, ax_tps) = plt.subplots(1, 2, figsize=(11, 4))
  summary = {}
  for name, paths in runs.items():
    rows = _load(paths)
    train = [r for r in rows if r["split"] == "train"]
    valid = [r for r in rows if r["split"] == "valid"]
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label=f"{name} train")
    ax_loss.plot([r["step"] for r in valid], [r["loss"] for r in valid], "o--",
                 label=f"{name} valid")
    steady = [r["tokens_per_s"] for r in train[1:]]  # the first window includes compilation
    ax_tps.plot([r["step"] for r in train[1:]], steady, label=name)
    summary[name] = {"final_train_loss": train[-1]["loss"],
                     "final_valid_loss": valid[-1]["loss"] if valid else None,
                     "median_tokens_per_s": statistics.median(steady) if steady else None,
                     "steps": train[-1]["step"]}
  ax_loss.set(xlabel="step", ylabel="loss (nats/byte)", title="loss")
  ax_tps.set(xlabel="step", ylabel="tokens/s", title="training throughput")
  for ax in (ax_loss, ax_tps):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
  print(json.dumps(summary, indent=1))


if __name__ == "__main__":
  main(sys.argv[1:])
