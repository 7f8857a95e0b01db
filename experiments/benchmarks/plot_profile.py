"""Stacked bars of where the GPU time of HyperAttention calls goes, from ``profile_kernels.py``
JSONs (or ``bench_generate.py --profile_out``'s): each call's kernel time grouped by what the
kernels do.

  python -m experiments.benchmarks.plot_profile --out=experiments/results/X.png \
      sel12=path/prof_sel12.json paper=path/prof_paper.json

Writes the PNG and a JSON of the grouped milliseconds per call beside it (``.json``).
"""

import json
import re
import sys
from pathlib import Path

from experiments.benchmarks import common

# (group, pattern of the kernel name), first match wins; the rest is _OTHER.
_GROUPS = (("cuDNN attention (exact layers, base case)", r"cudnn"),
           ("level kernels (blocked stage)", r"hyperattn_block_attention"),
           ("run scores (select_blocks)", r"hyperattn_run_scores"),
           ("top-k (XLA, select_blocks)", r"stream_executor::cuda::Run<|topk"),
           ("sorts", r"[Ss]ort"),
           ("GEMMs (projections, MLP, LSH)", r"nvjet|gemm|cutlass|cublas"))
_OTHER = "other (XLA fusions, copies)"


def grouped_ms(profile: dict) -> dict[str, float]:
  """Milliseconds per call of each group; the kernels beyond the JSON's listed top ones count
  as other."""
  out = {name: 0.0 for name, _ in _GROUPS} | {_OTHER: 0.0}
  for kernel in profile["kernels"]:
    group = next((name for name, pattern in _GROUPS if re.search(pattern, kernel["name"])),
                 _OTHER)
    out[group] += kernel["ms_per_call"]
  out[_OTHER] += profile["kernel_ms_per_call"] - sum(out.values())
  return out


def main(argv):
  out = Path(next(a.split("=", 1)[1] for a in argv if a.startswith("--out=")))
  runs = dict(a.split("=", 1) for a in argv if not a.startswith("--"))
  if not runs:
    raise SystemExit("usage: plot_profile --out=X.png NAME=profile.json ...")
  grouped = {name: grouped_ms(json.loads(Path(path).read_text())) for name, path in runs.items()}
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(10, 1.6 + 0.6 * len(grouped)))
  left = [0.0] * len(grouped)
  for group in grouped[next(iter(grouped))]:
    widths = [g[group] for g in grouped.values()]
    ax.barh(list(grouped), widths, left=left, label=group)
    left = [a + b for a, b in zip(left, widths)]
  ax.set(xlabel="GPU kernel time per call (ms)", title="where the time goes")
  ax.invert_yaxis()
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  out.with_suffix(".json").write_text(json.dumps(grouped, indent=1))
  print(json.dumps(grouped, indent=1))


if __name__ == "__main__":
  main(sys.argv[1:])
