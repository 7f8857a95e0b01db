"""Pallas (Triton) kernel of the ``select_blocks`` option's run scores (reference:
``hyperattn_jax/selection.py``, ``block_bounds`` maxed over each block's queries).

Each sorted query block scores every run of keys by Quest's bound maxed over its queries (all
heads of the kv head): ``score[b, r] = max_{i in block b} sum_d max(q_id kmax_rd, q_id kmin_rd)``
``= max_i ([relu(q_i), min(q_i, 0)] . [kmax_r, kmin_r])``. XLA writes the ``[queries, runs]``
bound matrix to memory and reduces it (both for every level of a causal call); here a program
keeps a running elementwise maximum of its ``[block_q, block_r]`` bound tiles in registers
(no reduction across the tile's rows, i.e. across warps, per tile) and reduces it over rows
once, writing only the ``block_r`` maxima.

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

from pallas_kernels.triton.block_sizes import BlockSizes, check_block_sizes
from pallas_kernels.triton.common import NEG_INF, check_array, dot, pad_to, pow2_at_least, round_up

__all__ = ["run_scores_pallas"]


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
    bound = (dot(jnp.maximum(q, zero), kmax, trans_b=True)
             + dot(jnp.minimum(q, zero), kmin, trans_b=True))
    bound = jnp.where((rows >= 0)[:, None], bound, NEG_INF)       # [block_q, block_r]
    return jnp.maximum(best, bound)

  def group(g, best):
    return lax.fori_loop(0, tiles, functools.partial(tile, g=g), best)

  best = jnp.full((block_q, kmax.shape[0]), NEG_INF, jnp.float32)
  out_ref[...] = jnp.max(lax.fori_loop(0, groups, group, best), axis=0)


def run_scores_pallas(q, q_perm, kmax, kmin, *, num_blocks: int, q_offset: int,
                      block_sizes: BlockSizes = BlockSizes(), interpret: bool):
  """Each sorted query block's score of every run (``block_sizes.run_scores`` tiles: its
  ``block_k`` runs per program; ``interpret``: Pallas' interpreter).

  Args:
    q: ``[P, Rq, N, H]`` queries (public layout; the window's rows from ``q_offset``).
    q_perm: ``[P, Nkv, G, nb * qb]`` int32 local query rows in sorted order (-1: padding);
      block ``b`` (of ``num_blocks``) holds its entries ``b * qb .. (b + 1) * qb - 1``.
    kmax, kmin: ``[P, Nkv, R, H]`` per-channel max/min of every run (q's dtype, or float32).
  Returns:
    ``[P, Nkv, nb, R]`` float32: the bound maxed over the block's queries (-inf for a block
    without a valid query).
  """
  check_array("q", q, (("P", None), ("Rq", None), ("N", None), ("H", None)), "float")
  p, _, n, h = q.shape
  check_array("q_perm", q_perm, (("P", p), ("Nkv", None), ("G", None), ("nb * qb", None)), "int")
  if n != q_perm.shape[1] * q_perm.shape[2] or q_perm.shape[3] % num_blocks:
    raise ValueError(f"q_perm: expected [P, Nkv, G, num_blocks * qb] with Nkv * G = {n}, "
                     f"num_blocks = {num_blocks}; got {q_perm.shape}")
  kh, g, rows = q_perm.shape[1:]
  r = kmax.shape[2] if kmax.ndim == 4 else None
  for name, x in (("kmax", kmax), ("kmin", kmin)):
    check_array(name, x, (("P", p), ("Nkv", kh), ("R", r), ("H", h)), "float")
  check_block_sizes(block_sizes)
  tiles = block_sizes.run_scores
  # kmax/kmin in q's type: exact for values drawn from 16-bit keys (the reference's inputs).
  dtype = q.dtype
  kmax, kmin = kmax.astype(dtype), kmin.astype(dtype)
  nb = num_blocks
  qb = rows // nb
  bq = min(tiles.block_q, pow2_at_least(qb))
  qb_p = round_up(qb, bq)
  br = min(tiles.block_k, pow2_at_least(r))
  r_p = round_up(r, br)
  h_p = pow2_at_least(h)
  q = pad_to(q, 3, h_p)
  kmax, kmin = (pad_to(pad_to(x, 3, h_p), 2, r_p) for x in (kmax, kmin))
  perm = pad_to(q_perm.reshape(p, kh, g, nb, qb), 4, qb_p, -1).reshape(p, kh, g, nb * qb_p)
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
      compiler_params=plgpu.CompilerParams(**tiles.compiler), interpret=interpret,
      name="hyperattn_run_scores")(
          q, perm, kmax, kmin)
  return out[..., :r]
