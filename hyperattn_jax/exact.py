"""Memory-safe exact attention with LSE and a flash-style VJP.

``flash_attention`` runs one of three kernels: the chunked online softmax in plain JAX here
(no ``n x n`` matrix is ever materialised: queries are processed ``chunk`` rows at a time and
keys ``chunk`` columns at a time, fully masked causal chunks skipped), the Pallas flash kernels,
or cuDNN (``cudnn.py``). Its VJP recomputes the probabilities from the saved log-sum-exp, so the
residuals are ``q, k, v, out, lse`` only. ``kernel_forward`` / ``kernel_backward`` are the two
passes on their own: the causal recursion (``causal.py``) runs the backward from the statistics of
the final merged result (``merge.py``).

``flash_attention`` takes the public layout ``[batch, seq, heads, head_dim]``; the loops work in
the internal layout (heads-major, grouped for GQA):
  q ``[batch, kv_heads, group, q_len, head_dim]``, k/v ``[batch, kv_heads, kv_len, head_dim]``,
  key_mask ``[batch, kv_len]`` bool, out like q, lse ``[batch, kv_heads, group, q_len]`` float32
  (float64 for float64 inputs, as every accumulation).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from hyperattn_jax import backends
from hyperattn_jax import cudnn
from hyperattn_jax.merge import output_delta
from hyperattn_jax.perturbation import dense, nonzero, primal_values

__all__ = ["flash_attention", "grouped_q", "kernel_forward", "kernel_backward"]

_NEG_INF = float("-inf")


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _acc(dtype):
  """Accumulation dtype: float32, or float64 for float64 inputs."""
  return jnp.promote_types(dtype, jnp.float32)


def _pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _num_key_chunks(i, q_chunk: int, k_chunk: int, nk: int, causal: bool):
  """Key chunks query chunk ``i`` must visit (all, or up to its diagonal when causal)."""
  if not causal:
    return nk
  return jnp.minimum(nk, ((i + 1) * q_chunk + k_chunk - 1) // k_chunk)


def _chunk_scores(qi, kj, mask_j, qpos, kpos, scale, causal):
  """Masked fp32 scores ``[b, k, g, q_chunk, k_chunk]`` of one (query, key) chunk pair."""
  s = jnp.einsum("bkgqh,bksh->bkgqs", qi, kj, preferred_element_type=_acc(qi.dtype)) * scale
  valid = mask_j[:, None, None, None, :]
  if causal:
    valid = valid & (qpos[:, None] >= kpos[None, :])
  return jnp.where(valid, s, _NEG_INF)


def _split(q, k, v, key_mask, chunk):
  """Pads to whole chunks and returns the chunked views the loops index."""
  tq, tk = q.shape[3], k.shape[2]
  qc, kc = min(chunk, tq), min(chunk, tk)
  nq, nk = _cdiv(tq, qc), _cdiv(tk, kc)
  q = _pad_axis(q, 3, nq * qc)
  k = _pad_axis(k, 2, nk * kc)
  v = _pad_axis(v, 2, nk * kc)
  key_mask = _pad_axis(key_mask, 1, nk * kc, False)
  return q, k, v, key_mask, qc, kc, nq, nk


def _forward(q, k, v, key_mask, causal, scale, chunk):
  b, kh, g, tq, h = q.shape
  acc_t = _acc(q.dtype)
  q_p, k_p, v_p, mask_p, qc, kc, nq, nk = _split(q, k, v, key_mask, chunk)

  def one_query_chunk(i):
    qi = lax.dynamic_slice_in_dim(q_p, i * qc, qc, axis=3)
    qpos = i * qc + jnp.arange(qc)

    def body(j, carry):
      m, l, acc = carry
      kj = lax.dynamic_slice_in_dim(k_p, j * kc, kc, axis=2)
      vj = lax.dynamic_slice_in_dim(v_p, j * kc, kc, axis=2)
      mask_j = lax.dynamic_slice_in_dim(mask_p, j * kc, kc, axis=1)
      s = _chunk_scores(qi, kj, mask_j, qpos, j * kc + jnp.arange(kc), scale, causal)
      m_new = jnp.maximum(m, s.max(-1))
      m_safe = jnp.where(m_new == _NEG_INF, 0.0, m_new)
      p = jnp.exp(s - m_safe[..., None])
      alpha = jnp.exp(m - m_safe)
      l = l * alpha + p.sum(-1)
      pv = jnp.einsum("bkgqs,bksh->bkgqh", p.astype(v.dtype), vj,
                      preferred_element_type=acc_t)
      return m_new, l, acc * alpha[..., None] + pv

    init = (jnp.full((b, kh, g, qc), _NEG_INF, acc_t),
            jnp.zeros((b, kh, g, qc), acc_t),
            jnp.zeros((b, kh, g, qc, h), acc_t))
    m, l, acc = lax.fori_loop(0, _num_key_chunks(i, qc, kc, nk, causal), body, init)
    # l is 0 only on rows without a valid key; a NaN l (a NaN score or value) must reach the
    # output, so the test is l != 0, not l > 0.
    has = l != 0
    l_safe = jnp.where(has, l, 1.0)
    out = jnp.where(has[..., None], acc / l_safe[..., None], 0.0)
    lse = jnp.where(has, m + jnp.log(l_safe), _NEG_INF)
    return out.astype(q.dtype), lse

  outs, lses = lax.map(one_query_chunk, jnp.arange(nq))  # [nq, b, k, g, qc, ...]
  out = jnp.moveaxis(outs, 0, 3).reshape(b, kh, g, nq * qc, h)[:, :, :, :tq]
  lse = jnp.moveaxis(lses, 0, 3).reshape(b, kh, g, nq * qc)[..., :tq]
  return out, lse


def _backward(q, k, v, key_mask, out, lse, d_out, d_lse, causal, scale, chunk):
  tk = k.shape[2]
  acc_t = _acc(q.dtype)
  # D_i = sum_h dO_ih O_ih; the score gradient is P * (dP - D + dlse).
  delta = jnp.sum(d_out.astype(acc_t) * out.astype(acc_t), axis=-1)
  q_p, k_p, v_p, mask_p, qc, kc, nq, nk = _split(q, k, v, key_mask, chunk)
  tq_p = nq * qc
  # Rows without any valid key have lse = -inf and must get p = 0: use +inf there.
  lse_p = _pad_axis(jnp.where(lse == _NEG_INF, jnp.inf, lse), 3, tq_p, jnp.inf)
  do_p = _pad_axis(d_out, 3, tq_p)
  delta_p = _pad_axis(delta, 3, tq_p)
  dlse_p = _pad_axis(d_lse.astype(acc_t), 3, tq_p)

  def one_query_chunk(carry, i):
    dk, dv = carry
    sl = lambda x: lax.dynamic_slice_in_dim(x, i * qc, qc, axis=3)
    qi, doi, lse_i, delta_i, dlse_i = sl(q_p), sl(do_p), sl(lse_p), sl(delta_p), sl(dlse_p)
    qpos = i * qc + jnp.arange(qc)

    def body(j, c):
      dqi, dk, dv = c
      kj = lax.dynamic_slice_in_dim(k_p, j * kc, kc, axis=2)
      vj = lax.dynamic_slice_in_dim(v_p, j * kc, kc, axis=2)
      mask_j = lax.dynamic_slice_in_dim(mask_p, j * kc, kc, axis=1)
      s = _chunk_scores(qi, kj, mask_j, qpos, j * kc + jnp.arange(kc), scale, causal)
      p = jnp.exp(s - lse_i[..., None])
      dp = jnp.einsum("bkgqh,bksh->bkgqs", doi, vj, preferred_element_type=acc_t)
      ds = p * (dp - delta_i[..., None] + dlse_i[..., None])
      dqi = dqi + jnp.einsum("bkgqs,bksh->bkgqh", ds.astype(k.dtype), kj,
                             preferred_element_type=acc_t) * scale
      dk_j = jnp.einsum("bkgqs,bkgqh->bksh", ds.astype(q.dtype), qi,
                        preferred_element_type=acc_t) * scale
      dv_j = jnp.einsum("bkgqs,bkgqh->bksh", p.astype(d_out.dtype), doi,
                        preferred_element_type=acc_t)
      add = lambda acc, x: lax.dynamic_update_slice_in_dim(
          acc, lax.dynamic_slice_in_dim(acc, j * kc, kc, axis=2) + x, j * kc, axis=2)
      return dqi, add(dk, dk_j), add(dv, dv_j)

    dqi = jnp.zeros(qi.shape, acc_t)
    dqi, dk, dv = lax.fori_loop(0, _num_key_chunks(i, qc, kc, nk, causal), body, (dqi, dk, dv))
    return (dk, dv), dqi

  zeros_kv = jnp.zeros(k_p.shape, acc_t)
  (dk, dv), dqs = lax.scan(one_query_chunk, (zeros_kv, zeros_kv), jnp.arange(nq))
  dq = jnp.moveaxis(dqs, 0, 3).reshape(q_p.shape)[:, :, :, :q.shape[3]]
  return dq.astype(q.dtype), dk[:, :, :tk].astype(k.dtype), dv[:, :, :tk].astype(v.dtype)


def grouped_q(q, kv_heads: int):
  """Queries ``[B, T, N, H]`` -> ``[B, Nkv, G, T, H]`` (query head ``kv * G + g``)."""
  b, t, n, h = q.shape
  return q.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)


def _grouped(q, k, v):
  """Public ``[B, T, N, H]`` -> q ``[B, Nkv, G, T, H]``, k/v ``[B, Nkv, T, H]`` (no repeats)."""
  return grouped_q(q, k.shape[2]), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _public(xg):
  """Heads-major ``[B, Nkv, G, T, ...]`` -> ``[B, T, N, ...]``."""
  x = jnp.moveaxis(xg, 3, 1)
  return x.reshape(x.shape[:2] + (-1,) + x.shape[4:])


def kernel_forward(q, k, v, key_mask, causal, scale, chunk, implementation: backends.Backend):
  """(out, lse) of exact attention by the backend's kernel (cuDNN, its flash kernel or the XLA
  loops); key_mask None: every key valid."""
  if implementation.cudnn:
    return cudnn.attention_fwd(q, k, v, causal, scale)
  key_mask = _ones_mask(k) if key_mask is None else key_mask
  if implementation.kernels is not None:
    return implementation.kernels.flash_attention_pallas(q, k, v, key_mask, causal, scale,
                                                         **implementation.options)
  out, lse = _forward(*_grouped(q, k, v), key_mask, causal, scale, chunk)
  return _public(out), _public(lse).swapaxes(1, 2)


def kernel_backward(q, k, v, key_mask, out, lse, d_out, d_lse, causal, scale, chunk,
                    implementation: backends.Backend):
  """(dq, dk, dv) from a given ``(out, lse)`` and cotangents (``d_lse`` None: no cotangent).

  Given the ``(out, lse)`` of a merge that contains this attention as a part, this is the part's
  share of the merged result's gradient (see ``merge.py``)."""
  if implementation.cudnn and d_lse is None:
    return cudnn.attention_bwd(q, k, v, out, lse, d_out, causal, scale)
  key_mask = _ones_mask(k) if key_mask is None else key_mask
  if implementation.kernels is not None:  # also for cuDNN: its backward takes no lse cotangent
    return implementation.kernels.flash_attention_bwd_pallas(
        q, k, v, key_mask, d_out, lse, output_delta(out, d_out, d_lse), causal, scale,
        **implementation.options)
  d_lse = jnp.zeros_like(lse) if d_lse is None else d_lse
  grouped_stat = lambda x: x.reshape(x.shape[0], k.shape[2], -1, x.shape[-1])
  qg, kg, vg = _grouped(q, k, v)
  dq, dk, dv = _backward(qg, kg, vg, key_mask, _grouped(out, k, v)[0], grouped_stat(lse),
                         _grouped(d_out, k, v)[0], grouped_stat(d_lse), causal, scale, chunk)
  return _public(dq), dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3)


