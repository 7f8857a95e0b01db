"""Log-sum-exp merge of attentions of the same queries over disjoint key sets."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["merge_attention", "prior_cotangents"]

_NEG_INF = float("-inf")


def merge_attention(out1, lse1, out2, lse2):
  """Log-sum-exp merge of two attentions over disjoint key sets.

  out ``[..., T, N, H]`` with lse ``[..., N, T]`` (the public layouts). Rows empty in both parts
  stay ``0`` / ``-inf``.
  """
  # Written out (not jnp.logaddexp) so that rows empty in both parts get finite gradients.
  top = jax.lax.stop_gradient(jnp.maximum(lse1, lse2))
  top = jnp.where(top == _NEG_INF, 0.0, top)
  e1, e2 = jnp.exp(lse1 - top), jnp.exp(lse2 - top)
  total = e1 + e2
  has = total > 0
  total_safe = jnp.where(has, total, 1.0)
  lse = jnp.where(has, top + jnp.log(total_safe), _NEG_INF)
  w1, w2 = e1 / total_safe, e2 / total_safe
  to_rows = lambda w: jnp.swapaxes(w, -1, -2)[..., None]
  acc = jnp.promote_types(out1.dtype, jnp.float32)  # float64 stays float64
  out = out1.astype(acc) * to_rows(w1) + out2.astype(acc) * to_rows(w2)
  return out.astype(out1.dtype), lse


def prior_cotangents(prior_out, prior_lse, out, lse, d_out, d_lse):
  """Cotangents of one part of a merge, from the merged result: with the part's share
  ``w = exp(prior_lse - lse)`` (0 on rows where either is -inf), ``d prior_out = w dO`` and
  ``d prior_lse = w (dO . (prior_out - out) + dlse)``. ``d_lse`` may be None (no cotangent).

  Shapes as :func:`merge_attention` (out ``[..., T, N, H]``, lse ``[..., N, T]``).
  """
  acc = jnp.promote_types(out.dtype, jnp.float32)
  finite = (prior_lse > _NEG_INF) & (lse > _NEG_INF)
  w = jnp.where(finite, jnp.exp(jnp.where(finite, prior_lse - lse, 0.0)), 0.0)
  to_rows = lambda x: jnp.swapaxes(x, -1, -2)[..., None]
  d_prior_out = (d_out.astype(acc) * to_rows(w)).astype(prior_out.dtype)
  spread = jnp.sum(d_out.astype(acc) * (prior_out.astype(acc) - out.astype(acc)), axis=-1)
  d_prior_lse = jnp.swapaxes(spread, -1, -2)
  if d_lse is not None:
    d_prior_lse = d_prior_lse + d_lse.astype(acc)
  return d_prior_out, w * d_prior_lse

