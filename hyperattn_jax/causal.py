"""Causal HyperAttention: the recursion over batched levels, one VJP from the final (out, lse).

Every query and key is hashed once (one set of hyperplanes, ``level_codes`` slices each level's
sort keys); first, exact causal attention on the ``2**L`` diagonal base blocks (one batched
call: cuDNN on GPU where it can run it, else the Pallas/XLA flash loops) starts the running
(out, lse); then for each recursion level ``d`` the ``2**d`` lower-left quadrants at once,
batched (row windows of the folded views of the same arrays, ``folding.py``), through the
non-causal stages (``plan.py``, ``blocked.py``), merged into the running (out, lse) by
log-sum-exp (in place, inside the Pallas kernel).

One custom VJP (:func:`_causal_recursion`) covers the whole recursion: every part's backward
starts from the final (out, lse) (``merge.py``) and adds into one dq/dk/dv, so neither the
parts' own results nor the merges are kept for it.

The options' exact keys: :func:`_exact_windows` (sinks: queries after the first base block x
the first ``sink_size`` keys; band: per level, each quadrant's right half x the last
``local_window`` keys of its left half), taken out of the levels by :func:`_level_key_mask`
(and out of the codes: they sort last), merged and differentiated like the base case (the exact
kernels + key masks).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from hyperattn_jax import backends
from hyperattn_jax import lsh
from hyperattn_jax import sorting
from hyperattn_jax.blocked import RowWindow, blocked_attention_bwd, blocked_attention_fwd
from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.exact import kernel_backward, kernel_forward
from hyperattn_jax.folding import (add_grads, add_key_rows, fold_rows, fold_stats, merge_rows,
                                   unfold_stats)
from hyperattn_jax.merge import output_delta, part_cotangents
from hyperattn_jax.noncausal import attend_blocks
from hyperattn_jax.perturbation import dense, flag, is_set, nonzero, primal_values
from hyperattn_jax.plan import Plan, SampleDraw, build_plan, rng_streams

__all__ = ["hyper_causal", "causal_levels", "level_codes"]


def causal_levels(seq_len: int, min_seq_len: int) -> tuple[int, int]:
  """Recursion depth ``L`` and base block size ``s`` with ``s * 2**L >= seq_len``, ``s <= min``.

  Padding is at most ``2**L - 1`` positions (not to the next power of two).
  """
  levels = max(0, math.ceil(math.log2(seq_len / min_seq_len))) if seq_len > min_seq_len else 0
  return levels, -(-seq_len // 2 ** levels)


def hyper_causal(q, k, v, key_mask, rng, config: HyperAttentionConfig, scale, implementation):
  """Causal approximate attention: q ``[B, T, Nq, H]``, k/v ``[B, T, Nkv, H]``, key_mask ``[B,
  T]`` or None -> out ``[B, T, Nq, H]``, lse ``[B, Nq, T]`` (``T > config.min_seq_len``).

  T is padded to ``base * 2**L`` (:func:`causal_levels`); every query and key is hashed once
  and each level's plan built from its slice of the codes (samples from ``fold_in(rng, d)``);
  then the recursion (:func:`_causal_recursion`) on the padded arrays.
  """
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
  projections = lsh.draw_projections(rng_streams(rng)[0], k.shape[2], h, config.lsh_num_projs)
  q_code, k_code = sorting.sort_keys(q, k, level_mask, projections)
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
    plans.append(build_plan(fold(q), fold(k), fold(v), mask, jax.random.fold_in(rng, d), config,
                            window, implementation, (q_codes, k_codes)))
  # Padding keys lie after every real query, so without a key mask the causal mask alone
  # excludes them from the base case (which lets cuDNN run it).
  base_mask = None if key_mask is None else fold_rows(level_mask, 2 ** levels)
  out, lse = _causal_recursion(q, k, v, tuple(plans), base_mask,
                               _Recursion(config, scale, implementation, windows,
                                          _exact_windows(tp, windows, config)))
  return out[:, :t], lse[..., :t]


# ----------------------------------------------------------------------------------------------
# The levels (row windows of folded views, their codes and key masks) and the options' exact parts


def _level_window(t: int, d: int, all_keys_valid: bool) -> tuple[int, RowWindow]:
  """Level ``d`` of a padded length ``t``: ``2**d`` pairs of halves; each quadrant's queries
  are rows ``[half, 2 half)`` of its pair, its keys rows ``[0, half)``."""
  parts = 2 ** d
  half = t // (2 * parts)
  return parts, RowWindow(half, half, 0, half, all_keys_valid)


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


class _Recursion(NamedTuple):
  """The static part of a causal recursion call."""
  config: HyperAttentionConfig
  scale: float
  implementation: backends.Backend
  levels: tuple  # (parts, RowWindow) of each level d (``_level_window``)
  exact_parts: tuple  # (parts, RowWindow) of the exactly attended keys (``_exact_windows``)


# ----------------------------------------------------------------------------------------------
# The forward: base case, exact parts, then the levels merged into the running result


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
    fq, fk, fv = (fold_rows(x, parts) for x in (q, k, v))
    if rec.config.normalizer == "merged":  # the blocked kernel merges into the running result
      running = blocked_attention_fwd(fq, fk, fv, plan.sort, plan.samples.gather(fk, fv, window),
                                      plan.selection, rec.scale, rec.config.block_size, window,
                                      rec.implementation, into=running)
    else:
      running = merge_rows(running, *attend_blocks(fq, fk, fv, plan, rec.config, rec.scale,
                                                   rec.implementation, window), window.q_offset)
  return running


# ----------------------------------------------------------------------------------------------
# One VJP for the whole recursion, from the final (out, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _causal_recursion(q, k, v, plans, base_mask, rec: _Recursion):
  """Causal HyperAttention of padded q ``[B, T, N, H]``, k/v ``[B, T, Nkv, H]`` (``T = base *
  2**len(plans)``), one :class:`plan.Plan` per level, base_mask ``[B * 2**L, base]`` or None.

  The VJP runs every part's backward from the statistics of the *final* merged (out, lse)
  (``merge.py``): no part's own (out, lse) is kept, no merge is differentiated, and the parts'
  gradients are added into one dq/dk/dv (in q's dtype, as autodiff would sum them).
  """
  return _recursion_forward(q, k, v, plans, base_mask, rec)


def _recursion_fwd(q, k, v, plans, base_mask, rec):
  (q, k, v, plans, base_mask), perturbed = primal_values((q, k, v, plans, base_mask))
  out, lse = _recursion_forward(q, k, v, plans, base_mask, rec)
  weight_grads = tuple(flag(p.samples.log_weight) for p in perturbed[3])  # per level
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
    return blocked_attention_bwd(q, k, v, plan.sort, plan.samples.gather(k, v, window),
                                 plan.selection, d_out, lse, delta, rec.scale, config.block_size,
                                 window, rec.implementation, into=into, weight_grad=weight_grad)
  # ApproxD's row normaliser is not a merge of parts: differentiate the level by autodiff, its
  # output's cotangents pulled back from the merged statistics.
  part = lambda q, k, v, w: attend_blocks(q, k, v, plan.with_log_weight(w), config, rec.scale,
                                          rec.implementation, window)
  (o_d, l_d), pull = jax.vjp(part, q, k, v, plan.samples.log_weight)
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
      dk, dv = add_key_rows(dk, plan.samples.rows, dks), add_key_rows(dv, plan.samples.rows, dvs)
    grads = (dq, dk, dv)
    dw = None if dw is None else dw.astype(plan.samples.log_weight.dtype)
    d_plans.append(Plan(None, SampleDraw(None, None, None, dw), None, None))
  return grads + (tuple(d_plans), None)


_causal_recursion.defvjp(_recursion_fwd, _recursion_bwd, symbolic_zeros=True)
