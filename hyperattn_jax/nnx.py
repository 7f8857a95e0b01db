"""Flax NNX integration: a self-attention module and an ``attention_fn`` drop-in.

The NNX counterparts of :mod:`hyperattn_jax.layers` (same computation: both call
:func:`hyperattn_jax.layers.attention_core` between their projections):

* :class:`HyperAttention` -- multi-head self-attention (q/k/v/out projections, GQA, RoPE, key
  padding, ``mode="hyper"`` or ``"exact"`` with identical params, a decode cache);
* :func:`make_attention_fn` -- ``nnx.MultiHeadAttention(..., attention_fn=fn)``.

Randomness of :class:`HyperAttention`: a key from the ``rngs`` given to the call, else from the
``"hyper"`` stream of the ``nnx.Rngs`` given to the constructor (a fresh key per call), else a
fixed key drawn at construction (after the parameters) from its ``params`` stream: reproducible,
and different for two layers built from one ``Rngs``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.layers import (KVCache, attention_core, check_decode_args, flax_attention,
                                  head_dims)

__all__ = ["HyperAttention", "make_attention_fn"]


def _key_from(rngs) -> jax.Array:
  """A key from ``rngs``: an ``nnx.Rngs`` (its ``"hyper"`` stream), an ``nnx.RngStream`` or a
  ``jax.random`` key."""
  if isinstance(rngs, nnx.Rngs):
    return rngs["hyper"]()
  if isinstance(rngs, nnx.RngStream):
    return rngs()
  return rngs


class HyperAttention(nnx.Module):
  """Multi-head self-attention with HyperAttention: ``[batch, seq, in_features]`` in,
  ``[batch, seq, out_features]`` out.

  Args:
    num_heads: query heads.
    in_features: input width.
    num_kv_heads: key/value heads (GQA/MQA when smaller; must divide ``num_heads``); None means
      ``num_heads``.
    head_dim: per-head width; None means ``in_features // num_heads``.
    out_features: output width; None means ``in_features``.
    causal: causal self-attention.
    mode: ``"hyper"`` (HyperAttention) or ``"exact"``; identical parameters in both modes.
    config: :class:`HyperAttentionConfig`.
    implementation: None, ``"xla"`` or ``"pallas"`` (see :func:`hyper_attention`).
    use_rope, rope_base: rotary position embedding of q and k.
    use_bias: biases in the projections.
    dtype: computation dtype (None: from the inputs and params); param_dtype: parameters.
    kernel_init, bias_init: initialisers of the projections.
    decode: the default of ``__call__``'s ``decode``.
    rngs: ``params`` initialise the projections (in the order query, key, value, out, as
      ``nnx.MultiHeadAttention``); a ``"hyper"`` stream, if present, is kept for the draws.

  Decoding (``causal`` only): ``init_cache((batch, max_len, in_features), dtype)`` creates the
  ``nnx.Cache`` variables ``cached_key``, ``cached_value`` ``[batch, max_len, kv_heads,
  head_dim]`` and ``cache_index``; then a ``decode=True`` call on ``[batch, seq > 1, ...]`` is
  the prefill (the cache restarts at position 0, outputs with ``mode``) and one on ``[batch, 1,
  ...]`` a decode step at position ``cache_index`` (exact attention over the cached positions).
  """

  def __init__(self, num_heads: int, in_features: int, *, num_kv_heads: int | None = None,
               head_dim: int | None = None, out_features: int | None = None,
               causal: bool = True, mode: str = "hyper",
               config: HyperAttentionConfig = HyperAttentionConfig(),
               implementation: str | None = None, use_rope: bool = True,
               rope_base: float = 10000.0, use_bias: bool = False, dtype: Any = None,
               param_dtype: Any = jnp.float32,
               kernel_init: Callable = nnx.initializers.lecun_normal(),
               bias_init: Callable = nnx.initializers.zeros_init(), decode: bool = False,
               rngs: nnx.Rngs):
    if not isinstance(config, HyperAttentionConfig):
      raise TypeError(f"config must be a HyperAttentionConfig, got {type(config).__name__}")
    self.num_heads = num_heads
    self.num_kv_heads, self.head_dim = head_dims(in_features, num_heads, num_kv_heads, head_dim,
                                                 mode, use_rope)
    self.in_features = in_features
    self.out_features = out_features or in_features
    self.causal, self.mode, self.config = causal, mode, config
    self.implementation, self.use_rope, self.rope_base = implementation, use_rope, rope_base
    self.decode = decode
    linear = functools.partial(nnx.LinearGeneral, use_bias=use_bias, dtype=dtype,
                               param_dtype=param_dtype, kernel_init=kernel_init,
                               bias_init=bias_init, rngs=rngs)
    self.query = linear(in_features, (num_heads, self.head_dim))
    self.key = linear(in_features, (self.num_kv_heads, self.head_dim))
    self.value = linear(in_features, (self.num_kv_heads, self.head_dim))
    self.out = linear((num_heads, self.head_dim), self.out_features, axis=(-2, -1))
    self.hyper_rngs = rngs["hyper"].fork() if "hyper" in rngs else nnx.data(None)
    self.default_key = nnx.data(rngs.params())
    self.cached_key: nnx.Cache | None = nnx.data(None)
    self.cached_value: nnx.Cache | None = nnx.data(None)
    self.cache_index: nnx.Cache | None = nnx.data(None)

  def init_cache(self, input_shape: tuple[int, ...], dtype: Any = jnp.float32) -> None:
    """Zero decode cache for inputs ``[batch, max_len, in_features]`` (``input_shape``);
    ``dtype``: that of the keys/values (the computation dtype)."""
    if len(input_shape) != 3:
      raise ValueError(f"input_shape must be (batch, max_len, in_features), got {input_shape}")
    shape = (*input_shape[:2], self.num_kv_heads, self.head_dim)
    self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
    self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
    self.cache_index = nnx.Cache(jnp.zeros((), jnp.int32))

  def __call__(self, x: jax.Array, *, key_mask: jax.Array | None = None,
               positions: jax.Array | None = None, decode: bool | None = None,
               rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None) -> jax.Array:
    """x ``[batch, seq, in_features]``; key_mask ``[batch, seq]`` bool (False: padding);
    positions ``[batch, seq]`` int for RoPE (default ``arange(seq)``); decode: use the cache
    (None: the constructor's); rngs: the draws' key source for this call -> ``[batch, seq,
    out_features]``. Outputs of real tokens do not depend on the content of padded tokens."""
    if x.ndim != 3 or x.shape[-1] != self.in_features:
      raise ValueError(f"x must be [batch, seq, in_features={self.in_features}], got shape "
                       f"{tuple(x.shape)}")
    batch, seq, _ = x.shape
    if key_mask is not None and tuple(key_mask.shape) != (batch, seq):
      raise ValueError(f"key_mask must be [batch, seq] = {(batch, seq)}, got "
                       f"{tuple(key_mask.shape)}")
    decode = self.decode if decode is None else decode
    cache = None
    if decode:
      check_decode_args(self.causal, key_mask, positions)
      if self.cached_key is None:
        raise ValueError("decode=True needs a cache: call init_cache(input_shape, dtype) first")
      cache = KVCache(self.cached_key[...], self.cached_value[...], self.cache_index[...])
    rng = None
    if self.mode == "hyper":
      source = next(r for r in (rngs, self.hyper_rngs, self.default_key) if r is not None)
      rng = _key_from(source)
    out, _, cache = attention_core(
        self.query(x), self.key(x), self.value(x), causal=self.causal, mode=self.mode,
        config=self.config, implementation=self.implementation, rng=rng, key_mask=key_mask,
        positions=positions, use_rope=self.use_rope, rope_base=self.rope_base, cache=cache)
    if decode:
      self.cached_key[...], self.cached_value[...], self.cache_index[...] = cache
    return self.out(out)


def make_attention_fn(config: HyperAttentionConfig | None = None, *, causal: bool = False,
                      implementation: str | None = None,
                      rng: jax.Array | None = None) -> Callable:
  """An ``attention_fn`` for ``flax.nnx.MultiHeadAttention`` using HyperAttention.

  Example::

    attn = nnx.MultiHeadAttention(num_heads=8, in_features=512, decode=False,
                                  attention_fn=make_attention_fn(HyperAttentionConfig(),
                                                                 causal=True),
                                  rngs=nnx.Rngs(0))
    y = attn(x, mask=key_padding[:, None, None, :])

  The returned function takes query ``[batch, q_len, heads, head_dim]``, key/value ``[batch,
  kv_len, kv_heads, head_dim]`` and the keywords ``nnx.MultiHeadAttention`` passes: ``mask``
  as a key padding mask (see :func:`hyperattn_jax.checks.key_mask_from_attention_mask`), ``dtype``,
  ``is_causal`` (causal where it or ``causal`` is set), ``deterministic``/``dropout_rate``
  without dropout (``dropout_rng`` and ``broadcast_dropout`` are then unused). Refused with a
  ValueError: a ``bias``, attention dropout (``dropout_rate > 0`` and not ``deterministic``), a
  ``precision``, ``sow_weights=True`` (``module`` given: no attention matrix exists).

  The draws come from ``rng`` (default ``jax.random.key(0)``), the same at every call: the
  function has no state. For fresh draws per step use :class:`HyperAttention`, which takes an
  ``nnx.Rngs`` stream. In ``nnx.MultiHeadAttention``'s ``decode=True`` the one query is not
  causal over the cache (its mask limits the keys); keep ``causal=False`` there, and note that
  the cache longer than ``config.min_seq_len`` is then attended approximately.
  """
  config = HyperAttentionConfig() if config is None else config
  if not isinstance(config, HyperAttentionConfig):
    raise TypeError(f"config must be a HyperAttentionConfig, got {type(config).__name__}")

  def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True,
                   dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
                   precision=None, module=None, is_causal=False):
    del broadcast_dropout, dropout_rng  # no dropout: refused below where it would apply
    if module is not None:
      raise ValueError("sow_weights=True is not supported: HyperAttention never forms the "
                       "attention weights")
    return flax_attention(query, key, value, bias=bias, mask=mask, dropout_rate=dropout_rate,
                          deterministic=deterministic, dtype=dtype, precision=precision,
                          causal=causal or is_causal,
                          rng=lambda: jax.random.key(0) if rng is None else rng,
                          config=config, implementation=implementation)

  return attention_fn
