"""A CPU demo: exact vs HyperAttention time and error on inputs with planted heavy keys.

  python -m experiments.demo [--n=8192] [--causal]
Each query has one key with a dominant score hidden at a random position (what LSH is for); the
rest is random. Prints time and relative error of hyper_attention vs exact_attention.
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from hyperattn_jax import HyperAttentionConfig, exact_attention, hyper_attention

flags.DEFINE_integer("n", 8192, "Sequence length.")
flags.DEFINE_integer("heads", 4, "Heads.")
flags.DEFINE_integer("head_dim", 64, "Head dimension.")
flags.DEFINE_bool("causal", False, "Causal attention.")
FLAGS = flags.FLAGS


def _timed(fn, *args):
  jax.block_until_ready(fn(*args))  # compile
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - t0


def main(argv):
  del argv
  n, h, d = FLAGS.n, FLAGS.heads, FLAGS.head_dim
  key = jax.random.key(0)
  q = jax.random.normal(key, (1, n, h, d))
  q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
  perm = jax.random.permutation(jax.random.fold_in(key, 1), n)
  k = 12.0 * np.sqrt(d) * q[:, perm] + jax.random.normal(jax.random.fold_in(key, 2), q.shape)
  v = jax.random.normal(jax.random.fold_in(key, 3), q.shape)
  cfg = HyperAttentionConfig(block_size=256, sample_size=256, lsh_num_projs=7, min_seq_len=1024)
  exact = jax.jit(lambda q, k, v: exact_attention(q, k, v, causal=FLAGS.causal))
  hyper = jax.jit(lambda q, k, v: hyper_attention(q, k, v, rng=jax.random.key(1),
                                                  causal=FLAGS.causal, config=cfg))
  ref, t_exact = _timed(exact, q, k, v)
  out, t_hyper = _timed(hyper, q, k, v)
  err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  print(f"{jax.devices()[0].platform}: n={n} heads={h} head_dim={d} causal={FLAGS.causal}")
  print(f"exact_attention : {t_exact * 1e3:8.1f} ms")
  print(f"hyper_attention : {t_hyper * 1e3:8.1f} ms   ({t_exact / t_hyper:.1f}x faster)")
  print(f"relative error  : {err:.4f}   (||hyper - exact|| / ||exact||)")


if __name__ == "__main__":
  app.run(main)
