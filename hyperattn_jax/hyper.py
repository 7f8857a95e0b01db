"""HyperAttention (Han et al., ICLR 2024), its stages top to bottom, and exact attention.

Public layout ``[batch, seq, heads, head_dim]`` (as ``jax.nn.dot_product_attention``) from end
to end: the sort order is carried as permutations (local row indices), never as sorted copies
of q/k/v; GQA without repeating K/V (query head ``kv * G + g`` uses kv head ``kv``).

Non-causal (``_hyper_noncausal``):
  0. draw the LSH hyperplanes and the samples from ``rng`` (``_plan``);
  1. sortLSH: hash q and k, stable-sort both by Gray rank of the bucket (invalid keys last):
     the permutations ``q_perm [B, Nkv, G, rows]``, ``k_perm [B, Nkv, keys]``;
  2+3. blocked stage: the i-th sorted query block attends to the i-th sorted key block and to
     the shared uniform samples (reweighted, own-block samples masked), in one softmax,
     reading rows by index (``blocked.py`` in XLA, ``pallas_kernels`` on GPU);
  4. the outputs are written back to the unsorted rows by the same index.
Causal (``_hyper_causal``): every query and key is hashed once (one set of hyperplanes); first,
exact causal attention on the ``2**L`` diagonal base blocks (one batched call: cuDNN on GPU
where it can run it, else the Pallas/XLA flash loops) starts the running (out, lse); then for
each recursion level ``d`` the ``2**d`` lower-left quadrants at once, batched (row windows of the
folded views of the same arrays, ``folding.py``), through the non-causal algorithm, merged into
the running (out, lse) by log-sum-exp (in place, inside the Pallas kernel). One custom VJP covers
the whole recursion: every part's backward starts from the final (out, lse) (``merge.py``) and
adds into one dq/dk/dv, so neither the parts' own results nor the merges are kept for it.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from hyperattn_jax import backends
from hyperattn_jax import checks
from hyperattn_jax import lsh
from hyperattn_jax import selection as selection_lib
from hyperattn_jax.blocked import (RowWindow, blocked_attention, blocked_attention_bwd,
                                   blocked_attention_fwd, grouped_rows)
from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.exact import flash_attention, grouped_q, kernel_backward, kernel_forward
from hyperattn_jax.folding import (add_grads, add_key_rows, fold_rows, fold_stats, merge_rows,
                                   unfold_stats)
from hyperattn_jax.merge import merge_attention, output_delta, part_cotangents
from hyperattn_jax.perturbation import dense, flag, is_set, nonzero, primal_values

__all__ = ["hyper_attention", "exact_attention", "merge_attention"]

_NEG_INF = float("-inf")


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


# ----------------------------------------------------------------------------------------------
# Exact attention (base case of the recursion and the exact baseline)


def _exact(q, k, v, key_mask, causal, scale, config, implementation):
  """Exact attention in the public layout; returns (out, lse) with lse ``[B, N, T]``."""
  return flash_attention(q, k, v, key_mask, causal, scale, config.exact_chunk_size,
                         backends.exact_backend(implementation, q, key_mask))


# ----------------------------------------------------------------------------------------------
# Non-causal HyperAttention


class _Plan(NamedTuple):
  """One approximation's sort orders and draws (int arrays: fixed under differentiation), and
  the samples' log-weights (differentiable in v for the ``"value_norm"`` sampler)."""
  q_perm: jax.Array      # [P, Nkv, G, nb * qb] local query rows in sorted order (-1: padding)
  k_perm: jax.Array      # [P, Nkv, nb * block_size] local key rows in sorted order
  samp_rows: jax.Array   # [P, Nkv, m] local key rows of the samples
  samp_pos: jax.Array    # [P, Nkv, m] their sorted positions
  n_valid: jax.Array     # [P] valid keys
  log_weight: jax.Array  # [P, Nkv, m] float32
  tau_rows: jax.Array | None  # [P, Nkv, approx_d_rows] ApproxD's sorted query rows, or None
  selection: selection_lib.Selection | None  # the select_blocks option's chosen keys, or None


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


# 16-bit sorts of one call/level at most (each is a few kernel launches; at 1M causal, whose
# finest level takes 16, they measured faster than one 32-bit sort: see HISTORY); beyond, one
# 32-bit sort.
_MAX_SORTS = 16


