"""Hashing (stage 1a of sortLSH): angular LSH codes and their Gray-code rank, the sort key.

Angular LSH: ``r`` Gaussian hyperplanes; the bit ``i`` of a vector ``x`` is ``x . P[:, i] > 0``.
The bucket code is the integer with those bits. Sorting by the raw code would put codes 3
(011) and 4 (100) next to each other although they differ in every bit; instead we sort by the
*Gray rank* of the code: the position ``i`` with ``gray(i) = i ^ (i >> 1) == code``. Buckets
adjacent in that order differ in exactly one bit (one hyperplane), so a sorted block spans
angularly neighbouring buckets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["gray_code", "gray_rank", "lsh_codes", "lsh_sort_keys", "draw_projections"]


def gray_code(i: jax.Array) -> jax.Array:
  """The i-th Gray code, ``i ^ (i >> 1)`` (integer arrays)."""
  return jnp.bitwise_xor(i, jnp.right_shift(i, 1))


def gray_rank(code: jax.Array, num_bits: int) -> jax.Array:
  """Inverse of :func:`gray_code` for codes below ``2**num_bits``: the prefix-xor of the bits."""
  rank = code
  shift = 1
  while shift < num_bits:
    rank = jnp.bitwise_xor(rank, jnp.right_shift(rank, shift))
    shift *= 2
  return rank


def lsh_codes(x: jax.Array, projections: jax.Array) -> jax.Array:
  """Angular LSH bucket codes.

  Args:
    x: ``[batch, kv_heads, ..., seq, head_dim]``.
    projections: ``[kv_heads, head_dim, num_projs]`` Gaussian hyperplanes.
  Returns:
    int32 ``[batch, kv_heads, ..., seq]`` codes in ``[0, 2**num_projs)``.
  """
  num_projs = projections.shape[-1]
  extra = x.ndim - 4  # group axes between kv_heads and seq
  p = projections.reshape(projections.shape[:1] + (1,) * extra + projections.shape[1:])
  proj = jnp.matmul(x.astype(jnp.float32), p.astype(jnp.float32))  # [..., seq, r]
  bits = (proj > 0).astype(jnp.int32)
  weights = jnp.left_shift(jnp.int32(1), jnp.arange(num_projs, dtype=jnp.int32))
  return jnp.sum(bits * weights, axis=-1)


def lsh_sort_keys(x: jax.Array, projections: jax.Array) -> jax.Array:
  """Sort keys of the sortLSH order: Gray ranks of the LSH codes (same shape as lsh_codes)."""
  return gray_rank(lsh_codes(x, projections), projections.shape[-1])


def draw_projections(rng: jax.Array, kv_heads: int, head_dim: int, num_projs: int) -> jax.Array:
  """``[kv_heads, head_dim, num_projs]`` float32 Gaussian hyperplanes, shared by q and k."""
  return jax.random.normal(rng, (kv_heads, head_dim, num_projs), jnp.float32)
