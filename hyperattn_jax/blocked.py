"""The blocked stage of HyperAttention in plain JAX (XLA): block-diagonal + sampled residual.

This is the computation the Pallas kernels in ``pallas_kernels/`` replace, and the reference
they are tested against. One softmax over the concatenation of

  * the query's own sorted key block (``block_size`` keys), and
  * the shared sampled keys (``sample_size`` keys), each carrying the log-weight
    ``log(n_valid / sample_size)`` and masked when it lies in the query's own block,

is exactly the log-sum-exp merge of the two parts. Each sample ``j`` carries its own log-weight
(``log(n_valid / sample_size)`` for the uniform sampler; ``-log(sample_size * p_j)`` for a
sampler with probabilities ``p_j``), so the sampled sums are unbiased estimates of the residual.

Shapes (heads-major, grouped for GQA; ``nb`` key blocks, ``qb = q_len // nb`` query rows each):
  qs       ``[batch, kv_heads, group, nb * qb, head_dim]``  sorted queries
  ks, vs   ``[batch, kv_heads, nb * block_size, head_dim]``  sorted keys; position >= n_valid
           is invalid (invalid keys are sorted last)
  samples  a ``plan.SampleSet``: k, v ``[batch, kv_heads, sample_size, head_dim]`` sampled keys,
           pos ``[batch, kv_heads, sample_size]`` int32 their sorted positions, n_valid
           ``[batch]`` int32 valid keys, log_weight ``[batch, kv_heads, sample_size]`` float32
  returns out like qs (qs.dtype) and lse ``[batch, kv_heads, group, nb * qb]`` float32.

On rows by index (the public layout, the sort order given by a ``plan.SortPlan`` of
permutations) the stage is :func:`blocked_attention` (custom VJP) over
:func:`blocked_attention_fwd` / :func:`blocked_attention_bwd`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from hyperattn_jax import backends
from hyperattn_jax.folding import add_grads, embed_rows, merge_rows
from hyperattn_jax.merge import output_delta, part_cotangents
from hyperattn_jax.perturbation import dense, flag, is_set, nonzero, primal_values

__all__ = ["RowWindow", "blocked_attention", "blocked_attention_bwd", "blocked_attention_fwd",
           "blocked_attention_xla", "softmax_out_lse", "grouped_rows", "unsort_rows"]

_NEG_INF = float("-inf")


def softmax_out_lse(logits: jax.Array, values_fn) -> tuple[jax.Array, jax.Array]:
  """Normalised output and LSE of masked (``-inf``) fp32 logits; empty rows give 0 and -inf.

  ``values_fn(p)`` contracts the unnormalised probabilities with the values.
  """
  m = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
  m = jnp.where(m == _NEG_INF, 0.0, m)
  p = jnp.exp(logits - m[..., None])
  l = jnp.sum(p, axis=-1)
  has = l != 0  # 0 on rows without a valid key; NaN (a NaN input) propagates
  l_safe = jnp.where(has, l, 1.0)
  out = jnp.where(has[..., None], values_fn(p) / l_safe[..., None], 0.0)
  lse = jnp.where(has, m + jnp.log(l_safe), _NEG_INF)
  return out, lse


class SelectedKeys(NamedTuple):
  """The keys each sorted query block attends to beyond its own block (``selection.py``), for
  ``blocked_attention_xla``: k, v ``[batch, kv_heads, nb, S, head_dim]``, keep ``[batch,
  kv_heads, nb, S]`` bool (False: not attended), drop_samples ``[batch, kv_heads, nb,
  sample_size]`` bool (True: the sample is left out of the block's residual)."""
  k: jax.Array
  v: jax.Array
  keep: jax.Array
  drop_samples: jax.Array


def blocked_attention_xla(qs, ks, vs, samples, selected: SelectedKeys | None = None, *,
                          scale: float, block_size: int):
  """See the module docstring for shapes; ``selected``: the chosen keys of the
  ``select_blocks`` option, a third part of each block's softmax (or None)."""
  k_samp, v_samp, samp_pos, n_valid = samples.k, samples.v, samples.pos, samples.n_valid
  b, kh, g, tq, h = qs.shape
  acc = jnp.promote_types(qs.dtype, jnp.float32)  # float32, or float64 for float64 inputs
  nb = ks.shape[2] // block_size
  qb = tq // nb
  # [b, k, nb, g * qb, h]: the g query heads of a kv head share its key block (one matmul).
  q5 = qs.reshape(b, kh, g, nb, qb, h).transpose(0, 1, 3, 2, 4, 5).reshape(b, kh, nb, g * qb, h)
  kb = ks.reshape(b, kh, nb, block_size, h)
  vb = vs.reshape(b, kh, nb, block_size, h)

  s_blk = jnp.einsum("bknqh,bknsh->bknqs", q5, kb, preferred_element_type=acc) * scale
  key_pos = jnp.arange(nb * block_size, dtype=jnp.int32).reshape(nb, block_size)
  blk_valid = key_pos[None] < n_valid[:, None, None]                      # [b, nb, bs]
  s_blk = jnp.where(blk_valid[:, None, :, None, :], s_blk, _NEG_INF)

  s_smp = jnp.einsum("bknqh,bkmh->bknqm", q5, k_samp, preferred_element_type=acc)
  s_smp = s_smp * scale + samples.log_weight[:, :, None, None, :]
  own_block = (samp_pos // block_size)[:, :, None, :] == jnp.arange(nb)[None, None, :, None]
  if selected is not None:
    own_block = own_block | selected.drop_samples
  s_smp = jnp.where(own_block[:, :, :, None, :], _NEG_INF, s_smp)         # [b, k, nb, 1, m]
  logits = [s_blk, s_smp]
  if selected is not None:
    s_sel = jnp.einsum("bknqh,bknsh->bknqs", q5, selected.k, preferred_element_type=acc) * scale
    logits.append(jnp.where(selected.keep[:, :, :, None, :], s_sel, _NEG_INF))
  m = k_samp.shape[2]

  def values(p):
    p_blk, p_smp = p[..., :block_size], p[..., block_size:block_size + m]
    out = (jnp.einsum("bknqs,bknsh->bknqh", p_blk.astype(vs.dtype), vb,
                      preferred_element_type=acc) +
           jnp.einsum("bknqm,bkmh->bknqh", p_smp.astype(v_samp.dtype), v_samp,
                      preferred_element_type=acc))
    if selected is not None:
      out = out + jnp.einsum("bknqs,bknsh->bknqh", p[..., block_size + m:].astype(
          selected.v.dtype), selected.v, preferred_element_type=acc)
    return out

  out, lse = softmax_out_lse(jnp.concatenate(logits, axis=-1), values)
  out = out.reshape(b, kh, nb, g, qb, h).transpose(0, 1, 3, 2, 4, 5).reshape(b, kh, g, tq, h)
  lse = lse.reshape(b, kh, nb, g, qb).transpose(0, 1, 3, 2, 4).reshape(b, kh, g, tq)
  return out.astype(qs.dtype), lse


# Elements of one chunk's [queries, block + samples] fp32 score matrix in the XLA backward.
_BWD_CHUNK_ELEMENTS = 1 << 26


def _blocks_per_chunk(num_blocks: int, elements_per_block: int) -> int:
  """The largest divisor of ``num_blocks`` whose chunk stays within the element budget."""
  limit = max(1, _BWD_CHUNK_ELEMENTS // max(elements_per_block, 1))
  return max(c for c in range(1, min(num_blocks, limit) + 1) if num_blocks % c == 0)


def _recompute_bwd(qs, ks, vs, samples, selected, d_out, lse, delta, *, scale, block_size):
  """Recompute-and-differentiate ``blocked_attention_xla`` over chunks of blocks (a scan), from
  the statistics ``lse``, ``delta`` ``[b, k, g, tq]`` of the merged result that contains the
  stage (its own, or a merge with other parts; ``merge.part_cotangents``).

  Blocks are independent except for the shared samples, whose gradients are summed over the
  chunks in float32; peak memory is one chunk's score matrix (``_BWD_CHUNK_ELEMENTS``). The
  selected keys (``selected``, or None) belong to their block: their gradients ``[b, k, nb, S,
  h]`` are returned as ``SelectedKeys(dk, dv, None, None)`` (else None).
  """
  b, kh, g, tq, h = qs.shape
  nb = ks.shape[2] // block_size
  qb, m = tq // nb, samples.k.shape[2]
  extra = 0 if selected is None else selected.k.shape[3]
  c = _blocks_per_chunk(nb, b * kh * g * qb * (block_size + m + extra))
  nc = nb // c
  chunk_q = lambda x: jnp.moveaxis(x.reshape(b, kh, g, nc, c * qb, *x.shape[4:]), 3, 0)
  chunk_k = lambda x: jnp.moveaxis(x.reshape(b, kh, nc, c * block_size, h), 2, 0)
  unchunk = lambda x, axis, n: jnp.moveaxis(x, 0, axis).reshape(x.shape[1:axis + 1] + (n, h))
  chunk_sel = lambda x: jnp.moveaxis(x.reshape((b, kh, nc, c) + x.shape[3:]), 2, 0)
  sel_chunks = (None if selected is None else
                (chunk_sel(selected.k), chunk_sel(selected.v), chunk_sel(selected.keep),
                 chunk_sel(selected.drop_samples)))

  def body(acc, xs):
    i, q_c, k_c, v_c, do_c, lse_c, delta_c, sel_c = xs
    offset = i * c * block_size  # positions relative to the chunk's first key
    keep_c = None if sel_c is None else sel_c[2:]
    stage = lambda q, k, v, k_s, v_s, w, sel: blocked_attention_xla(
        q, k, v, dataclasses.replace(samples, k=k_s, v=v_s, pos=samples.pos - offset,
                                     n_valid=samples.n_valid - offset, log_weight=w),
        None if sel is None else SelectedKeys(*sel, *keep_c), scale=scale,
        block_size=block_size)
    (o_c, l_c), vjp = jax.vjp(stage, q_c, k_c, v_c, samples.k, samples.v, samples.log_weight,
                              None if sel_c is None else sel_c[:2])
    dq, dk, dv, *d_samples, d_sel = vjp(part_cotangents(o_c, l_c, lse_c, delta_c, do_c))
    acc = tuple(a + d.astype(jnp.float32) for a, d in zip(acc, d_samples))
    return acc, (dq, dk, dv, d_sel)

  zeros = tuple(jnp.zeros(x.shape, jnp.float32)
                for x in (samples.k, samples.v, samples.log_weight))
  (dks, dvs, dw), (dq, dk, dv, d_sel) = jax.lax.scan(
      body, zeros, (jnp.arange(nc), chunk_q(qs), chunk_k(ks), chunk_k(vs), chunk_q(d_out),
                    chunk_q(lse), chunk_q(delta), sel_chunks))
  dq = unchunk(dq, 3, tq)
  dk, dv = unchunk(dk, 2, nb * block_size), unchunk(dv, 2, nb * block_size)
  if d_sel is not None:
    unchunk_sel = lambda x: jnp.moveaxis(x, 0, 2).reshape((b, kh, nb) + x.shape[4:])
    d_sel = SelectedKeys(unchunk_sel(d_sel[0]), unchunk_sel(d_sel[1]), None, None)
  return dq, dk, dv, dks, dvs, dw, d_sel


# ----------------------------------------------------------------------------------------------
# Rows by index: the stage in the public layout, the sort order given by permutations


class RowWindow(NamedTuple):
  """Where one problem's rows lie (static): its queries are rows ``[q_offset, q_offset + q_len)``
  of q, its keys rows ``[k_offset, k_offset + k_len)`` of k/v (a causal level's quadrants are
  windows of the same arrays, so no sliced copies are made).

  ``all_keys_valid``: every key of the window is valid (no key mask, ``n_valid == k_len``), a
  static promise of the caller: the Pallas kernels then add no per-key bias where the blocks
  are also full (the XLA path masks by ``n_valid`` regardless)."""
  q_offset: int
  q_len: int
  k_offset: int
  k_len: int
  all_keys_valid: bool = False


def _row_index(perm):
  """(problem, head) index arrays broadcasting against ``perm`` ``[P, Nkv, G, n]``."""
  p, kh, g, _ = perm.shape
  heads = jnp.arange(kh)[:, None] * g + jnp.arange(g)[None, :]
  return jnp.arange(p)[:, None, None, None], heads[None, :, :, None]


def grouped_rows(x, perm, offset: int = 0):
  """Rows ``offset + perm`` of ``x`` ``[P, R, N, ...]`` -> heads-major ``[P, Nkv, G, n, ...]``
  (zeros for -1)."""
  pi, hi = _row_index(perm)
  rows = x[pi, offset + jnp.maximum(perm, 0), hi]
  return jnp.where((perm >= 0).reshape(perm.shape + (1,) * (x.ndim - 3)), rows, 0)


def _public(xg):
  """Heads-major ``[P, Nkv, G, n, ...]`` -> ``[P, n, Nkv * G, ...]``."""
  x = jnp.moveaxis(xg, 3, 1)
  return x.reshape(x.shape[:2] + (-1,) + x.shape[4:])


def unsort_rows(xs, perm, length: int):
  """Rows ``xs`` ``[P, n, N, ...]`` in the order ``perm`` ``[P, Nkv, G, n]`` (head ``kv * G + g``
  following ``perm[:, kv, g]``; for keys, ``G = 1``) put back at their local rows -> ``[P,
  length, N, ...]``: the inverse of ``_public(grouped_rows(x, perm))``.

  Every local row ``0 .. length-1`` must occur once in each ``perm[p, kv, g]``; -1 rows are
  dropped.
  """
  p, kh, g, n = perm.shape
  pi, hi = _row_index(perm)
  spare = length + jnp.arange(n, dtype=perm.dtype)       # distinct out-of-range rows, dropped
  rows = jnp.where(perm >= 0, perm, spare)
  vals = jnp.moveaxis(xs.reshape((p, n, kh, g) + xs.shape[3:]), 1, 3)
  out = jnp.zeros((p, length) + xs.shape[2:], xs.dtype)
  return out.at[pi, rows, hi].set(vals, mode="drop", unique_indices=True)


def _sorted_inputs(q, k, v, sort, window):
  """qs ``[P, Nkv, G, n, H]``, ks/vs ``[P, Nkv, n_k, H]`` in sorted order."""
  kp = sort.k_perm[:, :, None]
  return (grouped_rows(q, sort.q_perm, window.q_offset),
          grouped_rows(k, kp, window.k_offset)[:, :, 0],
          grouped_rows(v, kp, window.k_offset)[:, :, 0])


def _selected_keys(k, v, selection, window: RowWindow) -> SelectedKeys | None:
  """The chosen keys' rows of k/v ``[P, Rk, Nkv, H]`` -> :class:`SelectedKeys` (``selection``:
  a ``selection.Selection`` of the window's local key rows, or None)."""
  if selection is None:
    return None
  p, kh, nb, n = selection.rows.shape
  # Unkept rows are gathered as zeros, like padding: a masked key's NaN would otherwise reach
  # its block through the zero probability times its value (0 * NaN).
  kept = jnp.where(selection.keep, selection.rows, -1).reshape(p, kh, 1, nb * n)
  rows = lambda x: grouped_rows(x, kept, window.k_offset)[:, :, 0].reshape(p, kh, nb, n,
                                                                           x.shape[-1])
  return SelectedKeys(rows(k), rows(v), selection.keep, selection.drop_samples)


def blocked_attention_fwd(q, k, v, sort, samples, selection, scale: float, block_size: int,
                          window: RowWindow, implementation: backends.Backend, into=None):
  """The forward of :func:`blocked_attention` (same arguments and results), not differentiable.

  ``into``: a running ``(out [B, T, N, H], lse [B, N, T])`` of which q's problems are the folded
  rows (``folding.py``; a causal level's quadrants): returns it with the stage's result merged
  into the window's query rows by log-sum-exp (the kernels do so in place where they can).
  """
  kernels = implementation.kernels
  if kernels is not None:
    stage = lambda into: kernels.blocked_attention_pallas(
        q, k, v, sort.q_perm, sort.k_perm, samples.k, samples.v, samples.pos, samples.n_valid,
        samples.log_weight, selection, scale=scale, block_size=block_size, **window._asdict(),
        **implementation.options, into=into)
    if into is None or kernels.in_place(q.shape[-1]):
      return stage(into)
    return merge_rows(into, *stage(None), window.q_offset)
  qs, ks, vs = _sorted_inputs(q, k, v, sort, window)
  out, lse = blocked_attention_xla(qs, ks, vs, samples, _selected_keys(k, v, selection, window),
                                   scale=scale, block_size=block_size)
  out = unsort_rows(_public(out), sort.q_perm, window.q_len)
  lse = unsort_rows(_public(lse), sort.q_perm, window.q_len).swapaxes(1, 2)
  return (out, lse) if into is None else merge_rows(into, out, lse, window.q_offset)


def blocked_attention_bwd(q, k, v, sort, samples, selection, d_out, lse, delta, scale: float,
                          block_size: int, window: RowWindow, implementation: backends.Backend,
                          into=None,
                          weight_grad: bool = True):
  """The stage's share of the gradient of a merged result that contains it as a part.

  Arguments as :func:`blocked_attention`, plus the merged result's ``d_out`` ``[P, Rq, N, H]``
  and its statistics ``lse``, ``delta = rowsum(dO * O) - dlse`` ``[P, N, Rq]`` (``merge.py``),
  all in q's rows (the window's queries at ``window.q_offset``; no slice is copied). Returns
  dq ``[P, q_len, N, H]``, dk/dv ``[P, k_len, Nkv, H]`` (the window's rows, float32 or the
  inputs' dtype) and the float32 gradients of the samples' k, v ``[P, Nkv, m, H]`` and
  log_weight ``[P, Nkv, m]`` (None without
  ``weight_grad``: the Pallas kernels then skip its reduction). ``into``: running
  ``(dq [B, T, N, H], dk, dv [B, T, Nkv, H])`` of which q/k's problems are the folded rows:
  those with dq, dk, dv added to the window's rows are returned instead (in place in the
  kernels where they can). The selected keys' gradients are inside dk/dv.
  """
  kernels = implementation.kernels
  if kernels is not None:
    grads = lambda into: kernels.blocked_attention_bwd_pallas(
        q, k, v, sort.q_perm, sort.k_perm, samples.k, samples.v, samples.pos, samples.n_valid,
        samples.log_weight, d_out, lse, delta, selection, scale=scale, block_size=block_size,
        **window._asdict(), **implementation.options, into=into, weight_grad=weight_grad)
    if into is None or kernels.in_place(q.shape[-1]):
      return grads(into)
    dq, dk, dv, *sample_grads = grads(None)
    return (*add_grads(into, (dq, dk, dv), window.q_offset, window.k_offset), *sample_grads)
  q_perm = sort.q_perm
  qs, ks, vs = _sorted_inputs(q, k, v, sort, window)
  stats = lambda x: grouped_rows(jnp.swapaxes(x, 1, 2), q_perm, window.q_offset)
  dq, dk, dv, dks, dvs, dw, d_sel = _recompute_bwd(
      qs, ks, vs, samples, _selected_keys(k, v, selection, window),
      grouped_rows(d_out, q_perm, window.q_offset), stats(lse), stats(delta), scale=scale,
      block_size=block_size)
  kp = sort.k_perm[:, :, None]
  dq = unsort_rows(_public(dq), q_perm, window.q_len)
  dk = unsort_rows(_public(dk[:, :, None]), kp, window.k_len)
  dv = unsort_rows(_public(dv[:, :, None]), kp, window.k_len)
  if d_sel is not None:  # a key may be chosen by several blocks: scatter-add
    dk, dv = (_add_selected(d, ds, selection.rows) for d, ds in ((dk, d_sel.k), (dv, d_sel.v)))
  if into is not None:
    dq, dk, dv = add_grads(into, (dq, dk, dv), window.q_offset, window.k_offset)
  return dq, dk, dv, dks, dvs, dw if weight_grad else None


def _add_selected(acc, vals, rows):
  """``acc`` ``[P, k_len, Nkv, H]`` with ``vals`` ``[P, Nkv, nb, S, H]`` added at the local key
  rows ``rows`` ``[P, Nkv, nb, S]`` (-1: dropped)."""
  p, kh = rows.shape[:2]
  rows = jnp.where(rows >= 0, rows, acc.shape[1]).reshape(p, kh, -1)
  vals = vals.reshape(p, kh, -1, vals.shape[-1]).astype(acc.dtype)
  return acc.at[jnp.arange(p)[:, None, None], rows, jnp.arange(kh)[None, :, None]].add(
      vals, mode="drop")


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def blocked_attention(q, k, v, sort, samples, selection, scale: float, block_size: int,
                      window: RowWindow, implementation: backends.Backend):
  """The blocked stage on rows by index, with the backend's forward and backward.

  Args:
    q: ``[P, Rq, N, H]``; k, v: ``[P, Rk, Nkv, H]`` (public layout; the problem's rows are
      ``window``'s).
    sort: a ``plan.SortPlan``: q_perm ``[P, Nkv, G, nb * qb]`` int32 local query rows in
      sorted order (-1: padding row), k_perm ``[P, Nkv, nb * block_size]`` int32 local key
      rows in sorted order (-1: padding); sorted positions ``>= samples.n_valid`` are invalid
      keys, and -1 entries may only lie there.
    samples: a ``plan.SampleSet`` (k, v, pos, n_valid, log_weight: as
      ``blocked_attention_xla``).
    selection: the ``select_blocks`` option's ``selection.Selection`` (local key rows of the
      window), or None.
  Returns:
    out ``[P, q_len, N, H]`` (q's dtype), lse ``[P, N, q_len]`` float32, unsorted.

  The VJP (:func:`blocked_attention_bwd` from the saved (out, lse)) differentiates q, k, v, the
  samples and their log-weights (the latter only where they are differentiated: not for
  constants such as the uniform sampler's), for cotangents of both ``out`` and ``lse``; no ``n x
  (block_size + sample_size)`` matrix is kept between the passes. A backend with kernels runs
  their backward kernels; XLA recomputes the stage chunk by chunk of blocks and differentiates
  it by autodiff (the reference).
  """
  return blocked_attention_fwd(q, k, v, sort, samples, selection, scale, block_size, window,
                               implementation)


def _vjp_fwd(q, k, v, sort, samples, selection, scale, block_size, window, implementation):
  inputs, perturbed = primal_values((q, k, v, sort, samples, selection))
  out, lse = blocked_attention_fwd(*inputs, scale, block_size, window, implementation)
  return (out, lse), (inputs, out, lse, flag(perturbed[4].log_weight))


def _vjp_bwd(scale, block_size, window, implementation, res, cotangents):
  inputs, out, lse, weight_grad = res
  q, k, v, _, samples, _ = inputs
  d_out, d_lse = dense(cotangents[0]), nonzero(cotangents[1])
  in_q_rows = lambda x: embed_rows(x, window.q_offset, q.shape[1])        # window -> q's rows
  stats_in_q_rows = lambda x: embed_rows(x, window.q_offset, q.shape[1], axis=2)
  dq, dk, dv, dks, dvs, dw = blocked_attention_bwd(
      *inputs, in_q_rows(d_out), stats_in_q_rows(lse),
      stats_in_q_rows(output_delta(out, d_out, d_lse)), scale, block_size, window,
      implementation, weight_grad=is_set(weight_grad))
  cast = lambda d, x: None if d is None else d.astype(x.dtype)
  d_samples = dataclasses.replace(samples, k=cast(dks, samples.k), v=cast(dvs, samples.v),
                                  pos=None, n_valid=None,
                                  log_weight=cast(dw, samples.log_weight))
  return (cast(in_q_rows(dq), q),
          cast(embed_rows(dk, window.k_offset, k.shape[1]), k),
          cast(embed_rows(dv, window.k_offset, v.shape[1]), v), None, d_samples, None)


blocked_attention.defvjp(_vjp_fwd, _vjp_bwd, symbolic_zeros=True)