def _perms(codes, rows, num_projs: int, masked: bool):
  """Stage 1b: for each sort-key array ``codes[i]`` ``[..., n_i]`` (values below ``2**num_projs``,
  or equal to it on masked keys where ``masked``), the stable sort of its rows by key, as local
  row indices ``[..., rows[i]]`` int32, padded to ``rows[i]`` (padding sorts last and is -1).

  On GPU a batched sort is cub's segmented radix sort, several times slower at few long rows,
  so the arrays are flattened, concatenated and radix-sorted with the row index riding along
  as the value: the key of a row is (segment, sort key), segment = its leading position (batch,
  head, ...) numbered across the arrays. 16-bit keys take two radix passes, 32-bit ones four:
  the segments are cut into consecutive groups that each fit 16 bits with the code (a group's
  rows are a contiguous range, sorted in place), as long as that takes at most ``_MAX_SORTS``
  sorts; else one 32-bit sort, and a stable argsort per array beyond 32 bits. The radix sort
  is stable, so ties keep rows ascending. The code needs ``num_projs`` bits, one more when
  masked keys or padding rows carry the invalid code ``2**num_projs``.
  """
  padded = [jnp.pad(c, ((0, 0),) * (c.ndim - 1) + ((0, r - c.shape[-1]),),
                    constant_values=2 ** num_projs) for c, r in zip(codes, rows)]
  code_bits = num_projs + int(masked or any(r > c.shape[-1] for c, r in zip(codes, rows)))
  counts = [math.prod(c.shape[:-1]) for c in padded]
  segments = sum(counts)
  per_sort16 = 2 ** max(16 - code_bits, 0)
  if code_bits <= 16 and _cdiv(segments, per_sort16) <= _MAX_SORTS:
    perms = _radix_perms(padded, counts, code_bits, jnp.uint16, per_sort16)
  elif (segments - 1).bit_length() + code_bits <= 32:
    perms = _radix_perms(padded, counts, code_bits, jnp.uint32, segments)
  else:
    perms = [jnp.argsort(c, axis=-1, stable=True).astype(jnp.int32) for c in padded]
  return tuple(jnp.where(p < c.shape[-1], p, -1) for p, c in zip(perms, codes))


def _radix_perms(padded, counts, code_bits: int, key_type, per_sort: int):
  """The (segment, code) radix sorts of :func:`_perms`: segments numbered across the arrays,
  ``per_sort`` consecutive ones per sort (keys relative to the group); the sorted row indices
  of each array ``[..., rows]`` int32."""
  keys, index = [], []
  # The row index rides along in 16 bits where every array's rows fit (cub's sorts measured
  # faster with 16-bit values than with 32-bit ones: see HISTORY), else 32.
  value_type = jnp.uint16 if max(c.shape[-1] for c in padded) <= 2 ** 16 else jnp.uint32
  for c, first, count in zip(padded, itertools.accumulate([0] + counts), counts):
    segment = (first + jnp.arange(count, dtype=jnp.uint32)) % per_sort
    keys.append(((segment.reshape(c.shape[:-1] + (1,)) << code_bits)
                 | c.astype(jnp.uint32)).astype(key_type).reshape(-1))
    index.append(jax.lax.broadcasted_iota(value_type, c.shape, c.ndim - 1).reshape(-1))
  keys, index = jnp.concatenate(keys), jnp.concatenate(index)

  def flat_start(segment):  # first flat row of a segment
    start = 0
    for c, first, count in zip(padded, itertools.accumulate([0] + counts), counts):
      if segment < first + count:
        return start + (segment - first) * c.shape[-1]
      start += c.size
    return start
  bounds = [flat_start(g) for g in range(0, sum(counts), per_sort)] + [keys.size]
  index = jnp.concatenate([jax.lax.sort((keys[a:b], index[a:b]), num_keys=1, is_stable=True)[1]
                           for a, b in zip(bounds[:-1], bounds[1:])])
  ends = list(itertools.accumulate(c.size for c in padded))
  return [part.reshape(c.shape).astype(jnp.int32)
          for part, c in zip(jnp.split(index, ends[:-1]), padded)]


def _rng_streams(rng):
  """The keys of one approximation: (LSH hyperplanes, samples, ApproxD rows)."""
  return jax.random.split(rng, 3)


