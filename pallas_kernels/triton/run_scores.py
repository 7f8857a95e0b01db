"""Pallas (Triton) kernel of the ``select_blocks`` option's run scores (reference:
``hyperattn_jax/selection.py``, ``block_bounds`` maxed over each block's queries).

Each sorted query block scores every run of keys by Quest's bound maxed over its queries (all
heads of the kv head): ``score[b, r] = max_{i in block b} sum_d max(q_id kmax_rd, q_id kmin_rd)``
``= max_i ([relu(q_i), min(q_i, 0)] . [kmax_r, kmin_r])``. XLA writes the ``[queries, runs]``
bound matrix to memory and reduces it (both for every level of a causal call); here a program
keeps one block's ``[block_q, block_r]`` bound tiles in registers and writes only the
``block_r`` maxima.

Grid ``(P * Nkv, block, run chunk)`` with the run chunks fastest (the programs of one query
block run side by side and read its query rows from L2). Query rows are loaded by index from
the sort permutation (``-1``: padding, left out of the max), in the public layout ``[P, Rq, N,
H]`` at the window's ``q_offset``. Products are exact in the float32 accumulation for 16-bit
inputs and float32 ones (no TF32), as in the reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

__all__ = ["run_scores_pallas"]

_NEG_INF = float("-inf")


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _pow2_at_least(x: int, lo: int = 16) -> int:
  p = lo
  while p < x:
    p *= 2
  return p


def _scores_kernel(q_ref, perm_ref, kmax_ref, kmin_ref, out_ref, *, kv_heads, groups,
                   q_offset, block_q, tiles):
  i = pl.program_id(2)  # the launch grid is the logical one reversed
  p, kv = i // kv_heads, i % kv_heads
  kmax, kmin = kmax_ref[...], kmin_ref[...]                       # [block_r, H]
  cols = lax.broadcasted_iota(jnp.int32, (1, q_ref.shape[-1]), 1)

  def tile(t, best, g):
    rows = perm_ref[g, pl.ds(t * block_q, block_q)]
    q = q_ref[p, q_offset + jnp.maximum(rows, 0)[:, None], kv * groups + g, cols]
    zero = jnp.zeros((), q.dtype)
    bound = (plgpu.dot(jnp.maximum(q, zero), kmax, trans_b=True, allow_tf32=False)
             + plgpu.dot(jnp.minimum(q, zero), kmin, trans_b=True, allow_tf32=False))
    bound = jnp.where((rows >= 0)[:, None], bound, _NEG_INF)      # [block_q, block_r]
    return jnp.maximum(best, jnp.max(bound, axis=0))

  def group(g, best):
    return lax.fori_loop(0, tiles, functools.partial(tile, g=g), best)

  best = jnp.full((kmax.shape[0],), _NEG_INF, jnp.float32)
  out_ref[...] = lax.fori_loop(0, groups, group, best)


def run_scores_pallas(q, q_perm, kmax, kmin, *, num_blocks: int, q_offset: int,
                      block_q: int = 64, block_r: int = 64, num_warps: int = 4,
                      num_stages: int = 2):
  """Each sorted query block's score of every run.

  Args:
    q: ``[P, Rq, N, H]`` queries (public layout; the window's rows from ``q_offset``).
    q_perm: ``[P, Nkv, G, nb * qb]`` int32 local query rows in sorted order (-1: padding);
      block ``b`` (of ``num_blocks``) holds its entries ``b * qb .. (b + 1) * qb - 1``.
    kmax, kmin: ``[P, Nkv, R, H]`` per-channel max/min of every run (q's dtype, or float32).
  Returns:
    ``[P, Nkv, nb, R]`` float32: the bound maxed over the block's queries (-inf for a block
    without a valid query).
  """
  p, _, n, h = q.shape
  if q_perm.ndim != 4 or q_perm.shape[0] != p or n != q_perm.shape[1] * q_perm.shape[2] or (
      q_perm.shape[3] % num_blocks):
    raise ValueError(f"q_perm: expected [P, Nkv, G, num_blocks * qb] with P = {p}, Nkv * G = "
                     f"{n}, num_blocks = {num_blocks}; got {q_perm.shape}")
  kh, g, rows = q_perm.shape[1:]
  r = kmax.shape[2]
  if kmax.shape != (p, kh, r, h) or kmin.shape != kmax.shape:
    raise ValueError(f"kmax, kmin: expected [P, Nkv, R, H] = {(p, kh, r, h)}, got {kmax.shape}, "
                     f"{kmin.shape}")
  # kmax/kmin in q's type: exact for values drawn from 16-bit keys (the reference's inputs).
  dtype = q.dtype
  kmax, kmin = kmax.astype(dtype), kmin.astype(dtype)
  nb = num_blocks
  qb = rows // nb
  bq = min(block_q, _pow2_at_least(qb))
  qb_p = _round_up(qb, bq)
  br = min(block_r, _pow2_at_least(r))
  r_p = _round_up(r, br)
  h_p = _pow2_at_least(h)
  pad = lambda x, axis, size, value=0: jnp.pad(
      x, [(0, size - x.shape[a]) if a == axis else (0, 0) for a in range(x.ndim)],
      constant_values=value)
  q = pad(q, 3, h_p)
  kmax, kmin = (pad(pad(x, 3, h_p), 2, r_p) for x in (kmax, kmin))
  perm = pad(q_perm.reshape(p, kh, g, nb, qb), 4, qb_p, -1).reshape(p, kh, g, nb * qb_p)
  kernel = functools.partial(_scores_kernel, kv_heads=kh, groups=g, q_offset=q_offset,
                             block_q=bq, tiles=qb_p // bq)
  spec = lambda shape, index: pl.BlockSpec(shape, lambda c, b, i: index(i, b, c))
  out = pl.pallas_call(
      kernel, grid=(r_p // br, nb, p * kh),
      in_specs=[pl.no_block_spec,
                spec((None, None, g, qb_p), lambda i, b, c: (i // kh, i % kh, 0, b)),
                spec((None, None, br, h_p), lambda i, b, c: (i // kh, i % kh, c, 0)),
                spec((None, None, br, h_p), lambda i, b, c: (i // kh, i % kh, c, 0))],
      out_specs=spec((None, None, None, br), lambda i, b, c: (i // kh, i % kh, b, c)),
      out_shape=jax.ShapeDtypeStruct((p, kh, nb, r_p), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=jax.default_backend() != "gpu", name="hyperattn_run_scores")(
          q, perm, kmax, kmin)
  return out[..., :r]
