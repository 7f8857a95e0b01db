"""Tile-size sweep of the Pallas kernels on the GPU, forward or backward, checked and timed.

For each ``Tiles(block_q, block_k, num_warps, num_stages)`` it runs

  * the blocked stage (``blocked_attention_pallas`` / ``blocked_attention_bwd_pallas``, rows by
    index through random permutations) at the shape of one non-causal call, and
  * the exact kernels (``flash_attention_pallas`` / ``flash_attention_bwd_pallas``) at the
    shape of the causal base case (``n / min_seq_len`` diagonal blocks folded into the batch),

checks the result against the XLA reference (the XLA blocked stage / chunked exact attention,
and their autodiff for the backward) and records the median time; cuDNN on the base-case shape
is timed in the same run for comparison. What it finds is printed and written (the JSON's
``block_sizes``) as a ``BlockSizes``: the defaults with each swept kernel's fastest tiles
(within ``--max_err``), ready for ``hyper_attention(..., block_sizes=...)``:

  python -m experiments.benchmarks.tune_kernels --out=$OUT/tune.json --n=131072 --phase=bwd

  sizes = BlockSizes.from_dict(json.load(open("tune.json"))["block_sizes"])
"""

from __future__ import annotations

import dataclasses
import itertools

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from hyperattn_jax import backends
from hyperattn_jax import blocked as blocked_lib
from hyperattn_jax import exact as exact_lib
from hyperattn_jax import merge as merge_lib
from hyperattn_jax import plan as plan_lib
from hyperattn_jax import sampling
from experiments import provenance
from experiments.benchmarks import common
from pallas_kernels.triton import BlockSizes, Tiles

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "JSON file to write.", required=True)
flags.DEFINE_integer("n", 131072, "Sequence length of the non-causal blocked call.")
common.define_shape_flags(kv_heads=False)
common.define_hyper_flags("block_size", "sample_size", "min_seq_len")
flags.DEFINE_list("block_q", ["64", "128"], "Query tiles.")
flags.DEFINE_list("block_k", ["32", "64", "128"], "Key tiles.")
flags.DEFINE_list("num_warps", ["4", "8"], "Warps.")
flags.DEFINE_list("num_stages", ["2", "3"], "Pipeline stages.")
common.define_timing_flags(reps=10)
flags.DEFINE_enum("phase", "fwd", ["fwd", "bwd"], "Forward or backward kernels.")
flags.DEFINE_list("sample_groups", ["8"],
                  "Backward blocked kernel: float32 partials of the sample gradients.")
flags.DEFINE_list("kernels", [], "Only these cases (blocked, base_case, blocked_bwd, "
                  "base_case_bwd); default: both of the phase.")
flags.DEFINE_float("max_err", 5e-2, "Largest abs error vs XLA for a tiling to count as best.")
flags.adopt_module_key_flags(common)  # --help lists them with this script's flags


def _max_err(out, ref):
  return float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))


def _blocked_inputs(rng):
  n, h, d, bs, m = FLAGS.n, FLAGS.heads, FLAGS.head_dim, FLAGS.block_size, FLAGS.sample_size
  kq, kk, kv, kp, kr = jax.random.split(rng, 5)
  q = jax.random.normal(kq, (1, n, h, d), jnp.bfloat16)
  k = jax.random.normal(kk, (1, n, h, d), jnp.bfloat16)
  v = jax.random.normal(kv, (1, n, h, d), jnp.bfloat16)
  perm = lambda key: jax.vmap(lambda r: jax.random.permutation(r, n))(
      jax.random.split(key, h)).astype(jnp.int32)
  q_perm = perm(kr)[None, :, None]
  k_perm = perm(jax.random.fold_in(kr, 1))[None]
  n_valid = jnp.array([n], jnp.int32)
  pos = sampling.draw_sample_positions(kp, n_valid, h, m)
  rows = jnp.take_along_axis(k_perm, pos, axis=-1)[:, :, None]
  k_s = blocked_lib.grouped_rows(k, rows)[:, :, 0]
  v_s = blocked_lib.grouped_rows(v, rows)[:, :, 0]
  log_w = jnp.broadcast_to(jnp.log(n_valid.astype(jnp.float32) / m)[:, None, None], pos.shape)
  kw = dict(scale=d ** -0.5, block_size=bs,
            window=blocked_lib.RowWindow(0, n, 0, n, all_keys_valid=True))
  return (q, k, v, q_perm, k_perm, k_s, v_s, pos, n_valid, log_w), kw


