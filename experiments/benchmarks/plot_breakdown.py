"""Stacked bars of HyperAttention's per-stage forward and backward times (bench --breakdown).

  python -m experiments.benchmarks.plot_breakdown experiments/results/X.json  # X-breakdown.png

Causal levels are summed per stage; one pair of bars (forward, backward) per (n, causal, impl).
"""

import json
import sys
from pathlib import Path

from experiments.benchmarks import common

plt = common.pyplot()

# Records before 2026-11-25 (sorted copies) have sort_gather/unsort; later ones sort_samples.
STAGES = ("hash", "sort_gather", "sort_samples", "blocked", "unsort", "merge", "base_case")


def stage_totals(breakdown):
  """{stage: {"fwd_ms", "bwd_ms"}} summed over the causal levels."""
  parts = [breakdown["noncausal"]] if "noncausal" in breakdown else breakdown["levels"]
  totals = {s: {"fwd_ms": 0.0, "bwd_ms": 0.0} for s in STAGES}
  if "hash" in breakdown:  # causal: hashed once per call, for every level
    parts = parts + [{"hash": breakdown["hash"]}]
  # The base case by the kernel the library runs (cuDNN where it can); older records: base_case.
  for name in ("base_case_cudnn", "base_case_pallas", "base_case_xla", "base_case"):
    if name in breakdown:
      parts = parts + [{"base_case": breakdown[name]}]
      break
  for part in parts:
    for stage, times in part.items():
      if stage not in totals:  # kernel-variant timings (kernels_*) are not stages
        continue
      for key in ("fwd_ms", "bwd_ms"):
        totals[stage][key] += times.get(key, 0.0)
  return totals


def main(path):
  records = [r for r in json.loads(Path(path).read_text())["records"]
             if "breakdown" in r and "error" not in r["breakdown"]]
  fig, ax = plt.subplots(figsize=(2.2 * len(records) + 2, 4.5))
  labels, x = [], 0.0
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for rec in records:
    totals = stage_totals(rec["breakdown"])
    for offset, key in ((0.0, "fwd_ms"), (0.42, "bwd_ms")):
      bottom = 0.0
      for i, stage in enumerate(STAGES):
        val = totals[stage][key]
        ax.bar(x + offset, val, 0.4, bottom=bottom, color=colors[i % len(colors)],
               label=stage if not labels and key == "fwd_ms" else None)
        bottom += val
      ax.text(x + offset, bottom, f"{key[:3]}\n{bottom:.1f}", ha="center", va="bottom",
              fontsize=7)
    labels.append((x + 0.21, f"n={rec['n']}\n{'causal' if rec['causal'] else 'non-causal'}"
                              f"\n{rec['impl']}"))
    x += 1.2
  ax.set_xticks([p for p, _ in labels], [t for _, t in labels], fontsize=8)
  ax.set(ylabel="ms (median)", title="HyperAttention stages: forward (left) / backward (right)")
  ax.legend(fontsize=8)
  ax.margins(y=0.15)
  fig.tight_layout()
  out = Path(path).with_name(Path(path).stem + "-breakdown.png")
  fig.savefig(out, dpi=120)
  print(f"wrote {out}")


if __name__ == "__main__":
  main(sys.argv[1])
