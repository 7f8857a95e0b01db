"""Pallas (Triton) kernels for attention restricted to a key block, plus shared samples.

The same kernels serve both GPU stages of HyperAttention, forward and backward:

* the blocked stage (``blocked_attention_pallas`` / ``blocked_attention_bwd_pallas``, reference
  ``hyperattn_jax/blocked.py``): a tile of sorted query block ``n`` attends to sorted key block
  ``n`` and to the shared samples (each with its log-weight, masked when it lies in block ``n``);
* the exact base case (``flash_attention_pallas`` / ``flash_attention_bwd_pallas``, reference
  ``hyperattn_jax/exact.py``): one key block per batch row, causal within it, no samples.

Rows by index: every kernel reads q, k, v (and dO, lse, delta) in the public layout
``[P, rows, heads, head_dim]`` / ``[P, heads, rows]`` and writes its results there, row by row.
A tile's rows are either read from the sort permutations (``sorted``, the blocked stage: the
sortLSH order is never materialised, and the outputs land unsorted) or are consecutive (the
base case). ``-1`` marks a padding row: it is never stored, and where it could reach another
row's result it reads zeros (a masked load: a padding key's k and v in the forward and dq, a
padding query's q and dO in dk/dv), so a NaN in row 0 reaches only what attends to row 0; where
it cannot (a padding query's own row, a padding key's own gradient) it loads row 0.

Forward: each program owns ``block_q`` query rows of one (batch * kv_head, group head, block) and
runs one online-softmax pass (fp32 statistics and accumulator) over the block's keys in chunks of
``block_k`` (skipping chunks above the diagonal when causal) and then over the samples; it writes
the normalised output and the log-sum-exp.

Backward (flash-style recomputation from an lse and ``delta = rowsum(dO * O) - dlse``: those of
the kernel's own result, or of a merged result that contains it as a part, ``merge.py``; dO,
lse and delta are read in q's rows, at the window's offset):
  * ``dq``: the forward's grid and key loop, accumulating ``dS K`` for its query tile;
  * ``dk, dv`` of a block's keys: one program per two chunks of ``block_k`` keys, each looping
    over the block's query tiles of every group head (no other block touches these keys, so no
    reduction), the next chunk's rows loaded during the current chunk's loop;
  * ``dk, dv`` of the samples: every query block reaches them, so each program takes ``block_k``
    samples and a group of query blocks and writes a float32 partial; the partials of the
    groups are summed afterwards (no races, bounded extra memory).

Running arrays (``into=``, a causal level of the recursion): after its key loop the forward
merges its (unnormalised) result with the running (out, lse) of its query rows by log-sum-exp
and writes the merged rows back; dq and the own keys' dk/dv add into the running gradients' rows.
The running arrays are aliased inputs/outputs (``input_output_aliases``: updated in place, no
merge or scatter pass); each program owns its rows, so there are no races. Only a head_dim that
needs no padding can be updated in place (:func:`in_place`); the caller merges the others.

Scores are kept in base-2 units inside the kernels: ``s = q k^T (scale log2 e) + bias``,
probabilities ``exp2(s - m)`` (one multiply-add and one ``ex2`` per score instead of the longer
``expf`` sequence). The per-key biases and the backward's lse input arrive in base-2 units
(scaled by XLA outside); the forward's lse is converted back at the boundary (natural log
outside, the running lse too).

Key validity (masks, padding, ``n_valid``) is an additive bias row (0 or -inf) per key, so no
mask tensor of size ``q x k`` exists; where the caller promises that every key is valid
(``all_keys_valid``) and the blocks are full, there is no bias row at all. GQA: the
group axis is a grid axis (forward, dq) or a loop (dk/dv) over programs reading the same K/V
rows (no repetition in HBM).

Small per-call arrays (padded per block to whole tiles): key_bias ``[P, 1 or Nkv, nb * bs_p]``,
q_perm ``[P, Nkv, G, nb * qb_p]``, k_perm ``[P, Nkv, nb * bs_p]`` int32, samples k/v
``[P*Nkv, m_p, H]``, sample_block ``[P*Nkv, m_p]`` int32 (-1 = padding), sample_bias
``[P*Nkv, m_p]`` f32 (the log-weights times log2 e), sample_span ``[P*Nkv, 2, nb]`` int32 (the
sample columns ``[lo, hi)`` of each block's samples: the forward and dq select away a query
block's own samples only in the chunks overlapping them, one or two for ascending samples).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.triton.block_sizes import BlockSizes, Tiles, check_block_sizes
from pallas_kernels.triton.common import (LOG2E, NEG_INF, check_array, dot, pad_to,
                                          pow2_at_least, round_up)

__all__ = ["blocked_attention_pallas", "blocked_attention_bwd_pallas", "flash_attention_pallas",
           "flash_attention_bwd_pallas", "in_place"]

_LN2 = math.log(2.0)


def _causal(s, q0, k0, query_axis=0):
  """Causal mask of a score tile with queries from ``q0`` and keys from ``k0`` on its axes."""
  q_pos = q0 + lax.broadcasted_iota(jnp.int32, s.shape, query_axis)
  k_pos = k0 + lax.broadcasted_iota(jnp.int32, s.shape, 1 - query_axis)
  return jnp.where(q_pos >= k_pos, s, NEG_INF)


class _Geometry(NamedTuple):
  """Static shape and launch settings of one call. Local rows: query ``i`` is row ``q_offset +
  i`` of q."""
  kv_heads: int
  groups: int
  num_blocks: int
  q_len: int            # valid local query rows; outputs have this many rows
  q_offset: int
  k_len: int
  k_offset: int
  block_q: int
  block_k: int
  tiles_per_block: int  # query tiles per block (block_q * tiles >= the block's query rows)
  chunks_per_block: int  # key chunks per block (block_k * chunks >= the block's keys)
  sorted: bool          # rows come from q_perm / k_perm (the blocked stage); else the rows of
                        # the one block are consecutive (the exact kernels)
  causal: bool          # within the block (exact kernels only)
  num_warps: int
  num_stages: int
  interpret: bool       # Pallas' interpreter (off the GPU)
  accumulate: bool = False  # results go into the rows of running arrays (``into=``)
  key_bias: bool = True  # a per-key bias row (0 / -inf) masks invalid keys; False: all valid
  lse_parts: int = 1    # running lse ``[P / lse_parts, N, lse_parts, rows]`` (problem p = its
                        # batch row p // lse_parts, row group p % lse_parts)
  select_chunks: int = 0  # chunks of ``block_k`` selected keys per block (``select_blocks``)
  block_sample_bias: bool = False  # the samples' bias is per query block (own and dropped
                                   # samples -inf in it): no own-block select
  key_partials: bool = False  # dk/dv kernel: float32 results at the keys' positions in k_perm
                              # (selected keys: one key may be chosen by several blocks)
  key_padding: bool = True    # a key chunk may hold padding rows (-1): their k, v read zeros
  query_padding: bool = True  # a query tile may hold padding rows (-1): in dk/dv their q, dO
                              # read zeros


# ----------------------------------------------------------------------------------------------
# Rows by index


def _cols(width):
  return lax.broadcasted_iota(jnp.int32, (1, width), 1)


def _load_rows(ref, p, rows, head, offset=0):
  """``ref[p, offset + rows, head, :]`` ``[len(rows), H]`` (row 0 for padding rows)."""
  return ref[p, offset + jnp.maximum(rows, 0)[:, None], head, _cols(ref.shape[-1])]


def _load_rows_or_zeros(ref, p, rows, head, offset=0):
  """:func:`_load_rows` with zeros on padding rows, which are masked out of the load (the XLA
  stage's gathers give zeros; row 0 may hold a NaN that a zero probability would not cancel:
  ``0 * NaN`` is NaN)."""
  at = offset + jnp.maximum(rows, 0)
  return plgpu.load(ref.at[p, at[:, None], head, _cols(ref.shape[-1])],
                    mask=(rows >= 0)[:, None], other=0)


def _store_rows(ref, p, rows, head, value, offset=0):
  """``ref[p, offset + rows, head, :] = value``, skipping padding rows (masked, never
  addressed)."""
  valid = rows >= 0
  at = jnp.where(valid, offset + rows, ref.shape[1])
  plgpu.store(ref.at[p, at[:, None], head, _cols(ref.shape[-1])], value.astype(ref.dtype),
              mask=valid[:, None])


def _load_stats(ref, p, rows, head, padding, offset=0):
  """``ref[p, head, offset + rows]`` (``padding`` on padding rows) from a ``[P, N, T]`` array."""
  return jnp.where(rows >= 0, ref[p, head, offset + jnp.maximum(rows, 0)], padding)


def _store_stats(ref, p, rows, head, value):
  valid = rows >= 0
  plgpu.store(ref.at[p, head, jnp.where(valid, rows, ref.shape[2])], value, mask=valid)


def _load_running_lse(geo, ref, p, rows, head):
  """Rows ``q_offset + rows`` of problem ``p`` of a running lse ``[P / lse_parts, N, lse_parts,
  R]`` (``-inf`` on padding rows)."""
  at = geo.q_offset + jnp.maximum(rows, 0)
  return jnp.where(rows >= 0, ref[p // geo.lse_parts, head, p % geo.lse_parts, at], NEG_INF)


def _store_running_lse(geo, ref, p, rows, head, value):
  valid = rows >= 0
  at = jnp.where(valid, geo.q_offset + rows, ref.shape[3])
  plgpu.store(ref.at[p // geo.lse_parts, head, p % geo.lse_parts, at], value, mask=valid)


def _store_results(geo, outs, values, p, rows, head, offset, running=None):
  """Stores float32 ``values`` (one per result) at local ``rows``: into the running arrays
  (``outs`` = their inputs, then the aliased outputs), added to their rows ``offset + rows``
  (``running``: those rows if already loaded), when ``geo.accumulate``; else into the
  window-sized outputs ``outs``."""
  n = len(values)
  if not geo.accumulate:
    for ref, value in zip(outs, values):
      _store_rows(ref, p, rows, head, value)
    return
  if running is None:
    running = [_load_rows(ref, p, rows, head, offset) for ref in outs[:n]]
  for ref, value, prior in zip(outs[n:], values, running):
    _store_rows(ref, p, rows, head, value + prior.astype(jnp.float32), offset)


def _tile_rows(geo, perm, tile):
  """Local query rows of a tile: ``perm`` (sorted), or tile ``tile`` of the consecutive rows
  (the exact kernels: one block)."""
  if geo.sorted:
    return perm
  r = tile * geo.block_q + lax.iota(jnp.int32, geo.block_q)
  return jnp.where(r < geo.q_len, r, -1)


def _chunk_keys(geo, perm, chunk):
  """Local key rows of a key chunk: ``perm`` (that chunk of k_perm), or chunk ``chunk`` of the
  consecutive keys (the exact kernels: one block)."""
  if geo.sorted:
    return perm
  c = chunk * geo.block_k + lax.iota(jnp.int32, geo.block_k)
  return jnp.where(c < geo.k_len, c, -1)


# ----------------------------------------------------------------------------------------------
# Kernels


class _Refs(NamedTuple):
  """The kernel's inputs beyond its row arrays: keys and (optional) permutations, samples,
  selected keys."""
  k: object
  v: object
  bias: object      # or None (``geo.key_bias`` False: every key valid)
  q_perm: object
  k_perm: object
  samples: object   # (k, v, bias, block[, span]) or None
  selected: object  # (rows, bias) of the block's selected keys, or None


def _split_refs(refs, geo, n_samples):
  """The kernel's key refs, and the rest; ``n_samples`` sample refs: 5 (k, v, bias, block,
  span) in the forward and dq, 4 (no span) in the samples' dk/dv, 0 without samples."""
  k, v, *refs = refs
  bias = None
  if geo.key_bias:
    bias, *refs = refs
  q_perm = k_perm = None
  if geo.sorted:
    q_perm, k_perm, *refs = refs
  samples = None
  if n_samples:
    samples, refs = tuple(refs[:n_samples]), refs[n_samples:]
  selected = None
  if geo.select_chunks:
    selected, refs = tuple(refs[:2]), refs[2:]
  return _Refs(k, v, bias, q_perm, k_perm, samples, selected), refs


