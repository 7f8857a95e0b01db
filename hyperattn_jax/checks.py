"""Argument checks at the public API boundary: clear errors naming the argument."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Dims", "check_qkv", "check_key_mask", "check_implementation"]

IMPLEMENTATIONS = (None, "xla", "pallas")


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


def check_key_mask(key_mask, key_value_seq_lengths, dims: Dims) -> jax.Array | None:
  """Returns a ``[batch, kv_seq]`` bool mask (True = attend) or None for 'all keys valid'.

  Concrete ``key_value_seq_lengths`` must lie in ``[0, kv_seq]``; traced ones (under jit)
  cannot be checked and act as if clamped to that range (below 0: no key; above: every key).
  """
  if key_mask is not None and key_value_seq_lengths is not None:
    raise ValueError("pass at most one of key_mask and key_value_seq_lengths")
  if key_value_seq_lengths is not None:
    lengths = jnp.asarray(key_value_seq_lengths)
    if lengths.shape != (dims.batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
      raise ValueError(f"key_value_seq_lengths must be an int array of shape [batch] = "
                       f"({dims.batch},), got {lengths.dtype}{tuple(lengths.shape)}")
    if not isinstance(lengths, jax.core.Tracer):
      values = np.asarray(lengths)
      if values.min() < 0 or values.max() > dims.kv_len:
        raise ValueError(f"key_value_seq_lengths must lie in [0, kv_seq] = [0, {dims.kv_len}], "
                         f"got {values.tolist()}")
    return jnp.arange(dims.kv_len)[None, :] < lengths[:, None]
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


def check_implementation(implementation) -> None:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")


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