def _ones_mask(k):
  return jnp.ones(k.shape[:2], jnp.bool_)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def flash_attention(q, k, v, key_mask, causal: bool, scale: float, chunk: int,
                    implementation: backends.Backend = backends.XLA):
  """Exact attention with LSE in the public layout.

  q ``[B, Tq, N, H]``, k/v ``[B, Tk, Nkv, H]``, key_mask ``[B, Tk]`` bool or None (every key
  valid) -> out like q, lse ``[B, N, Tq]`` float32. Rows whose keys are all masked get
  ``out = 0`` and ``lse = -inf``. ``causal`` requires ``Tq == Tk`` (query ``i`` sees keys
  ``j <= i``).

  ``implementation``: a ``backends.Backend``: XLA (the chunked loops here, heads-major), the
  kernels' flash kernels, or cuDNN's fused kernels (``backends.exact_backend``, see
  ``hyperattn_jax/cudnn.py``; key_mask must be None). The backward knows from its symbolic-zero
  cotangents (``perturbation.py``) whether the lse is differentiated: where it is not (the
  caller drops it, or nothing depends on it) the cuDNN backward runs; where it is, cuDNN's
  forward is differentiated with the flash backward kernels (cuDNN's takes no lse cotangent).
  """
  return kernel_forward(q, k, v, key_mask, causal, scale, chunk, implementation)


def _vjp_fwd(q, k, v, key_mask, causal, scale, chunk, implementation):
  (q, k, v, key_mask), _ = primal_values((q, k, v, key_mask))
  out, lse = kernel_forward(q, k, v, key_mask, causal, scale, chunk, implementation)
  return (out, lse), (q, k, v, key_mask, out, lse)


def _vjp_bwd(causal, scale, chunk, implementation, res, cotangents):
  q, k, v, key_mask, out, lse = res
  dq, dk, dv = kernel_backward(q, k, v, key_mask, out, lse, dense(cotangents[0]),
                               nonzero(cotangents[1]), causal, scale, chunk, implementation)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


flash_attention.defvjp(_vjp_fwd, _vjp_bwd, symbolic_zeros=True)
