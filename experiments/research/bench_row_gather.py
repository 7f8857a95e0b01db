"""Can a Mosaic GPU kernel read rows by index? Bandwidth of one TMA copy per row.

The blocked kernels read q/k/v rows through the sort permutations. Hopper's TMA has no gather,
so a Mosaic GPU port of them would issue one TMA copy per 128-byte row (head_dim 64, bf16)
into shared memory. This benchmark gathers ``--rows`` rows of ``[rows, head_dim]`` by a random
permutation (one call's q at 131k, 32 heads, folded) and writes them out contiguously:
  * ``tma_per_row_random``: one TMA copy per row, rows in a random order (the kernels' case);
  * ``tma_per_row_sequential``: the same copies of consecutive rows (the per-copy cost alone);
  * ``tma_block``: one TMA copy per ``--rows_per_program`` consecutive rows (plain bandwidth);
  * ``xla_take``: XLA's gather (what sorted copies cost).
GPU only (Mosaic GPU); the result is checked against ``jnp.take``.

  python3 -m experiments.research.bench_row_gather --out=$OUT/gather.json   # + gather.png
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from experiments import provenance
from experiments import timing
from experiments.benchmarks import common

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "gather.json", "Output JSON.")
flags.DEFINE_integer("rows", 131072 * 32, "Rows to gather (sequence length x heads).")
flags.DEFINE_integer("head_dim", 64, "Row length.")
flags.DEFINE_integer("rows_per_program", 64, "Rows per program (one shared-memory tile).")
common.define_timing_flags(reps=20, warmup=2)
flags.adopt_module_key_flags(common)  # --help lists them with this script's flags


def copy_rows(x, idx, *, rows_per_program: int, per_row: bool):
  """``x[idx]`` ``[len(idx), D]`` by a Mosaic GPU kernel: each program copies
  ``rows_per_program`` rows into shared memory (one TMA copy per row, or one per tile of
  consecutive rows when ``per_row`` is False, ignoring ``idx``) and stores the tile."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  m, d, t = idx.shape[0], x.shape[1], rows_per_program
  if m % t:
    raise ValueError(f"len(idx)={m} must be a multiple of rows_per_program={t} (one tile per "
                     "program; a partial last tile would be dropped)")

  def body(idx_ref, x_ref, y_ref):
    b = lax.axis_index("b")

    def scope(tile, loaded):
      if per_row:
        for i in range(t):
          plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(idx_ref[b * t + i], 1)], tile.at[pl.ds(i, 1)],
                                  loaded)
      else:
        plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(b * t, t)], tile, loaded)
      plgpu.barrier_wait(loaded)
      plgpu.copy_smem_to_gmem(tile, y_ref.at[pl.ds(b * t, t)])
      plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(scope, plgpu.SMEM((t, d), x.dtype),
                  plgpu.Barrier(num_arrivals=t if per_row else 1))

  return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((m, d), x.dtype), grid=(m // t,),
                      grid_names=("b",))(idx, x)


def plot(records, path):
  """Bars of the achieved bandwidth per variant (``path``: the PNG)."""
  plt = common.pyplot()
  done = [r for r in records if "tb_per_s" in r]
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.bar([r["impl"] for r in done], [r["tb_per_s"] for r in done])
  ax.set_ylabel("TB/s (read + write, pipelined)")
  ax.set_title("rows of 128 bytes gathered into contiguous rows")
  ax.tick_params(axis="x", labelrotation=20, labelsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  del argv
  kx, kp = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (FLAGS.rows, FLAGS.head_dim), jnp.float32).astype(jnp.bfloat16)
  random = jax.random.permutation(kp, FLAGS.rows).astype(jnp.int32)
  sequential = jnp.arange(FLAGS.rows, dtype=jnp.int32)
  kernel = lambda per_row: jax.jit(lambda x, i: copy_rows(
      x, i, rows_per_program=FLAGS.rows_per_program, per_row=per_row))
  variants = {"tma_per_row_random": (kernel(True), random),
              "tma_per_row_sequential": (kernel(True), sequential),
              "tma_block": (kernel(False), sequential),
              "xla_take": (jax.jit(lambda x, i: jnp.take(x, i, axis=0)), random)}
  nbytes = 2 * x.size * x.dtype.itemsize  # read + write
  records = []
  for name, (fn, idx) in variants.items():
    rec = {"impl": name}
    try:
      rec["matches_take"] = bool(jnp.array_equal(fn(x, idx), jnp.take(x, idx, axis=0)))
      rec["median_ms"] = common.synchronised_ms(fn, x, idx)[0]
      rec["pipelined_ms"] = timing.pipelined_ms(fn, x, idx, reps=FLAGS.reps)
      rec["tb_per_s"] = nbytes / rec["pipelined_ms"] / 1e9
    except Exception as e:  # pylint: disable=broad-except
      rec["error"] = common.error_text(e, 400)
    records.append(rec)
    print(json.dumps(rec), flush=True)
  meta = provenance.run_meta(shape=[FLAGS.rows, FLAGS.head_dim], dtype="bfloat16",
                             bytes_moved=nbytes)
  provenance.write_results(FLAGS.out, meta, records=records)
  plot(records, str(Path(FLAGS.out).with_suffix(".png")))
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
