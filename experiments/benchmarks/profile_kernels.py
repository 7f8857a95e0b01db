r"""Per-kernel GPU time of one HyperAttention call, from a jax.profiler trace.

Times every device kernel of ``--reps`` jitted calls (after warm-up) and reports, per kernel
name, the milliseconds per call and the launch count, largest first: where the time of a whole
forward(+backward) goes, glue included (the stage breakdown of ``bench_attention.py`` times the
stages one by one instead).

  python -m experiments.benchmarks.profile_kernels --n=131072 --causal --mode=fwdbwd \
      --out=experiments/results/DATE-DEVICE-profile.json
"""

from __future__ import annotations

from pathlib import Path

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from experiments import provenance
from experiments import timing
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
  table = timing.report_kernels(timing.kernel_table(lambda: fn(*args), FLAGS.reps),
                                f"{FLAGS.mode} n={FLAGS.n} causal={FLAGS.causal}", FLAGS.top)
  if FLAGS.out:
    meta = provenance.run_meta(n=FLAGS.n, causal=FLAGS.causal, mode=FLAGS.mode, impl=FLAGS.impl,
                               config=str(config))
    provenance.write_results(FLAGS.out, meta, **table)


if __name__ == "__main__":
  app.run(main)
