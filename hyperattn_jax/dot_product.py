"""``dot_product_attention``: HyperAttention behind ``jax.nn.dot_product_attention``'s signature.

A drop-in for code written against ``jax.nn.dot_product_attention``: the same arguments, layouts
and semantics wherever HyperAttention can honour them (GQA/MQA, ``scale``, ``is_causal``, key
padding given as ``mask`` or ``key_value_seq_lengths``, ``query_seq_lengths``, unbatched
``[seq, heads, head_dim]`` inputs), and a ValueError naming the argument where it cannot (a
dense ``bias``, masks that are not key padding, ``local_window_size``). Two arguments are new:
``rng`` (the LSH hyperplanes and samples are drawn from it) and ``config``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hyperattn_jax import checks
from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.hyper import hyper_attention

__all__ = ["dot_product_attention"]

# jax.nn's implementation names -> this library's. "cudnn" asks for the GPU path, whose exact
# parts (short sequences, the causal base case) run on cuDNN where it can run them (bf16/fp16,
# no key mask) and the rest on the Pallas kernels.
_IMPLEMENTATIONS = {None: None, "xla": "xla", "cudnn": "pallas", "pallas": "pallas"}


def _implementation(implementation):
  if not isinstance(implementation, (str, type(None))) or implementation not in _IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {tuple(_IMPLEMENTATIONS)}, got "
                     f"{implementation!r}")
  if implementation == "cudnn" and jax.default_backend() != "gpu":
    raise ValueError("implementation='cudnn' needs a GPU (it selects the GPU kernels: cuDNN for "
                     "the exact parts, Pallas for the rest); use None or 'xla' on "
                     f"{jax.default_backend()}")
  return _IMPLEMENTATIONS[implementation]


def _refuse_unsupported(bias, local_window_size):
  """The jax.nn arguments HyperAttention cannot honour must be None."""
  if bias is not None:
    raise ValueError("bias must be None: HyperAttention never forms the dense [batch, heads, "
                     "q_seq, kv_seq] scores a bias is added to (express key padding with mask "
                     "or key_value_seq_lengths)")
  if local_window_size is not None:
    raise ValueError(f"local_window_size must be None, got {local_window_size!r}: "
                     "HyperAttention attends to every key, not to a window of keys "
                     "(HyperAttentionConfig.local_window adds an exact causal band to that)")


def _key_mask(mask, key_value_seq_lengths, dims: checks.Dims, is_causal: bool):
  """The ``[batch, kv_seq]`` key mask of ``mask`` AND ``key_value_seq_lengths`` (None: all keys)."""
  key_mask = None if mask is None else checks.key_mask_from_attention_mask(
      jnp.asarray(mask), dims.batch, dims.q_len, dims.kv_len, is_causal,
      causal_arg="is_causal=True")
  if key_value_seq_lengths is not None:
    by_length = checks.lengths_mask(key_value_seq_lengths, dims.batch, dims.kv_len,
                                    "key_value_seq_lengths", "kv_seq")
    key_mask = by_length if key_mask is None else key_mask & by_length
  return key_mask


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale: float | None = None,
                          is_causal: bool = False, query_seq_lengths=None,
                          key_value_seq_lengths=None, local_window_size=None,
                          implementation: str | None = None, rng,
                          config: HyperAttentionConfig | None = None):
  """HyperAttention with the signature and semantics of ``jax.nn.dot_product_attention``.

  Args:
    query: ``[batch, q_seq, heads, head_dim]`` (or ``[q_seq, heads, head_dim]``).
    key, value: ``[batch, kv_seq, kv_heads, head_dim]`` (or without the batch axis, as query);
      ``heads`` a multiple of ``kv_heads`` (GQA/MQA).
    bias: must be None: HyperAttention never forms the dense score matrix a bias is added to.
    mask: optional bool ``[batch|1, heads|1, q_seq|1, kv_seq]``, True = attend. Only key
      padding can be honoured: a mask with head and query axes of size 1, or a concrete mask
      equal to a key padding mask (AND the causal mask when ``is_causal``) on every query row
      it does not empty (such rows are unspecified: jax.nn gives the mean of all values there,
      this function attends to the valid keys). Combined with ``key_value_seq_lengths`` by AND.
    scale: logit scale, ``1/sqrt(head_dim)`` when None.
    is_causal: query ``i`` attends to keys ``j <= i``; needs ``q_seq == kv_seq``.
    query_seq_lengths: optional ``[batch]`` int in ``[0, q_seq]``: query rows at and beyond
      the length give zeros (as in jax.nn) and are zeroed before hashing, so they cannot move
      the real queries' LSH blocks.
    key_value_seq_lengths: optional ``[batch]`` int in ``[0, kv_seq]``: keys at and beyond the
      length get no weight. Out-of-range lengths (of either kind) are refused where concrete;
      traced ones act as if clamped.
    local_window_size: must be None: jax.nn restricts each query to a window of keys, which
      HyperAttention does not (``HyperAttentionConfig.local_window`` is different: an exact
      causal band added to the attention over every key).
    implementation: None (this library's default: the GPU kernels on GPU, else XLA), ``"xla"``,
      ``"cudnn"`` (the GPU kernels, cuDNN for the exact parts; GPU only) or ``"pallas"`` (the
      Pallas kernels; interpreted off the GPU, for tests).
    rng: a single ``jax.random`` key for the LSH hyperplanes and samples (same key, same result).
    config: :class:`HyperAttentionConfig`; None means ``HyperAttentionConfig()``, the paper's
      benchmark settings (block 256, 256 samples, 7 hyperplanes, ``min_seq_len`` 4096). Up to
      ``min_seq_len`` keys (causal: queries) attention is computed exactly, so short inputs give
      jax.nn's result (up to float rounding); beyond, the approximation.

  Returns:
    Like ``query``, in its dtype. Unlike jax.nn (which averages all values there), query rows
    without any valid key give zeros.
  """
  _refuse_unsupported(bias, local_window_size)
  implementation = _implementation(implementation)
  unbatched = getattr(query, "ndim", None) == 3
  if unbatched:
    query, key, value = (jnp.asarray(x)[None] for x in (query, key, value))
  dims = checks.check_qkv(query, key, value, causal=False)
  if is_causal and dims.q_len != dims.kv_len:
    raise ValueError(f"is_causal=True needs q_seq == kv_seq, got {dims.q_len} and {dims.kv_len}")
  key_mask = _key_mask(mask, key_value_seq_lengths, dims, bool(is_causal))
  query_rows = None
  if query_seq_lengths is not None:
    query_rows = checks.lengths_mask(query_seq_lengths, dims.batch, dims.q_len,
                                     "query_seq_lengths", "q_seq")[:, :, None, None]
    query = jnp.where(query_rows, query, jnp.zeros((), query.dtype))
  out = hyper_attention(query, key, value, rng=rng, causal=bool(is_causal), config=config,
                        scale=scale, key_mask=key_mask, implementation=implementation)
  if query_rows is not None:
    out = jnp.where(query_rows, out, jnp.zeros((), out.dtype))
  return out[0] if unbatched else out
