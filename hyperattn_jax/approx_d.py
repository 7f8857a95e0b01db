"""ApproxD (the paper's Algorithm 2): the ``"approx_d"`` normaliser of the blocked stage.

The row sums of the attention matrix are estimated as the sorted block's exact sum plus the
sampled residual, clamped from below by ``tau / kappa``, where ``tau`` is the largest exact
residual row sum (keys outside the row's own block) over a few uniformly drawn query rows
(``plan.Plan.tau_rows``). The clamp adds mass with value 0: the output is rescaled to it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hyperattn_jax.blocked import RowWindow, grouped_rows
from hyperattn_jax.config import HyperAttentionConfig

__all__ = ["normalise", "residual_lse_max"]

_NEG_INF = float("-inf")


def normalise(q, k, out, lse, lse_heavy, plan, scale, config: HyperAttentionConfig,
              window: RowWindow):
  """The blocked stage's (out ``[P, q_len, Nq, H]``, lse ``[P, Nq, q_len]``) renormalised by
  ApproxD: ``log d = max(lse, logaddexp(lse_heavy, log tau - log kappa))``, i.e. the residual
  row sum ``exp(lse) - exp(lse_heavy)`` clamped from below by ``tau / kappa`` (``lse_heavy``:
  the stage's lse without the samples; q ``[P, Rq, Nq, H]``, k ``[P, Rk, Nkv, H]``; ``plan``:
  the stage's ``plan.Plan``)."""
  bs = config.block_size
  b, kh, g, rows_p = plan.sort.q_perm.shape
  qs = grouped_rows(q, plan.sort.q_perm, window.q_offset)
  ks = grouped_rows(k, plan.sort.k_perm[:, :, None], window.k_offset)[:, :, 0]
  q_block = rows_p // (plan.sort.k_perm.shape[-1] // bs)
  log_tau = residual_lse_max(qs, ks, plan.samples.n_valid, plan.tau_rows, scale, q_block, bs,
                             config.exact_chunk_size)
  floor = jnp.logaddexp(lse_heavy, (log_tau - jnp.log(config.approx_d_kappa)).reshape(b, -1, 1))
  lse_d = jnp.maximum(lse, floor)
  rescale = jnp.where(lse == _NEG_INF, 0.0, jnp.exp(lse - lse_d))
  out = out.astype(rescale.dtype) * jnp.swapaxes(rescale, 1, 2)[..., None]
  return out.astype(q.dtype), lse_d


def residual_lse_max(qs, ks, n_valid, rows, scale, q_block, block_size, chunk):
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
