"""A deliberately simple dense reference of HyperAttention, the oracle for the fast paths.

It builds the full ``[batch, heads, q_seq, kv_seq]`` matrix of log-weights that the approximation
gives each (query, key) pair and takes one softmax over it:

* same sorted block (query rank // q_block == key rank // block_size): weight ``exp(s)``;
* otherwise, a key sampled ``c`` times: weight ``exp(s)`` times the sum of its samples'
  weights (``c * n_valid / sample_size`` for the uniform sampler);
* otherwise (or masked keys): 0.

The ``"approx_d"`` normaliser adds, per row, a phantom mass with value 0 (its row sum's lower
clamp), carried as a separate log-mass beside the matrix.

Causal: exact causal weights on the diagonal base blocks, and each recursion level's lower-left
quadrants filled from the non-causal weights. The options' exactly attended keys (sinks: the
first ``sink_size`` keys; band: the last ``local_window`` keys of a quadrant's left half) get
their exact score and are left out of the approximation (hashing, samples, ``n_valid``).
``select_blocks``: the keys of the runs a query's sorted block chooses (the largest bounds over
the block's queries, computed here from the dense per-query bounds) get their exact score too,
and a sampled key in such a run loses its sample weight. Summing unnormalised weights is what
the log-sum-exp merges compute, so this matrix's softmax is the approximation's output.

Shares only the random draws (``lsh.py``, ``sampling.py``) with the fast path; block membership
comes from sort ranks here, from gathers there. Memory is ``O(seq**2)``: small inputs only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hyperattn_jax import lsh
from hyperattn_jax import sampling
from hyperattn_jax import selection
from hyperattn_jax.causal import causal_levels
from hyperattn_jax.config import HyperAttentionConfig

__all__ = ["reference_hyper_attention", "dense_attention", "lsh_blocks"]

_NEG_INF = float("-inf")


def _scores(q, k, scale):
  """q ``[B, Tq, Nq, H]``, k ``[B, Tk, Nkv, H]`` -> fp32 scores ``[B, Nq, Tq, Tk]``."""
  g = q.shape[2] // k.shape[2]
  k = jnp.repeat(k, g, axis=2)
  return jnp.einsum("bqnh,bknh->bnqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale


def _softmax_out(log_w, v, log_phantom=None):
  """Softmax over the last axis of log-weights ``[B, N, Tq, Tk]`` applied to v; an optional
  phantom log-mass ``[B, N, Tq]`` (value 0) joins the normaliser."""
  g = log_w.shape[1] // v.shape[2]
  v = jnp.repeat(v, g, axis=2).astype(jnp.float32)
  lse = jax.nn.logsumexp(log_w, axis=-1)
  if log_phantom is not None:
    lse = jnp.logaddexp(lse, log_phantom)
  p = jnp.where(lse[..., None] == _NEG_INF, 0.0, jnp.exp(log_w - lse[..., None]))
  return jnp.einsum("bnqk,bknh->bqnh", p, v), lse


def _ranks(codes):
  """Position of each element in the stable ascending sort of ``codes`` (last axis)."""
  return jnp.argsort(jnp.argsort(codes, axis=-1, stable=True), axis=-1, stable=True)


def _grouped(x, kv_heads):
  """``[B, T, N, H]`` -> ``[B, Nkv, G, T, H]``."""
  b, t, n, h = x.shape
  return x.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)


def lsh_blocks(q, k, key_mask, rng, config, v=None, projections=None):
  """Sorted-block ids and sample weights the non-causal approximation draws from ``rng``
  (the LSH hyperplanes too, unless ``projections`` ``[Nkv, H, r]`` are given).

  Returns ``q_block [B, Nq, Tq]`` and ``k_block [B, Nq, Tk]`` int (a query attends exactly to the
  keys of its own block; masked keys may share a block id and must be excluded with ``key_mask``),
  ``sample_w [B, Nq, Tk]`` float32 (the summed weights of a key's samples, else 0) and
  ``q_rank [B, Nq, Tq]`` (sorted position of each query), all O(n). ``v`` is needed by the
  ``"value_norm"`` sampler.
  """
  b, tq, nq, h = q.shape
  tk, kh = k.shape[1], k.shape[2]
  g = nq // kh
  bs, r = config.block_size, config.lsh_num_projs
  nb = -(-tk // bs)
  qb = -(-tq // nb)
  proj_rng, sample_rng, _ = jax.random.split(rng, 3)
  if projections is None:
    projections = lsh.draw_projections(proj_rng, kh, h, r)
  n_valid = jnp.sum(key_mask, axis=-1, dtype=jnp.int32)

  # [B, Nkv, G, Tq] and [B, Nkv, Tk] sort keys; invalid keys last.
  q_codes = lsh.lsh_sort_keys(_grouped(q, kh), projections)
  k_codes = lsh.lsh_sort_keys(k.transpose(0, 2, 1, 3), projections)
  k_codes = jnp.where(key_mask[:, None, :], k_codes, 2 ** r)
  q_rank = _ranks(q_codes).reshape(b, nq, tq)
  k_rank = _ranks(k_codes)                                             # [B, Nkv, Tk]
  k_block = jnp.repeat(k_rank // bs, g, axis=1)                        # [B, Nq, Tk]

  if config.sampler == "value_norm" and v is None:
    raise ValueError("lsh_blocks needs v for the 'value_norm' sampler")
  vs_sorted = None if v is None else jnp.take_along_axis(
      v.transpose(0, 2, 1, 3), jnp.argsort(k_codes, axis=-1, stable=True)[..., None], axis=2)
  if vs_sorted is None:  # the uniform draw only needs the shape
    vs_sorted = jnp.zeros((b, kh, tk, 1), jnp.float32)
  samp_pos, log_w = sampling.draw_samples(sample_rng, config.sampler, vs_sorted, n_valid,
                                          config.sample_size)
  hits = k_rank[..., :, None] == samp_pos[..., None, :]                # [B, Nkv, Tk, m]
  sample_w = jnp.sum(jnp.where(hits, jnp.exp(log_w)[..., None, :], 0.0), axis=-1)
  return q_rank // qb, k_block, jnp.repeat(sample_w, g, axis=1), q_rank


def _selected(q, k, key_mask, q_block, config):
  """``[B, Nq, Tq, Tk]`` bool: key j lies in a run chosen by query i's sorted block (the runs
  of largest bound maxed over the block's queries of all heads of the kv head)."""
  b, tq, nq, _ = q.shape
  tk, kh = k.shape[1], k.shape[2]
  run = config.select_block_size
  nb = -(-tk // config.block_size)
  kmax, kmin, has_key = selection.run_extrema(k.transpose(0, 2, 1, 3), key_mask, run)
  bound = selection.block_bounds(_grouped(q, kh), kmax[:, :, None], kmin[:, :, None])
  member = (q_block.reshape(b, kh, nq // kh, tq)[..., None] == jnp.arange(nb))  # [B,Nkv,G,Tq,nb]
  scores = jnp.max(jnp.where(member[..., None], bound[:, :, :, :, None, :], _NEG_INF),
                   axis=(2, 3))                                        # [B, Nkv, nb, R]
  scores = jnp.where(has_key[:, :, None, :], scores, _NEG_INF)
  chosen = jax.lax.top_k(scores, min(config.select_blocks, scores.shape[-1]))[1]
  picked = jnp.any(jnp.arange(scores.shape[-1])[:, None] == chosen[..., None, :], axis=-1)
  picked = jnp.repeat(picked, nq // kh, axis=1)                        # [B, Nq, nb, R]
  rows = jnp.take_along_axis(picked, q_block[..., None], axis=2)       # [B, Nq, Tq, R]
  return jnp.take(rows, jnp.arange(tk) // run, axis=-1)


def _noncausal_log_weights(q, k, v, key_mask, rng, config, scale, projections=None):
  """Log-weights ``[B, Nq, Tq, Tk]`` and the phantom log-mass ``[B, Nq, Tq]`` (or None)."""
  q_block, k_block, sample_w, q_rank = lsh_blocks(q, k, key_mask, rng, config, v, projections)
  s = _scores(q, k, scale)
  same = q_block[..., :, None] == k_block[..., None, :]
  valid = key_mask[:, None, None, :]
  sampled = jnp.where(sample_w[:, :, None, :] > 0, s + jnp.log(sample_w)[:, :, None, :],
                      _NEG_INF)
  if config.select_blocks:
    sampled = jnp.where(_selected(q, k, key_mask, q_block, config), s, sampled)
  log_w = jnp.where(same, s, sampled)
  log_w = jnp.where(valid, log_w, _NEG_INF)
  if config.normalizer == "merged":
    return log_w, None
  # ApproxD: tau = the largest exact residual row sum over the drawn sorted query rows.
  b, tq, nq, _ = q.shape
  kh = k.shape[2]
  rows = sampling.draw_rows(jax.random.split(rng, 3)[2], b, kh, tq, config.approx_d_rows)
  rows = jnp.repeat(rows, nq // kh, axis=1)                            # [B, Nq, r]
  drawn = jnp.any(q_rank[..., :, None] == rows[..., None, :], axis=-1)  # [B, Nq, Tq]
  residual = jax.nn.logsumexp(jnp.where(valid & ~same, s, _NEG_INF), axis=-1)
  log_tau = jnp.max(jnp.where(drawn, residual, _NEG_INF), axis=-1, keepdims=True)
  lse = jax.nn.logsumexp(log_w, axis=-1)
  lse_heavy = jax.nn.logsumexp(jnp.where(valid & same, s, _NEG_INF), axis=-1)
  lse_d = jnp.maximum(lse, jnp.logaddexp(lse_heavy, log_tau - jnp.log(config.approx_d_kappa)))
  gap = jnp.where(lse_d > lse, lse - lse_d, _NEG_INF)
  return log_w, jnp.where(lse_d > lse, lse_d + jnp.log1p(-jnp.exp(gap)), _NEG_INF)


def _exact_log_weights(q, k, key_mask, causal, scale):
  s = _scores(q, k, scale)
  valid = key_mask[:, None, None, :]
  if causal:
    valid = valid & jnp.tril(jnp.ones((q.shape[1], k.shape[1]), jnp.bool_))
  return jnp.where(valid, s, _NEG_INF)


def _with_exact_keys(q, k, v, key_mask, exact, rng, config, scale, projections=None):
  """Non-causal log-weights where the keys ``exact`` ``[B, Tk]`` are attended exactly and the
  approximation covers the other valid keys."""
  w, ph = _noncausal_log_weights(q, k, v, key_mask & ~exact, rng, config, scale, projections)
  keep = (exact & key_mask)[:, None, None, :]
  return jnp.where(keep, _scores(q, k, scale), w), ph


def _causal_log_weights(q, k, v, key_mask, rng, config, scale):
  b, t, nq, h = q.shape
  levels, base = causal_levels(t, config.min_seq_len)
  tp = base * 2 ** levels
  pad = lambda x: jnp.pad(x, ((0, 0), (0, tp - t)) + ((0, 0),) * (x.ndim - 2))
  q, k, v, key_mask = pad(q), pad(k), pad(v), pad(key_mask)
  # One set of hyperplanes for every level; the samples are drawn per level.
  projections = lsh.draw_projections(jax.random.split(rng, 3)[0], k.shape[2], h,
                                     config.lsh_num_projs)
  log_w = jnp.full((b, nq, tp, tp), _NEG_INF, jnp.float32)
  phantom = jnp.full((b, nq, tp), _NEG_INF, jnp.float32)
  for i in range(2 ** levels):
    sl = slice(i * base, (i + 1) * base)
    log_w = log_w.at[:, :, sl, sl].set(
        _exact_log_weights(q[:, sl], k[:, sl], key_mask[:, sl], True, scale))
  for d in range(levels):
    parts, half = 2 ** d, tp // 2 ** (d + 1)
    halves = lambda x, which: x.reshape((b, parts, 2, half) + x.shape[2:])[:, :, which].reshape(
        (b * parts, half) + x.shape[2:])
    pos = jnp.arange(half)[None, :]
    first = (jnp.arange(b * parts) % parts == 0)[:, None]
    exact = (pos >= half - config.local_window) | (first & (pos < config.sink_size))
    w, ph = _with_exact_keys(halves(q, 1), halves(k, 0), halves(v, 0), halves(key_mask, 0),
                             exact, jax.random.fold_in(rng, d), config, scale, projections)
    w = w.reshape(b, parts, nq, half, half)
    for p in range(parts):
      rows = slice((2 * p + 1) * half, (2 * p + 2) * half)
      cols = slice(2 * p * half, (2 * p + 1) * half)
      log_w = log_w.at[:, :, rows, cols].set(w[:, p])
      if ph is not None:
        ph_p = ph.reshape(b, parts, nq, half)[:, p]
        phantom = phantom.at[:, :, rows].set(jnp.logaddexp(phantom[:, :, rows], ph_p))
  return log_w[:, :, :t, :t], phantom[:, :, :t]


def reference_hyper_attention(query, key, value, *, rng, causal=False,
                              config: HyperAttentionConfig | None = None, scale=None,
                              key_mask=None):
  """Dense oracle of :func:`hyperattn_jax.hyper_attention` (same key -> same approximation).

  Returns ``(out [B, Tq, Nq, H] float32, lse [B, Nq, Tq] float32)``.
  """
  config = HyperAttentionConfig() if config is None else config
  scale = 1.0 / float(query.shape[-1]) ** 0.5 if scale is None else scale
  b, tk = key.shape[0], key.shape[1]
  key_mask = jnp.ones((b, tk), jnp.bool_) if key_mask is None else key_mask
  phantom = None
  if causal:
    if query.shape[1] <= config.min_seq_len:
      log_w = _exact_log_weights(query, key, key_mask, True, scale)
    else:
      log_w, phantom = _causal_log_weights(query, key, value, key_mask, rng, config, scale)
  elif tk <= max(config.min_seq_len, config.block_size):
    log_w = _exact_log_weights(query, key, key_mask, False, scale)
  else:
    sinks = jnp.broadcast_to(jnp.arange(tk) < config.sink_size, (b, tk))
    log_w, phantom = _with_exact_keys(query, key, value, key_mask, sinks, rng, config, scale)
  return _softmax_out(log_w, value, phantom)


def dense_attention(query, key, value, *, causal=False, scale=None, key_mask=None):
  """Exact dense attention (``O(seq**2)`` memory) with LSE, the exact oracle."""
  scale = 1.0 / float(query.shape[-1]) ** 0.5 if scale is None else scale
  b, tk = key.shape[0], key.shape[1]
  key_mask = jnp.ones((b, tk), jnp.bool_) if key_mask is None else key_mask
  return _softmax_out(_exact_log_weights(query, key, key_mask, causal, scale), value)
