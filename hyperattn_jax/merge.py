"""Log-sum-exp merge of attentions of the same queries over disjoint key sets."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["merge_attention"]

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
