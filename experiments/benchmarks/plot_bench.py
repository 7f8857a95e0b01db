"""Log-log plot of a bench_attention.py JSON: median time vs n, one panel per (causal, mode).

  python -m experiments.benchmarks.plot_bench experiments/results/X.json   # writes X.png beside it
Also prints a markdown table of the medians (ms) for the README.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from experiments.benchmarks import common

plt = common.pyplot()


def load(path):
  data = json.loads(Path(path).read_text())
  timed = [r for r in data["records"] if "median_ms" in r]
  return data["meta"], timed


def scaling_exponent(points):
  """Least-squares slope of log(time) vs log(n)."""
  xs = [math.log(n) for n, _ in points]
  ys = [math.log(t) for _, t in points]
  mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
  den = sum((x - mx) ** 2 for x in xs)
  return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else float("nan")


def plot(path):
  meta, recs = load(path)
  modes = sorted({r["mode"] for r in recs}, reverse=True)
  causals = sorted({r["causal"] for r in recs}, reverse=True)
  impls = sorted({r["impl"] for r in recs})
  fig, axes = plt.subplots(len(causals), len(modes), figsize=(6 * len(modes), 4.5 * len(causals)),
                           squeeze=False)
  for i, causal in enumerate(causals):
    for j, mode in enumerate(modes):
      ax = axes[i][j]
      for impl in impls:
        pts = sorted((r["n"], r["median_ms"]) for r in recs
                     if r["impl"] == impl and r["causal"] == causal and r["mode"] == mode)
        if pts:
          ax.plot(*zip(*pts), marker="o", label=impl)
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel("sequence length n")
      ax.set_ylabel("median ms")
      ax.set_title(f"{'causal' if causal else 'non-causal'} {mode}")
      ax.grid(True, which="both", alpha=0.3)
      ax.legend()
  fig.suptitle(f"{meta['device']}, jax {meta['jax']}, B={meta['batch']} H={meta['heads']} "
               f"d={meta['head_dim']} {meta['dtype']}, {meta['date']}")
  fig.tight_layout()
  out = Path(path).with_suffix(".png")
  fig.savefig(out, dpi=110)
  print(f"wrote {out}")
  ns = sorted({r["n"] for r in recs})
  for causal in causals:
    for mode in modes:
      print(f"\n{'causal' if causal else 'non-causal'} {mode} (median ms)\n")
      print("| impl | " + " | ".join(f"{n // 1024}k" for n in ns) + " | exponent |")
      print("|---" * (len(ns) + 2) + "|")
      for impl in impls:
        by_n = {r["n"]: r["median_ms"] for r in recs
                if r["impl"] == impl and r["causal"] == causal and r["mode"] == mode}
        cells = [f"{by_n[n]:.3g}" if n in by_n else "—" for n in ns]
        big = [(n, t) for n, t in by_n.items() if n >= 32768]
        exp = f"{scaling_exponent(big):.2f}" if len(big) >= 2 else "—"
        print(f"| {impl} | " + " | ".join(cells) + f" | {exp} |")


if __name__ == "__main__":
  for p in sys.argv[1:]:
    plot(p)
