"""Tile sweep of the whole HyperAttention forward at one shape: per-kernel GPU time of each tiling.

``tune_kernels.py`` times single kernels on synthetic permutations without the options; this
times ``hyper_attention`` itself (causal by default, GQA, ``select_blocks`` and the other
options from the flags), so the level kernels see their real selected keys and the run-score
kernel its real query blocks. Each ``--sweep`` entry ``FIELD:BQxBKxWARPSxSTAGES`` replaces one
``BlockSizes`` field (``blocked_fwd``, ``run_scores``, ``flash_fwd``) of the defaults; every
tiling is checked against the default tiling's output and profiled (``timing.kernel_table``:
kernel times are stable to ~1% within a call, wall times to ~1.5%). cuDNN at the same shape is
timed in the same run. The JSON is rewritten after every entry (a cut run keeps what it did):

  python -m experiments.benchmarks.tune_op --out=$OUT/tune_op.json --heads=8 --kv_heads=4 \\
      --select_blocks=12 --sweep=run_scores:64x128x4x2,blocked_fwd:128x64x4x2
"""

from __future__ import annotations

import collections
import dataclasses

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from experiments import provenance
from experiments import timing
from experiments.benchmarks import common
from hyperattn_jax import hyper_attention
from pallas_kernels.triton import BlockSizes, Tiles

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "JSON file to write.", required=True)
flags.DEFINE_integer("n", 131072, "Sequence length.")
flags.DEFINE_bool("causal", True, "Causal attention.")
common.define_shape_flags()
common.define_dtype_flag()
common.define_hyper_flags()
common.define_timing_flags(reps=10)
flags.DEFINE_list("sweep", [], "FIELD:BQxBKxWARPSxSTAGES entries, each timed with the other "
                  "fields at their defaults (the default tiling is always timed first).")
flags.DEFINE_integer("profile_reps", 3, "Traced calls per tiling.")
flags.DEFINE_float("max_err", 5e-2, "Largest abs difference from the default tiling's output "
                   "for a tiling to count as correct.")
flags.adopt_module_key_flags(common)  # --help lists them with this script's flags

_FIELDS = ("blocked_fwd", "run_scores", "flash_fwd")
# Kernel-name prefixes grouped in the records (the rest is summed as "other").
_GROUPS = {"run_scores": "hyperattn_run_scores", "blocked_fwd": "hyperattn_block_attention_fwd",
           "cudnn": "cudnn"}


def parse_entry(entry: str) -> tuple[str, Tiles]:
  """``"FIELD:BQxBKxWxS"`` -> (field, Tiles); a ValueError names a malformed entry."""
  field, _, spec = entry.partition(":")
  parts = spec.split("x")
  if field not in _FIELDS or len(parts) != 4 or not all(p.isdigit() for p in parts):
    raise ValueError(f"--sweep: {entry!r} is not FIELD:BQxBKxWARPSxSTAGES with FIELD one of "
                     f"{_FIELDS}")
  bq, bk, warps, stages = map(int, parts)
  return field, Tiles(block_q=bq, block_k=bk, num_warps=warps, num_stages=stages)


def grouped_ms(table: dict) -> dict[str, float]:
  """Kernel ms per call of one profile, summed per :data:`_GROUPS` prefix (and ``other``)."""
  out = collections.defaultdict(float)
  for row in table["kernels"]:
    group = next((g for g, prefix in _GROUPS.items() if row["name"].startswith(prefix)), "other")
    out[group] += row["ms_per_call"]
  return dict(out) | {"total": table["kernel_ms_per_call"]}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  entries = [("default", None)] + [parse_entry(e) for e in FLAGS.sweep]
  n, dtype = FLAGS.n, jnp.dtype(FLAGS.dtype)
  q, k, v, _ = common.random_inputs(jax.random.key(0), (1, n, FLAGS.heads, FLAGS.head_dim),
                                    (1, n, FLAGS.kv_heads, FLAGS.head_dim), dtype)
  rng = jax.random.key(1)
  config = common.hyper_config()

  def op(block_sizes):
    return jax.jit(lambda q, k, v, rng: hyper_attention(
        q, k, v, rng=rng, causal=FLAGS.causal, config=config, implementation="pallas",
        block_sizes=block_sizes))

  records = []
  cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=FLAGS.causal, implementation="cudnn"))
  try:
    records.append({"impl": "cudnn", "median_ms": common.synchronised_ms(cudnn, q, k, v)[0]})
  except Exception as e:  # pylint: disable=broad-except  (no cuDNN off the GPU)
    records.append({"impl": "cudnn", "error": common.error_text(e, 200)})
  print(records[-1], flush=True)
  meta = provenance.run_meta(config=dataclasses.asdict(config))
  reference = None
  for field, tiles in entries:
    sizes = BlockSizes() if field == "default" else BlockSizes(**{field: tiles})
    rec = {"impl": "hyper_pallas", "field": field,
           "tiles": None if tiles is None else dataclasses.asdict(tiles)}
    try:
      fn = op(sizes)
      out = fn(q, k, v, rng).astype(jnp.float32)
      if reference is None:
        reference = out
      rec["max_abs_diff_vs_default"] = float(jnp.max(jnp.abs(out - reference)))
      rec["median_ms"] = common.synchronised_ms(fn, q, k, v, rng)[0]
      rec["pipelined_ms"] = timing.pipelined_ms(fn, q, k, v, rng, reps=FLAGS.reps)
      rec["kernel_ms"] = grouped_ms(timing.kernel_table(lambda fn=fn: fn(q, k, v, rng),
                                                        reps=FLAGS.profile_reps))
    except Exception as e:  # pylint: disable=broad-except
      rec["error"] = common.error_text(e, 300)
    records.append(rec)
    print(rec, flush=True)
    provenance.write_results(FLAGS.out, meta, records=records, best=best(records))
  print("best:", best(records))
  plot(records, FLAGS.out.removesuffix(".json") + ".png")


def plot(records, path: str) -> None:
  """Stacked bars of each tiling's kernel time per group (and cuDNN's whole call as a line)."""
  plt = common.pyplot()
  rows = [r for r in records if "kernel_ms" in r]
  labels = [r["field"] if r["tiles"] is None else
            f"{r['field']}\n" + "x".join(str(v) for v in r["tiles"].values()) for r in rows]
  fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(rows)), 4))
  bottom = [0.0] * len(rows)
  for group in (*_GROUPS, "other"):
    ms = [r["kernel_ms"].get(group, 0.0) for r in rows]
    ax.bar(range(len(rows)), ms, bottom=bottom, label=group)
    bottom = [b + m for b, m in zip(bottom, ms)]
  ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=7)
  ax.set_ylabel("GPU kernel ms per call")
  cudnn = next((r["median_ms"] for r in records if r["impl"] == "cudnn" and "median_ms" in r),
               None)
  ax.set_title(f"hyper_attention tilings (cuDNN: {cudnn:.1f} ms)" if cudnn else
               "hyper_attention tilings")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def best(records) -> dict:
  """{field: the record of its fastest correct tiling by kernel time (the default included)}."""
  ok = [r for r in records if "kernel_ms" in r and r["max_abs_diff_vs_default"] < FLAGS.max_err]
  default = next((r for r in ok if r["field"] == "default"), None)
  out = {}
  for field in _FIELDS:
    candidates = [r for r in ok if r["field"] == field] + ([default] if default else [])
    if len(candidates) > 1:
      out[field] = min(candidates, key=lambda r: r["kernel_ms"]["total"])
  return out


if __name__ == "__main__":
  app.run(main)
