r"""Per-kernel GPU time of one HyperAttention call, from a jax.profiler trace.

Times every device kernel of ``--reps`` jitted calls (after warm-up) and reports, per kernel
name, the milliseconds per call and the launch count, largest first: where the time of a whole
forward(+backward) goes, glue included (the stage breakdown of ``bench_attention.py`` times the
stages one by one instead).

  python -m experiments.benchmarks.profile_kernels --n=131072 --causal --mode=fwdbwd \
      --out=experiments/results/DATE-DEVICE-profile.json
"""

from __future__ import annotations

import collections
import glob
import tempfile
import time
from pathlib import Path

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from experiments import provenance
from experiments.benchmarks import common
from hyperattn_jax import hyper_attention

FLAGS = flags.FLAGS
flags.DEFINE_integer("n", 131072, "sequence length")
flags.DEFINE_bool("causal", True, "causal attention")
flags.DEFINE_enum("mode", "fwdbwd", ["fwd", "fwdbwd"], "forward, or forward + backward")
flags.DEFINE_string("impl", "pallas", "hyper_attention implementation")
common.define_shape_flags()
common.define_hyper_flags()
flags.DEFINE_integer("reps", 3, "traced calls")
flags.DEFINE_integer("top", 40, "kernels listed")
flags.DEFINE_string("out", None, "JSON output path")
flags.DEFINE_string("hlo_out", None, "also write the compiled (optimised) HLO text here")
flags.adopt_module_key_flags(common)  # --help lists them with this script's flags


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
  config = common.hyper_config()
  q, k, v, d_out = common.random_inputs(
      jax.random.key(0), (1, FLAGS.n, FLAGS.heads, FLAGS.head_dim),
      (1, FLAGS.n, FLAGS.kv_heads, FLAGS.head_dim), jnp.bfloat16)
  attend = lambda q, k, v: hyper_attention(q, k, v, rng=jax.random.key(1), causal=FLAGS.causal,
                                           config=config, implementation=FLAGS.impl)
  fn, args = common.jitted_pass(attend, FLAGS.mode, q, k, v, d_out)
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
  meta = provenance.run_meta(n=FLAGS.n, causal=FLAGS.causal, mode=FLAGS.mode, impl=FLAGS.impl,
                             config=str(config))
  print(f"{FLAGS.mode} n={FLAGS.n} causal={FLAGS.causal}: kernels {gpu_ms:.2f} ms/call "
        f"(traced wall {wall_ms:.2f} ms)")
  for r in kernels[:FLAGS.top]:
    print(f"{r['ms_per_call']:9.3f} ms {r['launches_per_call']:6.1f}x  {r['name'][:110]}")
  if FLAGS.out:
    provenance.write_results(FLAGS.out, meta, wall_ms_per_call_traced=wall_ms,
                             kernel_ms_per_call=gpu_ms, kernels=kernels[:FLAGS.top])


if __name__ == "__main__":
  app.run(main)
