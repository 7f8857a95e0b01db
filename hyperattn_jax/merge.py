"""Log-sum-exp merge of attentions of the same queries over disjoint key sets, and the
backward of a part of such a merge from the merged result.

Merging parts ``(O_p, lse_p)`` gives ``lse = log sum_p exp(lse_p)`` and ``O = sum_p w_p O_p``
with ``w_p = exp(lse_p - lse)``. The gradient of the merged ``(O, lse)`` through part ``p``'s
scores is ``dS = P (dO . v - delta)`` with ``P`` normalised by the *merged* lse and
``delta = dO . O - dlse`` (:func:`output_delta`): a flash-style backward of the part started
from the merged statistics needs neither ``O_p`` nor ``lse_p``. Where the part is differentiated
by autodiff instead, :func:`part_cotangents` gives the cotangents of ``(O_p, lse_p)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["merge_attention", "output_delta", "part_cotangents"]

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
  has = total != 0  # 0 on rows empty in both parts; NaN (a NaN input) propagates
  total_safe = jnp.where(has, total, 1.0)
  lse = jnp.where(has, top + jnp.log(total_safe), _NEG_INF)
  w1, w2 = e1 / total_safe, e2 / total_safe
  to_rows = lambda w: jnp.swapaxes(w, -1, -2)[..., None]
  acc = jnp.promote_types(out1.dtype, jnp.float32)  # float64 stays float64
  out = out1.astype(acc) * to_rows(w1) + out2.astype(acc) * to_rows(w2)
  return out.astype(out1.dtype), lse


def output_delta(out, d_out, d_lse=None):
  """``delta = rowsum(dO * O) - dlse`` of the merged result, ``[..., N, T]`` (out ``[..., T, N,
  H]``, d_lse ``[..., N, T]`` or None), float32 (float64 for float64 inputs)."""
  acc = jnp.promote_types(out.dtype, jnp.float32)
  delta = jnp.swapaxes(jnp.sum(d_out.astype(acc) * out.astype(acc), axis=-1), -1, -2)
  return delta if d_lse is None else delta - d_lse.astype(acc)


def part_cotangents(part_out, part_lse, lse, delta, d_out):
  """Cotangents of one part ``(part_out, part_lse)`` of a merge, from the merged ``lse``, its
  ``delta`` (:func:`output_delta`) and ``d_out``: with the part's share ``w = exp(part_lse -
  lse)`` (0 where either is -inf), ``d part_out = w dO`` and ``d part_lse = w (dO . part_out -
  delta)``.

  Rows on the leading axes: out/d_out ``[..., T, H]``, the statistics ``[..., T]``.
  """
  acc = jnp.promote_types(d_out.dtype, jnp.float32)
  finite = (part_lse != _NEG_INF) & (lse != _NEG_INF)  # NaN statistics propagate
  w = jnp.where(finite, jnp.exp(jnp.where(finite, part_lse - lse, 0.0)), 0.0)
  d_part_out = (d_out.astype(acc) * w[..., None]).astype(part_out.dtype)
  spread = jnp.sum(d_out.astype(acc) * part_out.astype(acc), axis=-1)
  return d_part_out, w * (spread - delta)