def _plan(q, k, v, key_mask, rng, config: HyperAttentionConfig, window: RowWindow,
          implementation: backends.Backend, codes=None):
  """Stages 0+1 of the window's problem: the draws from ``rng`` and the sortLSH orders.

  q ``[P, Rq, Nq, H]``, k/v ``[P, Rk, Nkv, H]``, key_mask ``[P, k_len]`` bool or None;
  ``codes``: the window's sort keys (q ``[P, Nkv, G, q_len]``, k ``[P, Nkv, k_len]``) when the
  caller hashed already (the causal levels share one hashing per call); else they are hashed
  here with hyperplanes drawn from ``rng``. ``implementation``: the backend of the
  selection's run scores (``select_blocks``).
  """
  b, kh = q.shape[0], k.shape[2]
  tq, tk = window.q_len, window.k_len
  nb = _cdiv(tk, config.block_size)
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
  q_perm, k_perm = _perms(codes, (nb * qb, nb * config.block_size), config.lsh_num_projs,
                          masked=key_mask is not None)

  # Samples are sorted positions in [0, n_valid): drawn over the valid keys.
  vs = (grouped_rows(v, k_perm[:, :, None], window.k_offset)[:, :, 0]
        if config.sampler == "value_norm"
        else jnp.zeros(k_perm.shape + (1,), v.dtype))  # the uniform draw needs only the shape
  samp_pos, log_weight = lsh.draw_samples(sample_rng, config.sampler, vs, n_valid,
                                          config.sample_size)
  tau_rows = (lsh.draw_rows(rows_rng, b, kh, tq, config.approx_d_rows)
              if config.normalizer == "approx_d" else None)
  samp_rows = jnp.take_along_axis(k_perm, samp_pos, axis=-1)
  selection = None
  if config.select_blocks:
    keys = jax.lax.slice_in_dim(k, window.k_offset, window.k_offset + tk, axis=1)
    selection = selection_lib.build_selection(
        q, q_perm, keys.transpose(0, 2, 1, 3),
        jnp.ones((b, tk), jnp.bool_) if key_mask is None else key_mask, k_perm, samp_rows,
        q_offset=window.q_offset, block_size=config.block_size, count=config.select_blocks,
        run=config.select_block_size, implementation=implementation)
  return _Plan(q_perm, k_perm, samp_rows, samp_pos, n_valid, log_weight, tau_rows, selection)


def _stage_arrays(q, k, v, plan: _Plan, window: RowWindow):
  """The blocked stage's array arguments (``blocked.blocked_attention``) for the plan's problems:
  q/k/v ``[P, R, ., H]``, the permutations, the samples' rows of k and v gathered ``[P, Nkv, m,
  H]``, their positions, the valid key counts, the log-weights and the selection (last)."""
  samples = lambda x: grouped_rows(x, plan.samp_rows[:, :, None], window.k_offset)[:, :, 0]
  return (q, k, v, plan.q_perm, plan.k_perm, samples(k), samples(v), plan.samp_pos, plan.n_valid,
          plan.log_weight, plan.selection)


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


def _attend_blocks(q, k, v, plan: _Plan, config: HyperAttentionConfig, scale, implementation,
                   window: RowWindow):
  """Stages 2+3+4: the blocked stage with the sampled residual, normalised as configured, the
  outputs written back to the unsorted rows: out ``[P, q_len, Nq, H]``, lse ``[P, Nq, q_len]``.

  ``"approx_d"``: ``log d = max(lse, logaddexp(lse_heavy, log tau - log kappa))``, i.e. the
  residual row sum ``exp(lse) - exp(lse_heavy)`` clamped from below by ``tau / kappa``; the
  output is rescaled to that normaliser (the clamp adds mass with value 0).
  """
  bs = config.block_size
  arrays = _stage_arrays(q, k, v, plan, window)[:-2]  # all but the log-weights and selection
  stage = lambda w: blocked_attention(*arrays, w, plan.selection, scale, bs, window,
                                      implementation)
  out, lse = stage(plan.log_weight)
  if config.normalizer == "merged":
    return out, lse
  _, lse_heavy = stage(jnp.full_like(plan.log_weight, _NEG_INF))
  b, kh, g, rows_p = plan.q_perm.shape
  qs = grouped_rows(q, plan.q_perm, window.q_offset)
  ks = grouped_rows(k, plan.k_perm[:, :, None], window.k_offset)[:, :, 0]
  q_block = rows_p // (plan.k_perm.shape[-1] // bs)
  log_tau = _residual_lse_max(qs, ks, plan.n_valid, plan.tau_rows, scale, q_block, bs,
                              config.exact_chunk_size)
  floor = jnp.logaddexp(lse_heavy, (log_tau - jnp.log(config.approx_d_kappa)).reshape(b, -1, 1))
  lse_d = jnp.maximum(lse, floor)
  rescale = jnp.where(lse == _NEG_INF, 0.0, jnp.exp(lse - lse_d))
  out = out.astype(rescale.dtype) * jnp.swapaxes(rescale, 1, 2)[..., None]
  return out.astype(q.dtype), lse_d


