"""Folded row views: ``parts`` consecutive row groups of ``[B, T, ...]`` as ``B * parts`` problems.

A causal recursion level runs its ``2**d`` quadrants as one batched problem: rows ``[B, T, ...]``
seen as ``[B * parts, T / parts, ...]`` (a free view), per-row statistics ``[B, N, T]`` as ``[B *
parts, N, T / parts]`` (a transpose). The level's results land in a window of each problem's
rows and go back into the running accumulators of the whole sequence, which keep their own
(unfolded) shape: XLA on GPU copies a whole accumulator when it is updated through a view of a
different shape, so the updates here are scatters on the accumulator's own shape.

These are the XLA forms; the Pallas kernels merge and add into the accumulators in place
(``pallas_kernels/triton/block_attention.py``, ``into=``).
"""

from __future__ import annotations

import jax.numpy as jnp

from hyperattn_jax.merge import merge_attention

__all__ = ["fold_rows", "fold_stats", "unfold_stats", "embed_rows", "merge_rows", "add_rows",
           "add_grads", "add_key_rows"]


def fold_rows(x, parts: int):
  """Rows ``[B, T, ...]`` -> ``[B * parts, T / parts, ...]`` (a view: consecutive rows)."""
  return x.reshape((x.shape[0] * parts, x.shape[1] // parts) + x.shape[2:])


def fold_stats(x, parts: int):
  """Statistics ``[B, N, T]`` -> ``[B * parts, N, T / parts]``."""
  b, n, t = x.shape
  return x.reshape(b, n, parts, t // parts).transpose(0, 2, 1, 3).reshape(b * parts, n, -1)


def unfold_stats(x, parts: int):
  """Inverse of :func:`fold_stats`."""
  bp, n, s = x.shape
  return x.reshape(bp // parts, parts, n, s).transpose(0, 2, 1, 3).reshape(bp // parts, n, -1)


def _unfolded_rows(acc, parts: int, local_rows):
  """(batch, row) indices into ``acc`` ``[B, T, ...]`` of rows ``local_rows`` ``[B * parts,
  ...]`` of the folded view (row -1 -> ``T``: out of range, dropped)."""
  p = local_rows.shape[0]
  group = jnp.arange(p).reshape((p,) + (1,) * (local_rows.ndim - 1))
  rows = (group % parts) * (acc.shape[1] // parts) + local_rows
  return group // parts, jnp.where(local_rows >= 0, rows, acc.shape[1])


def _window_rows(acc, g, start: int):
  """(batch, row) indices of rows ``[start, start + len)`` of every problem of ``g`` ``[B *
  parts, len, ...]`` in ``acc`` ``[B, T, ...]``."""
  local = jnp.broadcast_to(start + jnp.arange(g.shape[1]), g.shape[:2])
  return _unfolded_rows(acc, g.shape[0] // acc.shape[0], local)


def add_rows(acc, g, start: int):
  """``acc`` ``[B, T, ...]`` with ``g`` ``[B * parts, len, ...]`` added to rows ``[start, start +
  len)`` of each of its ``parts`` row groups, in place (sorted, unique indices)."""
  b, rows = _window_rows(acc, g, start)
  return acc.at[b, rows].add(g.astype(acc.dtype), indices_are_sorted=True, unique_indices=True)


def add_grads(running, grads, q_start: int, k_start: int):
  """Running ``(dq [B, T, N, H], dk, dv [B, T, Nkv, H])`` with a level's window gradients
  ``(dq [B * parts, q_len, N, H], dk, dv [B * parts, k_len, Nkv, H])`` added at query rows
  ``[q_start, q_start + q_len)`` and key rows ``[k_start, k_start + k_len)`` of each problem."""
  return tuple(add_rows(acc, g, start)
               for acc, g, start in zip(running, grads, (q_start, k_start, k_start)))


def embed_rows(x, offset: int, rows: int, axis: int = 1, fill=0):
  """A window's values ``x`` placed at ``offset`` of ``rows`` rows along ``axis`` (e.g. a level's
  query rows ``[P, len, ...]`` in q's rows ``[P, rows, ...]``), ``fill`` elsewhere; no copy when
  the window is every row."""
  widths = [(0, 0)] * x.ndim
  widths[axis] = (offset, rows - offset - x.shape[axis])
  return jnp.pad(x, widths, constant_values=fill)


def merge_rows(running, out, lse, start: int):
  """The running result ``(out [B, T, N, H], lse [B, N, T])`` with a part over other keys of
  rows ``[start, start + len)`` of each problem, ``out [B * parts, len, N, H]``, ``lse [B *
  parts, N, len]``, merged in by log-sum-exp (``merge.merge_attention``)."""
  acc_out, acc_lse = running
  b, rows = _window_rows(acc_out, out, start)
  stat = lambda x: jnp.swapaxes(x, 1, 2)                          # [., N, len] <-> [., len, N]
  merged_out, merged_lse = merge_attention(acc_out[b, rows], stat(stat(acc_lse)[b, rows]), out,
                                           lse)
  set_rows = lambda acc, x: acc.at[b, rows].set(x.astype(acc.dtype), indices_are_sorted=True,
                                                unique_indices=True)
  return set_rows(acc_out, merged_out), stat(set_rows(stat(acc_lse), stat(merged_lse)))


def add_key_rows(acc, rows, vals):
  """``acc`` ``[B, T, Nkv, H]`` with ``vals`` ``[B * parts, Nkv, m, H]`` added at the folded
  view's rows ``rows`` ``[B * parts, Nkv, m]`` (per kv head; -1: dropped), in place."""
  b, rows = _unfolded_rows(acc, rows.shape[0] // acc.shape[0], rows)
  heads = jnp.arange(rows.shape[1])[None, :, None]
  return acc.at[b, rows, heads].add(vals.astype(acc.dtype), mode="drop")
