"""Pallas (Triton) kernels for attention restricted to a key block, plus shared samples.

The same kernels serve both GPU stages of HyperAttention, forward and backward:

* the blocked stage (``blocked_attention_pallas`` / ``blocked_attention_bwd_pallas``, reference
  ``hyperattn_jax/blocked.py`` and its autodiff): a tile of sorted query block ``n`` attends to
  sorted key block ``n`` and to the shared samples (each with its log-weight, masked when it lies
  in block ``n``);
* the exact base case (``flash_attention_pallas`` / ``flash_attention_bwd_pallas``, reference
  ``hyperattn_jax/exact.py``): one key block per (folded) batch row, causal within it, no
  samples.

Forward: each program owns ``block_q`` query rows of one (batch * kv_head, group head, block) and
runs one online-softmax pass (fp32 statistics and accumulator) over the block's keys in chunks of
``block_k`` (skipping chunks above the diagonal when causal) and then over the samples; it writes
the normalised output and the log-sum-exp.

Backward (flash-style recomputation from the saved lse; ``delta = rowsum(dO * O) - dlse``):
  * ``dq``: the forward's grid and key loop, accumulating ``dS K`` for its query tile;
  * ``dk, dv`` of a block's keys: one program per ``block_k`` keys, looping over the block's query
    tiles of every group head (no other block touches these keys, so no reduction);
  * ``dk, dv`` of the samples: every query block reaches them, so each program takes ``block_k``
    samples and a group of query blocks and writes a float32 partial; the partials of the
    ``sample_groups`` groups are summed afterwards (no races, bounded extra memory).

Key validity (masks, padding, ``n_valid``) is an additive bias row (0 or -inf) per key, so no
mask tensor of size ``q x k`` exists. GQA: the group axis is a grid axis (forward, dq) or a loop
(dk/dv) over programs reading the same K/V block (no repetition in HBM).

Kernel layouts (padded to whole tiles; head_dim to a power of two >= 16):
  q ``[B*Nkv, G, nb * qb_p, H_p]``, k/v ``[B*Nkv, nb * bs_p, H_p]``, key_bias ``[B*Nkv, nb*bs_p]``,
  samples k/v ``[B*Nkv, m_p, H_p]``, sample_block ``[B*Nkv, m_p]`` int32 (-1 = padding),
  sample_bias ``[B*Nkv, m_p]`` f32; out like q, lse ``[B*Nkv, G, nb * qb_p]`` f32.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

__all__ = ["blocked_attention_pallas", "blocked_attention_bwd_pallas", "flash_attention_pallas",
           "flash_attention_bwd_pallas"]

_NEG_INF = float("-inf")


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _pow2_at_least(x: int, lo: int = 16) -> int:
  p = lo
  while p < x:
    p *= 2
  return p


def _dot(a, b, trans_a=False, trans_b=False):
  """fp32 accumulation; fp32 operands are multiplied exactly (no TF32), like XLA at HIGHEST."""
  return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, allow_tf32=False)


def _causal(s, q0, k0, query_axis=0):
  """Causal mask of a score tile with queries from ``q0`` and keys from ``k0`` on its axes."""
  q_pos = q0 + lax.broadcasted_iota(jnp.int32, s.shape, query_axis)
  k_pos = k0 + lax.broadcasted_iota(jnp.int32, s.shape, 1 - query_axis)
  return jnp.where(q_pos >= k_pos, s, _NEG_INF)


# ----------------------------------------------------------------------------------------------
# Kernels


def _visit_keys(step, carry, q, row0, block, key_refs, sample_refs, *, scale, block_k, causal):
  """Runs ``carry = step(carry, s, k, v)`` over every key chunk a query tile sees.

  ``q`` ``[block_q, H]`` sits at row ``row0`` of its query block ``block``; ``s`` is the masked
  fp32 score tile ``[block_q, block_k]`` of a chunk of the block's keys (then of the samples).
  """
  k_ref, v_ref, kb_ref = key_refs

  def key_chunk(j, carry, masked):
    sl = pl.ds(j * block_k, block_k)
    k = k_ref[sl, :]
    s = _dot(q, k, trans_b=True) * scale + kb_ref[sl][None, :]
    if masked:
      s = _causal(s, row0, j * block_k)
    return step(carry, s, k, v_ref[sl, :])

  n_chunks = k_ref.shape[0] // block_k
  if causal:  # chunks left of the diagonal need no mask; the diagonal ones do
    below = row0 // block_k
    upper = jnp.minimum(n_chunks, (row0 + q.shape[0] + block_k - 1) // block_k)
    carry = lax.fori_loop(0, below, functools.partial(key_chunk, masked=False), carry)
    carry = lax.fori_loop(below, upper, functools.partial(key_chunk, masked=True), carry)
  else:
    carry = lax.fori_loop(0, n_chunks, functools.partial(key_chunk, masked=False), carry)

  if sample_refs is not None:
    ks_ref, vs_ref, sb_ref, sblk_ref = sample_refs

    def sample_chunk(j, carry):
      sl = pl.ds(j * block_k, block_k)
      k = ks_ref[sl, :]
      s = _dot(q, k, trans_b=True) * scale + sb_ref[sl][None, :]
      s = jnp.where(sblk_ref[sl][None, :] == block, _NEG_INF, s)
      return step(carry, s, k, vs_ref[sl, :])
    carry = lax.fori_loop(0, ks_ref.shape[0] // block_k, sample_chunk, carry)
  return carry


def _split_key_refs(refs, has_samples):
  """(k, v, key_bias) and (samples k, v, bias, block) or None, then the remaining refs."""
  key_refs, refs = refs[:3], refs[3:]
  if not has_samples:
    return key_refs, None, refs
  return key_refs, refs[:4], refs[4:]


def _fwd_kernel(q_ref, *refs, scale, block_k, tiles_per_block, causal, has_samples):
  key_refs, sample_refs, (o_ref, lse_ref) = _split_key_refs(refs, has_samples)
  tile = pl.program_id(2)
  q = q_ref[...]
  block_q, head_dim = q.shape

  def step(carry, s, k, v):
    del k
    m, l, acc = carry
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == _NEG_INF, 0.0, m_new)
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe[:, None])
    return m_new, l * alpha + jnp.sum(p, axis=1), acc * alpha[:, None] + _dot(p.astype(v.dtype), v)

  init = (jnp.full((block_q,), _NEG_INF, jnp.float32), jnp.zeros((block_q,), jnp.float32),
          jnp.zeros((block_q, head_dim), jnp.float32))
  m, l, acc = _visit_keys(step, init, q, (tile % tiles_per_block) * block_q,
                          tile // tiles_per_block, key_refs, sample_refs, scale=scale,
                          block_k=block_k, causal=causal)
  has = l > 0
  l_safe = jnp.where(has, l, 1.0)
  o_ref[...] = jnp.where(has[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(has, m + jnp.log(l_safe), _NEG_INF)


def _dq_kernel(q_ref, do_ref, lse_ref, delta_ref, *refs, scale, block_k, tiles_per_block, causal,
               has_samples):
  key_refs, sample_refs, (dq_ref,) = _split_key_refs(refs, has_samples)
  tile = pl.program_id(2)
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

  def step(dq, s, k, v):
    p = jnp.exp(s - lse[:, None])
    ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  dq = _visit_keys(step, jnp.zeros(q.shape, jnp.float32), q, (tile % tiles_per_block) * q.shape[0],
                   tile // tiles_per_block, key_refs, sample_refs, scale=scale, block_k=block_k,
                   causal=causal)
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, bias_ref, *refs, scale, block_q,
                 tiles_per_block, chunks_per_block, blocks_per_program, causal, samples):
  """dk, dv of one chunk of keys: a block's own keys, or samples against a group of blocks.

  q/do ``[G, rows, H]`` and lse/delta ``[G, rows]`` hold the query rows of the block (own keys)
  or of ``blocks_per_program`` consecutive blocks (samples). For samples it also writes the
  gradient of their log-weights (the column sums of the score gradient).
  """
  if samples:
    sblk_ref, dk_ref, dv_ref, dw_ref = refs
    first_block, col0 = pl.program_id(1) * blocks_per_program, 0
  else:
    dk_ref, dv_ref = refs
    first_block = pl.program_id(1) // chunks_per_block
    col0 = (pl.program_id(1) % chunks_per_block) * k_ref.shape[0]
  k, v, bias = k_ref[...], v_ref[...], bias_ref[...]

  def query_tile(t, carry, g, masked):
    dk, dv, dw = carry
    rows = pl.ds(t * block_q, block_q)
    q, do = q_ref[g, rows, :], do_ref[g, rows, :]
    lse, delta = lse_ref[g, rows], delta_ref[g, rows]
    s = _dot(k, q, trans_b=True) * scale + bias[:, None]               # [block_k, block_q]
    if samples:
      s = jnp.where(sblk_ref[...][:, None] == first_block + t // tiles_per_block, _NEG_INF, s)
    if masked:  # keys on the rows, queries on the columns
      s = _causal(s, t * block_q, col0, query_axis=1)
    p = jnp.exp(s - lse[None, :])
    ds = p * (_dot(v, do, trans_b=True) - delta[None, :])
    return (dk + _dot(ds.astype(q.dtype), q), dv + _dot(p.astype(do.dtype), do),
            dw + jnp.sum(ds, axis=1))

  n_tiles = blocks_per_program * tiles_per_block

  def head(g, carry):
    if not causal:
      return lax.fori_loop(0, n_tiles, functools.partial(query_tile, g=g, masked=False), carry)
    # Query tiles above the chunk see none of its keys; those crossing the diagonal are masked.
    first = col0 // block_q
    unmasked = jnp.minimum(n_tiles, (col0 + k.shape[0] + block_q - 1) // block_q)
    carry = lax.fori_loop(first, unmasked, functools.partial(query_tile, g=g, masked=True), carry)
    return lax.fori_loop(unmasked, n_tiles, functools.partial(query_tile, g=g, masked=False),
                         carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv, dw = lax.fori_loop(0, q_ref.shape[0], head,
                             (zeros, zeros, jnp.zeros((k.shape[0],), jnp.float32)))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  if samples:
    dw_ref[...] = dw


# ----------------------------------------------------------------------------------------------
# pallas_calls on the padded layouts


class _Tiling(NamedTuple):
  """Static geometry of one call on the padded layouts."""
  num_blocks: int
  block_q: int
  block_k: int
  num_warps: int
  num_stages: int

  def tiles_per_block(self, rows):
    return rows // self.num_blocks // self.block_q


def _pallas_call(kernel, tiling, grid, in_specs, out_specs, out_shape, name):
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps,
                                           num_stages=tiling.num_stages),
      interpret=jax.default_backend() != "gpu", name=name)


def _key_specs(h, bs_p, m_p, samples, tiles_per_block):
  """Specs of (k, v, key_bias[, samples k, v, bias, block]) on the (bkv, head, tile) grid."""
  specs = [pl.BlockSpec((None, bs_p, h), lambda i, j, t: (i, t // tiles_per_block, 0))] * 2
  specs += [pl.BlockSpec((None, bs_p), lambda i, j, t: (i, t // tiles_per_block))]
  if samples:
    specs += [pl.BlockSpec((None, m_p, h), lambda i, j, t: (i, 0, 0))] * 2
    specs += [pl.BlockSpec((None, m_p), lambda i, j, t: (i, 0))] * 2
  return specs


def _tile_forward(q, keys, samples, *, causal, scale, tiling):
  """Forward over the padded layouts: out like q, lse ``[B*Nkv, G, rows]`` f32."""
  bkv, g, tq, h = q.shape
  tpb = tiling.tiles_per_block(tq)
  bs_p = keys[0].shape[1] // tiling.num_blocks
  m_p = samples[0].shape[1] if samples is not None else 0
  row_spec = pl.BlockSpec((None, None, tiling.block_q, h), lambda i, j, t: (i, j, t, 0))
  in_specs = [row_spec] + _key_specs(h, bs_p, m_p, samples is not None, tpb)
  kernel = functools.partial(_fwd_kernel, scale=scale, block_k=tiling.block_k,
                             tiles_per_block=tpb, causal=causal, has_samples=samples is not None)
  return _pallas_call(
      kernel, tiling, (bkv, g, tq // tiling.block_q), in_specs,
      [row_spec, pl.BlockSpec((None, None, tiling.block_q), lambda i, j, t: (i, j, t))],
      [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((bkv, g, tq), jnp.float32)],
      "hyperattn_block_attention_fwd")(q, *keys, *(samples or ()))


def _tile_backward(q, keys, samples, do, lse, delta, *, causal, scale, tiling, sample_groups):
  """Backward over the padded layouts: dq like q, dk/dv like the keys, and for the samples
  float32 (dk, dv, d log-weight) summed over the groups' partials (or None without samples).

  lse must be ``+inf`` on rows without keys (so that their probabilities are 0).
  """
  bkv, g, tq, h = q.shape
  nb, bq, bk = tiling.num_blocks, tiling.block_q, tiling.block_k
  tpb = tiling.tiles_per_block(tq)
  qb_p = tq // nb
  k, v, key_bias = keys
  bs_p = k.shape[1] // nb
  m_p = samples[0].shape[1] if samples is not None else 0
  has_samples = samples is not None

  # dq: the forward's grid.
  row_spec = pl.BlockSpec((None, None, bq, h), lambda i, j, t: (i, j, t, 0))
  stat_spec = pl.BlockSpec((None, None, bq), lambda i, j, t: (i, j, t))
  dq = _pallas_call(
      functools.partial(_dq_kernel, scale=scale, block_k=bk, tiles_per_block=tpb, causal=causal,
                        has_samples=has_samples),
      tiling, (bkv, g, tq // bq),
      [row_spec, row_spec, stat_spec, stat_spec] + _key_specs(h, bs_p, m_p, has_samples, tpb),
      row_spec, jax.ShapeDtypeStruct(q.shape, q.dtype), "hyperattn_block_attention_dq",
  )(q, do, lse, delta, *keys, *(samples or ()))

  def dkdv(key_arrays, rows, grid, key_map, row_map, samples_mode):
    rows_spec = pl.BlockSpec((None, g, rows, h), lambda i, c, *r: (i, 0, row_map(c, *r), 0))
    rstat_spec = pl.BlockSpec((None, g, rows), lambda i, c, *r: (i, 0, row_map(c, *r)))
    kspec = pl.BlockSpec((None, bk, h), lambda i, c, *r: (i, key_map(c, *r), 0))
    bspec = pl.BlockSpec((None, bk), lambda i, c, *r: (i, key_map(c, *r)))
    in_specs = [rows_spec, rows_spec, rstat_spec, rstat_spec, kspec, kspec, bspec]
    if samples_mode:  # float32 partials [bkv, group, m_p, ...], one per group of blocks
      in_specs.append(bspec)
      out_specs = [pl.BlockSpec((None, None, bk, h), lambda i, c, s: (i, c, s, 0))] * 2
      out_specs.append(pl.BlockSpec((None, None, bk), lambda i, c, s: (i, c, s)))
      part = (bkv, grid[1], m_p)
      out_shape = [jax.ShapeDtypeStruct(part + (h,), jnp.float32)] * 2
      out_shape.append(jax.ShapeDtypeStruct(part, jnp.float32))
    else:
      out_specs = [pl.BlockSpec((None, bk, h), lambda i, c: (i, c, 0))] * 2
      out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2
    kernel = functools.partial(
        _dkdv_kernel, scale=scale, block_q=bq, tiles_per_block=tpb,
        chunks_per_block=bs_p // bk, blocks_per_program=rows // qb_p,
        causal=causal and not samples_mode, samples=samples_mode)
    return _pallas_call(kernel, tiling, grid, in_specs, out_specs, out_shape,
                        "hyperattn_block_attention_dkdv")(q, do, lse, delta, *key_arrays)

  # dk, dv of each block's own keys: program (bkv, key chunk) over its block's query rows.
  cpb = bs_p // bk
  dk, dv = dkdv((k, v, key_bias), qb_p, (bkv, nb * cpb), lambda c: c, lambda c: c // cpb, False)
  if not has_samples:
    return dq, dk, dv, None
  # Samples: program (bkv, group of blocks, sample chunk); the groups' partials are summed.
  bpg = nb // sample_groups
  parts = dkdv(samples, bpg * qb_p, (bkv, sample_groups, m_p // bk), lambda c, s: s,
               lambda c, s: c, True)
  return dq, dk, dv, tuple(x.sum(axis=1) for x in parts)


# ----------------------------------------------------------------------------------------------
# Public wrappers: layouts in, layouts out


def _pad_to(x, axis, size, value=0):
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _tile_sizes(rows: int, block_q: int) -> int:
  """Query tile: ``block_q``, or the smallest power of two >= 16 covering fewer rows."""
  return min(block_q, _pow2_at_least(rows))


def _sample_groups(num_blocks: int, target: int) -> int:
  """The largest divisor of ``num_blocks`` that is at most ``target``."""
  return max(d for d in range(1, min(num_blocks, target) + 1) if num_blocks % d == 0)


class _BlockedLayout(NamedTuple):
  """The blocked stage's arrays padded to the kernel layouts, and how to undo the padding."""
  q: jax.Array
  keys: tuple
  samples: tuple
  tiling: _Tiling
  rows: callable      # [B, Nkv, G, T, ...] -> kernel rows layout (zero padded)
  unrows: callable    # kernel rows layout -> [B, Nkv, G, T, ...]


