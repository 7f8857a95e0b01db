"""Query-aware key-block selection (an option beyond the paper, ``select_blocks``).

Angular LSH puts a key in its query's block by angle alone, so a key whose score is large
through its norm at a moderate angle (a trained retrieval head's needle) is attended exactly
only by chance. Here every problem's keys are cut into runs of ``select_block_size``
consecutive keys, each run summarised by its per-channel max and min, and each sorted query
block chooses the ``select_blocks`` runs with the largest upper bound on ``q . k`` over its
queries (Quest, Tang et al. 2024: ``sum_d max(q_d kmax_d, q_d kmin_d)`` bounds ``q . k`` for every
key of the run). The blocked stage attends to the chosen keys exactly, except those already in
the query block's own sorted key block, and leaves the samples that fall in a chosen run out of
that block's residual: every valid key is counted once, by the block, the selection or the
(unbiased) sampled estimate of the rest.

Shapes: ``nb`` sorted query blocks, ``S = select_blocks * select_block_size`` chosen key rows
per block, ``m`` samples.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from hyperattn_jax import backends
from hyperattn_jax.blocked import grouped_rows

__all__ = ["Selection", "block_bounds", "run_extrema", "run_scores", "build_selection"]

# Elements of one chunk's [queries, runs] bound matrix (the selection of a 131k quadrant would
# otherwise hold every query's bound on every run at once).
_CHUNK_ELEMENTS = 1 << 25


class Selection(NamedTuple):
  """The keys each sorted query block attends to exactly beyond its own block (int/bool
  arrays: fixed under differentiation)."""
  rows: jax.Array          # [P, Nkv, nb, S] int32 local key rows of the chosen runs (-1: none)
  keep: jax.Array          # [P, Nkv, nb, S] bool: a valid key outside the block's own keys
  drop_samples: jax.Array  # [P, Nkv, nb, m] bool: the sample lies in a chosen run


def run_extrema(k, key_valid, run: int):
  """Per-channel max and min of every run of ``run`` consecutive valid keys: k ``[P, Nkv, Tk,
  H]``, key_valid ``[P, Tk]`` bool -> kmax, kmin ``[P, Nkv, R, H]`` in k's dtype (0 in runs
  without a valid key) and ``has_key`` ``[P, 1, R]`` (``R = ceil(Tk / run)``)."""
  p, kh, tk, h = k.shape
  r = -(-tk // run)
  k = jnp.pad(k, ((0, 0), (0, 0), (0, r * run - tk), (0, 0)))
  valid = jnp.pad(key_valid, ((0, 0), (0, r * run - tk)))[:, None, :, None]
  k, valid = k.reshape(p, kh, r, run, h), valid.reshape(p, 1, r, run, 1)
  has_key = jnp.any(valid, axis=(3, 4))
  kmax = jnp.max(jnp.where(valid, k, -jnp.inf), axis=3)
  kmin = jnp.min(jnp.where(valid, k, jnp.inf), axis=3)
  zero = lambda x: jnp.where(has_key[..., None], x, 0.0)
  return zero(kmax), zero(kmin), has_key


def block_bounds(q, kmax, kmin):
  """Quest's bound ``sum_d max(q_d kmax_d, q_d kmin_d)`` of q ``[..., n, H]`` against every run
  (kmax/kmin ``[..., R, H]``, leading axes broadcasting) -> ``[..., n, R]`` float32.

  16-bit inputs are multiplied in their own type with float32 accumulation (on GPU the tensor
  cores): a product of two 16-bit values is exact in float32, so the bound differs from the
  float32 one only in the order of summation. Other types: float32 at full precision."""
  if q.dtype == kmax.dtype and q.dtype in (jnp.bfloat16, jnp.float16):
    dot = lambda a, b: jnp.einsum("...nh,...rh->...nr", a, b, preferred_element_type=jnp.float32)
  else:
    q, kmax, kmin = (x.astype(jnp.float32) for x in (q, kmax, kmin))
    dot = lambda a, b: jnp.einsum("...nh,...rh->...nr", a, b,
                                  precision=jax.lax.Precision.HIGHEST)
  zero = jnp.zeros((), q.dtype)
  return dot(jnp.maximum(q, zero), kmax) + dot(jnp.minimum(q, zero), kmin)


def run_scores(q, q_perm, q_offset: int, kmax, kmin, num_blocks: int,
               implementation: backends.Backend):
  """Each sorted query block's score of every run: the bound maxed over its queries (all heads
  of the kv head). q ``[P, Rq, N, H]`` (the window's rows from ``q_offset``), q_perm ``[P, Nkv,
  G, nb * qb]`` (-1: padding rows, left out) -> ``[P, Nkv, nb, R]`` float32.

  A backend with kernels: their ``run_scores_pallas`` (bound tiles reduced in registers); XLA:
  chunked over query blocks so that one chunk's ``[queries, runs]`` bound matrix stays within
  ``_CHUNK_ELEMENTS``."""
  if implementation.kernels is not None:
    return implementation.kernels.run_scores_pallas(q, q_perm, kmax, kmin, num_blocks=num_blocks,
                                                    q_offset=q_offset, **implementation.options)
  p, kh, g, rows = q_perm.shape
  nb, qb, runs = num_blocks, rows // num_blocks, kmax.shape[2]
  qs = grouped_rows(q, q_perm, q_offset).reshape(p, kh, g, nb, qb, q.shape[-1])
  q_valid = (q_perm >= 0).reshape(p, kh, g, nb, qb)
  per_block = p * kh * g * qb * runs
  c = max(d for d in range(1, nb + 1) if nb % d == 0 and d * per_block <= max(_CHUNK_ELEMENTS,
                                                                             per_block))
  chunk = lambda x: jnp.moveaxis(x.reshape(x.shape[:3] + (nb // c, c) + x.shape[4:]), 3, 0)

  def block_scores(xs):
    q_c, valid_c = xs                                              # [P, Nkv, G, c, qb, (H)]
    bound = block_bounds(q_c, kmax[:, :, None, None], kmin[:, :, None, None])
    bound = jnp.where(valid_c[..., None], bound, -jnp.inf)         # [P, Nkv, G, c, qb, R]
    return jnp.max(bound, axis=(2, 4))                             # [P, Nkv, c, R]

  scores = jax.lax.map(block_scores, (chunk(qs), chunk(q_valid)))  # [nb / c, P, Nkv, c, R]
  return jnp.moveaxis(scores, 0, 2).reshape(p, kh, nb, runs)


def build_selection(q, q_perm, k, key_valid, k_perm, samp_rows, *, q_offset: int,
                    block_size: int, count: int, run: int,
                    implementation: backends.Backend) -> Selection:
  """The :class:`Selection` of one batch of problems.

  q ``[P, Rq, N, H]`` (the window's queries from ``q_offset``) and q_perm ``[P, Nkv, G, nb *
  qb]`` their sorted order (-1: padding); k ``[P, Nkv, Tk, H]`` the problem's keys in order and
  key_valid ``[P, Tk]``; k_perm ``[P, Nkv, nb * block_size]`` the sorted key order (-1:
  padding); samp_rows ``[P, Nkv, m]`` the samples' rows. ``count`` runs of ``run`` keys per
  block, the largest scores (:func:`run_scores`; ties: the lower index).
  """
  p, kh = q_perm.shape[:2]
  tk = k.shape[2]
  nb = k_perm.shape[-1] // block_size
  # A discrete choice: fixed under differentiation (no tangents through the score kernel).
  q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
  kmax, kmin, has_key = run_extrema(k, key_valid, run)
  scores = run_scores(q, q_perm, q_offset, kmax, kmin, nb, implementation)
  scores = jnp.where(has_key[:, :, None, :], scores, -jnp.inf)
  chosen = jax.lax.top_k(scores, min(count, scores.shape[-1]))[1].astype(jnp.int32)
  key_rows = (chosen[..., None] * run + jnp.arange(run, dtype=jnp.int32)).reshape(
      p, kh, nb, -1)                                               # [P, Nkv, nb, S]
  inside = key_rows < tk
  key_rows = jnp.where(inside, key_rows, -1)
  # A key's sorted position (its own block in the sorted order): the inverse of k_perm.
  positions = jnp.arange(k_perm.shape[-1], dtype=jnp.int32)
  pi, hi = jnp.arange(p)[:, None, None], jnp.arange(kh)[None, :, None]
  rank = jnp.zeros((p, kh, tk), jnp.int32).at[pi, hi, jnp.where(k_perm >= 0, k_perm, tk)].set(
      jnp.broadcast_to(positions, k_perm.shape), mode="drop")
  gather = lambda x: jnp.take_along_axis(x, jnp.maximum(key_rows, 0).reshape(p, kh, -1),
                                         axis=-1).reshape(key_rows.shape)
  valid = inside & gather(jnp.broadcast_to(key_valid[:, None, :], (p, kh, tk)))
  own = gather(rank) // block_size == jnp.arange(nb, dtype=jnp.int32)[None, None, :, None]
  drop = jnp.any((samp_rows // run)[:, :, None, :, None] == chosen[:, :, :, None, :], axis=-1)
  return Selection(key_rows, valid & ~own, drop)