def _hyper_noncausal(q, k, v, key_mask, rng, config: HyperAttentionConfig, scale,
                     implementation):
  """Approximate attention of every query over every key: q ``[B, Tq, Nq, H]``, k/v ``[B, Tk,
  Nkv, H]``, key_mask ``[B, Tk]`` or None -> out ``[B, Tq, Nq, H]``, lse ``[B, Nq, Tq]``.

  With sinks, the first ``sink_size`` keys are taken out of the approximation and attended
  exactly, merged in by log-sum-exp."""
  sinks = config.sink_size
  approx_mask = key_mask
  if sinks:
    rest = jnp.broadcast_to(jnp.arange(k.shape[1]) >= sinks, k.shape[:2])
    approx_mask = rest if key_mask is None else key_mask & rest
  window = RowWindow(0, q.shape[1], 0, k.shape[1], all_keys_valid=approx_mask is None)
  plan = _plan(q, k, v, approx_mask, rng, config, window, implementation)
  out, lse = _attend_blocks(q, k, v, plan, config, scale, implementation, window)
  if not sinks:
    return out, lse
  head = lambda x: x[:, :sinks]
  return merge_attention(out, lse, *_exact(q, head(k), head(v), None if key_mask is None
                                           else head(key_mask), False, scale, config,
                                           implementation))


# ----------------------------------------------------------------------------------------------
# Causal HyperAttention: batched recursion levels, one VJP from the final (out, lse)


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


def _level_window(t: int, d: int, all_keys_valid: bool) -> tuple[int, RowWindow]:
  """Level ``d`` of a padded length ``t``: ``2**d`` pairs of halves; each quadrant's queries
  are rows ``[half, 2 half)`` of its pair, its keys rows ``[0, half)``."""
  parts = 2 ** d
  half = t // (2 * parts)
  return parts, RowWindow(half, half, 0, half, all_keys_valid)


class _Recursion(NamedTuple):
  """The static part of a causal recursion call."""
  config: HyperAttentionConfig
  scale: float
  implementation: backends.Backend
  levels: tuple  # (parts, RowWindow) of each level d (``_level_window``)
  exact_parts: tuple  # (parts, RowWindow) of the exactly attended keys (``_exact_windows``)


def _exact_windows(t: int, levels, config: HyperAttentionConfig) -> tuple:
  """The key ranges the options attend exactly, as ``(parts, RowWindow)`` of folded views of
  the padded length ``t``: the sinks (keys ``[0, sink_size)`` for every query after the first
  base block) and, per level, the band (the last ``local_window`` keys of each quadrant's left
  half for every query of its right half). The levels take these keys out of their
  approximation (:func:`_level_key_mask`)."""
  base = t >> len(levels)
  parts = []
  if config.sink_size:
    parts.append((1, RowWindow(base, t - base, 0, config.sink_size)))
  if config.local_window:
    w = config.local_window
    parts += [(p, RowWindow(win.q_offset, win.q_len, win.k_len - w, w)) for p, win in levels]
  return tuple(parts)


def _level_key_mask(mask, batch: int, parts: int, half: int, config: HyperAttentionConfig):
  """A level's key mask ``[batch * parts, half]`` (``mask``: the padded sequence's ``[batch,
  T]`` or None) less the keys the options attend exactly: the band's last ``local_window`` keys
  of every left half, the sinks in the first problem of every batch row. None: all valid."""
  if not (config.sink_size or config.local_window):
    return None if mask is None else fold_rows(mask, parts)[:, :half]
  pos = jnp.arange(half)
  first = jnp.arange(batch * parts) % parts == 0
  keep = ((pos < half - config.local_window)[None, :] &
          ~((pos < config.sink_size)[None, :] & first[:, None]))
  return keep if mask is None else fold_rows(mask, parts)[:, :half] & keep


