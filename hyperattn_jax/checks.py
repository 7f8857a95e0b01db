"""Argument checks at the public API boundary: clear errors naming the argument."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Dims", "check_qkv", "check_key_mask", "lengths_mask",
           "key_mask_from_attention_mask"]


class Dims(NamedTuple):
  batch: int
  q_len: int
  kv_len: int
  q_heads: int
  kv_heads: int
  head_dim: int

  @property
  def group(self) -> int:
    return self.q_heads // self.kv_heads


def check_qkv(q, k, v, causal: bool) -> Dims:
  """Checks ``q [B, Tq, Nq, H]``, ``k, v [B, Tkv, Nkv, H]`` and returns the dimensions."""
  for name, x in (("query", q), ("key", k), ("value", v)):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if x.ndim != 4:
      raise ValueError(f"{name} must have rank 4 [batch, seq, heads, head_dim], got shape "
                       f"{tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must have a floating dtype (float32, bfloat16, float16), "
                      f"got {x.dtype}")
  if not q.dtype == k.dtype == v.dtype:
    raise TypeError(f"query, key and value must share one dtype, got {q.dtype}, {k.dtype}, "
                    f"{v.dtype}")
  if k.shape != v.shape:
    raise ValueError(f"key and value must have the same shape [batch, kv_seq, kv_heads, "
                     f"head_dim], got {tuple(k.shape)} and {tuple(v.shape)}")
  b, tq, nq, h = q.shape
  _, tk, nkv, hk = k.shape
  if k.shape[0] != b:
    raise ValueError(f"key batch ({k.shape[0]}) must equal query batch ({b})")
  if hk != h:
    raise ValueError(f"key head_dim ({hk}) must equal query head_dim ({h})")
  if nq % nkv:
    raise ValueError(f"query heads ({nq}) must be divisible by key/value heads ({nkv}) "
                     "(grouped-query attention)")
  if min(b, tq, tk, nq, h) == 0:
    raise ValueError(f"query {tuple(q.shape)} and key {tuple(k.shape)} must have no empty axis")
  if causal and tq != tk:
    raise ValueError(f"causal=True needs query length == key length, got {tq} and {tk}")
  return Dims(b, tq, tk, nq, nkv, h)


def lengths_mask(lengths, batch: int, seq: int, name: str, seq_name: str) -> jax.Array:
  """``[batch, seq]`` bool, True before each row's length; ``lengths`` ``[batch]`` int.

  Concrete lengths must lie in ``[0, seq]``; traced ones (under jit) cannot be checked and act
  as if clamped to that range (below 0: no row; above: every row). ``name`` / ``seq_name``:
  the argument and its axis, for the errors.
  """
  lengths = jnp.asarray(lengths)
  if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"{name} must be an int array of shape [batch] = ({batch},), got "
                     f"{lengths.dtype}{tuple(lengths.shape)}")
  if not isinstance(lengths, jax.core.Tracer):
    values = np.asarray(lengths)
    if values.min() < 0 or values.max() > seq:
      raise ValueError(f"{name} must lie in [0, {seq_name}] = [0, {seq}], got {values.tolist()}")
  return jnp.arange(seq)[None, :] < lengths[:, None]


def check_key_mask(key_mask, key_value_seq_lengths, dims: Dims) -> jax.Array | None:
  """Returns a ``[batch, kv_seq]`` bool mask (True = attend) or None for 'all keys valid'
  (``key_value_seq_lengths``: see :func:`lengths_mask`)."""
  if key_mask is not None and key_value_seq_lengths is not None:
    raise ValueError("pass at most one of key_mask and key_value_seq_lengths")
  if key_value_seq_lengths is not None:
    return lengths_mask(key_value_seq_lengths, dims.batch, dims.kv_len, "key_value_seq_lengths",
                        "kv_seq")
  if key_mask is None:
    return None
  key_mask = jnp.asarray(key_mask)
  if key_mask.shape != (dims.batch, dims.kv_len) or key_mask.dtype != jnp.bool_:
    raise ValueError(f"key_mask must be a bool array of shape [batch, kv_seq] = "
                     f"({dims.batch}, {dims.kv_len}), got {key_mask.dtype}{tuple(key_mask.shape)}")
  return key_mask


def check_scale(scale, head_dim: int) -> float:
  if scale is None:
    return float(1.0 / np.sqrt(head_dim))
  if isinstance(scale, jax.core.Tracer) or not np.isscalar(scale) or not np.isfinite(scale):
    raise ValueError(f"scale must be a finite Python float or None, got {scale!r}")
  return float(scale)


def check_rng(rng) -> None:
  if rng is None:
    raise ValueError("rng must be a jax.random key (jax.random.key(0) or PRNGKey(0)); the LSH "
                     "projections and the samples are drawn from it")
  rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
  typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
  if not typed and rng.dtype != jnp.uint32:
    raise TypeError(f"rng must be a single jax.random key, got {rng.dtype}{tuple(rng.shape)}")
  # One key: a typed key has shape (), a raw uint32 key (jax.random.PRNGKey) shape (2,). A typed
  # key array of shape (2,) is a split pair, not one raw key.
  if rng.shape != (() if typed else (2,)):
    kind = "typed key array" if typed else "raw uint32 key array"
    raise ValueError(f"rng must be a single jax.random key (a typed key of shape () or a raw "
                     f"uint32 key of shape (2,)), got a {kind} of shape {tuple(rng.shape)}; "
                     "pass one of them (e.g. keys[0]) or jax.vmap over the keys")


def key_mask_from_attention_mask(mask, batch: int, q_len: int, kv_len: int, causal: bool, *,
                                 causal_arg: str) -> jax.Array:
  """``[batch, kv_len]`` key mask equivalent to a ``[batch|1, heads|1, q_len|1, kv_len]`` bool
  attention mask (flax's and ``jax.nn.dot_product_attention``'s), or a ValueError.

  HyperAttention supports key padding (and causal masking through the caller's causal flag,
  ``causal_arg``, named in the errors), not arbitrary masks. A mask with head and query axes of
  size 1 is a key mask. A concrete mask of another shape is accepted when it equals (key mask)
  [AND (causal lower triangle)] on the query rows it does not empty; a traced one cannot be
  checked and is refused.
  """
  if (not hasattr(mask, "shape") or mask.ndim != 4 or mask.shape[0] not in (1, batch) or
      mask.shape[2] not in (1, q_len) or mask.shape[-1] != kv_len):
    raise ValueError(f"mask must be [batch, heads|1, q_len|1, kv_len] = [{batch}, ., ., {kv_len}]"
                     f", got shape {tuple(getattr(mask, 'shape', ()))}")
  mask = mask.astype(bool)
  if mask.shape[1] == 1 and mask.shape[2] == 1:
    return jnp.broadcast_to(mask[:, 0, 0, :], (batch, kv_len))
  try:
    m = np.asarray(mask)
  except jax.errors.TracerArrayConversionError:
    raise ValueError(
        f"mask of shape {tuple(mask.shape)} is traced and may depend on the head or query; "
        "HyperAttention supports key padding only: pass a [batch, 1, 1, kv_len] mask (e.g. "
        f"mask[:, :1, :1, :] of a padding mask) and express causal masking with {causal_arg}"
    ) from None
  m = np.broadcast_to(m, m.shape[:2] + (q_len, kv_len))
  keys = m.any(axis=(1, 2))                                                   # [b|1, kv]
  expected = np.broadcast_to(keys[:, None, None, :], m.shape)
  if causal:
    expected = expected & np.tril(np.ones((q_len, kv_len), bool))
  # Rows the mask empties entirely (padded queries) are unconstrained: flax returns an
  # arbitrary average there, HyperAttention attends to the valid keys.
  if not np.array_equal(m, expected & m.any(axis=-1, keepdims=True)):
    raise ValueError(
        "mask is not a key padding mask" + (" combined with the causal mask" if causal else "") +
        ": HyperAttention cannot apply arbitrary masks; pass a [batch, 1, 1, kv_len] key mask "
        f"and express causal masking with {causal_arg}")
  return jnp.broadcast_to(jnp.asarray(keys), (batch, kv_len))
