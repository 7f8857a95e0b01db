"""Kernel backends on the blocked stage's shape: Pallas Triton vs Pallas Mosaic GPU vs cuDNN.

A causal level at 131k runs 65536 query rows per head, each against 512 keys (its block and
the samples). This benchmark times plain dense attention of that size and shape, with no
gathers, masks or running rows: ``--blocks`` problems of ``--q_rows`` queries over ``--k_rows``
keys. It compares:
  * this library's Pallas (Triton) flash kernels (``exact.flash_attention``, "pallas");
  * jax's Pallas Triton example kernel (``jax.experimental.pallas.ops.gpu.attention.mha``);
  * jax's Pallas Mosaic GPU (wgmma, warp-specialised) example kernel
    (``jax.experimental.pallas.ops.gpu.attention_mgpu``);
  * cuDNN (``jax.nn.dot_product_attention(implementation="cudnn")``).
It bounds what porting the blocked kernels to another backend could gain. GPU only.

  python3 -m experiments.research.bench_backends --out=$OUT/backends.json   # + backends.png

The queries are drawn pre-scaled by head_dim**-0.5 and every variant runs at scale 1. Each
variant's output is checked against cuDNN's (max abs error in the JSON). Times are the
median of synchronised calls and the pipelined device time per call, as in bench_attention.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import provenance
from experiments import timing
from experiments.benchmarks import common
from hyperattn_jax import backends
from hyperattn_jax import exact

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "backends.json", "Output JSON (the plot goes beside it).")
flags.DEFINE_integer("blocks", 256, "Independent problems (folded into the batch).")
flags.DEFINE_integer("q_rows", 256, "Query rows per problem.")
flags.DEFINE_integer("k_rows", 512, "Key rows per problem.")
common.define_shape_flags(kv_heads=False)
flags.DEFINE_enum("dtype", "float16", ["float16", "bfloat16"], "Input dtype.")
common.define_timing_flags(reps=20, warmup=3)
flags.adopt_module_key_flags(common)  # --help lists them with this script's flags


def _variants():
  """{name: attention function (q, k, v) -> out} of every backend and tile setting. The queries
  arrive scaled (jax's Mosaic GPU example applies no softmax scale), so every variant runs with
  scale 1 and none times a scaling pass."""
  out = {"cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=1.0,
                                                               implementation="cudnn"),
         "ours_triton": lambda q, k, v: exact.flash_attention(q, k, v, None, False, 1.0, 512,
                                                              backends.resolve("pallas"))[0]}
  from jax.experimental.pallas.ops.gpu import attention as triton_mha  # pylint: disable=g-import-not-at-top
  # Its fused backward needs as many query blocks as key blocks.
  bwd_q, bwd_k = max(16, 64 * FLAGS.q_rows // FLAGS.k_rows), 64
  for bq, bk in ((64, 64), (128, 64)):
    sizes = triton_mha.BlockSizes(block_q=bq, block_k=bk, block_q_dkv=bwd_q, block_kv_dkv=bwd_k,
                                  block_q_dq=bwd_q, block_kv_dq=bwd_k)
    out[f"jax_triton_mha_{bq}x{bk}"] = (
        lambda q, k, v, s=sizes: triton_mha.mha(q, k, v, None, sm_scale=1.0, block_sizes=s))
  from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu  # pylint: disable=g-import-not-at-top
  for bq, bk, steps in ((64, 64, 2), (64, 128, 2), (128, 64, 2), (128, 64, 4), (128, 128, 2),
                        (128, 128, 3)):
    config = mgpu.TuningConfig(block_q=bq, block_kv=bk, max_concurrent_steps=steps,
                               block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)
    out[f"jax_mosaic_mha_{bq}x{bk}_s{steps}"] = lambda q, k, v, c=config: mgpu.attention(q, k, v, c)
  return out


def _plot(records, path):
  plt = common.pyplot()
  names = sorted({r["impl"] for r in records if "tflops" in r})
  fig, ax = plt.subplots(figsize=(9, 4))
  for i, mode in enumerate(("fwd", "fwdbwd")):
    vals = [next((r["tflops"] for r in records if r["impl"] == n and r["mode"] == mode
                  and "tflops" in r), 0.0) for n in names]
    ax.bar(np.arange(len(names)) + 0.4 * i, vals, 0.4, label=mode)
  ax.set_xticks(np.arange(len(names)) + 0.2, names, rotation=30, ha="right", fontsize=8)
  ax.set_ylabel("TFLOP/s (pipelined)")
  ax.set_title(f"{FLAGS.blocks} x ({FLAGS.q_rows} q x {FLAGS.k_rows} k), {FLAGS.heads} heads, "
               f"d={FLAGS.head_dim}, {FLAGS.dtype}")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  del argv
  dtype = jnp.dtype(FLAGS.dtype)
  shape_q = (FLAGS.blocks, FLAGS.q_rows, FLAGS.heads, FLAGS.head_dim)
  shape_k = (FLAGS.blocks, FLAGS.k_rows, FLAGS.heads, FLAGS.head_dim)
  q, k, v, d_out = common.random_inputs(jax.random.key(0), shape_q, shape_k, dtype,
                                        q_scale=FLAGS.head_dim ** -0.5)
  fwd_flops = 4 * FLAGS.blocks * FLAGS.heads * FLAGS.q_rows * FLAGS.k_rows * FLAGS.head_dim
  meta = provenance.run_meta(shape_q=shape_q, shape_kv=shape_k, dtype=FLAGS.dtype,
                             reps=FLAGS.reps, fwd_flops=fwd_flops, fwdbwd_flops=3.5 * fwd_flops)
  records = []
  reference = {}  # cuDNN's results (the first variant)
  for name, attn in _variants().items():
    for mode in ("fwd", "fwdbwd"):
      rec = {"impl": name, "mode": mode}
      try:
        fn, args = common.jitted_pass(attn, mode, q, k, v, d_out)
        out = fn(*args)
        if name == "cudnn":
          reference[mode] = out
        if mode in reference:
          rec["max_abs_err_vs_cudnn"] = jax.tree.leaves(jax.tree.map(
              lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))),
              out, reference[mode]))
        med = common.synchronised_ms(fn, *args)[0]
        pipelined = timing.pipelined_ms(fn, *args, reps=FLAGS.reps)
        rec.update(median_ms=med, pipelined_ms=pipelined,
                   tflops=meta[f"{mode}_flops"] / pipelined / 1e9)
      except Exception as e:  # pylint: disable=broad-except
        rec["error"] = common.error_text(e, 400)
      records.append(rec)
      print(json.dumps(rec), flush=True)
  provenance.write_results(FLAGS.out, meta, records=records)
  _plot(records, str(Path(FLAGS.out).with_suffix(".png")))
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