def _blocked_layout(qs, ks, vs, k_samp, v_samp, samp_pos, n_valid, log_weight, *, block_size,
                    block_q, block_k, num_warps, num_stages):
  b, kh, g, tq, h = qs.shape
  nb = ks.shape[2] // block_size
  qb, m = tq // nb, k_samp.shape[2]
  bq = _tile_sizes(qb, block_q)
  qb_p, bs_p, m_p = _round_up(qb, bq), _round_up(block_size, block_k), _round_up(m, block_k)
  h_p = _pow2_at_least(h)

  def rows(x, value=0):
    x = x.reshape(b * kh, g, nb, qb, *x.shape[4:])
    x = _pad_to(x, 3, qb_p, value)
    if x.ndim == 5:
      x = _pad_to(x, 4, h_p)
    return x.reshape(b * kh, g, nb * qb_p, *x.shape[4:])

  def unrows(x):
    x = x.reshape(b, kh, g, nb, qb_p, *x.shape[3:])[:, :, :, :, :qb]
    if x.ndim == 6:
      x = x[..., :h]
    return x.reshape(b, kh, g, tq, *x.shape[5:])

  blocks = lambda x: _pad_to(_pad_to(x.reshape(b * kh, nb, block_size, h), 2, bs_p), 3, h_p
                             ).reshape(b * kh, nb * bs_p, h_p)
  j = jnp.arange(bs_p)
  pos = jnp.arange(nb)[:, None] * block_size + j[None, :]
  valid = (j[None, :] < block_size) & (pos < n_valid[:, None, None])           # [B, nb, bs_p]
  key_bias = jnp.where(valid, 0.0, _NEG_INF).astype(jnp.float32)
  key_bias = jnp.broadcast_to(key_bias[:, None], (b, kh, nb, bs_p)).reshape(b * kh, nb * bs_p)

  samp = lambda x: _pad_to(_pad_to(x.reshape(b * kh, m, h), 1, m_p), 2, h_p)
  s_blk = _pad_to((samp_pos // block_size).reshape(b * kh, m), 1, m_p, -1).astype(jnp.int32)
  s_bias = _pad_to(log_weight.astype(jnp.float32).reshape(b * kh, m), 1, m_p, _NEG_INF)
  return _BlockedLayout(rows(qs), (blocks(ks), blocks(vs), key_bias),
                        (samp(k_samp), samp(v_samp), s_bias, s_blk),
                        _Tiling(nb, bq, block_k, num_warps, num_stages), rows, unrows)


def _backward_stats(out, lse, d_out, d_lse):
  """lse with ``+inf`` on empty rows, and ``delta = rowsum(dO * O) - dlse`` (float32)."""
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  return jnp.where(lse == _NEG_INF, jnp.inf, lse), delta - d_lse.astype(jnp.float32)


def blocked_attention_pallas(qs, ks, vs, k_samp, v_samp, samp_pos, n_valid, log_weight, *,
                             scale: float, block_size: int, block_q: int = 64, block_k: int = 64,
                             num_warps: int = 4, num_stages: int = 2):
  """The blocked stage on GPU; same arguments and results as ``blocked_attention_xla``.

  qs ``[B, Nkv, G, nb * qb, H]``, ks/vs ``[B, Nkv, nb * block_size, H]``, k_samp/v_samp
  ``[B, Nkv, m, H]``, samp_pos ``[B, Nkv, m]``, n_valid ``[B]``, log_weight ``[B, Nkv, m]``
  -> out like qs, lse ``[B, Nkv, G, nb * qb]`` float32.
  """
  lay = _blocked_layout(qs, ks, vs, k_samp, v_samp, samp_pos, n_valid, log_weight,
                        block_size=block_size, block_q=block_q, block_k=block_k,
                        num_warps=num_warps, num_stages=num_stages)
  out, lse = _tile_forward(lay.q, lay.keys, lay.samples, causal=False, scale=scale,
                           tiling=lay.tiling)
  return lay.unrows(out), lay.unrows(lse)


def blocked_attention_bwd_pallas(qs, ks, vs, k_samp, v_samp, samp_pos, n_valid, log_weight, out,
                                 lse, d_out, d_lse, *, scale: float, block_size: int,
                                 block_q: int = 64, block_k: int = 64, num_warps: int = 4,
                                 num_stages: int = 2, sample_groups: int = 8):
  """Gradients of the blocked stage w.r.t. (qs, ks, vs, k_samp, v_samp, log_weight), from its
  (out, lse); the log-weight gradient is float32 ``[B, Nkv, m]``.

  Arguments as ``blocked_attention_pallas`` plus its outputs and their cotangents (``d_out``
  like qs, ``d_lse`` ``[B, Nkv, G, nb * qb]``). The sample gradients are summed over
  ``sample_groups`` float32 partials (the largest divisor of the block count not above it).
  """
  lay = _blocked_layout(qs, ks, vs, k_samp, v_samp, samp_pos, n_valid, log_weight,
                        block_size=block_size, block_q=block_q, block_k=block_k,
                        num_warps=num_warps, num_stages=num_stages)
  lse, delta = _backward_stats(out, lse, d_out, d_lse)
  dq, dk, dv, (dks, dvs, dw) = _tile_backward(
      lay.q, lay.keys, lay.samples, lay.rows(d_out), lay.rows(lse, jnp.inf), lay.rows(delta),
      causal=False, scale=scale, tiling=lay.tiling,
      sample_groups=_sample_groups(lay.tiling.num_blocks, sample_groups))
  b, kh, n, h = ks.shape
  nb, m = lay.tiling.num_blocks, k_samp.shape[2]
  unblocks = lambda x: x.reshape(b, kh, nb, -1, x.shape[-1])[:, :, :, :block_size, :h].reshape(
      b, kh, n, h)
  unsamp = lambda x, like: x[:, :m, :h].reshape(like.shape).astype(like.dtype)
  dw = dw[:, :m].reshape(b, kh, m)
  return (lay.unrows(dq), unblocks(dk), unblocks(dv), unsamp(dks, k_samp), unsamp(dvs, v_samp),
          dw)


class _FlashLayout(NamedTuple):
  q: jax.Array
  keys: tuple
  tiling: _Tiling
  rows: callable
  unrows: callable


def _flash_layout(q, k, v, key_mask, *, block_q, block_k, num_warps, num_stages):
  b, kh, g, tq, h = q.shape
  tk = k.shape[2]
  bq = _tile_sizes(tq, block_q)
  tq_p, tk_p, h_p = _round_up(tq, bq), _round_up(tk, block_k), _pow2_at_least(h)

  def rows(x, value=0):
    x = _pad_to(x, 3, tq_p, value)
    if x.ndim == 5:
      x = _pad_to(x, 4, h_p)
    return x.reshape(b * kh, g, *x.shape[3:])

  def unrows(x):
    x = x.reshape(b, kh, g, *x.shape[2:])[:, :, :, :tq]
    return x[..., :h] if x.ndim == 5 else x

  kv = lambda x: _pad_to(_pad_to(x, 2, tk_p), 3, h_p).reshape(b * kh, tk_p, h_p)
  key_bias = _pad_to(jnp.where(key_mask, 0.0, _NEG_INF).astype(jnp.float32), 1, tk_p, _NEG_INF)
  key_bias = jnp.broadcast_to(key_bias[:, None], (b, kh, tk_p)).reshape(b * kh, tk_p)
  return _FlashLayout(rows(q), (kv(k), kv(v), key_bias),
                      _Tiling(1, bq, block_k, num_warps, num_stages), rows, unrows)


def flash_attention_pallas(q, k, v, key_mask, causal: bool, scale: float, *, block_q: int = 128,
                           block_k: int = 64, num_warps: int = 4, num_stages: int = 3):
  """Exact attention on GPU; same arguments and results as ``flash_attention_grouped``.

  q ``[B, Nkv, G, Tq, H]``, k/v ``[B, Nkv, Tk, H]``, key_mask ``[B, Tk]`` bool -> out like q,
  lse ``[B, Nkv, G, Tq]`` float32. Causal needs ``Tq == Tk``.
  """
  lay = _flash_layout(q, k, v, key_mask, block_q=block_q, block_k=block_k, num_warps=num_warps,
                      num_stages=num_stages)
  out, lse = _tile_forward(lay.q, lay.keys, None, causal=causal, scale=scale, tiling=lay.tiling)
  return lay.unrows(out), lay.unrows(lse)


def flash_attention_bwd_pallas(q, k, v, key_mask, out, lse, d_out, d_lse, causal: bool,
                               scale: float, *, block_q: int = 64, block_k: int = 64,
                               num_warps: int = 4, num_stages: int = 2):
  """Gradients (dq, dk, dv) of ``flash_attention_pallas`` from its (out, lse) and cotangents."""
  lay = _flash_layout(q, k, v, key_mask, block_q=block_q, block_k=block_k, num_warps=num_warps,
                      num_stages=num_stages)
  lse, delta = _backward_stats(out, lse, d_out, d_lse)
  dq, dk, dv, _ = _tile_backward(lay.q, lay.keys, None, lay.rows(d_out),
                                    lay.rows(lse, jnp.inf), lay.rows(delta), causal=causal,
                                    scale=scale, tiling=lay.tiling, sample_groups=1)
  tk, h = k.shape[2], k.shape[3]
  unkeys = lambda x: x.reshape(k.shape[:2] + x.shape[1:])[:, :, :tk, :h]
  return lay.unrows(dq), unkeys(dk), unkeys(dv)