# The BlockSizes field each case sweeps.
_FIELDS = {"blocked": "blocked_fwd", "base_case": "flash_fwd", "blocked_bwd": "blocked_bwd",
           "base_case_bwd": "flash_bwd"}


def _base_inputs(rng):
  h, d, s = FLAGS.heads, FLAGS.head_dim, FLAGS.min_seq_len
  parts = FLAGS.n // s
  kq, kk, kv = jax.random.split(rng, 3)
  q = jax.random.normal(kq, (parts, s, h, d), jnp.bfloat16)
  k = jax.random.normal(kk, (parts, s, h, d), jnp.bfloat16)
  v = jax.random.normal(kv, (parts, s, h, d), jnp.bfloat16)
  return q, k, v, jnp.ones((parts, s), bool)


def _cases(b_args, b_kw, base_args, scale):
  """(name, kernel(block_sizes) -> fn, args, reference fn) of the chosen pass. Every array
  reaches the jitted functions as an argument (closed-over arrays become constants XLA may
  fold)."""
  def xla_blocked(q, k, v, q_perm, k_perm, k_s, v_s, pos, n_valid, log_w):
    return blocked_lib.blocked_attention_fwd(
        q, k, v, plan_lib.SortPlan(q_perm, k_perm),
        plan_lib.SampleSet(k_s, v_s, pos, n_valid, log_w), None, b_kw["scale"],
        b_kw["block_size"], b_kw["window"], backends.XLA)
  xla_base = lambda q, k, v, m: exact_lib.flash_attention(q, k, v, m, True, scale, 512)
  backend = backends.resolve("pallas")
  kernels = backend.kernels
  kw = dict(scale=b_kw["scale"], block_size=b_kw["block_size"], **b_kw["window"]._asdict(),
            interpret=backend.interpret)
  if FLAGS.phase == "fwd":
    return (("blocked", lambda t: lambda *a: kernels.blocked_attention_pallas(
                 *a, **kw, block_sizes=t), b_args, xla_blocked),
            ("base_case", lambda t: lambda q, k, v, m: kernels.flash_attention_pallas(
                 q, k, v, m, True, scale, block_sizes=t, interpret=kw["interpret"]), base_args,
             xla_base))
  out, lse = jax.jit(xla_blocked)(*b_args)
  # Cotangents: d_out = out, no lse cotangent (the window is every row: stats in q's rows).
  stats = (out, lse, merge_lib.output_delta(out, out))

  def ref_b(q, k, v, q_perm, k_perm, k_s, v_s, pos, n_valid, log_w, d_out, lse, delta):
    del delta
    fwd = lambda q, k, v: xla_blocked(q, k, v, q_perm, k_perm, k_s, v_s, pos, n_valid, log_w)
    return jax.vjp(fwd, q, k, v)[1]((d_out, jnp.zeros_like(lse)))

  def ref_base(q, k, v, m, d_out, lse, delta):
    del delta
    return jax.vjp(lambda q, k, v: xla_base(q, k, v, m), q, k, v)[1]((d_out,
                                                                      jnp.zeros_like(lse)))
  b_out, b_lse = jax.jit(xla_base)(*base_args)
  # The flash backward's arguments: d_out = out, lse, delta (no lse cotangent).
  base_stats = (b_out, b_lse, merge_lib.output_delta(b_out, b_out))
  return (("blocked_bwd", lambda t: lambda *a: kernels.blocked_attention_bwd_pallas(
               *a, **kw, block_sizes=t)[:3], b_args + stats, ref_b),
          ("base_case_bwd", lambda t: lambda *a: kernels.flash_attention_bwd_pallas(
               *a, True, scale, block_sizes=t, interpret=kw["interpret"]),
           base_args + base_stats, ref_base))


