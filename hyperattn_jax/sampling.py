"""Sampling (stage 0 of an approximation): the random draws beyond the hyperplanes.

The residual's samples are *sorted* key positions (invalid keys sort last, so positions ``[0,
n_valid)`` are exactly the valid keys), drawn in ascending order, each with the log-weight that
makes the sampled sums unbiased estimates of the residual (the paper's approximate matrix
product): uniform over the valid keys, or in proportion to ``|v|^2``. ApproxD's rows are a
uniform draw of sorted query positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["draw_sample_positions", "draw_samples", "draw_rows"]


def draw_sample_positions(rng: jax.Array, n_valid: jax.Array, kv_heads: int,
                          sample_size: int) -> jax.Array:
  """Uniform sample (with replacement) of *sorted* key positions, in ascending order.

  Invalid keys are sorted last, so positions ``[0, n_valid)`` are exactly the valid keys and a
  uniform draw over them is a uniform draw over the valid keys. Ascending, each key block's
  samples are consecutive: the Pallas kernels mask a query block's own samples only in the
  sample chunks that hold them.

  Args:
    n_valid: ``[batch]`` int32 number of valid keys.
  Returns:
    int32 ``[batch, kv_heads, sample_size]``.
  """
  batch = n_valid.shape[0]
  maxval = jnp.maximum(n_valid, 1)[:, None, None]
  return jnp.sort(jax.random.randint(rng, (batch, kv_heads, sample_size), 0, maxval,
                                     dtype=jnp.int32), axis=-1)


def draw_samples(rng: jax.Array, sampler: str, vs_sorted: jax.Array, n_valid: jax.Array,
                 sample_size: int) -> tuple[jax.Array, jax.Array]:
  """The residual samples: positions in the sorted key order, ascending, and their log-weights
  (unbiased reweighting).

  * ``"uniform"``: positions uniform over the valid keys, log-weight ``log(n_valid / m)``;
  * ``"value_norm"``: position ``j`` with probability ``p_j = |v_j|^2 / sum |v|^2`` over the
    valid keys (the paper's approximate matrix product), log-weight ``-log(m p_j)``. Drawn by
    inverse CDF from ``m`` uniforms, so the draw does not depend on padding beyond ``n_valid``.
    ``p_j`` is differentiable in v (the positions are not).

  Args:
    vs_sorted: ``[batch, kv_heads, n, head_dim]`` values in sorted order (valid keys first).
    n_valid: ``[batch]`` int32.
  Returns:
    positions int32 ``[batch, kv_heads, m]`` (ascending) and log-weights float32 ``[batch,
    kv_heads, m]`` (``-inf`` for a batch without valid keys).
  """
  batch, kv_heads, n = vs_sorted.shape[:3]
  shape = (batch, kv_heads, sample_size)
  empty = (n_valid == 0)[:, None, None]
  if sampler == "uniform":
    pos = draw_sample_positions(rng, n_valid, kv_heads, sample_size)
    log_w = jnp.log(n_valid.astype(jnp.float32) / sample_size)[:, None, None]
    return pos, jnp.broadcast_to(log_w, shape)
  if sampler != "value_norm":
    raise ValueError(f"sampler must be 'uniform' or 'value_norm', got {sampler!r}")
  valid = jnp.arange(n)[None, None, :] < n_valid[:, None, None]
  # tiny keeps an all-zero V drawable (uniformly); it is below any nonzero |v|^2 in float32.
  sq = jnp.where(valid, jnp.sum(jnp.square(vs_sorted.astype(jnp.float32)), axis=-1) +
                 jnp.finfo(jnp.float32).tiny, 0.0)                           # [B, Nkv, n]
  total = jnp.sum(sq, axis=-1, keepdims=True)
  cdf = jnp.cumsum(jax.lax.stop_gradient(sq), axis=-1)
  target = jnp.sort(jax.random.uniform(rng, shape), axis=-1) * jax.lax.stop_gradient(total)
  search = jax.vmap(jax.vmap(lambda c, t: jnp.searchsorted(c, t, side="right")))
  pos = jnp.minimum(search(cdf, target), jnp.maximum(n_valid, 1)[:, None, None] - 1)
  pos = pos.astype(jnp.int32)
  log_p = jnp.log(jnp.take_along_axis(sq, pos, axis=-1)) - jnp.log(total)
  return pos, jnp.where(empty, -jnp.inf, -(jnp.log(float(sample_size)) + log_p))


def draw_rows(rng: jax.Array, batch: int, kv_heads: int, q_len: int, rows: int) -> jax.Array:
  """Uniform sorted query positions ``[batch, kv_heads, rows]`` in ``[0, q_len)`` (ApproxD)."""
  return jax.random.randint(rng, (batch, kv_heads, rows), 0, q_len, dtype=jnp.int32)
