"""Tile-size sweep of the Pallas forward kernels on the GPU, checked and timed in one process.

For each (block_q, block_k, num_warps, num_stages) it runs

  * the blocked stage (``blocked_attention_pallas``) at the shape of one non-causal call, and
  * the exact kernel (``flash_attention_pallas``) at the shape of the causal base case
    (``n / min_seq_len`` diagonal blocks folded into the batch),

checks the result against the XLA reference (``blocked_attention_xla`` / cuDNN-free chunked
exact attention) and records the median time; cuDNN on the base-case shape is timed in the same
run for comparison:

  python experiments/tune_kernels.py --out=$OUT/tune.json --n=131072
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import time
from pathlib import Path

from absl import app
from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from hyperattn_jax import blocked as blocked_lib  # noqa: E402
from hyperattn_jax import exact as exact_lib  # noqa: E402
from hyperattn_jax import lsh  # noqa: E402
import pallas_kernels  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "JSON file to write.", required=True)
flags.DEFINE_integer("n", 131072, "Sequence length of the non-causal blocked call.")
flags.DEFINE_integer("heads", 32, "Heads.")
flags.DEFINE_integer("head_dim", 64, "Head dimension.")
flags.DEFINE_integer("block_size", 256, "HyperAttention block size.")
flags.DEFINE_integer("sample_size", 256, "Samples.")
flags.DEFINE_integer("min_seq_len", 4096, "Base-case block length.")
flags.DEFINE_list("block_q", ["64", "128"], "Query tiles.")
flags.DEFINE_list("block_k", ["32", "64", "128"], "Key tiles.")
flags.DEFINE_list("num_warps", ["4", "8"], "Warps.")
flags.DEFINE_list("num_stages", ["2", "3"], "Pipeline stages.")
flags.DEFINE_integer("reps", 10, "Timed repetitions (median).")


def _median_ms(fn, *args):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(FLAGS.reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


def _max_err(out, ref):
  return float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))


def _blocked_inputs(rng):
  n, h, d, bs, m = FLAGS.n, FLAGS.heads, FLAGS.head_dim, FLAGS.block_size, FLAGS.sample_size
  kq, kk, kv, kp = jax.random.split(rng, 4)
  qs = jax.random.normal(kq, (1, h, 1, n, d), jnp.bfloat16)
  ks = jax.random.normal(kk, (1, h, n, d), jnp.bfloat16)
  vs = jax.random.normal(kv, (1, h, n, d), jnp.bfloat16)
  n_valid = jnp.array([n], jnp.int32)
  pos = lsh.draw_sample_positions(kp, n_valid, h, m)
  k_s = jnp.take_along_axis(ks, pos[..., None], axis=-2)
  v_s = jnp.take_along_axis(vs, pos[..., None], axis=-2)
  log_w = jnp.broadcast_to(jnp.log(n_valid.astype(jnp.float32) / m)[:, None, None], pos.shape)
  return (qs, ks, vs, k_s, v_s, pos, n_valid, log_w), dict(scale=d ** -0.5, block_size=bs)


def _base_inputs(rng):
  h, d, s = FLAGS.heads, FLAGS.head_dim, FLAGS.min_seq_len
  parts = FLAGS.n // s
  kq, kk, kv = jax.random.split(rng, 3)
  q = jax.random.normal(kq, (parts, h, 1, s, d), jnp.bfloat16)
  k = jax.random.normal(kk, (parts, h, s, d), jnp.bfloat16)
  v = jax.random.normal(kv, (parts, h, s, d), jnp.bfloat16)
  return q, k, v, jnp.ones((parts, s), bool)


def main(argv):
  del argv
  rng = jax.random.key(0)
  b_args, b_kw = _blocked_inputs(rng)
  q, k, v, mask = _base_inputs(jax.random.fold_in(rng, 1))
  scale = FLAGS.head_dim ** -0.5
  ref_blocked = jax.jit(lambda *a: blocked_lib.blocked_attention_xla(*a, **b_kw))(*b_args)[0]
  ref_base = jax.jit(lambda q, k, v, m: exact_lib.flash_attention_grouped(
      q, k, v, m, True, scale, 512, "xla"))(q, k, v, mask)[0]
  parts, h, _, s, d = q.shape
  to_bthd = lambda x: x.reshape(parts, h, s, d).transpose(0, 2, 1, 3)
  cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation="cudnn"))
  records = [{"kernel": "cudnn_base_case"}]
  try:
    records[0]["median_ms"] = _median_ms(cudnn, to_bthd(q), to_bthd(k[:, :, None]),
                                         to_bthd(v[:, :, None]))
  except Exception as e:  # pylint: disable=broad-except  (no cuDNN off the GPU)
    records[0]["error"] = f"{type(e).__name__}: {str(e)[:200]}"
  print(records[-1], flush=True)
  combos = itertools.product(*(map(int, x) for x in (FLAGS.block_q, FLAGS.block_k,
                                                     FLAGS.num_warps, FLAGS.num_stages)))
  for bq, bk, warps, stages in combos:
    tiles = dict(block_q=bq, block_k=bk, num_warps=warps, num_stages=stages)
    for name, fn, args, ref in (
        ("blocked", lambda *a, t=tiles: pallas_kernels.blocked_attention_pallas(
            *a, **b_kw, **t), b_args, ref_blocked),
        ("base_case", lambda q, k, v, m, t=tiles: pallas_kernels.flash_attention_pallas(
            q, k, v, m, True, scale, **t), (q, k, v, mask), ref_base)):
      rec = {"kernel": name, **tiles}
      try:
        jfn = jax.jit(fn)
        rec["max_abs_err_vs_xla"] = _max_err(jfn(*args)[0], ref)
        rec["median_ms"] = _median_ms(jfn, *args)
      except Exception as e:  # pylint: disable=broad-except
        rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
      records.append(rec)
      print(rec, flush=True)
  best = {}
  for rec in records:
    if "median_ms" in rec and rec["kernel"] != "cudnn_base_case" and (
        rec["max_abs_err_vs_xla"] < 2e-2 and
        rec["median_ms"] < best.get(rec["kernel"], {}).get("median_ms", np.inf)):
      best[rec["kernel"]] = rec
  print("best:", best)
  meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
          "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
  Path(FLAGS.out).write_text(json.dumps({"meta": meta, "records": records, "best": best},
                                        indent=1))


if __name__ == "__main__":
  app.run(main)