def _visit_keys(step, carry, q, row0, block, refs, p, kv, *, geo, scale):
  """Runs ``carry = step(carry, s, k, v)`` over every key chunk a query tile sees.

  ``q`` ``[block_q, H]`` sits at row ``row0`` of its query block ``block``; ``s`` is the masked
  fp32 score tile ``[block_q, block_k]`` (base-2 units) of a chunk of the block's keys (then of
  the selected keys, then of the samples).
  """
  bk = geo.block_k
  scale2 = scale * LOG2E
  # Padding keys have a -inf bias (or causal mask), but their probability 0 times a NaN in the
  # row they would load is NaN: where there can be padding, they read zeros.
  load_keys = _load_rows_or_zeros if geo.key_padding else _load_rows

  def key_chunk(j, carry, masked):
    sl = pl.ds(j * bk, bk)
    keys = _chunk_keys(geo, refs.k_perm[sl] if geo.sorted else None, j)
    k = load_keys(refs.k, p, keys, kv, geo.k_offset)
    s = dot(q, k, trans_b=True) * scale2
    if geo.key_bias:
      s = s + refs.bias[sl][None, :]
    if masked:
      s = _causal(s, row0, j * bk)
    return step(carry, s, k, load_keys(refs.v, p, keys, kv, geo.k_offset))

  n_chunks = geo.chunks_per_block
  if geo.causal:  # chunks left of the diagonal need no mask; the diagonal ones do
    below = row0 // bk
    upper = jnp.minimum(n_chunks, (row0 + q.shape[0] + bk - 1) // bk)
    carry = lax.fori_loop(0, below, functools.partial(key_chunk, masked=False), carry)
    carry = lax.fori_loop(below, upper, functools.partial(key_chunk, masked=True), carry)
  else:
    carry = lax.fori_loop(0, n_chunks, functools.partial(key_chunk, masked=False), carry)

  if refs.selected is not None:
    rows_ref, sel_bias_ref = refs.selected

    def selected_chunk(j, carry):
      sl = pl.ds(j * bk, bk)
      keys = rows_ref[sl]
      k = _load_rows_or_zeros(refs.k, p, keys, kv, geo.k_offset)
      s = dot(q, k, trans_b=True) * scale2 + sel_bias_ref[sl][None, :]
      return step(carry, s, k, _load_rows_or_zeros(refs.v, p, keys, kv, geo.k_offset))
    carry = lax.fori_loop(0, geo.select_chunks, selected_chunk, carry)

  if refs.samples is not None:
    ks_ref, vs_ref, sb_ref, sblk_ref, span_ref = refs.samples
    lo, hi = span_ref[0, block], span_ref[1, block]

    def sample_chunk(j, carry):
      sl = pl.ds(j * bk, bk)
      k = ks_ref[sl, :]
      s = dot(q, k, trans_b=True) * scale2 + sb_ref[sl][None, :]
      if not geo.block_sample_bias:
        s = _own_block_masked(s, sblk_ref[sl], block, j * bk, lo, hi)
      return step(carry, s, k, vs_ref[sl, :])
    carry = lax.fori_loop(0, ks_ref.shape[0] // bk, sample_chunk, carry)
  return carry


def _own_block_masked(s, sample_block, block, col0, lo, hi):
  """Scores ``s`` ``[block_q, block_k]`` against the samples from column ``col0``
  (``sample_block``: their key blocks) with those in the query block ``block`` masked (counted
  exactly in the block's own keys). The select runs only where the chunk overlaps the block's
  sample columns ``[lo, hi)``."""
  own = lambda s, b: jnp.where(b[None, :] == block, NEG_INF, s)
  return lax.cond((col0 < hi) & (col0 + sample_block.shape[0] > lo), own, lambda s, b: s, s,
                  sample_block)


def _query_tile(geo, refs):
  """(problem, kv head, head, block, tile in block, local rows) of a forward/dq program."""
  i, t, g = _program_ids(3)
  p, kv = i // geo.kv_heads, i % geo.kv_heads
  block, tile = t // geo.tiles_per_block, t % geo.tiles_per_block
  rows = _tile_rows(geo, refs.q_perm[...] if geo.sorted else None, tile)
  return p, kv, kv * geo.groups + g, block, tile, rows


def _fwd_kernel(q_ref, *refs, geo, scale, has_samples):
  refs, outs = _split_refs(refs, geo, 5 if has_samples else 0)
  p, kv, head, block, tile, rows = _query_tile(geo, refs)
  q = _load_rows(q_ref, p, rows, head, geo.q_offset)
  block_q, head_dim = q.shape

  def step(carry, s, k, v):
    del k
    m, l, acc = carry
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
    alpha = jnp.exp2(m - m_safe)
    p_ = jnp.exp2(s - m_safe[:, None])
    return m_new, l * alpha + jnp.sum(p_, axis=1), acc * alpha[:, None] + dot(p_.astype(v.dtype),
                                                                              v)

  init = (jnp.full((block_q,), NEG_INF, jnp.float32), jnp.zeros((block_q,), jnp.float32),
          jnp.zeros((block_q, head_dim), jnp.float32))
  m, l, acc = _visit_keys(step, init, q, tile * block_q, block, refs, p, kv, geo=geo,
                          scale=scale)
  if geo.accumulate:
    # Merge with the running (out, lse) of these rows, read only now: reading them before the
    # key loop measured slower (HISTORY). Running rows without keys (lse -inf, weight 0) hold
    # zeros, as every writer stores them, so no select guards against other values there.
    out_in, lse_in, o_ref, lse_ref = outs
    m_run = _load_running_lse(geo, lse_in, p, rows, head) * LOG2E
    m_tot = jnp.maximum(m, m_run)
    m_safe = jnp.where(m_tot == NEG_INF, 0.0, m_tot)
    alpha, beta = jnp.exp2(m - m_safe), jnp.exp2(m_run - m_safe)
    out_run = _load_rows(out_in, p, rows, head, geo.q_offset).astype(jnp.float32)
    acc = acc * alpha[:, None] + out_run * beta[:, None]
    m, l = m_safe, l * alpha + beta
  else:
    o_ref, lse_ref = outs
  has = l != 0  # 0 on rows without a valid key; NaN (a NaN input) propagates
  l_safe = jnp.where(has, l, 1.0)
  out = jnp.where(has[:, None], acc / l_safe[:, None], 0.0)
  lse = jnp.where(has, (m + jnp.log2(l_safe)) * _LN2, NEG_INF)
  if geo.accumulate:
    _store_rows(o_ref, p, rows, head, out, geo.q_offset)
    _store_running_lse(geo, lse_ref, p, rows, head, lse)
  else:
    _store_rows(o_ref, p, rows, head, out)
    _store_stats(lse_ref, p, rows, head, lse)


def _dq_kernel(q_ref, do_ref, lse_ref, delta_ref, *refs, geo, scale, has_samples):
  refs, outs = _split_refs(refs, geo, 5 if has_samples else 0)
  p, kv, head, block, tile, rows = _query_tile(geo, refs)
  q = _load_rows(q_ref, p, rows, head, geo.q_offset)
  do = _load_rows(do_ref, p, rows, head, geo.q_offset)
  lse2 = _load_stats(lse_ref, p, rows, head, jnp.inf, geo.q_offset)
  delta = _load_stats(delta_ref, p, rows, head, 0.0, geo.q_offset)

  def step(dq, s, k, v):
    p_ = jnp.exp2(s - lse2[:, None])
    ds = p_ * (dot(do, v, trans_b=True) - delta[:, None])
    return dq + dot(ds.astype(k.dtype), k)

  # The running dq rows (into=) are loaded with q, not after the loop.
  running = [_load_rows(outs[0], p, rows, head, geo.q_offset)] if geo.accumulate else None
  dq = _visit_keys(step, jnp.zeros(q.shape, jnp.float32), q, tile * q.shape[0], block, refs, p,
                   kv, geo=geo, scale=scale) * scale
  _store_results(geo, outs, (dq,), p, rows, head, geo.q_offset, running)


def _chunk_grads(rows_in, refs, p, kv, k, v, bias, first_block, col0, n_dw, *, geo, scale,
                 blocks_per_program, samples):
  """(dk, dv[, dw]) float32 of keys k/v ``[block_k, H]`` (from column ``col0`` of their block;
  ``bias`` ``[block_k]`` or None) of problem ``p``, kv head ``kv`` over the query tiles of
  ``blocks_per_program`` blocks from ``first_block`` (``rows_in``: the q, dO, lse, delta refs);
  ``n_dw`` 1: with the log-weights' gradient (the samples' row sums of the score gradient)."""
  q_ref, do_ref, lse_ref, delta_ref = rows_in
  bk, bq, tpb = geo.block_k, geo.block_q, geo.tiles_per_block
  scale2 = scale * LOG2E
  # A padding query's probabilities are 0 (lse +inf), but they multiply its q and dO into every
  # key's gradient: where there can be padding, those read zeros (a NaN there is 0 * NaN).
  load_queries = _load_rows_or_zeros if geo.query_padding else _load_rows

  def query_tile(t, carry, g, masked):
    dk, dv, *dw = carry
    # lax.div/rem (t >= 0): jnp's // and % inside a static-trip-count loop fail to lower in
    # jax 0.11's Triton backend (operand types i32 vs i1).
    tpb_ = jnp.int32(tpb)
    block, tile = first_block + lax.div(t, tpb_), lax.rem(t, tpb_)
    head = kv * geo.groups + g
    rows = _tile_rows(geo, refs.q_perm[g, pl.ds(t * bq, bq)] if geo.sorted else None, tile)
    q = load_queries(q_ref, p, rows, head, geo.q_offset)
    do = load_queries(do_ref, p, rows, head, geo.q_offset)
    lse2 = _load_stats(lse_ref, p, rows, head, jnp.inf, geo.q_offset)
    delta = _load_stats(delta_ref, p, rows, head, 0.0, geo.q_offset)
    s = dot(k, q, trans_b=True) * scale2                              # [block_k, block_q]
    if bias is not None:
      s = s + bias[:, None]
    if samples and geo.block_sample_bias:  # the bias row of the tile's block
      s = s + refs.samples[2][lax.div(t, tpb_), :][:, None]
    elif samples:  # a select on every tile (the span's per-tile test measured slower)
      s = jnp.where(refs.samples[3][...][:, None] == block, NEG_INF, s)
    if masked:  # keys on the rows, queries on the columns
      s = _causal(s, tile * bq, col0, query_axis=1)
    p_ = jnp.exp2(s - lse2[None, :])
    ds = p_ * (dot(v, do, trans_b=True) - delta[None, :])
    return (dk + dot(ds.astype(q.dtype), q), dv + dot(p_.astype(do.dtype), do),
            *(w + jnp.sum(ds, axis=1) for w in dw))

  n_tiles = blocks_per_program * tpb

  def head_loop(g, carry):
    if not geo.causal:
      return lax.fori_loop(0, n_tiles, functools.partial(query_tile, g=g, masked=False), carry)
    # Query tiles above the chunk see none of its keys; those crossing the diagonal are masked.
    first = col0 // bq
    unmasked = jnp.minimum(n_tiles, (col0 + bk + bq - 1) // bq)
    carry = lax.fori_loop(first, unmasked, functools.partial(query_tile, g=g, masked=True),
                          carry)
    return lax.fori_loop(unmasked, n_tiles, functools.partial(query_tile, g=g, masked=False),
                         carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dw = (jnp.zeros((k.shape[0],), jnp.float32),) * n_dw
  return lax.fori_loop(0, geo.groups, head_loop, (zeros, zeros, *dw))


def _dkdv_kernel(*refs, geo, scale, blocks_per_program, chunks_per_program, samples,
                 weight_grad):
  """dk, dv of chunks of keys: a block's own keys, or samples against a group of blocks.

  Own keys (grid ``(P * Nkv, num_blocks * chunks_per_block / chunks_per_program)``):
  ``chunks_per_program`` consecutive chunks of one block, each over the block's query tiles;
  the keys are loaded by index (the next chunk's while this one runs: a block has only a few
  query tiles, so a program per chunk would wait on its loads) and their gradients stored by
  index. Samples (grid ``(P * Nkv, groups, m_p / block_k)``): the sample chunk's float32
  partial over ``blocks_per_program`` consecutive query blocks, and, with ``weight_grad``, the
  gradient of their log-weights (the row sums of the score gradient ``[block_k, block_q]``: a
  reduction per tile, so only where the log-weights are differentiated).
  """
  rows_in, refs = refs[:4], refs[4:]
  refs, outs = _split_refs(refs, geo, 4 if samples else 0)
  i, c = _program_ids(3 if samples else 2)[:2]
  p, kv = i // geo.kv_heads, i % geo.kv_heads
  chunk_grads = functools.partial(_chunk_grads, rows_in, refs, p, kv, geo=geo, scale=scale,
                                  blocks_per_program=blocks_per_program, samples=samples)
  if samples:
    ks_ref, vs_ref, sb_ref = refs.samples[:3]
    dk_ref, dv_ref, *dw_ref = outs
    dk, dv, *dw = chunk_grads(ks_ref[...], vs_ref[...],
                              None if geo.block_sample_bias else sb_ref[...],
                              c * blocks_per_program, 0, int(weight_grad))
    dk_ref[...] = dk * scale
    dv_ref[...] = dv
    for ref, value in zip(dw_ref, dw):
      ref[...] = value
    return

  cpp, bk = chunks_per_program, geo.block_k
  block, chunk0 = (c * cpp) // geo.chunks_per_block, (c * cpp) % geo.chunks_per_block

  def load(j):
    """Chunk ``j`` of the program: its key rows, k, v (and the running dk/dv rows)."""
    keys = _chunk_keys(geo, refs.k_perm[pl.ds(j * bk, bk)] if geo.sorted else None, chunk0 + j)
    running = [_load_rows(ref, p, keys, kv, geo.k_offset) for ref in outs[:2]
               ] if geo.accumulate else None
    return (keys, _load_rows(refs.k, p, keys, kv, geo.k_offset),
            _load_rows(refs.v, p, keys, kv, geo.k_offset), running)

  chunk = load(0)
  for j in range(cpp):  # static: the next chunk's loads are issued before this one's loops
    keys, k, v, running = chunk
    if j + 1 < cpp:
      chunk = load(j + 1)
    bias = refs.bias[pl.ds(j * bk, bk)] if geo.key_bias else None
    dk, dv = chunk_grads(k, v, bias, block, (chunk0 + j) * bk, 0)
    if geo.key_partials:  # at the keys' positions: a key may recur in other blocks' chunks
      at = (c * cpp + j) * bk + lax.iota(jnp.int32, bk)
      for ref, value in zip(outs, (dk * scale, dv)):
        _store_rows(ref, p, at, kv, value)
    else:
      _store_results(geo, outs, (dk * scale, dv), p, keys, kv, geo.k_offset, running)


# ----------------------------------------------------------------------------------------------
# pallas_calls


def _program_ids(n):
  """The program's indices on its logical grid (``_pallas_call``)."""
  return tuple(pl.program_id(n - 1 - axis) for axis in range(n))


def _spec(block_shape, index_map):
  """A BlockSpec whose ``index_map`` takes the logical grid indices (``_pallas_call``)."""
  return pl.BlockSpec(block_shape, lambda *ids: index_map(*ids[::-1]))


def _pallas_call(kernel, geo, grid, in_specs, out_specs, out_shape, name, running=()):
  """Launches ``kernel`` on the logical ``grid`` (problem * kv head first), reversed: the last
  logical axis is the fastest-varying launch index, so that the programs of one (problem, kv
  head) run side by side and share its key blocks and samples in L2 (with many small
  problems, a causal level's quadrants, the samples were otherwise re-read from HBM by every
  program). Kernels read their indices with ``_program_ids``, specs are made by ``_spec``.

  ``running``: the last ``len(running)`` inputs are updated in place (aliased to the outputs,
  read by row index like them)."""
  n_in = len(in_specs) + len(running)
  if running:  # the outputs take the running arrays' shapes (one result: not a list)
    single = not isinstance(out_shape, (list, tuple))
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in running]
    out_specs = [_WHOLE] * len(running)
    out_specs, out_shape = (out_specs[0], out_shape[0]) if single else (out_specs, out_shape)
  return pl.pallas_call(
      kernel, grid=tuple(reversed(grid)), in_specs=list(in_specs) + [_WHOLE] * len(running),
      out_specs=out_specs,
      out_shape=out_shape,
      input_output_aliases={n_in - len(running) + i: i for i in range(len(running))},
      compiler_params=plgpu.CompilerParams(num_warps=geo.num_warps, num_stages=geo.num_stages),
      interpret=geo.interpret, name=name)


_WHOLE = pl.no_block_spec  # arrays read or written by row index


class _Inputs(NamedTuple):
  """A call's arrays: q/k/v in the public layout, key bias, permutations, samples."""
  q: jax.Array
  k: jax.Array
  v: jax.Array
  bias: jax.Array | None  # None: no key bias row (``geo.key_bias`` False)
  perms: tuple          # (q_perm, k_perm) or ()
  samples: tuple        # (k, v, bias, block, span) or ()
  selected: tuple = ()  # (rows, bias) ``[P, Nkv, nb * S_p]`` of the selected keys, or ()


def _bias_head(x: _Inputs, geo):
  """Index map of the key bias's head axis: per kv head (blocked stage) or shared (base case)."""
  nkv = geo.kv_heads
  return (lambda i: i % nkv) if x.bias.shape[1] > 1 else (lambda i: 0)


def _key_inputs(x: _Inputs, geo):
  """Specs on the (bkv, tile, group head) grid and arrays of (k, v[, bias][, perms][,
  samples])."""
  nkv, bs_p, tpb = geo.kv_heads, geo.chunks_per_block * geo.block_k, geo.tiles_per_block
  specs = [_WHOLE, _WHOLE]
  if geo.key_bias:
    kvb = _bias_head(x, geo)
    specs.append(_spec((None, None, bs_p), lambda i, t, g: (i // nkv, kvb(i), t // tpb)))
  if geo.sorted:
    specs += [_spec((None, None, None, geo.block_q), lambda i, t, g: (i // nkv, i % nkv, g, t)),
              _spec((None, None, bs_p), lambda i, t, g: (i // nkv, i % nkv, t // tpb))]
  if x.samples:
    m_p = x.samples[0].shape[1]
    specs += [_spec((None, m_p, x.samples[0].shape[2]), lambda i, t, g: (i, 0, 0))] * 2
    specs.append(_spec((None, None, m_p), lambda i, t, g: (i, t // tpb, 0))
                 if geo.block_sample_bias else _spec((None, m_p), lambda i, t, g: (i, 0)))
    specs.append(_spec((None, m_p), lambda i, t, g: (i, 0)))
    specs.append(_spec((None, 2, geo.num_blocks), lambda i, t, g: (i, 0, 0)))
  if geo.select_chunks:
    s_p = geo.select_chunks * geo.block_k
    specs += [_spec((None, None, s_p), lambda i, t, g: (i // nkv, i % nkv, t // tpb))] * 2
  key_arrays = (x.k, x.v, x.bias) if geo.key_bias else (x.k, x.v)
  return specs, key_arrays + x.perms + x.samples + x.selected


def _tile_forward(x: _Inputs, geo: _Geometry, *, scale, running=()):
  """Forward: out ``[P, q_len, N, H]`` (q's dtype), lse ``[P, N, q_len]`` f32; or, with
  ``running = (out [P, Rq, N, H], lse [P / lse_parts, N, lse_parts, Rq])`` (``geo.accumulate``),
  those with the result merged into the window's rows."""
  p, _, n, h = x.q.shape
  specs, arrays = _key_inputs(x, geo)
  kernel = functools.partial(_fwd_kernel, geo=geo, scale=scale, has_samples=bool(x.samples))
  grid = (p * geo.kv_heads, geo.num_blocks * geo.tiles_per_block, geo.groups)
  return _pallas_call(
      kernel, geo, grid, [_WHOLE] + specs, [_WHOLE, _WHOLE],
      [jax.ShapeDtypeStruct((p, geo.q_len, n, h), x.q.dtype),
       jax.ShapeDtypeStruct((p, n, geo.q_len), jnp.float32)],
      "hyperattn_block_attention_fwd", running)(x.q, *arrays, *running)


def _tile_backward(x: _Inputs, geo: _Geometry, do, lse, delta, *, scale, sample_groups,
                   key_chunks, weight_grad, running=()):
  """Backward: dq ``[P, q_len, N, H]`` (q's dtype), dk/dv ``[P, k_len, Nkv, H]`` (k's dtype),
  for the samples float32 (dk, dv, d log-weight) summed over the ``sample_groups`` partials (or
  None; the log-weight gradient is None unless ``weight_grad``), and for the selected keys
  float32 (dk, dv) ``[P, nb * S_p, Nkv, H]`` at their positions in ``x.selected``'s rows (or
  None). With ``running = (dq like q, dk, dv like k)`` (``geo.accumulate``): those with the
  gradients added to the window's rows instead (the selected keys' apart). ``key_chunks``: key
  chunks per own-keys dk/dv program (at most).

  do like q; lse (base-2 units, ``+inf`` on rows without keys: ``_lse_base2``) and delta
  ``[P, N, Rq]`` f32 (q's rows).
  """
  p, _, n, h = x.q.shape
  nkv, bk = geo.kv_heads, geo.block_k
  rows_in = (x.q, do, lse, delta)
  specs, arrays = _key_inputs(x, geo)
  dq = _pallas_call(
      functools.partial(_dq_kernel, geo=geo, scale=scale, has_samples=bool(x.samples)),
      geo, (p * nkv, geo.num_blocks * geo.tiles_per_block, geo.groups), [_WHOLE] * 4 + specs,
      _WHOLE, jax.ShapeDtypeStruct((p, geo.q_len, n, h), x.q.dtype),
      "hyperattn_block_attention_dq", running[:1])(*rows_in, *arrays, *running[:1])

  def own_keys(x, geo, running=()):
    """dk, dv of each block's keys (those of k_perm): program (bkv, group of key chunks) over
    its block's query rows."""
    cpp = _largest_divisor(geo.chunks_per_block, key_chunks)
    return _dkdv_call(x, geo, rows_in, scale=scale, weight_grad=weight_grad, samples=False,
                      blocks_per_program=1,
                      grid=(p * nkv, geo.num_blocks * geo.chunks_per_block // cpp),
                      running=running, chunks_per_program=cpp)

  dk, dv = own_keys(x, geo, running[1:])
  selected = None
  if x.selected:  # the selected keys as each block's keys, their partials at their positions
    rows, bias = x.selected
    selected = own_keys(
        x._replace(bias=bias, perms=(x.perms[0], rows), samples=(), selected=()),
        geo._replace(chunks_per_block=geo.select_chunks, key_bias=True, accumulate=False,
                     key_partials=True))
  samples = None
  if x.samples:
    # Samples: program (bkv, group of blocks, sample chunk); the groups' partials are summed.
    grid = (p * nkv, sample_groups, x.samples[0].shape[1] // bk)
    dks, dvs, *dw = (t.sum(axis=1) for t in _dkdv_call(
        x, geo, rows_in, scale=scale, weight_grad=weight_grad, samples=True,
        blocks_per_program=geo.num_blocks // sample_groups, grid=grid))
    samples = (dks, dvs, dw[0] if dw else None)
  return dq, dk, dv, samples, selected


def _dkdv_call(x: _Inputs, geo: _Geometry, rows_in, *, scale, weight_grad, samples,
               blocks_per_program, grid, running=(), chunks_per_program=1):
  """One launch of :func:`_dkdv_kernel` on ``grid`` (bkv, c[, s]): own keys have c = group of
  ``chunks_per_program`` key chunks (s absent), samples have c = group of blocks and s =
  sample chunk (their bias is the samples' own)."""
  kgeo = geo._replace(key_bias=geo.key_bias and not samples, select_chunks=0)
  in_specs, arrays = _dkdv_inputs(x, geo, kgeo.key_bias, samples, blocks_per_program,
                                  chunks_per_program)
  out_specs, out_shape = _dkdv_outputs(x, geo, samples, weight_grad, grid[1])
  kernel = functools.partial(_dkdv_kernel, geo=kgeo, scale=scale,
                             blocks_per_program=blocks_per_program,
                             chunks_per_program=chunks_per_program, samples=samples,
                             weight_grad=weight_grad)
  return _pallas_call(kernel, kgeo, grid, in_specs, out_specs, out_shape,
                      "hyperattn_block_attention_dkdv", running)(*rows_in, *arrays, *running)


def _dkdv_inputs(x: _Inputs, geo: _Geometry, key_bias, samples, blocks_per_program,
                 chunks_per_program):
  """Specs and arrays of a dk/dv launch's inputs after (q, dO, lse, delta)."""
  nkv, bk = geo.kv_heads, geo.block_k
  in_specs = [_WHOLE] * 6
  arrays = [x.k, x.v]
  keys = chunks_per_program * bk
  if key_bias:
    kvb = _bias_head(x, geo)
    in_specs.append(_spec((None, None, keys), lambda i, c: (i // nkv, kvb(i), c)))
    arrays.append(x.bias)
  if geo.sorted:
    rows = blocks_per_program * geo.tiles_per_block * geo.block_q
    if samples:
      in_specs += [_spec((None, None, geo.groups, rows),
                         lambda i, c, s: (i // nkv, i % nkv, 0, c)),
                   _spec((None, None, bk), lambda i, c, s: (i // nkv, i % nkv, 0))]
    else:
      per_block = geo.chunks_per_block // chunks_per_program  # programs per block
      in_specs += [_spec((None, None, geo.groups, rows),
                         lambda i, c: (i // nkv, i % nkv, 0, c // per_block)),
                   _spec((None, None, keys), lambda i, c: (i // nkv, i % nkv, c))]
    arrays += list(x.perms)
  if samples:
    hs = x.samples[0].shape[2]
    in_specs += [_spec((None, bk, hs), lambda i, c, s: (i, s, 0))] * 2
    in_specs.append(_spec((None, blocks_per_program, bk), lambda i, c, s: (i, c, s))
                    if geo.block_sample_bias else _spec((None, bk), lambda i, c, s: (i, s)))
    in_specs.append(_spec((None, bk), lambda i, c, s: (i, s)))
    arrays += list(x.samples[:4])  # not the span
  return in_specs, arrays


def _dkdv_outputs(x: _Inputs, geo: _Geometry, samples, weight_grad, groups):
  """Specs and shapes of a dk/dv launch's results: the samples' float32 partials ``[P * Nkv,
  groups, m_p, H]`` (and their log-weights' ``[P * Nkv, groups, m_p]``), the selected keys'
  float32 partials at their positions, or dk/dv ``[P, k_len, Nkv, H]``."""
  p, _, _, h = x.q.shape
  nkv, bk = geo.kv_heads, geo.block_k
  if samples:
    m_p, hs = x.samples[0].shape[1], x.samples[0].shape[2]
    part = (p * nkv, groups, m_p)
    out_specs = [_spec((None, None, bk, hs), lambda i, c, s: (i, c, s, 0))] * 2
    out_shape = [jax.ShapeDtypeStruct(part + (hs,), jnp.float32)] * 2
    if weight_grad:
      out_specs.append(_spec((None, None, bk), lambda i, c, s: (i, c, s)))
      out_shape.append(jax.ShapeDtypeStruct(part, jnp.float32))
    return out_specs, out_shape
  if geo.key_partials:
    return [_WHOLE] * 2, [jax.ShapeDtypeStruct((p, x.perms[1].shape[-1], nkv, h),
                                               jnp.float32)] * 2
  return [_WHOLE] * 2, [jax.ShapeDtypeStruct((p, geo.k_len, nkv, h), x.k.dtype)] * 2


# ----------------------------------------------------------------------------------------------
# Public wrappers


def in_place(head_dim: int) -> bool:
  """Whether the kernels update running arrays (``into=``) of this head_dim in place: those that
  need no padding (a power of two >= 16)."""
  return pow2_at_least(head_dim) == head_dim


def _pad_head_dim(*xs):
  """Zero-pads the last axis to a power of two >= 16 (a copy only for such head_dims)."""
  h_p = pow2_at_least(xs[0].shape[-1])
  return tuple(pad_to(x, x.ndim - 1, h_p) for x in xs)


def _largest_divisor(n: int, target: int) -> int:
  """The largest divisor of ``n`` that is at most ``target``."""
  return max(d for d in range(1, min(n, target) + 1) if n % d == 0)


def _per_block(x, nb, size, value):
  """``[..., nb * rows]`` -> ``[..., nb * size]``, each block padded with ``value``."""
  x = x.reshape(x.shape[:-1] + (nb, x.shape[-1] // nb))
  return pad_to(x, x.ndim - 1, size, value).reshape(x.shape[:-2] + (nb * size,))


class _Window(NamedTuple):
  """The problem's rows (static): queries ``[q_offset, q_offset + q_len)`` of q, keys
  ``[k_offset, k_offset + k_len)`` of k/v; ``all_keys_valid``: the caller promises that every
  key of the window is valid (then full blocks need no per-key bias)."""
  q_offset: int
  q_len: int
  k_offset: int
  k_len: int
  all_keys_valid: bool


def _check_qkv(q, k, v, q_rows: str, k_rows: str):
  """q ``[P, q_rows, N, H]``, k/v ``[P, k_rows, Nkv, H]`` of one floating dtype, ``N`` a
  multiple of ``Nkv``."""
  check_array("q", q, (("P", None), (q_rows, None), ("N", None), ("H", None)), "float")
  p, _, n, h = q.shape
  check_array("k", k, (("P", p), (k_rows, None), ("Nkv", None), ("H", h)), "float", q.dtype)
  rk, kh = k.shape[1:3]
  check_array("v", v, (("P", p), (k_rows, rk), ("Nkv", kh), ("H", h)), "float", q.dtype)
  if n % kh:
    raise ValueError(f"q: N = {n} query heads must be a multiple of Nkv = {kh}")


def _check_blocked(q, k, v, q_perm, k_perm, k_samp, v_samp, samp_pos, n_valid, log_weight,
                   selection, block_size, window: _Window, block_sizes):
  """The blocked wrappers' argument checks (ValueErrors naming the argument)."""
  _check_qkv(q, k, v, "Rq", "Rk")
  p, rq, n, h = q.shape
  rk, kh = k.shape[1:3]
  if not (isinstance(block_size, int) and block_size > 0):
    raise ValueError(f"block_size must be a positive int, got {block_size!r}")
  check_array("k_perm", k_perm, (("P", p), ("Nkv", kh), ("nb * block_size", None)), "int")
  nb = k_perm.shape[2] // block_size
  if nb == 0 or k_perm.shape[2] % block_size:
    raise ValueError(f"k_perm: expected [P, Nkv, nb * block_size] with block_size = "
                     f"{block_size}, got {k_perm.shape}")
  check_array("q_perm", q_perm, (("P", p), ("Nkv", kh), ("G", n // kh), ("nb * qb", None)),
              "int")
  if q_perm.shape[3] % nb:
    raise ValueError(f"q_perm: expected [P, Nkv, G, nb * qb] with nb = {nb}, got "
                     f"{q_perm.shape}")
  m = k_samp.shape[2] if k_samp.ndim == 4 else None
  for name, x in (("k_samp", k_samp), ("v_samp", v_samp)):
    check_array(name, x, (("P", p), ("Nkv", kh), ("m", m), ("H", h)), "float", q.dtype)
  check_array("samp_pos", samp_pos, (("P", p), ("Nkv", kh), ("m", m)), "int")
  check_array("n_valid", n_valid, (("P", p),), "int")
  check_array("log_weight", log_weight, (("P", p), ("Nkv", kh), ("m", m)), "float")
  if selection is not None:
    rows, keep, drop = selection
    check_array("selection.rows", rows, (("P", p), ("Nkv", kh), ("nb", nb), ("S", None)), "int")
    check_array("selection.keep", keep, (("P", p), ("Nkv", kh), ("nb", nb), ("S", rows.shape[3])),
                "bool")
    check_array("selection.drop_samples", drop, (("P", p), ("Nkv", kh), ("nb", nb), ("m", m)),
                "bool")
  if not (0 <= window.q_offset and window.q_offset + window.q_len <= rq and
          0 <= window.k_offset and window.k_offset + window.k_len <= rk):
    raise ValueError(f"window {window} lies outside the Rq = {rq} rows of q or the Rk = {rk} "
                     "rows of k")
  check_block_sizes(block_sizes)


def _check_stats(q, d_out, lse, delta):
  """The backward's d_out (like q ``[P, R, N, H]``), lse and delta (``[P, N, R]`` float)."""
  p, r, n, h = q.shape
  check_array("d_out", d_out, (("P", p), ("R", r), ("N", n), ("H", h)), "float")
  for name, x in (("lse", lse), ("delta", delta)):
    check_array(name, x, (("P", p), ("N", n), ("R", r)), "float")


class _Blocked(NamedTuple):
  inputs: _Inputs
  geo: _Geometry


def _blocked_inputs(q, k, v, q_perm, k_perm, k_samp, v_samp, samp_pos, n_valid, log_weight,
                    selection, *, block_size, window: _Window, tiles: Tiles, interpret):
  """The kernels' arrays (padded to whole tiles) and geometry of a blocked call."""
  p, _, _, h = q.shape
  kh, g = q_perm.shape[1], q_perm.shape[2]
  nb = k_perm.shape[-1] // block_size
  qb, m = q_perm.shape[-1] // nb, k_samp.shape[2]
  bq, bk = min(tiles.block_q, pow2_at_least(qb)), tiles.block_k
  qb_p, bs_p, m_p = round_up(qb, bq), round_up(block_size, bk), round_up(m, bk)
  q, k, v = _pad_head_dim(q, k, v)

  # Full blocks of keys the window promises valid need no bias row (nor its add per score).
  key_bias = not (window.all_keys_valid and bs_p == block_size
                  and nb * block_size == window.k_len)
  bias = None
  if key_bias:
    j = jnp.arange(bs_p)
    pos = jnp.arange(nb)[:, None] * block_size + j[None, :]
    valid = (j[None, :] < block_size) & (pos < n_valid[:, None, None])          # [P, nb, bs_p]
    bias = jnp.broadcast_to(jnp.where(valid, 0.0, NEG_INF).astype(jnp.float32)[:, None],
                            (p, kh, nb, bs_p)).reshape(p, kh, nb * bs_p)
  samples = _sample_arrays(k_samp, v_samp, samp_pos, log_weight, nb, block_size, m_p,
                           q.shape[-1])
  selected, select_chunks = (), 0
  if selection is not None:
    selected, select_chunks, s_bias = _selected_arrays(selection, samples[3][:, :m], samples[2],
                                                       nb, bk)
    samples = samples[:2] + (s_bias,) + samples[3:]
  perms = (_per_block(q_perm, nb, qb_p, -1), _per_block(k_perm, nb, bs_p, -1))
  geo = _Geometry(kv_heads=kh, groups=g, num_blocks=nb, q_len=window.q_len,
                  q_offset=window.q_offset, k_len=window.k_len, k_offset=window.k_offset,
                  block_q=bq, block_k=bk, tiles_per_block=qb_p // bq,
                  chunks_per_block=bs_p // bk, sorted=True, causal=False,
                  num_warps=tiles.num_warps, num_stages=tiles.num_stages, interpret=interpret,
                  key_bias=key_bias, select_chunks=select_chunks,
                  block_sample_bias=bool(select_chunks),
                  # -1 rows: the blocks' tile padding, and the permutations' rows beyond the
                  # window's (each local row occurs once in them)
                  key_padding=bs_p > block_size or nb * block_size > window.k_len,
                  query_padding=qb_p > qb or nb * qb > window.q_len)
  return _Blocked(_Inputs(q, k, v, bias, perms, samples, selected), geo)


def _sample_arrays(k_samp, v_samp, samp_pos, log_weight, nb, block_size, m_p, h_p):
  """The samples' kernel arrays: k, v ``[P * Nkv, m_p, h_p]``, bias (the log-weights in base-2
  units, ``-inf`` padding) and block (``-1`` padding) ``[P * Nkv, m_p]``, span ``[P * Nkv, 2,
  nb]``."""
  p, kh, m, h = k_samp.shape
  samp = lambda x: pad_to(pad_to(x.reshape(p * kh, m, h), 1, m_p), 2, h_p)
  blk = (samp_pos // block_size).reshape(p * kh, m).astype(jnp.int32)  # each sample's block
  s_bias = pad_to(log_weight.astype(jnp.float32).reshape(p * kh, m) * LOG2E, 1, m_p, NEG_INF)
  # Each block's samples lie in columns [lo, hi) (one or two chunks when the positions are
  # ascending, as hyper_attention draws them): only chunks there mask the query block's own
  # samples.
  rows, col = jnp.arange(p * kh)[:, None], jnp.arange(m, dtype=jnp.int32)[None, :]
  span = jnp.stack([jnp.full((p * kh, nb), m, jnp.int32).at[rows, blk].min(col),
                    jnp.zeros((p * kh, nb), jnp.int32).at[rows, blk].max(col + 1)], axis=1)
  return samp(k_samp), samp(v_samp), s_bias, pad_to(blk, 1, m_p, -1), span


def _selected_arrays(selection, blk, s_bias, nb, block_k):
  """Each block's selected rows (-1 where not kept) and their bias (0 kept, -inf not) ``[P,
  Nkv, nb * S_p]``, padded to whole chunks, their chunk count, and the samples' bias per block
  ``[P * Nkv, nb, m_p]`` (-inf on the block's own and dropped samples; ``blk``, ``s_bias``: the
  samples' blocks ``[P * Nkv, m]`` and bias ``[P * Nkv, m_p]``)."""
  rows, keep, drop = selection
  p, kh, _, s = rows.shape
  m, m_p = blk.shape[1], s_bias.shape[1]
  s_p = round_up(s, block_k)
  per_block = lambda x, value: _per_block(x.reshape(p, kh, -1), nb, s_p, value)
  # Unkept rows become padding (-1): their k, v read zeros, as in the XLA stage, so a NaN there
  # reaches nothing (a -inf bias added to a NaN score is NaN; 0 * NaN in P V), and their
  # gradients are dropped.
  selected = (per_block(jnp.where(keep, rows, -1), -1),
              per_block(jnp.where(keep, 0.0, NEG_INF).astype(jnp.float32), NEG_INF))
  out_of_residual = ((blk[:, None, :] == jnp.arange(nb, dtype=jnp.int32)[None, :, None])
                     | drop.reshape(p * kh, nb, m))
  s_bias = pad_to(jnp.where(out_of_residual, NEG_INF, s_bias[:, None, :m]), 2, m_p, NEG_INF)
  return selected, s_p // block_k, s_bias


def _folded(running, q, kind):
  """``parts``: the problems of q ``[P, Rq, ...]`` per row of ``running``'s first array ``[B,
  parts * Rq, ...]`` (checked)."""
  x = running[0]
  parts = q.shape[0] // x.shape[0]
  if x.shape[0] * parts != q.shape[0] or x.shape[1] != parts * q.shape[1]:
    raise ValueError(f"into: running {kind} {x.shape} does not hold the rows of q {q.shape} "
                     "(expected [P / parts, parts * Rq, ...])")
  if not in_place(q.shape[-1]):
    raise ValueError(f"into: the running arrays are updated in place only for a head_dim that "
                     f"is a power of two >= 16 (in_place), got {q.shape[-1]}")
  return parts


def _fold(x, parts):
  """Rows ``[B, parts * R, ...]`` -> ``[B * parts, R, ...]`` (a view)."""
  return x.reshape((x.shape[0] * parts, x.shape[1] // parts) + x.shape[2:])


def blocked_attention_pallas(q, k, v, q_perm, k_perm, k_samp, v_samp, samp_pos, n_valid,
                             log_weight, selection=None, *, scale: float, block_size: int,
                             q_offset: int, q_len: int, k_offset: int, k_len: int,
                             all_keys_valid: bool = False,
                             block_sizes: BlockSizes = BlockSizes(), interpret: bool,
                             into=None):
  """The blocked stage (``block_sizes.blocked_fwd`` tiles; ``interpret``: Pallas' interpreter).

  q ``[P, Rq, N, H]``, k/v ``[P, Rk, Nkv, H]`` (the problem's rows: queries ``[q_offset,
  q_offset + q_len)``, keys ``[k_offset, k_offset + k_len)``; ``all_keys_valid``: the caller
  promises every key of them valid), q_perm ``[P, Nkv, G, nb * qb]`` / k_perm ``[P, Nkv, nb *
  block_size]`` local rows in sorted order (-1: padding; sorted positions ``>= n_valid`` are
  invalid keys), k_samp/v_samp ``[P, Nkv, m, H]``, samp_pos ``[P, Nkv, m]`` (sorted
  positions), n_valid ``[P]``, log_weight ``[P, Nkv, m]`` -> out ``[P, q_len, N, H]``, lse
  ``[P, N, q_len]`` float32. ``selection``: the ``select_blocks`` option's ``(rows, keep,
  drop_samples)`` (``[P, Nkv, nb, S]`` int32 local key rows (-1: none) / bool, ``[P, Nkv, nb,
  m]`` bool), or None: each tile also attends to its block's kept selected rows, loaded by
  index, and leaves the dropped samples out (by a -inf bias, which a NaN score survives: a
  block may drop only samples whose key it attends exactly, a kept row or one of its own, as the
  library's selection does). ``into``: a running ``(out [B, T, N, H], lse [B,
  N, T])`` of which q's problems are the ``T / Rq`` consecutive row groups of each batch row
  (head_dim :func:`in_place` only): returned with the result merged into the window's query
  rows in place. Its rows with lse ``-inf`` get weight 0 and must hold finite values (zeros,
  as written here). The kernels read q, k, v (and write the results) by index through the
  permutations: no sorted copies.
  """
  window = _Window(q_offset, q_len, k_offset, k_len, all_keys_valid)
  _check_blocked(q, k, v, q_perm, k_perm, k_samp, v_samp, samp_pos, n_valid, log_weight,
                 selection, block_size, window, block_sizes)
  lay = _blocked_inputs(q, k, v, q_perm, k_perm, k_samp, v_samp, samp_pos, n_valid, log_weight,
                        selection, block_size=block_size, window=window,
                        tiles=block_sizes.blocked_fwd, interpret=interpret)
  if into is None:
    out, lse = _tile_forward(lay.inputs, lay.geo, scale=scale)
    return out[..., :q.shape[-1]], lse
  parts = _folded(into, q, "out")
  out, lse = into
  b, n, t = lse.shape
  out, lse = _tile_forward(lay.inputs, lay.geo._replace(accumulate=True, lse_parts=parts),
                           scale=scale, running=(_fold(out, parts),
                                                 lse.reshape(b, n, parts, t // parts)))
  return out.reshape(into[0].shape), lse.reshape(into[1].shape)


def blocked_attention_bwd_pallas(q, k, v, q_perm, k_perm, k_samp, v_samp, samp_pos, n_valid,
                                 log_weight, d_out, lse, delta, selection=None, *, scale: float,
                                 block_size: int, q_offset: int, q_len: int, k_offset: int,
                                 k_len: int, all_keys_valid: bool = False,
                                 block_sizes: BlockSizes = BlockSizes(), interpret: bool,
                                 into=None, weight_grad: bool = True):
  """The stage's gradients from the statistics of the merged result that contains it (its own,
  or a merge with other parts): the arguments of :func:`blocked_attention_pallas` and d_out
  ``[P, Rq, N, H]``, lse and ``delta = rowsum(dO * O) - dlse`` ``[P, N, Rq]`` in q's rows
  (``block_sizes.blocked_bwd`` tiles).

  Returns dq ``[P, q_len, N, H]``, dk/dv ``[P, k_len, Nkv, H]`` (the window's rows only; the
  selected keys' gradients, float32 partials per (block, selected key), scatter-added in),
  dk_samp/dv_samp like the samples and the float32 log-weight gradient ``[P, Nkv, m]`` (None
  without ``weight_grad``: the log-weights are constants, e.g. of the uniform sampler). With
  ``into`` = running ``(dq [B, T, N, H], dk, dv [B, T, Nkv, H])`` of which q/k's problems are
  the folded rows (head_dim :func:`in_place` only): those with dq, dk, dv added to the
  window's rows in place instead. The sample gradients are summed over float32 partials:
  ``block_sizes.sample_groups`` per (kv head) over all ``P`` problems together, i.e. the
  largest divisor of the block count not above ``sample_groups / P`` per problem (batched
  causal levels have enough programs without more, and their partials would cost ``P`` times
  the memory).
  """
  window = _Window(q_offset, q_len, k_offset, k_len, all_keys_valid)
  _check_blocked(q, k, v, q_perm, k_perm, k_samp, v_samp, samp_pos, n_valid, log_weight,
                 selection, block_size, window, block_sizes)
  _check_stats(q, d_out, lse, delta)
  lay = _blocked_inputs(q, k, v, q_perm, k_perm, k_samp, v_samp, samp_pos, n_valid, log_weight,
                        selection, block_size=block_size, window=window,
                        tiles=block_sizes.blocked_bwd, interpret=interpret)
  running, geo = (), lay.geo
  if into is not None:
    parts = _folded(into, q, "dq")
    running, geo = tuple(_fold(x, parts) for x in into), geo._replace(accumulate=True)
  (d_out,) = _pad_head_dim(d_out)
  groups = _largest_divisor(geo.num_blocks, max(1, block_sizes.sample_groups // q.shape[0]))
  dq, dk, dv, (dks, dvs, dw), selected = _tile_backward(
      lay.inputs, geo, d_out, _lse_base2(lse), delta.astype(jnp.float32), scale=scale,
      sample_groups=groups, key_chunks=block_sizes.key_chunks_per_program,
      weight_grad=weight_grad, running=running)
  h, m = q.shape[-1], k_samp.shape[2]
  p, kh = q_perm.shape[:2]
  unsamp = lambda x, like: x[:, :m, :h].reshape(like.shape).astype(like.dtype)
  samples = (unsamp(dks, k_samp), unsamp(dvs, v_samp),
             None if dw is None else dw[:, :m].reshape(p, kh, m))
  dq, dk, dv = dq[..., :h], dk[..., :h], dv[..., :h]
  if selected is not None:
    dk, dv = (_add_key_partials(d, part[..., :h], lay.inputs.selected[0],
                                k_offset if into is not None else 0)
              for d, part in zip((dk, dv), selected))
  if into is not None:
    dq, dk, dv = (g.reshape(x.shape) for g, x in zip((dq, dk, dv), into))
  return (dq, dk, dv, *samples)


def _add_key_partials(acc, partials, rows, offset):
  """``acc`` ``[P, R, Nkv, H]`` with the float32 ``partials`` ``[P, n, Nkv, H]`` of the keys at
  local rows ``rows`` ``[P, Nkv, n]`` (-1: none) added to its rows ``offset + rows`` (in
  float32: a key chosen by several blocks gets several partials)."""
  p, kh, n = rows.shape
  at = jnp.where(rows >= 0, offset + rows, acc.shape[1])                  # [P, Nkv, n]
  total = acc.astype(jnp.float32).at[jnp.arange(p)[:, None, None], at,
                                     jnp.arange(kh)[None, :, None]].add(
      jnp.swapaxes(partials, 1, 2), mode="drop")                          # [P, Nkv, n, H]
  return total.astype(acc.dtype)


def _lse_base2(lse):
  """The kernels' lse input: in base-2 units, ``+inf`` on rows without keys (so that their
  probabilities are 0)."""
  return jnp.where(lse == NEG_INF, jnp.inf, lse.astype(jnp.float32) * LOG2E)


def _check_flash(q, k, v, key_mask, causal, block_sizes):
  """The exact wrappers' argument checks (ValueErrors naming the argument)."""
  _check_qkv(q, k, v, "Tq", "Tk")
  p, tq = q.shape[:2]
  tk = k.shape[1]
  check_array("key_mask", key_mask, (("P", p), ("Tk", tk)), "bool")
  if causal and tq != tk:
    raise ValueError(f"causal needs Tq == Tk, got q {q.shape} and k {k.shape}")
  check_block_sizes(block_sizes)


def _flash_inputs(q, k, v, key_mask, causal, *, tiles: Tiles, interpret):
  p, tq, n, _ = q.shape
  tk, kh = k.shape[1], k.shape[2]
  bq, bk = min(tiles.block_q, pow2_at_least(tq)), tiles.block_k
  q, k, v = _pad_head_dim(q, k, v)
  tk_p, tq_p = round_up(tk, bk), round_up(tq, bq)
  bias = pad_to(jnp.where(key_mask, 0.0, NEG_INF).astype(jnp.float32), 1, tk_p, NEG_INF)
  geo = _Geometry(kv_heads=kh, groups=n // kh, num_blocks=1, q_len=tq, q_offset=0, k_len=tk,
                  k_offset=0, block_q=bq, block_k=bk, tiles_per_block=tq_p // bq,
                  chunks_per_block=tk_p // bk, sorted=False, causal=causal,
                  num_warps=tiles.num_warps, num_stages=tiles.num_stages, interpret=interpret,
                  key_padding=tk_p > tk, query_padding=tq_p > tq)
  return _Inputs(q, k, v, bias[:, None], (), ()), geo


def flash_attention_pallas(q, k, v, key_mask, causal: bool, scale: float, *,
                           block_sizes: BlockSizes = BlockSizes(), interpret: bool):
  """Exact attention (``block_sizes.flash_fwd`` tiles) in the public layout.

  q ``[P, Tq, N, H]``, k/v ``[P, Tk, Nkv, H]``, key_mask ``[P, Tk]`` bool -> out like q, lse
  ``[P, N, Tq]`` float32. Causal needs ``Tq == Tk``.
  """
  _check_flash(q, k, v, key_mask, causal, block_sizes)
  x, geo = _flash_inputs(q, k, v, key_mask, causal, tiles=block_sizes.flash_fwd,
                         interpret=interpret)
  out, lse = _tile_forward(x, geo, scale=scale)
  return out[..., :q.shape[-1]], lse


def flash_attention_bwd_pallas(q, k, v, key_mask, d_out, lse, delta, causal: bool, scale: float,
                               *, block_sizes: BlockSizes = BlockSizes(), interpret: bool):
  """Gradients (dq, dk, dv) of exact attention (``block_sizes.flash_bwd`` tiles) from the
  statistics of the merged result that contains it (its own, or a merge with other parts):
  d_out like q, lse and ``delta = rowsum(dO * O) - dlse`` ``[P, N, Tq]``; the other arguments
  as :func:`flash_attention_pallas`."""
  _check_flash(q, k, v, key_mask, causal, block_sizes)
  _check_stats(q, d_out, lse, delta)
  x, geo = _flash_inputs(q, k, v, key_mask, causal, tiles=block_sizes.flash_bwd,
                         interpret=interpret)
  (d_out,) = _pad_head_dim(d_out)
  dq, dk, dv, _, _ = _tile_backward(x, geo, d_out, _lse_base2(lse), delta.astype(jnp.float32),
                                    scale=scale, sample_groups=1,
                                    key_chunks=block_sizes.key_chunks_per_program,
                                    weight_grad=False)
  h = q.shape[-1]
  return dq[..., :h], dk[..., :h], dv[..., :h]
