"""HyperAttention (Han et al., ICLR 2024), its stages top to bottom, and exact attention.

Public layout ``[batch, seq, heads, head_dim]`` (as ``jax.nn.dot_product_attention``) from end
to end: the sort order is carried as permutations (local row indices), never as sorted copies
of q/k/v; GQA without repeating K/V (query head ``kv * G + g`` uses kv head ``kv``).

Non-causal (``_hyper_noncausal``):
  0. draw the LSH hyperplanes and the samples from ``rng``;
  1. sortLSH: hash q and k, stable-sort both by Gray rank of the bucket (invalid keys last):
     the permutations ``q_perm [B, Nkv, G, rows]``, ``k_perm [B, Nkv, keys]``;
  2+3. blocked stage: the i-th sorted query block attends to the i-th sorted key block and to
     the shared uniform samples (reweighted, own-block samples masked), in one softmax,
     reading rows by index (``blocked.py`` in XLA, ``pallas_kernels`` on GPU);
  4. the outputs are written back to the unsorted rows by the same index.
Causal (``_hyper_causal``): every query and key is hashed once (one set of hyperplanes); for each
recursion level ``d`` the ``2**d`` lower-left quadrants at once, batched (row windows of the same
arrays), through the non-causal algorithm, merged into the running (out, lse) by log-sum-exp;
last, exact causal attention on the ``2**L`` diagonal base blocks (one batched call: cuDNN on
GPU where it can run it, else the Pallas/XLA flash loops), merged inside that call so that its
backward starts from the final (out, lse).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from hyperattn_jax import checks
from hyperattn_jax import cudnn
from hyperattn_jax import lsh
from hyperattn_jax.blocked import RowWindow, blocked_attention, grouped_rows
from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.exact import flash_attention, grouped_q
from hyperattn_jax.merge import merge_attention

__all__ = ["hyper_attention", "exact_attention", "merge_attention"]

_NEG_INF = float("-inf")


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


# ----------------------------------------------------------------------------------------------
# Exact attention (base case of the recursion and the exact baseline)


def _exact(q, k, v, key_mask, causal, scale, config, implementation, prior=None,
           lse_cotangent=True):
  """Exact attention in the public layout (merged into ``prior`` when given); returns (out,
  lse) with lse ``[B, N, T]``. On GPU ("pallas") it runs on cuDNN's fused kernels where cuDNN
  can (no key mask, bf16/fp16): faster than the Pallas flash kernel (see the breakdown in
  ``experiments/bench_attention.py``)."""
  if implementation == "pallas" and cudnn.available(q, key_mask):
    implementation = "cudnn"
  return flash_attention(q, k, v, key_mask, prior, causal, scale, config.exact_chunk_size,
                         implementation, lse_cotangent)


# ----------------------------------------------------------------------------------------------
# Non-causal HyperAttention


def _sort_keys(q, k, key_mask, projections):
  """Stage 1a, hashing: Gray-rank sort keys of every query ``[B, Nkv, G, Tq]`` and key ``[B,
  Nkv, Tk]`` (q ``[B, Tq, N, H]``, k ``[B, Tk, Nkv, H]``); masked keys get ``2**r``, so that
  they sort after every real bucket."""
  kh = k.shape[2]
  q_code = lsh.lsh_sort_keys(grouped_q(q, kh), projections)
  k_code = lsh.lsh_sort_keys(k.transpose(0, 2, 1, 3), projections)
  if key_mask is not None:
    k_code = jnp.where(key_mask[:, None, :], k_code, 2 ** projections.shape[-1])
  return q_code, k_code


def _perm(code, rows: int, num_projs: int):
  """Stage 1b: the stable sort of the rows by their sort keys ``code`` ``[..., n]``, as local
  row indices ``[..., rows]``, padded to ``rows`` (padding sorts last and is -1).

  Sort key and row index are packed into one int32 where they fit (one radix-sortable key,
  unique, so an unstable sort is stable), else an argsort of (key, row) pairs.
  """
  n = code.shape[-1]
  code = jnp.pad(code, ((0, 0),) * (code.ndim - 1) + ((0, rows - n),),
                 constant_values=2 ** num_projs)
  row_bits = max(1, (rows - 1).bit_length())
  if num_projs + 1 + row_bits <= 31:
    rows_iota = jax.lax.broadcasted_iota(jnp.int32, code.shape, code.ndim - 1)
    packed = jax.lax.sort(jnp.left_shift(code, row_bits) | rows_iota, dimension=code.ndim - 1)
    perm = jnp.bitwise_and(packed, (1 << row_bits) - 1)
  else:
    perm = jnp.argsort(code, axis=-1, stable=True).astype(jnp.int32)
  return jnp.where(perm < n, perm, -1)


def _residual_lse_max(qs, ks, n_valid, rows, scale, q_block, block_size, chunk):
  """ApproxD's ``log tau`` ``[B, Nkv, G]``: the largest exact residual row sum (keys outside the
  row's own block) over the sorted query rows ``rows`` ``[B, Nkv, r]``, chunked over keys."""
  b, kh, g, _, h = qs.shape
  n = ks.shape[2]
  q_r = jnp.take_along_axis(qs, jnp.broadcast_to(rows[:, :, None, :, None],
                                                 (b, kh, g, rows.shape[-1], 1)), axis=3)
  own = (rows // q_block)[:, :, None, :, None]                              # [B, Nkv, 1, r, 1]
  c = min(chunk, n)
  nc = -(-n // c)
  ks_p = jnp.pad(ks, ((0, 0), (0, 0), (0, nc * c - n), (0, 0)))

  def chunk_lse(i):
    k_c = jax.lax.dynamic_slice_in_dim(ks_p, i * c, c, axis=2)
    pos = i * c + jnp.arange(c)
    s = jnp.einsum("bkgrh,bkch->bkgrc", q_r, k_c,
                   preferred_element_type=jnp.promote_types(q_r.dtype, jnp.float32)) * scale
    keep = (pos < n_valid[:, None, None, None, None]) & (pos // block_size != own)
    return jax.nn.logsumexp(jnp.where(keep, s, _NEG_INF), axis=-1)

  lse = jax.nn.logsumexp(jax.lax.map(chunk_lse, jnp.arange(nc)), axis=0)   # [B, Nkv, G, r]
  return jnp.max(lse, axis=-1)


def _attend_blocks(q, k, v, q_perm, k_perm, samples, rows_rng, config: HyperAttentionConfig,
                   scale, implementation, window: RowWindow):
  """Stages 2+3: the blocked stage with the sampled residual, normalised as configured.

  ``"approx_d"``: ``log d = max(lse, logaddexp(lse_heavy, log tau - log kappa))``, i.e. the
  residual row sum ``exp(lse) - exp(lse_heavy)`` clamped from below by ``tau / kappa``; the
  output is rescaled to that normaliser (the clamp adds mass with value 0).
  """
  bs = config.block_size
  k_samp, v_samp, samp_pos, n_valid, log_weight = samples
  stage = lambda w: blocked_attention(q, k, v, q_perm, k_perm, k_samp, v_samp, samp_pos, n_valid,
                                      w, scale, bs, window, implementation)
  out, lse = stage(log_weight)
  if config.normalizer == "merged":
    return out, lse
  _, lse_heavy = stage(jnp.full_like(log_weight, _NEG_INF))
  b, kh, g, rows_p = q_perm.shape
  qs = grouped_rows(q, q_perm, window.q_offset)
  ks = grouped_rows(k, k_perm[:, :, None], window.k_offset)[:, :, 0]
  rows = lsh.draw_rows(rows_rng, b, kh, window.q_len, config.approx_d_rows)
  q_block = rows_p // (k_perm.shape[-1] // bs)
  log_tau = _residual_lse_max(qs, ks, n_valid, rows, scale, q_block, bs, config.exact_chunk_size)
  floor = jnp.logaddexp(lse_heavy, (log_tau - jnp.log(config.approx_d_kappa)).reshape(b, -1, 1))
  lse_d = jnp.maximum(lse, floor)
  rescale = jnp.where(lse == _NEG_INF, 0.0, jnp.exp(lse - lse_d))
  out = out.astype(rescale.dtype) * jnp.swapaxes(rescale, 1, 2)[..., None]
  return out.astype(q.dtype), lse_d


def _rng_streams(rng):
  """The keys of one approximation: (LSH hyperplanes, samples, ApproxD rows)."""
  return jax.random.split(rng, 3)


def _hyper_noncausal(q, k, v, key_mask, rng, config: HyperAttentionConfig, scale,
                     implementation, window: RowWindow | None = None, codes=None):
  """Approximate attention of the window's queries over the window's keys.

  q ``[P, Rq, Nq, H]``, k/v ``[P, Rk, Nkv, H]``; ``window`` (default: every row) says which rows
  are this problem's; key_mask: ``[P, k_len]`` bool or None. ``codes``: the window's sort keys
  (q ``[P, Nkv, G, q_len]``, k ``[P, Nkv, k_len]``) when the caller hashed already (the causal
  levels share one hashing per call); else they are hashed here with hyperplanes drawn from
  ``rng``. Returns out ``[P, q_len, Nq, H]``, lse ``[P, Nq, q_len]``.
  """
  if window is None:
    window = RowWindow(0, q.shape[1], 0, k.shape[1])
  b, kh = q.shape[0], k.shape[2]
  tq, tk = window.q_len, window.k_len
  bs = config.block_size
  nb = _cdiv(tk, bs)
  qb = _cdiv(tq, nb)

  # 0. randomness: hyperplanes shared by q and k of a kv head; samples per (batch, kv head).
  proj_rng, sample_rng, rows_rng = _rng_streams(rng)
  n_valid = (jnp.full((b,), tk, jnp.int32) if key_mask is None
             else jnp.sum(key_mask, axis=-1, dtype=jnp.int32))

  # 1. sortLSH (padding rows/keys get the invalid code, so they sort last): local row orders.
  if codes is None:
    window_rows = lambda x, start, n: jax.lax.slice_in_dim(x, start, start + n, axis=1)
    projections = lsh.draw_projections(proj_rng, kh, q.shape[-1], config.lsh_num_projs)
    codes = _sort_keys(window_rows(q, window.q_offset, tq), window_rows(k, window.k_offset, tk),
                       key_mask, projections)
  q_perm = _perm(codes[0], nb * qb, config.lsh_num_projs)
  k_perm = _perm(codes[1], nb * bs, config.lsh_num_projs)

  # Samples are sorted positions in [0, n_valid): drawn over the valid keys.
  key_rows = lambda x, perm: grouped_rows(x, perm[:, :, None], window.k_offset)[:, :, 0]
  vs = (key_rows(v, k_perm) if config.sampler == "value_norm"
        else jnp.zeros((b, kh, nb * bs, 1), v.dtype))  # the uniform draw needs only the shape
  samp_pos, log_weight = lsh.draw_samples(sample_rng, config.sampler, vs, n_valid,
                                          config.sample_size)
  samp_rows = jnp.take_along_axis(k_perm, samp_pos, axis=-1)
  samples = (key_rows(k, samp_rows), key_rows(v, samp_rows), samp_pos, n_valid, log_weight)

  # 2+3+4. blocked stage with the sampled residual in one softmax, written back unsorted.
  return _attend_blocks(q, k, v, q_perm, k_perm, samples, rows_rng, config, scale,
                        implementation, window)


# ----------------------------------------------------------------------------------------------
# Causal HyperAttention: batched recursion levels


def causal_levels(seq_len: int, min_seq_len: int) -> tuple[int, int]:
  """Recursion depth ``L`` and base block size ``s`` with ``s * 2**L >= seq_len``, ``s <= min``.

  Padding is at most ``2**L - 1`` positions (not to the next power of two).
  """
  levels = max(0, math.ceil(math.log2(seq_len / min_seq_len))) if seq_len > min_seq_len else 0
  return levels, _cdiv(seq_len, 2 ** levels)


def _split_halves(x, parts, axis):
  """View ``axis`` (length ``parts * 2 * half``) as (first halves, second halves) of parts."""
  shape = x.shape[:axis] + (parts, 2, x.shape[axis] // (2 * parts)) + x.shape[axis + 1:]
  xr = x.reshape(shape)
  take = lambda i: jnp.take(xr, i, axis=axis + 1)
  return take(0), take(1)


def level_codes(q_code, k_code, parts: int):
  """The sort keys of level ``log2(parts)``'s quadrants, from those of the whole sequence (q
  ``[B, Nkv, G, T]``, k ``[B, Nkv, T]``): second-half queries and first-half keys of each of
  the ``parts`` pairs, pairs folded into the batch (``[B * parts, ..., T / (2 parts)]``)."""
  def fold_parts(c):  # [B, ..., parts, half] -> [B * parts, ..., half]
    c = jnp.moveaxis(c, -2, 1)
    return c.reshape((c.shape[0] * parts,) + c.shape[2:])
  return (fold_parts(_split_halves(q_code, parts, q_code.ndim - 1)[1]),
          fold_parts(_split_halves(k_code, parts, k_code.ndim - 1)[0]))


def _hyper_causal(q, k, v, key_mask, rng, config, scale, implementation, lse_cotangent):
  b, t, nq, h = q.shape
  levels, base = causal_levels(t, config.min_seq_len)
  tp = base * 2 ** levels
  pad = lambda x: jnp.pad(x, ((0, 0), (0, tp - t)) + ((0, 0),) * (x.ndim - 2))
  q, k, v = pad(q), pad(k), pad(v)
  level_mask = pad(jnp.ones((b, t), jnp.bool_) if key_mask is None else key_mask)

  # Every query and key is hashed once, with one set of hyperplanes for all levels.
  projections = lsh.draw_projections(_rng_streams(rng)[0], k.shape[2], h, config.lsh_num_projs)
  q_code, k_code = _sort_keys(q, k, level_mask, projections)

  # Level d: the 2**d lower-left quadrants (second-half queries x first-half keys), batched,
  # each merged into the running (out, lse) of its query rows.
  out = jnp.zeros(q.shape, q.dtype)
  lse = jnp.full((b, nq, tp), _NEG_INF, jnp.promote_types(q.dtype, jnp.float32))
  for d in range(levels):
    parts = 2 ** d
    half = tp // (2 * parts)
    # Each quadrant reads rows [half, 2 half) (queries) and [0, half) (keys) of its pair.
    pairs = lambda x: x.reshape((b * parts, 2 * half) + x.shape[2:])
    m1 = pairs(level_mask)[:, :half]
    o_d, l_d = _hyper_noncausal(pairs(q), pairs(k), pairs(v), m1, jax.random.fold_in(rng, d),
                                config, scale, implementation, RowWindow(half, half, 0, half),
                                level_codes(q_code, k_code, parts))
    out_first, out_second = _split_halves(out, parts, 1)      # [B, parts, half, N, H]
    lse_first, lse_second = _split_halves(lse, parts, 2)      # [B, N, parts, half]
    o_d = o_d.reshape(b, parts, half, nq, h)
    l_d = l_d.reshape(b, parts, nq, half)
    merged_o, merged_l = merge_attention(out_second, jnp.moveaxis(lse_second, 2, 1), o_d, l_d)
    out = jnp.stack([out_first, merged_o], axis=2).reshape(b, tp, nq, h)
    lse = jnp.stack([lse_first, jnp.moveaxis(merged_l, 1, 2)], axis=3).reshape(b, nq, tp)

  # Base case, last: exact causal attention on the 2**L diagonal blocks (one batched call),
  # merged into the levels' result inside the call, so that its backward starts from the final
  # (out, lse). Padding keys lie after every real query, so without a key mask the causal mask
  # alone excludes them (which lets cuDNN run it).
  fold = lambda x: x.reshape((b * 2 ** levels, base) + x.shape[2:])
  fold_stats = lambda x: x.reshape(b, nq, 2 ** levels, base).transpose(0, 2, 1, 3).reshape(
      b * 2 ** levels, nq, base)
  base_mask = None if key_mask is None else fold(level_mask)
  out, lse = _exact(fold(q), fold(k), fold(v), base_mask, True, scale, config, implementation,
                    prior=(fold(out), fold_stats(lse)), lse_cotangent=lse_cotangent)
  out = out.reshape(b, tp, nq, h)
  lse = lse.reshape(b, 2 ** levels, nq, base).transpose(0, 2, 1, 3).reshape(b, nq, tp)
  return out[:, :t], lse[..., :t]


# ----------------------------------------------------------------------------------------------
# Public API


def _resolve_implementation(implementation):
  checks.check_implementation(implementation)
  if implementation is None:
    return "pallas" if _pallas_available() else "xla"
  return implementation


def _pallas_available() -> bool:
  if jax.default_backend() != "gpu":
    return False
  try:
    import pallas_kernels  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  return hasattr(pallas_kernels, "blocked_attention_pallas")


@functools.partial(jax.jit, static_argnames=("causal", "config", "scale", "implementation",
                                             "return_lse"))
def _hyper_jit(q, k, v, key_mask, rng, causal, config, scale, implementation, return_lse):
  """(out, lse), or out alone when not ``return_lse`` (then no lse cotangent can arrive)."""
  if causal and q.shape[1] > config.min_seq_len:
    out, lse = _hyper_causal(q, k, v, key_mask, rng, config, scale, implementation, return_lse)
  elif causal or k.shape[1] <= max(config.min_seq_len, config.block_size):
    out, lse = _exact(q, k, v, key_mask, causal, scale, config, implementation,
                      lse_cotangent=return_lse)
  else:
    out, lse = _hyper_noncausal(q, k, v, key_mask, rng, config, scale, implementation)
  return (out, lse) if return_lse else out


def hyper_attention(query, key, value, *, rng, causal: bool = False,
                    config: HyperAttentionConfig | None = None, scale: float | None = None,
                    key_mask=None, key_value_seq_lengths=None, return_lse: bool = False,
                    implementation: str | None = None):
  """HyperAttention: near-linear-time approximate softmax attention.

  Args:
    query: ``[batch, q_seq, q_heads, head_dim]``.
    key, value: ``[batch, kv_seq, kv_heads, head_dim]``; ``q_heads`` divisible by ``kv_heads``
      (grouped-query / multi-query attention without repeating K/V).
    rng: a ``jax.random`` key; the LSH hyperplanes and the samples are drawn from it (same key,
      same result).
    causal: query ``i`` attends to keys ``j <= i`` (needs ``q_seq == kv_seq``).
    config: :class:`HyperAttentionConfig` (default: the paper's benchmark settings).
    scale: logit scale, ``1/sqrt(head_dim)`` when None.
    key_mask: optional ``[batch, kv_seq]`` bool, False keys get no weight.
    key_value_seq_lengths: optional ``[batch]`` int, keys at and beyond the length get no weight
      (``jax.nn.dot_product_attention``'s convention); at most one of the two masks.
    return_lse: also return the log-sum-exp of the (approximate) scores, ``[batch, heads,
      q_seq]`` float32.
    implementation: None (Pallas on GPU when available, else XLA), ``"xla"`` or ``"pallas"``.

  Returns:
    ``[batch, q_seq, q_heads, head_dim]`` in the dtype of the inputs (and the lse). Query rows
    whose keys are all masked give zeros (lse ``-inf``).
  """
  config = HyperAttentionConfig() if config is None else config
  if not isinstance(config, HyperAttentionConfig):
    raise TypeError(f"config must be a HyperAttentionConfig, got {type(config).__name__}")
  dims = checks.check_qkv(query, key, value, causal)
  key_mask = checks.check_key_mask(key_mask, key_value_seq_lengths, dims)
  scale = checks.check_scale(scale, dims.head_dim)
  checks.check_rng(rng)
  implementation = _resolve_implementation(implementation)
  return _hyper_jit(query, key, value, key_mask, rng, bool(causal), config, scale,
                    implementation, bool(return_lse))


@functools.partial(jax.jit, static_argnames=("causal", "scale", "chunk_size", "implementation",
                                             "return_lse"))
def _exact_jit(q, k, v, key_mask, causal, scale, chunk_size, implementation, return_lse):
  out, lse = flash_attention(q, k, v, key_mask, None, causal, scale, chunk_size, implementation,
                             return_lse)
  return (out, lse) if return_lse else out


def exact_attention(query, key, value, *, causal: bool = False, scale: float | None = None,
                    key_mask=None, key_value_seq_lengths=None, return_lse: bool = False,
                    chunk_size: int = 512, implementation: str | None = None):
  """Exact softmax attention, memory-safe at long sequences (chunked online softmax).

  Same layouts, masks, GQA rules and ``implementation`` choices as :func:`hyper_attention`
  (``"pallas"``: the flash forward kernel of ``pallas_kernels``); no ``n x n`` matrix is
  materialised (peak extra memory ``O(chunk_size**2)`` per head in XLA), and the gradient is the
  flash-attention recomputation from the saved log-sum-exp.
  """
  dims = checks.check_qkv(query, key, value, causal)
  key_mask = checks.check_key_mask(key_mask, key_value_seq_lengths, dims)
  scale = checks.check_scale(scale, dims.head_dim)
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  implementation = _resolve_implementation(implementation)
  return _exact_jit(query, key, value, key_mask, bool(causal), scale, chunk_size,
                    implementation, bool(return_lse))
