"""Memory-safe exact attention in plain JAX: chunked online softmax with a flash-style VJP.

No ``n x n`` matrix is ever materialised: queries are processed ``chunk`` rows at a time and
keys ``chunk`` columns at a time (fully masked causal chunks are skipped). The VJP recomputes
the probabilities from the saved log-sum-exp, so the residuals are ``q, k, v, out, lse`` only.

``flash_attention`` takes the public layout ``[batch, seq, heads, head_dim]``; the loops work in
the internal layout (heads-major, grouped for GQA):
  q ``[batch, kv_heads, group, q_len, head_dim]``, k/v ``[batch, kv_heads, kv_len, head_dim]``,
  key_mask ``[batch, kv_len]`` bool, out like q, lse ``[batch, kv_heads, group, q_len]`` float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["flash_attention"]

_NEG_INF = float("-inf")


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


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
  s = jnp.einsum("bkgqh,bksh->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale
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
                      preferred_element_type=jnp.float32)
      return m_new, l, acc * alpha[..., None] + pv

    init = (jnp.full((b, kh, g, qc), _NEG_INF, jnp.float32),
            jnp.zeros((b, kh, g, qc), jnp.float32),
            jnp.zeros((b, kh, g, qc, h), jnp.float32))
    m, l, acc = lax.fori_loop(0, _num_key_chunks(i, qc, kc, nk, causal), body, init)
    out = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), _NEG_INF)
    return out.astype(q.dtype), lse

  outs, lses = lax.map(one_query_chunk, jnp.arange(nq))  # [nq, b, k, g, qc, ...]
  out = jnp.moveaxis(outs, 0, 3).reshape(b, kh, g, nq * qc, h)[:, :, :, :tq]
  lse = jnp.moveaxis(lses, 0, 3).reshape(b, kh, g, nq * qc)[..., :tq]
  return out, lse


def _backward(q, k, v, key_mask, out, lse, d_out, d_lse, causal, scale, chunk):
  tk = k.shape[2]
  # D_i = sum_h dO_ih O_ih; the score gradient is P * (dP - D + dlse).
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  q_p, k_p, v_p, mask_p, qc, kc, nq, nk = _split(q, k, v, key_mask, chunk)
  tq_p = nq * qc
  # Rows without any valid key have lse = -inf and must get p = 0: use +inf there.
  lse_p = _pad_axis(jnp.where(lse == _NEG_INF, jnp.inf, lse), 3, tq_p, jnp.inf)
  do_p = _pad_axis(d_out, 3, tq_p)
  delta_p = _pad_axis(delta, 3, tq_p)
  dlse_p = _pad_axis(d_lse.astype(jnp.float32), 3, tq_p)

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
      dp = jnp.einsum("bkgqh,bksh->bkgqs", doi, vj, preferred_element_type=jnp.float32)
      ds = p * (dp - delta_i[..., None] + dlse_i[..., None])
      dqi = dqi + jnp.einsum("bkgqs,bksh->bkgqh", ds.astype(k.dtype), kj,
                             preferred_element_type=jnp.float32) * scale
      dk_j = jnp.einsum("bkgqs,bkgqh->bksh", ds.astype(q.dtype), qi,
                        preferred_element_type=jnp.float32) * scale
      dv_j = jnp.einsum("bkgqs,bkgqh->bksh", p.astype(d_out.dtype), doi,
                        preferred_element_type=jnp.float32)
      add = lambda acc, x: lax.dynamic_update_slice_in_dim(
          acc, lax.dynamic_slice_in_dim(acc, j * kc, kc, axis=2) + x, j * kc, axis=2)
      return dqi, add(dk, dk_j), add(dv, dv_j)

    dqi = jnp.zeros(qi.shape, jnp.float32)
    dqi, dk, dv = lax.fori_loop(0, _num_key_chunks(i, qc, kc, nk, causal), body, (dqi, dk, dv))
    return (dk, dv), dqi

  zeros_kv = jnp.zeros(k_p.shape, jnp.float32)
  (dk, dv), dqs = lax.scan(one_query_chunk, (zeros_kv, zeros_kv), jnp.arange(nq))
  dq = jnp.moveaxis(dqs, 0, 3).reshape(q_p.shape)[:, :, :, :q.shape[3]]
  return dq.astype(q.dtype), dk[:, :, :tk].astype(k.dtype), dv[:, :, :tk].astype(v.dtype)


def _grouped(q, k, v):
  """Public ``[B, T, N, H]`` -> q ``[B, Nkv, G, T, H]``, k/v ``[B, Nkv, T, H]`` (no repeats)."""
  b, tq, n, h = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, tq, kh, n // kh, h).transpose(0, 2, 3, 1, 4)
  return qg, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _public(xg):
  """Heads-major ``[B, Nkv, G, T, ...]`` -> ``[B, T, N, ...]``."""
  x = jnp.moveaxis(xg, 3, 1)
  return x.reshape(x.shape[:2] + (-1,) + x.shape[4:])


def _forward_impl(q, k, v, key_mask, causal, scale, chunk, implementation):
  if implementation == "pallas":
    from pallas_kernels import flash_attention_pallas  # pylint: disable=import-outside-toplevel
    return flash_attention_pallas(q, k, v, key_mask, causal, scale)
  out, lse = _forward(*_grouped(q, k, v), key_mask, causal, scale, chunk)
  return _public(out), _public(lse).swapaxes(1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def flash_attention(q, k, v, key_mask, causal: bool, scale: float, chunk: int,
                    implementation: str = "xla"):
  """Exact attention with LSE in the public layout.

  q ``[B, Tq, N, H]``, k/v ``[B, Tk, Nkv, H]``, key_mask ``[B, Tk]`` bool -> out like q, lse
  ``[B, N, Tq]`` float32. Rows whose keys are all masked get ``out = 0`` and ``lse = -inf``.
  ``causal`` requires ``Tq == Tk`` (query ``i`` sees keys ``j <= i``). ``implementation`` picks
  the forward and backward: ``"xla"`` the chunked loops here (heads-major), ``"pallas"`` the GPU
  kernels (both the flash recomputation from the saved log-sum-exp).
  """
  return _forward_impl(q, k, v, key_mask, causal, scale, chunk, implementation)


def _vjp_fwd(q, k, v, key_mask, causal, scale, chunk, implementation):
  out, lse = _forward_impl(q, k, v, key_mask, causal, scale, chunk, implementation)
  return (out, lse), (q, k, v, key_mask, out, lse)


def _vjp_bwd(causal, scale, chunk, implementation, res, cotangents):
  q, k, v, key_mask, out, lse = res
  d_out, d_lse = cotangents
  if implementation == "pallas":
    from pallas_kernels import flash_attention_bwd_pallas  # pylint: disable=import-outside-toplevel
    dq, dk, dv = flash_attention_bwd_pallas(q, k, v, key_mask, out, lse, d_out, d_lse, causal,
                                            scale)
  else:
    grouped_stat = lambda x: x.reshape(x.shape[0], k.shape[2], -1, x.shape[-1])
    qg, kg, vg = _grouped(q, k, v)
    dq, dk, dv = _backward(qg, kg, vg, key_mask, _grouped(out, k, v)[0], grouped_stat(lse),
                           _grouped(d_out, k, v)[0], grouped_stat(d_lse), causal, scale, chunk)
    dq, dk, dv = _public(dq), dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


flash_attention.defvjp(_vjp_fwd, _vjp_bwd)