def _window_views(x, parts: int, window: RowWindow):
  """The query rows and key rows of ``window`` in the folded view ``[B * parts, T / parts,
  ...]`` of ``x``."""
  x = fold_rows(x, parts)
  rows = lambda start, n: jax.lax.slice_in_dim(x, start, start + n, axis=1)
  return rows(window.q_offset, window.q_len), rows(window.k_offset, window.k_len)


def _exact_part_args(q, k, v, row_mask, parts: int, window: RowWindow):
  """q rows ``[P, q_len, N, H]``, k/v rows ``[P, k_len, Nkv, H]`` and their key mask (or None)
  of an exact part."""
  keys = lambda x: None if x is None else _window_views(x, parts, window)[1]
  return _window_views(q, parts, window)[0], keys(k), keys(v), keys(row_mask)


def _recursion_forward(q, k, v, plans, base_mask, rec: _Recursion):
  """(out ``[B, T, N, H]``, lse ``[B, N, T]``) of the recursion on padded q/k/v ``[B, T, ., H]``.

  First exact causal attention on the diagonal base blocks (one batched call: cuDNN on GPU where
  it can run it, else the Pallas/XLA flash loops) and the options' exactly attended keys (sinks,
  band: ``rec.exact_parts``); then level ``d``: the ``2**d`` lower-left quadrants at once,
  batched (row windows of the folded views of the same arrays), through the non-causal
  algorithm, merged into the running (out, lse) of their query rows (in place in the Pallas
  kernel).
  """
  parts = 2 ** len(plans)
  fold = lambda x: fold_rows(x, parts)
  out, lse = kernel_forward(fold(q), fold(k), fold(v), base_mask, True, rec.scale,
                            rec.config.exact_chunk_size,
                            backends.exact_backend(rec.implementation, q, base_mask))
  running = (out.reshape(q.shape), unfold_stats(lse, parts))
  row_mask = None if base_mask is None else base_mask.reshape(q.shape[:2])
  for parts, window in rec.exact_parts:
    q_rows, k_rows, v_rows, mask = _exact_part_args(q, k, v, row_mask, parts, window)
    running = merge_rows(running, *kernel_forward(q_rows, k_rows, v_rows, mask, False, rec.scale,
                                                  rec.config.exact_chunk_size,
                                                  rec.implementation), window.q_offset)
  for plan, (parts, window) in zip(plans, rec.levels):
    fold = lambda x: fold_rows(x, parts)  # pylint: disable=cell-var-from-loop
    if rec.config.normalizer == "merged":  # the blocked kernel merges into the running result
      running = blocked_attention_fwd(*_stage_arrays(fold(q), fold(k), fold(v), plan, window),
                                      rec.scale, rec.config.block_size, window,
                                      rec.implementation, into=running)
    else:
      running = merge_rows(running, *_attend_blocks(fold(q), fold(k), fold(v), plan, rec.config,
                                                     rec.scale, rec.implementation, window),
                           window.q_offset)
  return running


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _causal_recursion(q, k, v, plans, base_mask, rec: _Recursion):
  """Causal HyperAttention of padded q ``[B, T, N, H]``, k/v ``[B, T, Nkv, H]`` (``T = base *
  2**len(plans)``), one :class:`_Plan` per level, base_mask ``[B * 2**L, base]`` or None.

  The VJP runs every part's backward from the statistics of the *final* merged (out, lse)
  (``merge.py``): no part's own (out, lse) is kept, no merge is differentiated, and the parts'
  gradients are added into one dq/dk/dv (in q's dtype, as autodiff would sum them).
  """
  return _recursion_forward(q, k, v, plans, base_mask, rec)


def _recursion_fwd(q, k, v, plans, base_mask, rec):
  (q, k, v, plans, base_mask), perturbed = primal_values((q, k, v, plans, base_mask))
  out, lse = _recursion_forward(q, k, v, plans, base_mask, rec)
  weight_grads = tuple(flag(p.log_weight) for p in perturbed[3])  # per level
  return (out, lse), (q, k, v, plans, base_mask, out, lse, weight_grads)


