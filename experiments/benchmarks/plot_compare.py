"""Two bench_attention.py JSONs of the same sweep side by side: the ratio of their medians.

  python -m experiments.benchmarks.plot_compare BASE.json NEW.json OUT.png

One bar per (n, causal, mode) and implementation: NEW's time / BASE's (1 = unchanged; cuDNN,
timed in both, shows how much the machine itself moved), in two panels: the median of
synchronised calls (host dispatch included) and the pipelined time per call (back to back, the
device's time). Also prints a markdown table of both for the record.
"""

from __future__ import annotations

import sys
from pathlib import Path

from experiments.benchmarks import common
from experiments.benchmarks.plot_bench import load

plt = common.pyplot()


_METRICS = ("median_ms", "pipelined_ms")


def _times(path):
  """{(n, causal, mode, impl): {metric: ms}} of one sweep."""
  _, recs = load(path)
  return {(r["n"], r["causal"], r["mode"], r["impl"]): {m: r[m] for m in _METRICS}
          for r in recs}


def _panel(ax, base, new, keys, metric):
  impls = sorted({k[3] for k in keys})
  cases = sorted({k[:3] for k in keys}, key=lambda c: (-c[1], c[2], c[0]))
  width = 0.8 / len(impls)
  ratio = lambda k: new[k][metric] / base[k][metric]
  for i, impl in enumerate(impls):
    shown = [(j, c) for j, c in enumerate(cases) if (*c, impl) in keys]
    ax.bar([j + (i - (len(impls) - 1) / 2) * width for j, _ in shown],
           [ratio((*c, impl)) for _, c in shown], width, label=impl)
  ax.axhline(1.0, color="black", lw=0.8)
  ax.set_xticks(range(len(cases)))
  ax.set_xticklabels([f"{n // 1024}k\n{'causal' if c else 'full'}\n{m}" for n, c, m in cases],
                     fontsize=8)
  ax.set_ylabel(f"{metric}: new / base")
  ratios = [ratio(k) for k in keys]
  ax.set_ylim(min(0.9, min(ratios) - 0.02), max(1.1, max(ratios) + 0.02))
  ax.legend()
  ax.grid(True, axis="y", alpha=0.3)


def compare(base_path, new_path, out_path):
  base, new = _times(base_path), _times(new_path)
  keys = set(base) & set(new)
  if not keys:
    raise SystemExit(f"{base_path} and {new_path} share no (n, causal, mode, impl) record")
  cases = {k[:3] for k in keys}
  fig, axes = plt.subplots(1, 2, figsize=(2 * max(6, 1.1 * len(cases)), 4))
  for ax, metric in zip(axes, _METRICS):
    _panel(ax, base, new, keys, metric)
  fig.suptitle(f"new = {Path(new_path).stem}, base = {Path(base_path).stem}")
  fig.tight_layout()
  fig.savefig(out_path, dpi=110)
  print(f"wrote {out_path}\n")
  print("| n | causal | mode | impl | median ms base / new | pipelined ms base / new | ratios |")
  print("|---|---|---|---|---|---|---|")
  for k in sorted(keys, key=lambda k: (k[3], -k[1], k[2], k[0])):
    n, causal, mode, impl = k
    b, w = base[k], new[k]
    print(f"| {n // 1024}k | {causal} | {mode} | {impl} | {b['median_ms']:.3f} / "
          f"{w['median_ms']:.3f} | {b['pipelined_ms']:.3f} / {w['pipelined_ms']:.3f} | "
          f"{w['median_ms'] / b['median_ms']:.3f} / {w['pipelined_ms'] / b['pipelined_ms']:.3f} |")


if __name__ == "__main__":
  if len(sys.argv) != 4:
    raise SystemExit(__doc__)
  compare(*sys.argv[1:])
