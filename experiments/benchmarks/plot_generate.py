"""Bar chart of bench_generate.py JSONs: time to first token per prompt length, exact vs hyper.

  python -m experiments.benchmarks.plot_generate A.json [B.json ...] --out=X.png
One panel per JSON (its model in the title); the speed-up of hyper over exact above each pair.
Also prints a markdown table (time to first token ms, decode tokens/s) for the READMEs.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from experiments.benchmarks import common

plt = common.pyplot()


def _rows(path):
  data = json.loads(Path(path).read_text())
  by = {(r["prompt_len"], r["attention"]): r for r in data["rows"]}
  lens = sorted({n for n, _ in by})
  return data["meta"], by, lens


def plot(paths: list[str], out: str) -> None:
  fig, axes = plt.subplots(1, len(paths), figsize=(5.5 * len(paths), 4.2), squeeze=False)
  print("| model | prompt | exact TTFT (ms) | hyper TTFT (ms) | speed-up | decode tok/s exact / hyper |")
  print("|---|---|---|---|---|---|")
  for ax, path in zip(axes[0], paths):
    meta, by, lens = _rows(path)
    layers = meta.get("model", {}).get("num_layers", "?")
    # The option that sets a hyper layer's cost: HyperAttentionConfig's select_blocks (records
    # from before the option hold the paper's settings).
    hyper_config = meta.get("model", {}).get("hyper")
    select = re.search(r"select_blocks=(\d+)", hyper_config or "")
    option = ("?" if hyper_config is None else
              f"select_blocks={select.group(1)}" if select and select.group(1) != "0" else
              "paper settings")
    missing = [key for key in ((n, a) for n in lens for a in ("exact", "hyper")) if key not in by]
    if missing:
      raise SystemExit(f"{path}: no row for (prompt_len, attention) {missing}: plot_generate "
                       "compares both models (bench_generate's default --attentions)")
    xs = range(len(lens))
    exact = [by[(n, "exact")]["time_to_first_token_ms"] for n in lens]
    hyper = [by[(n, "hyper")]["time_to_first_token_ms"] for n in lens]
    ax.bar([x - 0.2 for x in xs], exact, 0.4, label="exact (cuDNN on GPU)")
    ax.bar([x + 0.2 for x in xs], hyper, 0.4, label="hyper, all layers but the first")
    for x, e, h in zip(xs, exact, hyper):
      ax.text(x, max(e, h) * 1.02, f"{e / h:.2f}x", ha="center", fontsize=9)
    ax.set_xticks(list(xs), [str(n) for n in lens])
    ax.set_xlabel("prompt length")
    ax.set_ylabel("time to first token (ms)")
    ax.set_title(f"{layers} layers, hyper: {option}\n{meta.get('device', '')}, "
                 f"{meta.get('date', '')}", fontsize=10)
    ax.legend(fontsize=8)
    for n, e, h in zip(lens, exact, hyper):
      print(f"| {layers} layers, {option} | {n} | {e:.1f} | {h:.1f} | {e / h:.2f}x | "
            f"{by[(n, 'exact')]['decode_tokens_per_s']:.0f} / "
            f"{by[(n, 'hyper')]['decode_tokens_per_s']:.0f} |")
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  print(f"wrote {out}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("jsons", nargs="+")
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  plot(args.jsons, args.out)


if __name__ == "__main__":
  main()