def _level_grads(q, k, v, plan, d_out, lse, delta, rec: _Recursion, window: RowWindow, into,
                 weight_grad: bool):
  """One level's share of the gradient, from the merged statistics (lse, delta ``[P, N, 2
  half]``) of the folded views ``[P, 2 half, ., H]``, added into the running ``into = (dq, dk,
  dv)`` ``[B, T, ., H]`` (dq at the window's query rows, dk/dv at its key rows): returns those,
  the samples' dk/dv ``[P, Nkv, m, H]`` (None where they are already inside dk/dv: the autodiff
  path) and the log-weights' gradient (None unless ``weight_grad``)."""
  config, q_len = rec.config, window.q_len
  if config.normalizer == "merged":  # the blocked kernels' backward from the merged statistics
    return blocked_attention_bwd(*_stage_arrays(q, k, v, plan, window), d_out, lse, delta,
                                 rec.scale, config.block_size, window, rec.implementation,
                                 into=into, weight_grad=weight_grad)
  # ApproxD's row normaliser is not a merge of parts: differentiate the level by autodiff, its
  # output's cotangents pulled back from the merged statistics.
  part = lambda q, k, v, w: _attend_blocks(q, k, v, plan._replace(log_weight=w), config,
                                           rec.scale, rec.implementation, window)
  (o_d, l_d), pull = jax.vjp(part, q, k, v, plan.log_weight)
  rows = lambda x: jax.lax.slice_in_dim(x, window.q_offset, window.q_offset + q_len, axis=1)
  stat_rows = lambda x: jnp.swapaxes(jax.lax.slice_in_dim(x, window.q_offset,
                                                          window.q_offset + q_len, axis=2), 1, 2)
  d_o, d_l = part_cotangents(o_d, jnp.swapaxes(l_d, 1, 2), stat_rows(lse), stat_rows(delta),
                             rows(d_out))
  dq, dk, dv, dw = pull((d_o, jnp.swapaxes(d_l, 1, 2)))
  keys = lambda x: jax.lax.slice_in_dim(x, window.k_offset, window.k_offset + window.k_len,
                                        axis=1)
  return (*add_grads(into, (rows(dq), keys(dk), keys(dv)), window.q_offset, window.k_offset),
          None, None, dw if weight_grad else None)


def _recursion_bwd(rec: _Recursion, res, cotangents):
  q, k, v, plans, base_mask, out, lse, weight_grads = res
  # No lse cotangent (a symbolic zero: the lse is dropped or unused): the base case may run
  # cuDNN's backward, and no level's delta has an lse term.
  d_out, d_lse = dense(cotangents[0]), nonzero(cotangents[1])

  # Base case first: its gradients start the accumulators (every row of q, k, v).
  parts = 2 ** len(plans)
  fold = lambda x: fold_rows(x, parts)
  grads = kernel_backward(fold(q), fold(k), fold(v), base_mask, fold(out), fold_stats(lse, parts),
                          fold(d_out), None if d_lse is None else fold_stats(d_lse, parts), True,
                          rec.scale, rec.config.exact_chunk_size,
                          backends.exact_backend(rec.implementation, q, base_mask))
  grads = tuple(g.reshape(x.shape).astype(x.dtype) for g, x in zip(grads, (q, k, v)))

  # The exactly attended keys of the options, from the final statistics too.
  row_mask = None if base_mask is None else base_mask.reshape(q.shape[:2])
  for parts, window in rec.exact_parts:
    q_rows, k_rows, v_rows, mask = _exact_part_args(q, k, v, row_mask, parts, window)
    stats = lambda x: jax.lax.slice_in_dim(  # pylint: disable=cell-var-from-loop
        fold_stats(x, parts), window.q_offset, window.q_offset + window.q_len, axis=2)
    part = kernel_backward(q_rows, k_rows, v_rows, mask,
                           _window_views(out, parts, window)[0], stats(lse),
                           _window_views(d_out, parts, window)[0],
                           None if d_lse is None else stats(d_lse), False, rec.scale,
                           rec.config.exact_chunk_size, rec.implementation)
    grads = add_grads(grads, part, window.q_offset, window.k_offset)

  # Each level's share, from the final statistics, added into its rows.
  delta = output_delta(out, d_out, d_lse)
  d_plans = []
  for plan, (parts, window), weight_grad in zip(plans, rec.levels, weight_grads):
    fold = lambda x: fold_rows(x, parts)  # pylint: disable=cell-var-from-loop
    dq, dk, dv, dks, dvs, dw = _level_grads(fold(q), fold(k), fold(v), plan, fold(d_out),
                                            fold_stats(lse, parts), fold_stats(delta, parts),
                                            rec, window, grads, is_set(weight_grad))
    if dks is not None:  # the samples' gradients, into their key rows
      dk, dv = add_key_rows(dk, plan.samp_rows, dks), add_key_rows(dv, plan.samp_rows, dvs)
    grads = (dq, dk, dv)
    d_plans.append(_Plan(None, None, None, None, None,
                         None if dw is None else dw.astype(plan.log_weight.dtype), None, None))
  return grads + (tuple(d_plans), None)


