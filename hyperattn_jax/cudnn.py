"""Exact attention through cuDNN's fused flash kernels, with the float32 log-sum-exp (GPU only).

``jax.nn.dot_product_attention(implementation="cudnn", return_residual=True)`` hands back the
log-sum-exp cast to the output dtype (bf16 loses ~3% of a softmax weight), and its VJP always
starts from its own forward. The causal recursion needs both the float32 LSE (to merge) and a
backward that starts from the *final* merged ``(out, lse)`` (the flash identity
``dS = P_final * (dO . v - dO . O_final)``, exact when the LSE gets no cotangent). Both are
available one level down, in jax's cuDNN entry points (``jax._src.cudnn``; the same signatures
in jax 0.10.2 and 0.11), which this module wraps.

Layout as everywhere: q ``[B, Tq, N, H]``, k/v ``[B, Tk, Nkv, H]``, lse ``[B, N, Tq]`` float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

try:  # jax's own cuDNN attention (present in every jax with GPU support; private module).
  from jax._src.cudnn import fused_attention_stablehlo as _fa
except ImportError:  # pragma: no cover - very old or stripped-down jax
  _fa = None

__all__ = ["available", "attention_fwd", "attention_bwd"]


def available(q: jax.Array, key_mask) -> bool:
  """Whether cuDNN can run this exact attention: a CUDA GPU, bf16/fp16 inputs, a head_dim that
  is a multiple of 8 up to 128, and no key mask (cuDNN takes only sequence lengths)."""
  if _fa is None or key_mask is not None or jax.default_backend() != "gpu":
    return False
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return False
  head_dim = q.shape[-1]
  if head_dim % 8 or head_dim > 128:
    return False
  try:
    _fa.check_cudnn_version()
  except RuntimeError:
    return False
  return True


def _mask_type(causal: bool):
  return _fa.MaskType.CAUSAL if causal else _fa.MaskType.NO_MASK


def attention_fwd(q, k, v, causal: bool, scale: float):
  """Output ``[B, Tq, N, H]`` and float32 lse ``[B, N, Tq]`` (``causal``: ``Tq == Tk``)."""
  out, lse = _fa.dot_product_attention(q, k, v, scale=scale, mask_type=_mask_type(causal),
                                       qkv_layout="BTNH", return_residual=True)
  return out, lse.astype(jnp.float32)


def attention_bwd(q, k, v, out, lse, d_out, causal: bool, scale: float):
  """(dq, dk, dv) of exact attention from a given ``(out, lse)`` and the output cotangent.

  With the final merged ``(out, lse)`` of a sum of attentions over disjoint key sets, this is
  the gradient of the merged output through this part's keys (no LSE cotangent allowed).
  """
  empty = jnp.zeros((0,), q.dtype)
  res = (q, k, v) + (empty,) * 7 + (lse.astype(jnp.float32), out.astype(q.dtype))
  layout = _fa._normalize_layout("BTNH").value  # pylint: disable=protected-access
  grads = _fa._dot_product_attention_bwd_rule(  # pylint: disable=protected-access
      scale, 42, 0.0, (False, False), _mask_type(causal), layout, None, True, False, res,
      d_out.astype(q.dtype))
  return grads[0], grads[1], grads[2]
