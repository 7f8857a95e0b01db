r"""Per-kernel GPU time of one HyperAttention call, from a jax.profiler trace.

Times every device kernel of ``--reps`` jitted calls (after warm-up) and reports, per kernel
name, the milliseconds per call and the launch count, largest first: where the time of a whole
forward(+backward) goes, glue included (the stage breakdown of ``bench_attention.py`` times the
stages one by one instead).

  python experiments/profile_kernels.py --n=131072 --causal --mode=fwdbwd \
      --out=experiments/results/DATE-DEVICE-profile.json
"""

from __future__ import annotations

import collections
import glob
import json
import sys
import tempfile
import time
from pathlib import Path

from absl import app
from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments import provenance  # noqa: E402

from hyperattn_jax import HyperAttentionConfig, hyper_attention  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("n", 131072, "sequence length")
flags.DEFINE_bool("causal", True, "causal attention")
flags.DEFINE_enum("mode", "fwdbwd", ["fwd", "fwdbwd"], "forward, or forward + backward")
flags.DEFINE_string("impl", "pallas", "hyper_attention implementation")
flags.DEFINE_integer("heads", 32, "query heads")
flags.DEFINE_integer("kv_heads", 32, "key/value heads")
flags.DEFINE_integer("head_dim", 64, "head dimension")
flags.DEFINE_integer("reps", 3, "traced calls")
flags.DEFINE_integer("top", 40, "kernels listed")
flags.DEFINE_string("out", None, "JSON output path")
flags.DEFINE_string("hlo_out", None, "also write the compiled (optimised) HLO text here")


def _kernel_times(trace_dir: str) -> dict[str, list[float]]:
  """{kernel name: [total ns, launches]} over the GPU planes' stream lines."""
  totals = collections.defaultdict(lambda: [0.0, 0])
  for path in glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True):
    for plane in jax.profiler.ProfileData.from_file(path).planes:
      if not plane.name.startswith("/device:GPU"):
        continue
      for line in plane.lines:
        if "stream" not in line.name.lower():
          continue
        for event in line.events:
          totals[event.name][0] += event.duration_ns
          totals[event.name][1] += 1
  return totals


def main(argv):
  del argv
  config = HyperAttentionConfig()
  keys = jax.random.split(jax.random.key(0), 4)
  shape_q = (1, FLAGS.n, FLAGS.heads, FLAGS.head_dim)
  shape_kv = (1, FLAGS.n, FLAGS.kv_heads, FLAGS.head_dim)
  q, k, v = (jax.random.normal(kk, s, jnp.float32).astype(jnp.bfloat16)
             for kk, s in zip(keys, (shape_q, shape_kv, shape_kv)))
  d_out = jax.random.normal(keys[3], shape_q, jnp.float32).astype(jnp.bfloat16)
  attend = lambda q, k, v: hyper_attention(q, k, v, rng=jax.random.key(1), causal=FLAGS.causal,
                                           config=config, implementation=FLAGS.impl)
  if FLAGS.mode == "fwd":
    fn, args = jax.jit(attend), (q, k, v)
  else:
    fn = jax.jit(lambda q, k, v, d: jax.vjp(attend, q, k, v)[1](d))
    args = (q, k, v, d_out)
  jax.block_until_ready(fn(*args))
  if FLAGS.hlo_out:
    Path(FLAGS.hlo_out).parent.mkdir(parents=True, exist_ok=True)
    Path(FLAGS.hlo_out).write_text(fn.lower(*args).compile().as_text())
  trace_dir = tempfile.mkdtemp()
  t0 = time.perf_counter()
  with jax.profiler.trace(trace_dir):
    for _ in range(FLAGS.reps):
      jax.block_until_ready(fn(*args))
  wall_ms = (time.perf_counter() - t0) * 1e3 / FLAGS.reps
  totals = _kernel_times(trace_dir)
  kernels = sorted(({"name": name, "ms_per_call": ns / FLAGS.reps / 1e6,
                     "launches_per_call": count / FLAGS.reps}
                    for name, (ns, count) in totals.items()), key=lambda r: -r["ms_per_call"])
  gpu_ms = sum(r["ms_per_call"] for r in kernels)
  result = {"meta": provenance.run_meta(n=FLAGS.n, causal=FLAGS.causal, mode=FLAGS.mode,
                                       impl=FLAGS.impl, config=str(config)),
            "wall_ms_per_call_traced": wall_ms, "kernel_ms_per_call": gpu_ms,
            "kernels": kernels[:FLAGS.top]}
  print(f"{FLAGS.mode} n={FLAGS.n} causal={FLAGS.causal}: kernels {gpu_ms:.2f} ms/call "
        f"(traced wall {wall_ms:.2f} ms)")
  for r in kernels[:FLAGS.top]:
    print(f"{r['ms_per_call']:9.3f} ms {r['launches_per_call']:6.1f}x  {r['name'][:110]}")
  if FLAGS.out:
    Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
    Path(FLAGS.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
  app.run(main)
