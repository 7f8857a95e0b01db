"""Benchmark HyperAttention against exact attention and cuDNN, forward and forward+backward.

One run times every (n, causal, mode, implementation) combination in the same process, so the
numbers compare like with like, and writes one JSON file (plus a log on stdout):

  python -m experiments.benchmarks.bench_attention --out=experiments/results/bench.json \
      --ns=4096,16384,32768,65536,131072 --impls=hyper_xla,exact_xla,cudnn --modes=fwd,fwdbwd

Timing: ``jax.jit``, warm-up calls, then the median of ``--reps`` calls each ended by
``block_until_ready`` (host clock around a synchronised call: the call's dispatch and launch
latency included); also ``pipelined_ms``, the time per call of ``--reps`` calls issued back to
back with one synchronisation (the device time of a call inside a larger program). Inputs:
random normal, bf16, [batch, n, heads, head_dim], drawn fresh per shape. ``--breakdown`` adds
per-stage timings of HyperAttention, forward and backward (hash, sort+samples, blocked stage;
base case, each causal level and its merge; the Pallas blocked kernels alone, reading rows by
index); plot them with experiments/benchmarks/plot_breakdown.py.
Peak memory is XLA's compiled estimate (arguments + outputs + temporaries) of each function.
Plot with experiments/benchmarks/plot_bench.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from hyperattn_jax import HyperAttentionConfig, exact_attention, hyper_attention
from hyperattn_jax import backends
from hyperattn_jax import blocked as blocked_lib
from hyperattn_jax import causal as causal_lib
from hyperattn_jax import exact as exact_lib
from hyperattn_jax import lsh
from hyperattn_jax import merge as merge_lib
from hyperattn_jax import plan as plan_lib
from hyperattn_jax import sorting
from hyperattn_jax.blocked import RowWindow
from hyperattn_jax.folding import embed_rows
from hyperattn_jax.sharding import head_sharded_hyper_attention
from experiments import provenance
from experiments import timing
from experiments.benchmarks import common

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "JSON file to write.", required=True)
flags.DEFINE_list("ns", ["4096", "16384", "32768", "65536", "131072"], "Sequence lengths.")
flags.DEFINE_list("impls", ["hyper_pallas", "hyper_xla", "exact_xla", "cudnn"],
                  "hyper_pallas | hyper_xla | sharded_hyper_pallas | sharded_hyper_xla | exact_xla | "
                  "exact_pallas | cudnn")
flags.DEFINE_list("modes", ["fwd", "fwdbwd"], "fwd and/or fwdbwd.")
flags.DEFINE_list("causal", ["true", "false"], "Causal settings to run.")
flags.DEFINE_integer("batch", 1, "Batch size.")
common.define_shape_flags()
common.define_dtype_flag()
common.define_hyper_flags()
common.define_timing_flags(reps=20, warmup=3)
flags.DEFINE_integer("max_exact_n", 65536, "Skip exact_xla above this n (quadratic time).")
flags.DEFINE_float("time_cap_s", 2.0,
                   "Skip a variant's larger n once its median call time (s) exceeds this.")
flags.DEFINE_bool("breakdown", False, "Also time HyperAttention's stages.")
flags.DEFINE_list("breakdown_ns", [], "Lengths to break down (default: every n > min_seq_len).")
flags.DEFINE_bool("breakdown_kernels", True,
                  "In the breakdown, also time the Pallas blocked kernels (rows by index) alone, "
                  "forward and backward calls.")
flags.adopt_module_key_flags(common)  # --help lists them with this script's flags


def _memory_bytes(fn, *args):
  try:
    mem = fn.lower(*args).compile().memory_analysis()
    return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
               - mem.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    return None


def _attention_fn(impl: str, causal: bool, config: HyperAttentionConfig, rng):
  if impl.startswith("sharded_hyper_"):  # heads split over all local devices (issue 7 path)
    mesh = jax.sharding.Mesh(jax.devices(), ("heads",))
    return functools.partial(head_sharded_hyper_attention, rng=rng, mesh=mesh, causal=causal,
                             config=config, implementation=impl.removeprefix("sharded_hyper_"))
  if impl.startswith("hyper_"):
    return functools.partial(hyper_attention, rng=rng, causal=causal, config=config,
                             implementation=impl.removeprefix("hyper_"))
  if impl == "exact_xla":
    return functools.partial(exact_attention, causal=causal, implementation="xla")
  if impl == "exact_pallas":
    return functools.partial(exact_attention, causal=causal, implementation="pallas")
  if impl == "cudnn":
    return functools.partial(jax.nn.dot_product_attention, is_causal=causal,
                             implementation="cudnn")
  raise ValueError(f"unknown implementation {impl!r}")


def _flops(n: int, causal: bool, mode: str, impl: str, config) -> float:
  """Model FLOPs: exact = 4 n^2 d h (half when causal); hyper as in ../shared/README.md."""
  d, h, b = FLAGS.head_dim, FLAGS.heads, FLAGS.batch
  if "hyper" in impl and n > config.min_seq_len:
    per_query = (config.block_size + config.sample_size
                 + config.select_blocks * config.select_block_size)
    if causal:
      levels, base = causal_lib.causal_levels(n, config.min_seq_len)
      keys = 2 ** levels * base * base / 2 + levels * (n / 2) * per_query
    else:
      keys = n * per_query
  else:
    keys = n * n / (2 if causal else 1)
  fwd = 4 * keys * d * h * b
  return fwd * (3.5 if mode == "fwdbwd" else 1.0)


def _fwd_bwd_ms(fn, args, n_diff: int):
  """Median forward ms of ``jit(fn)``, and backward ms (forward+backward minus forward) w.r.t.
  the first ``n_diff`` args with fixed random cotangents (0 args: forward only)."""
  fwd = jax.jit(fn)
  result = {"fwd_ms": common.synchronised_ms(fwd, *args)[0]}
  if n_diff:
    out = fwd(*args)
    leaves, tree = jax.tree.flatten(out)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    cot = jax.tree.unflatten(tree, [jax.random.normal(kk, x.shape, jnp.float32).astype(x.dtype)
                                    for kk, x in zip(keys, leaves)])

    def fwdbwd(cot, *a):
      _, vjp = jax.vjp(lambda *d: fn(*d, *a[n_diff:]), *a[:n_diff])
      return vjp(cot)
    total = common.synchronised_ms(jax.jit(fwdbwd), cot, *args)[0]
    result["bwd_ms"] = max(total - result["fwd_ms"], 0.0)
  return result


def _stage_breakdown(n: int, causal: bool, config, q, k, v, rng, impl: str):
  """Forward and backward times of HyperAttention's stages (the library's stage functions):
  hash (once per call, also for all causal levels), sort (permutations) + samples, the blocked
  stage (reading rows by index, writing them back unsorted); causal adds the base case (by each
  kernel that can run it) and each level's merge. Backward = jit(forward+backward) -
  jit(forward), per stage. For Pallas, optionally the blocked kernels (rows by index): forward and
  backward calls timed alone."""
  scale = FLAGS.head_dim ** -0.5
  backend = backends.resolve(impl)

  proj = lsh.draw_projections(rng, k.shape[2], q.shape[-1], config.lsh_num_projs)
  hash_fn = lambda q, k, proj: sorting.sort_keys(q, k, None, proj)
  hashed = {"hash": _fwd_bwd_ms(hash_fn, (q, k, proj), 0)}  # once per call, for every level
  q_code, k_code = jax.jit(hash_fn)(q, k, proj)

  def noncausal_stages(qq, kk, vv, window, codes):
    b, _, nq, hd = qq.shape
    bs, m = config.block_size, config.sample_size

    def sort_sample(kk, vv, qq, qc, kc):  # the plan from the hashed codes, its samples' rows
      plan = plan_lib.build_plan(qq, kk, vv, None, rng, config, window, backend, (qc, kc))
      return plan.sort, plan.samples.gather(kk, vv, window)

    def sample_rows(*a):  # what the backward differentiates: the samples' k/v rows
      samples = sort_sample(*a)[1]
      return samples.k, samples.v, samples.log_weight
    # Arrays enter every timed function as arguments (closed-over arrays would be constants
    # that XLA tries to fold, e.g. whole sorts at compile time).
    sort, samples = jax.jit(sort_sample)(kk, vv, qq, *codes)
    blocked = lambda qq, kk, vv, k_s, v_s, lw, sort, pos, n_valid: blocked_lib.blocked_attention(
        qq, kk, vv, sort, plan_lib.SampleSet(k_s, v_s, pos, n_valid, lw), None, scale, bs, window,
        backend)
    res = {"sort_samples": _fwd_bwd_ms(sample_rows, (kk, vv, qq, *codes), 2),
           "blocked": _fwd_bwd_ms(blocked, (qq, kk, vv, samples.k, samples.v,
                                            samples.log_weight, sort, samples.pos,
                                            samples.n_valid), 6)}
    res["blocked"]["fwd_tflops"] = (4 * b * nq * window.q_len * (bs + m) * hd /
                                    res["blocked"]["fwd_ms"] / 1e9)
    if backend.kernels is not None and FLAGS.breakdown_kernels:
      args = (qq, kk, vv, sort.q_perm, sort.k_perm, samples.k, samples.v, samples.pos,
              samples.n_valid, samples.log_weight)
      kw = dict(scale=scale, block_size=bs, **window._asdict(), **backend.options)
      fwd = jax.jit(lambda *a: backend.kernels.blocked_attention_pallas(*a, **kw))
      bwd = jax.jit(lambda *a: backend.kernels.blocked_attention_bwd_pallas(*a, **kw))
      kernels = res["kernels_rows_by_index"] = {}
      try:
        out, lse = fwd(*args)
        kernels["fwd_ms"] = common.synchronised_ms(fwd, *args)[0]
        in_q_rows = lambda x, axis: embed_rows(x, window.q_offset, qq.shape[1], axis)
        stats = (in_q_rows(out, 1), in_q_rows(lse, 2),  # d_out = out, no d_lse
                 in_q_rows(merge_lib.output_delta(out, out), 2))
        kernels["bwd_ms"] = common.synchronised_ms(bwd, *args, *stats)[0]
      except Exception as e:  # pylint: disable=broad-except
        kernels["error"] = common.error_text(e, 300)
    return res

  if not causal:
    return {"noncausal": {**hashed, **noncausal_stages(
        q, k, v, RowWindow(0, n, 0, n, all_keys_valid=True), (q_code, k_code))}}
  levels, base = causal_lib.causal_levels(n, config.min_seq_len)
  b, _, nq, hd = q.shape
  fold = lambda x: x[:, :base * 2 ** levels].reshape((b * 2 ** levels, base) + x.shape[2:])
  # The base case by each kernel that can run it (the library picks cuDNN where it can); the
  # backward as in training: from the final (out, lse), no lse cotangent.
  folded = (fold(q), fold(k), fold(v))
  kernels = {impl: backend}
  on_cudnn = backends.exact_backend(backend, folded[0], None)
  if on_cudnn.cudnn:
    kernels["cudnn"] = on_cudnn
  result = {**hashed, "levels": []}
  for name, kernel in kernels.items():
    # out only, as in training: the lse gets no cotangent (cuDNN's backward can run).
    base_fn = lambda q, k, v, kernel=kernel: exact_lib.flash_attention(
        q, k, v, None, True, scale, config.exact_chunk_size, kernel)[0]
    result[f"base_case_{name}"] = _fwd_bwd_ms(base_fn, folded, 3)
  for d in range(levels):
    parts, half = 2 ** d, n // 2 ** (d + 1)
    pairs = lambda x: x.reshape((b * parts, 2 * half) + x.shape[2:])
    level = noncausal_stages(pairs(q), pairs(k), pairs(v),
                             RowWindow(half, half, 0, half, all_keys_valid=True),
                             causal_lib.level_codes(q_code, k_code, parts))
    lse = jnp.zeros((b * parts, nq, half), jnp.float32)
    qd = pairs(q)[:, half:]
    # Forward only: the recursion's VJP starts every part from the final (out, lse), so no
    # merge is differentiated.
    if backend.kernels is None:  # the Pallas kernel merges into the running result in place (no pass)
      level["merge"] = _fwd_bwd_ms(merge_lib.merge_attention, (qd, lse, qd, lse + 1.0), 0)
    result["levels"].append(level)
  return result


def main(argv):
  del argv
  config = common.hyper_config()
  dtype = jnp.dtype(FLAGS.dtype)
  rng = jax.random.key(0)
  meta = provenance.run_meta(
      batch=FLAGS.batch, heads=FLAGS.heads, kv_heads=FLAGS.kv_heads, head_dim=FLAGS.head_dim,
      dtype=FLAGS.dtype, config=dataclasses.asdict(config), reps=FLAGS.reps,
      timing="median_ms: median of reps, each call jit + block_until_ready, after warm-up; "
             "pipelined_ms: reps calls back to back, one block_until_ready, per call")
  records = []
  capped = set()
  print(f"{'n':>8} {'causal':>6} {'mode':>6} {'impl':>13} {'median_ms':>10} {'pipelined':>9} "
        f"{'TFLOP/s':>8} {'mem_GB':>7}", flush=True)
  for n in map(int, FLAGS.ns):
    q, k, v, d_out = common.random_inputs(
        jax.random.fold_in(rng, n), (FLAGS.batch, n, FLAGS.heads, FLAGS.head_dim),
        (FLAGS.batch, n, FLAGS.kv_heads, FLAGS.head_dim), dtype)
    for causal in (c == "true" for c in FLAGS.causal):
      for mode in FLAGS.modes:
        for impl in FLAGS.impls:
          rec = {"n": n, "causal": causal, "mode": mode, "impl": impl}
          tag = (causal, mode, impl)
          if impl == "exact_xla" and n > FLAGS.max_exact_n:
            rec["skipped"] = f"n > max_exact_n={FLAGS.max_exact_n}"
          elif tag in capped:
            rec["skipped"] = f"a shorter n already exceeded time_cap_s={FLAGS.time_cap_s}"
          else:
            try:
              fn, args = common.jitted_pass(_attention_fn(impl, causal, config, rng), mode,
                                            q, k, v, d_out, with_output=True)
              t0 = time.perf_counter()
              jax.block_until_ready(fn(*args))
              first = time.perf_counter() - t0
              med, lo, hi = common.synchronised_ms(fn, *args)
              pipelined = timing.pipelined_ms(fn, *args, reps=FLAGS.reps)
              if med / 1e3 > FLAGS.time_cap_s:
                capped.add(tag)
              flops = _flops(n, causal, mode, impl, config)
              rec.update(median_ms=med, min_ms=lo, max_ms=hi, pipelined_ms=pipelined,
                         first_call_s=first,
                         model_tflops=flops / med / 1e9, memory_bytes=_memory_bytes(fn, *args))
            except Exception as e:  # pylint: disable=broad-except
              rec["error"] = common.error_text(e, 300)
          records.append(rec)
          if "median_ms" in rec:
            mem = rec["memory_bytes"]
            print(f"{n:>8} {causal!s:>6} {mode:>6} {impl:>13} {rec['median_ms']:>10.3f} "
                  f"{rec['pipelined_ms']:>9.3f} {rec['model_tflops']:>8.1f} "
                  f"{mem / 1e9 if mem else float('nan'):>7.2f}",
                  flush=True)
          else:
            print(f"{n:>8} {causal!s:>6} {mode:>6} {impl:>13} "
                  f"{rec.get('skipped') or rec.get('error')}", flush=True)
    if FLAGS.breakdown and n > config.min_seq_len and (
        not FLAGS.breakdown_ns or str(n) in FLAGS.breakdown_ns):
      for impl in [i for i in FLAGS.impls if i.startswith("hyper_")]:
        for causal in (c == "true" for c in FLAGS.causal):
          try:
            bd = _stage_breakdown(n, causal, config, q, k, v, rng, impl.removeprefix("hyper_"))
          except Exception as e:  # pylint: disable=broad-except
            bd = {"error": common.error_text(e, 300)}
          records.append({"n": n, "causal": causal, "impl": impl, "breakdown": bd})
          print(f"breakdown n={n} causal={causal} {impl}: {json.dumps(bd)}", flush=True)
    provenance.write_results(FLAGS.out, meta, records=records)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