_causal_recursion.defvjp(_recursion_fwd, _recursion_bwd, symbolic_zeros=True)


def _hyper_causal(q, k, v, key_mask, rng, config, scale, implementation):
  b, t, _, h = q.shape
  levels, base = causal_levels(t, config.min_seq_len)
  tp = base * 2 ** levels
  pad = lambda x: jnp.pad(x, ((0, 0), (0, tp - t)) + ((0, 0),) * (x.ndim - 2))
  q, k, v = pad(q), pad(k), pad(v)
  # No mask where every key is valid: the sort codes then need no bit for masked keys.
  level_mask = (None if key_mask is None and tp == t
                else pad(jnp.ones((b, t), jnp.bool_) if key_mask is None else key_mask))
  options = bool(config.sink_size or config.local_window)

  # Every query and key is hashed once, with one set of hyperplanes for all levels.
  projections = lsh.draw_projections(_rng_streams(rng)[0], k.shape[2], h, config.lsh_num_projs)
  q_code, k_code = _sort_keys(q, k, level_mask, projections)
  # A window promises valid keys only without a key mask, padding and options (no per-key
  # bias then).
  windows = tuple(_level_window(tp, d, level_mask is None and not options)
                  for d in range(levels))
  plans = []
  for d, (parts, window) in enumerate(windows):
    fold = lambda x: fold_rows(x, parts)  # pylint: disable=cell-var-from-loop
    mask = _level_key_mask(level_mask, b, parts, window.k_len, config)
    q_codes, k_codes = level_codes(q_code, k_code, parts)
    if options:  # the exactly attended keys sort last, like masked ones
      k_codes = jnp.where(mask[:, None, :], k_codes, 2 ** config.lsh_num_projs)
    plans.append(_plan(fold(q), fold(k), fold(v), mask,
                       jax.random.fold_in(rng, d), config, window, implementation,
                       (q_codes, k_codes)))
  # Padding keys lie after every real query, so without a key mask the causal mask alone
  # excludes them from the base case (which lets cuDNN run it).
  base_mask = None if key_mask is None else fold_rows(level_mask, 2 ** levels)
  out, lse = _causal_recursion(q, k, v, tuple(plans), base_mask,
                               _Recursion(config, scale, implementation, windows,
                                          _exact_windows(tp, windows, config)))
  return out[:, :t], lse[..., :t]


# ----------------------------------------------------------------------------------------------
# Public API


def _zero_masked_keys(k, v, key_mask):
  """k, v ``[B, Tk, Nkv, H]`` with the masked keys' rows (key_mask ``[B, Tk]`` False) zeroed: a
  masked key's value is multiplied by its zero probability, and ``0 * NaN`` is NaN, so NaN
  padding would otherwise reach every output of its key block. Masked keys get no gradient
  either way."""
  if key_mask is None:
    return k, v
  keep = key_mask[:, :, None, None]
  return jnp.where(keep, k, jnp.zeros((), k.dtype)), jnp.where(keep, v, jnp.zeros((), v.dtype))


@functools.partial(jax.jit, static_argnames=("causal", "config", "scale", "implementation",
                                             "return_lse"))
def _hyper_jit(q, k, v, key_mask, rng, causal, config, scale, implementation, return_lse):
  """(out, lse), or out alone when not ``return_lse``. Where the lse is dropped or not
  differentiated, its cotangent is a symbolic zero and the backward has no lse term."""
  k, v = _zero_masked_keys(k, v, key_mask)
  if causal and q.shape[1] > config.min_seq_len:
    out, lse = _hyper_causal(q, k, v, key_mask, rng, config, scale, implementation)
  elif causal or k.shape[1] <= max(config.min_seq_len, config.block_size):
    out, lse = _exact(q, k, v, key_mask, causal, scale, config, implementation)
  else:
    out, lse = _hyper_noncausal(q, k, v, key_mask, rng, config, scale, implementation)
  return (out, lse) if return_lse else out


