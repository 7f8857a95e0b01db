"""Pallas (Triton) forward kernel for attention restricted to a key block, plus shared samples.

One kernel serves both GPU stages of HyperAttention:

* the blocked stage (``blocked_attention_pallas``, reference ``hyperattn_jax/blocked.py``): a tile
  of sorted query block ``n`` attends to sorted key block ``n`` and to the shared samples (each
  with the log-weight ``log(n_valid / m)``, masked when it lies in block ``n``);
* the exact base case (``flash_attention_pallas``, reference ``hyperattn_jax/exact.py``): one key
  block per (folded) batch row, causal within it, no samples.

Each program owns ``block_q`` query rows of one (batch * kv_head, group head, block) and runs one
online-softmax pass (fp32 statistics and accumulator) over the block's keys in chunks of
``block_k`` (skipping chunks above the diagonal when causal) and then over the samples; it
writes the normalised output and the log-sum-exp. Key validity (masks, padding, ``n_valid``) is
an additive bias row (0 or -inf) per key, so no mask tensor of size ``q x k`` exists. GQA: the
group axis is a grid axis whose programs read the same K/V block (no repetition in HBM).

Kernel layouts (padded to whole tiles; head_dim to a power of two >= 16):
  q ``[B*Nkv, G, nb * qb_p, H_p]``, k/v ``[B*Nkv, nb * bs_p, H_p]``, key_bias ``[B*Nkv, nb*bs_p]``,
  samples k/v ``[B*Nkv, m_p, H_p]``, sample_block ``[B*Nkv, m_p]`` int32 (-1 = padding),
  sample_bias ``[B*Nkv, m_p]`` f32; out like q, lse ``[B*Nkv, G, nb * qb_p]`` f32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

__all__ = ["blocked_attention_pallas", "flash_attention_pallas"]

_NEG_INF = float("-inf")


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _pow2_at_least(x: int, lo: int = 16) -> int:
  p = lo
  while p < x:
    p *= 2
  return p


def _dot(a, b, trans_b=False):
  """fp32 accumulation; fp32 operands are multiplied exactly (no TF32), like XLA at HIGHEST."""
  return plgpu.dot(a, b, trans_b=trans_b, allow_tf32=False)


def _kernel(*refs, scale, block_k, tiles_per_block, causal, has_samples):
  if has_samples:
    q_ref, k_ref, v_ref, kb_ref, ks_ref, vs_ref, sblk_ref, sb_ref, o_ref, lse_ref = refs
  else:
    q_ref, k_ref, v_ref, kb_ref, o_ref, lse_ref = refs
  tile = pl.program_id(2)
  block = tile // tiles_per_block
  q = q_ref[...]
  block_q, head_dim = q.shape
  row0 = (tile % tiles_per_block) * block_q

  def update(carry, s, v):
    m, l, acc = carry
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == _NEG_INF, 0.0, m_new)
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe[:, None])
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
    return m_new, l, acc

  def key_chunk(j, carry, masked):
    sl = pl.ds(j * block_k, block_k)
    s = _dot(q, k_ref[sl, :], trans_b=True) * scale + kb_ref[sl][None, :]
    if masked:
      rows = row0 + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
      cols = j * block_k + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
      s = jnp.where(rows >= cols, s, _NEG_INF)
    return update(carry, s, v_ref[sl, :])

  n_chunks = k_ref.shape[0] // block_k
  carry = (jnp.full((block_q,), _NEG_INF, jnp.float32), jnp.zeros((block_q,), jnp.float32),
           jnp.zeros((block_q, head_dim), jnp.float32))
  if causal:  # chunks left of the diagonal need no mask; the diagonal ones do
    below = row0 // block_k
    upper = jnp.minimum(n_chunks, (row0 + block_q + block_k - 1) // block_k)
    carry = lax.fori_loop(0, below, functools.partial(key_chunk, masked=False), carry)
    carry = lax.fori_loop(below, upper, functools.partial(key_chunk, masked=True), carry)
  else:
    carry = lax.fori_loop(0, n_chunks, functools.partial(key_chunk, masked=False), carry)

  if has_samples:
    def sample_chunk(j, carry):
      sl = pl.ds(j * block_k, block_k)
      s = _dot(q, ks_ref[sl, :], trans_b=True) * scale + sb_ref[sl][None, :]
      s = jnp.where(sblk_ref[sl][None, :] == block, _NEG_INF, s)
      return update(carry, s, vs_ref[sl, :])
    carry = lax.fori_loop(0, ks_ref.shape[0] // block_k, sample_chunk, carry)

  m, l, acc = carry
  has = l > 0
  l_safe = jnp.where(has, l, 1.0)
  o_ref[...] = jnp.where(has[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(has, m + jnp.log(l_safe), _NEG_INF)


def _tile_attention(q, k, v, key_bias, samples, *, num_blocks, causal, scale, block_q, block_k,
                    num_warps, num_stages):
  """pallas_call over the padded kernel layouts of the module docstring."""
  bkv, g, tq, h = q.shape
  nb = num_blocks
  bs_p = k.shape[1] // nb
  tiles_per_block = tq // nb // block_q
  grid = (bkv, g, tq // block_q)
  in_specs = [
      pl.BlockSpec((None, None, block_q, h), lambda i, j, t: (i, j, t, 0)),
      pl.BlockSpec((None, bs_p, h), lambda i, j, t: (i, t // tiles_per_block, 0)),
      pl.BlockSpec((None, bs_p, h), lambda i, j, t: (i, t // tiles_per_block, 0)),
      pl.BlockSpec((None, bs_p), lambda i, j, t: (i, t // tiles_per_block)),
  ]
  args = [q, k, v, key_bias]
  if samples is not None:
    k_s, v_s, s_blk, s_bias = samples
    m_p = k_s.shape[1]
    in_specs += [pl.BlockSpec((None, m_p, h), lambda i, j, t: (i, 0, 0))] * 2
    in_specs += [pl.BlockSpec((None, m_p), lambda i, j, t: (i, 0))] * 2
    args += [k_s, v_s, s_blk, s_bias]
  kernel = functools.partial(_kernel, scale=scale, block_k=block_k,
                             tiles_per_block=tiles_per_block, causal=causal,
                             has_samples=samples is not None)
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, block_q, h), lambda i, j, t: (i, j, t, 0)),
                 pl.BlockSpec((None, None, block_q), lambda i, j, t: (i, j, t))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((bkv, g, tq), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=jax.default_backend() != "gpu",
      name="hyperattn_block_attention",
  )(*args)


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


def blocked_attention_pallas(qs, ks, vs, k_samp, v_samp, samp_pos, n_valid, log_weight, *,
                             scale: float, block_size: int, block_q: int = 64, block_k: int = 64,
                             num_warps: int = 4, num_stages: int = 2):
  """The blocked stage on GPU; same arguments and results as ``blocked_attention_xla``.

  qs ``[B, Nkv, G, nb * qb, H]``, ks/vs ``[B, Nkv, nb * block_size, H]``, k_samp/v_samp
  ``[B, Nkv, m, H]``, samp_pos ``[B, Nkv, m]``, n_valid ``[B]``, log_weight ``[B]`` ->
  out like qs, lse ``[B, Nkv, G, nb * qb]`` float32.
  """
  b, kh, g, tq, h = qs.shape
  nb = ks.shape[2] // block_size
  qb, m = tq // nb, k_samp.shape[2]
  bq = _tile_sizes(qb, block_q)
  qb_p, bs_p, m_p = _round_up(qb, bq), _round_up(block_size, block_k), _round_up(m, block_k)
  h_p = _pow2_at_least(h)

  q = qs.reshape(b * kh, g, nb, qb, h)
  q = _pad_to(_pad_to(q, 3, qb_p), 4, h_p).reshape(b * kh, g, nb * qb_p, h_p)
  blocks = lambda x: _pad_to(_pad_to(x.reshape(b * kh, nb, block_size, h), 2, bs_p), 3, h_p
                             ).reshape(b * kh, nb * bs_p, h_p)
  j = jnp.arange(bs_p)
  pos = jnp.arange(nb)[:, None] * block_size + j[None, :]
  valid = (j[None, :] < block_size) & (pos < n_valid[:, None, None])           # [B, nb, bs_p]
  key_bias = jnp.where(valid, 0.0, _NEG_INF).astype(jnp.float32)
  key_bias = jnp.broadcast_to(key_bias[:, None], (b, kh, nb, bs_p)).reshape(b * kh, nb * bs_p)

  samp = lambda x: _pad_to(_pad_to(x.reshape(b * kh, m, h), 1, m_p), 2, h_p)
  s_blk = _pad_to((samp_pos // block_size).reshape(b * kh, m), 1, m_p, -1).astype(jnp.int32)
  s_bias = jnp.broadcast_to(log_weight.astype(jnp.float32)[:, None, None], (b, kh, m))
  s_bias = _pad_to(s_bias.reshape(b * kh, m), 1, m_p, _NEG_INF)

  out, lse = _tile_attention(q, blocks(ks), blocks(vs), key_bias,
                             (samp(k_samp), samp(v_samp), s_blk, s_bias), num_blocks=nb,
                             causal=False, scale=scale, block_q=bq, block_k=block_k,
                             num_warps=num_warps, num_stages=num_stages)
  out = out.reshape(b, kh, g, nb, qb_p, h_p)[:, :, :, :, :qb, :h].reshape(b, kh, g, tq, h)
  lse = lse.reshape(b, kh, g, nb, qb_p)[..., :qb].reshape(b, kh, g, tq)
  return out, lse


def flash_attention_pallas(q, k, v, key_mask, causal: bool, scale: float, *, block_q: int = 128,
                           block_k: int = 64, num_warps: int = 4, num_stages: int = 3):
  """Exact attention on GPU; same arguments and results as ``flash_attention_grouped``.

  q ``[B, Nkv, G, Tq, H]``, k/v ``[B, Nkv, Tk, H]``, key_mask ``[B, Tk]`` bool -> out like q,
  lse ``[B, Nkv, G, Tq]`` float32. Causal needs ``Tq == Tk``.
  """
  b, kh, g, tq, h = q.shape
  tk = k.shape[2]
  bq = _tile_sizes(tq, block_q)
  tq_p, tk_p, h_p = _round_up(tq, bq), _round_up(tk, block_k), _pow2_at_least(h)
  qp = _pad_to(_pad_to(q, 3, tq_p), 4, h_p).reshape(b * kh, g, tq_p, h_p)
  kv = lambda x: _pad_to(_pad_to(x, 2, tk_p), 3, h_p).reshape(b * kh, tk_p, h_p)
  key_bias = _pad_to(jnp.where(key_mask, 0.0, _NEG_INF).astype(jnp.float32), 1, tk_p, _NEG_INF)
  key_bias = jnp.broadcast_to(key_bias[:, None], (b, kh, tk_p)).reshape(b * kh, tk_p)
  out, lse = _tile_attention(qp, kv(k), kv(v), key_bias, None, num_blocks=1, causal=causal,
                             scale=scale, block_q=bq, block_k=block_k, num_warps=num_warps,
                             num_stages=num_stages)
  out = out.reshape(b, kh, g, tq_p, h_p)[:, :, :, :tq, :h]
  lse = lse.reshape(b, kh, g, tq_p)[..., :tq]
  return out, lse