def main(argv):
  del argv
  rng = jax.random.key(0)
  b_args, b_kw = _blocked_inputs(rng)
  base_args = _base_inputs(jax.random.fold_in(rng, 1))
  scale = FLAGS.head_dim ** -0.5
  cases = [c for c in _cases(b_args, b_kw, base_args, scale)
           if not FLAGS.kernels or c[0] in FLAGS.kernels]
  refs = {name: jax.jit(ref)(*args) for name, _, args, ref in cases}
  q, k, v, _ = base_args
  cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation="cudnn"))
  if FLAGS.phase == "bwd":
    fwd = cudnn
    cudnn = jax.jit(lambda q, k, v: jax.vjp(fwd, q, k, v)[1](q))
  records = [{"kernel": "cudnn_base_case", "phase": FLAGS.phase}]
  try:
    records[0]["median_ms"] = common.synchronised_ms(cudnn, q, k, v)[0]
    if FLAGS.phase == "bwd":
      records[0]["note"] = "forward + backward (cuDNN's backward needs its own forward)"
  except Exception as e:  # pylint: disable=broad-except  (no cuDNN off the GPU)
    records[0]["error"] = common.error_text(e, 200)
  print(records[-1], flush=True)
  combos = itertools.product(*(map(int, x) for x in (FLAGS.block_q, FLAGS.block_k,
                                                     FLAGS.num_warps, FLAGS.num_stages,
                                                     FLAGS.sample_groups)))
  for bq, bk, warps, stages, groups in combos:
    tiles = Tiles(block_q=bq, block_k=bk, num_warps=warps, num_stages=stages)
    for name, make, args, _ in cases:
      if name != "blocked_bwd" and groups != int(FLAGS.sample_groups[0]):
        continue  # the other kernels have no sample groups: time them once
      extra = {"sample_groups": groups} if name == "blocked_bwd" else {}
      rec = {"kernel": name, **dataclasses.asdict(tiles), **extra}
      try:
        jfn = jax.jit(make(BlockSizes(**{_FIELDS[name]: tiles}, **extra)))
        got = jax.tree.leaves(jfn(*args))
        rec["max_abs_err_vs_xla"] = max(_max_err(a, b) for a, b in zip(got, jax.tree.leaves(
            refs[name])))
        rec["median_ms"] = common.synchronised_ms(jfn, *args)[0]
      except Exception as e:  # pylint: disable=broad-except
        rec["error"] = common.error_text(e, 200)
      records.append(rec)
      print(rec, flush=True)
  best = _best(records)
  sizes = _best_block_sizes(best)
  print("best:", best)
  print("block_sizes =", sizes)
  provenance.write_results(FLAGS.out, provenance.run_meta(), records=records, best=best,
                           block_sizes=dataclasses.asdict(sizes))


def _best(records):
  """{kernel: its fastest record within --max_err}."""
  best = {}
  for rec in records:
    if "median_ms" in rec and rec["kernel"] != "cudnn_base_case" and (
        rec["max_abs_err_vs_xla"] < FLAGS.max_err and
        rec["median_ms"] < best.get(rec["kernel"], {}).get("median_ms", np.inf)):
      best[rec["kernel"]] = rec
  return best


def _best_block_sizes(best) -> BlockSizes:
  """The default BlockSizes with the fastest tiles (and sample groups) of every swept kernel."""
  fields = {}
  for name, rec in best.items():
    fields[_FIELDS[name]] = Tiles(**{f.name: rec[f.name] for f in dataclasses.fields(Tiles)})
    if "sample_groups" in rec:
      fields["sample_groups"] = rec["sample_groups"]
  return BlockSizes(**fields)


if __name__ == "__main__":
  app.run(main)