def hyper_attention(query, key, value, *, rng, causal: bool = False,
                    config: HyperAttentionConfig | None = None, scale: float | None = None,
                    key_mask=None, key_value_seq_lengths=None, return_lse: bool = False,
                    implementation: str | None = None, block_sizes=None):
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
    key_value_seq_lengths: optional ``[batch]`` int in ``[0, kv_seq]``, keys at and beyond the
      length get no weight (``jax.nn.dot_product_attention``'s convention); at most one of the
      two masks. Out-of-range lengths are refused where concrete; traced ones act as if clamped
      to ``[0, kv_seq]``.
    return_lse: also return the log-sum-exp of the (approximate) scores, ``[batch, heads,
      q_seq]`` float32.
    implementation: None (Pallas on GPU when available, else XLA), ``"xla"`` or ``"pallas"``
      (``backends.py``).
    block_sizes: the Pallas kernels' tiles, a ``pallas_kernels.triton.BlockSizes`` (None: the
      tuned defaults; ``experiments/benchmarks/tune_kernels.py`` prints one); the XLA path has
      no tiles and ignores it.

  Returns:
    ``[batch, q_seq, q_heads, head_dim]`` in the dtype of the inputs (and the lse). Query rows
    whose keys are all masked give zeros (lse ``-inf``). A NaN or Inf in the inputs reaches the
    outputs (and gradients) that attend to it, as in exact attention, so that a diverging model
    is visible; keys masked by key_mask / key_value_seq_lengths reach no output whatever they
    hold.
  """
  config = HyperAttentionConfig() if config is None else config
  if not isinstance(config, HyperAttentionConfig):
    raise TypeError(f"config must be a HyperAttentionConfig, got {type(config).__name__}")
  dims = checks.check_qkv(query, key, value, causal)
  key_mask = checks.check_key_mask(key_mask, key_value_seq_lengths, dims)
  scale = checks.check_scale(scale, dims.head_dim)
  checks.check_rng(rng)
  if config.local_window and not causal:
    raise ValueError(f"HyperAttentionConfig.local_window={config.local_window} is an exact band "
                     "of the causal recursion: use causal=True or local_window=0")
  implementation = backends.resolve(implementation, block_sizes)
  return _hyper_jit(query, key, value, key_mask, rng, bool(causal), config, scale,
                    implementation, bool(return_lse))


@functools.partial(jax.jit, static_argnames=("causal", "scale", "chunk_size", "implementation",
                                             "return_lse"))
def _exact_jit(q, k, v, key_mask, causal, scale, chunk_size, implementation, return_lse):
  k, v = _zero_masked_keys(k, v, key_mask)
  out, lse = flash_attention(q, k, v, key_mask, causal, scale, chunk_size, implementation)
  return (out, lse) if return_lse else out


def exact_attention(query, key, value, *, causal: bool = False, scale: float | None = None,
                    key_mask=None, key_value_seq_lengths=None, return_lse: bool = False,
                    chunk_size: int = 512, implementation: str | None = None,
                    block_sizes=None):
  """Exact softmax attention, memory-safe at long sequences (chunked online softmax).

  Same layouts, masks, GQA rules and ``implementation`` / ``block_sizes`` choices as
  :func:`hyper_attention` (``"pallas"``: the flash kernels of ``pallas_kernels``, tiles
  ``block_sizes.flash_fwd`` / ``flash_bwd``); no ``n x n`` matrix is
  materialised (peak extra memory ``O(chunk_size**2)`` per head in XLA), and the gradient is the
  flash-attention recomputation from the saved log-sum-exp.
  """
  dims = checks.check_qkv(query, key, value, causal)
  key_mask = checks.check_key_mask(key_mask, key_value_seq_lengths, dims)
  scale = checks.check_scale(scale, dims.head_dim)
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  implementation = backends.resolve(implementation, block_sizes)
  return _exact_jit(query, key, value, key_mask, bool(causal), scale, chunk_size,
                    implementation, bool(return_lse))
