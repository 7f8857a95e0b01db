"""Flax (linen) integration: a self-attention module and an ``attention_fn`` drop-in.

Two ways to use HyperAttention in a flax model:

* :class:`HyperAttention` -- a multi-head self-attention layer (q/k/v/out projections, GQA,
  rotary embedding, key padding masks, ``mode="hyper"`` or ``"exact"`` with identical params);
* :func:`make_attention_fn` -- ``nn.MultiHeadDotProductAttention(..., attention_fn=fn)``.

Randomness: the LSH hyperplanes and samples come from the rng stream ``"hyper"`` when the caller
provides one (``model.apply(..., rngs={"hyper": key})``); otherwise from a fixed key derived from
the module's path, so evaluation is reproducible and two layers never share their draws.

Autoregressive decoding (``HyperAttention(..., decode=True)``, flax's ``cache`` collection
convention): a multi-token call is the prefill (the prompt's keys/values are written at positions
``0 .. seq-1`` and its outputs are computed with the configured ``mode``); a one-token call is a
decode step at position ``cache_index`` (exact attention over the filled cache positions).
The pure functions :func:`attention_core` and :func:`decode_attention` are shared with the flax
NNX layer (:mod:`hyperattn_jax.nnx`).
"""

from __future__ import annotations

import functools
import zlib
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hyperattn_jax import cudnn
from hyperattn_jax.checks import key_mask_from_attention_mask
from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.hyper import exact_attention, hyper_attention
from hyperattn_jax.rope import apply_rope

__all__ = ["HyperAttention", "make_attention_fn", "KVCache", "attention_core", "decode_attention",
           "flax_attention", "head_dims", "check_decode_args"]

MODES = ("hyper", "exact")


def module_rng(module: nn.Module | None, stream: str) -> jax.Array:
  """A key from ``module``'s rng ``stream`` if given, else a fixed key from its path."""
  if module is not None and module.scope is not None and module.has_rng(stream):
    return module.make_rng(stream)
  path = "/".join(module.scope.path) if module is not None and module.scope is not None else ""
  return jax.random.fold_in(jax.random.key(0), zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _calling_module() -> nn.Module | None:
  """The flax module whose method is running (flax passes ``module`` only when sowing)."""
  stack = getattr(getattr(nn.module, "_context", None), "module_stack", None)
  return stack[-1] if stack else None


def flax_attention(query, key, value, *, bias, mask, dropout_rate, deterministic, dtype,
                   precision, causal: bool, rng: Callable[[], jax.Array],
                   config: HyperAttentionConfig, implementation: str | None) -> jax.Array:
  """The body of the linen and NNX ``attention_fn`` drop-ins: checks flax's arguments, then
  HyperAttention of query ``[batch, q_len, heads, head_dim]`` over key/value ``[batch, kv_len,
  kv_heads, head_dim]``. ``rng`` is called for the key only once the arguments are accepted."""
  if bias is not None:
    raise ValueError("HyperAttention cannot add a dense attention bias (bias must be None)")
  if dropout_rate > 0.0 and not deterministic:
    raise ValueError(f"HyperAttention has no attention-probability dropout (got dropout_rate="
                     f"{dropout_rate} with deterministic=False); use dropout_rate=0")
  if precision is not None:
    raise ValueError(f"precision={precision!r} is not supported (accumulation is fp32)")
  if query.ndim != 4:
    raise ValueError(f"query must be [batch, q_len, heads, head_dim] (one batch axis), got "
                     f"shape {tuple(query.shape)}")
  if causal and query.shape[1] != key.shape[1]:
    raise ValueError(f"causal attention needs q_len == kv_len, got query {tuple(query.shape)} "
                     f"and key {tuple(key.shape)}; a decode step over a cache is not causal "
                     "(the cache mask already limits the keys): use causal=False there")
  if dtype is not None:
    query, key, value = (x.astype(dtype) for x in (query, key, value))
  key_mask = None if mask is None else key_mask_from_attention_mask(
      mask, query.shape[0], query.shape[1], key.shape[1], causal,
      causal_arg="make_attention_fn(causal=True)")
  return hyper_attention(query, key, value, rng=rng(), causal=causal, config=config,
                         key_mask=key_mask, implementation=implementation)


def make_attention_fn(config: HyperAttentionConfig | None = None, *, causal: bool = False,
                      implementation: str | None = None, rng_stream: str = "hyper") -> Callable:
  """An ``attention_fn`` for ``flax.linen.MultiHeadDotProductAttention`` using HyperAttention.

  Example::

    attn = nn.MultiHeadDotProductAttention(
        num_heads=8, attention_fn=make_attention_fn(HyperAttentionConfig(), causal=True))
    y = attn.apply(params, x, mask=key_padding[:, None, None, :], rngs={"hyper": key})

  The returned function takes query ``[batch, q_len, heads, head_dim]``, key/value
  ``[batch, kv_len, heads, head_dim]`` and flax's keyword arguments. Supported: ``mask`` as a
  key padding mask (see :func:`hyperattn_jax.checks.key_mask_from_attention_mask`), ``dtype``
  (computation dtype), ``deterministic``/``dropout_rate`` without dropout. Refused with a
  ValueError: a dense ``bias``, attention dropout (``dropout_rate > 0`` and not
  ``deterministic``), a custom ``precision`` or einsum override, inputs with more than one batch
  axis, and ``sow_weights=True`` (flax then passes ``module``: HyperAttention never forms the
  dense attention weights, so there are none to sow).
  """
  config = HyperAttentionConfig() if config is None else config
  if not isinstance(config, HyperAttentionConfig):
    raise TypeError(f"config must be a HyperAttentionConfig, got {type(config).__name__}")

  def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True,
                   dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
                   precision=None, module=None, force_fp32_for_softmax=False,
                   qk_attn_weights_einsum=None, attn_weights_value_einsum=None):
    del broadcast_dropout, dropout_rng, force_fp32_for_softmax  # softmax is always fp32
    if module is not None:  # flax passes the module only to sow the attention weights
      raise ValueError("sow_weights=True is not supported: HyperAttention never forms the dense "
                       "[batch, heads, q_len, kv_len] attention weights, so there are none to "
                       "sow; call the layer with sow_weights=False")
    if qk_attn_weights_einsum is not None or attn_weights_value_einsum is not None:
      raise ValueError("custom attention einsums are not supported by HyperAttention")
    return flax_attention(query, key, value, bias=bias, mask=mask, dropout_rate=dropout_rate,
                          deterministic=deterministic, dtype=dtype, precision=precision,
                          causal=causal, rng=lambda: module_rng(_calling_module(), rng_stream),
                          config=config, implementation=implementation)

  return attention_fn


def _exact(q, k, v, *, causal: bool, key_mask, implementation):
  """Exact attention: with the default implementation cuDNN where it can run (GPU, bf16/fp16,
  no key mask: ``cudnn.available``), else :func:`exact_attention`."""
  if implementation is None and cudnn.available(q, key_mask):
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
  return exact_attention(q, k, v, causal=causal, key_mask=key_mask,
                         implementation=implementation)


class KVCache(NamedTuple):
  """One layer's decode cache: the RoPE'd keys and values of the positions below ``index``."""
  key: jax.Array    # [batch, max_len, kv_heads, head_dim]
  value: jax.Array  # [batch, max_len, kv_heads, head_dim]
  index: jax.Array  # [] int32: the number of filled positions


def head_dims(features: int, num_heads: int, num_kv_heads: int | None, head_dim: int | None,
              mode: str, use_rope: bool) -> tuple[int, int]:
  """``(kv_heads, head_dim)`` of a layer on ``features``-wide inputs, or a ValueError."""
  kv_heads = num_heads if num_kv_heads is None else num_kv_heads
  if num_heads <= 0 or kv_heads <= 0 or num_heads % kv_heads:
    raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of "
                     f"num_kv_heads ({kv_heads})")
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if head_dim is None and features % num_heads:
    raise ValueError(f"features ({features}) must be divisible by num_heads ({num_heads}) "
                     "when head_dim is None")
  head_dim = head_dim or features // num_heads
  if use_rope and head_dim % 2:
    raise ValueError(f"use_rope needs an even head_dim, got {head_dim}")
  return kv_heads, head_dim


def check_decode_args(causal: bool, key_mask, positions) -> None:
  """The arguments a ``decode=True`` call refuses: the cache holds one causal sequence per
  batch row, filled from position 0 (positions come from ``cache_index``)."""
  if not causal:
    raise ValueError("decode=True needs causal=True (the cache is for autoregressive decoding)")
  if key_mask is not None:
    raise ValueError("key_mask is not supported with decode=True: the cache has no padding "
                     "mask (use prompts of one length per batch)")
  if positions is not None:
    raise ValueError("positions must be None with decode=True: they are the cache positions "
                     "(0 .. seq-1 in the prefill, cache_index in a decode step)")


def decode_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                     num_valid: jax.Array) -> jax.Array:
  """Exact attention of query ``[batch, q_len, heads, head_dim]`` over the first ``num_valid``
  (``[]`` int) positions of key/value ``[batch, max_len, kv_heads, head_dim]`` (a decode cache);
  every query sees the same keys. GQA as in :func:`hyper_attention` (query head ``kv * G + g``
  uses kv head ``kv``); fp32 scores and softmax; ``O(q_len * max_len)`` work."""
  batch, q_len, heads, head_dim = query.shape
  kv_heads = key.shape[2]
  q = query.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
  scores = jnp.einsum("bqkgh,bskh->bkgqs", q, key,
                      preferred_element_type=jnp.float32) / np.sqrt(head_dim)
  valid = jnp.arange(key.shape[1]) < num_valid                                   # [max_len]
  probs = jax.nn.softmax(jnp.where(valid, scores, -jnp.inf), axis=-1)
  out = jnp.einsum("bkgqs,bskh->bqkgh", probs, value.astype(jnp.float32))
  return out.reshape(query.shape).astype(query.dtype)


def attention_core(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, mode: str,
                   config: HyperAttentionConfig, implementation: str | None,
                   rng: jax.Array | None, key_mask: jax.Array | None = None,
                   positions: jax.Array | None = None, use_rope: bool = True,
                   rope_base: float = 10000.0, cache: KVCache | None = None):
  """The layers' computation between the projections: RoPE, padding, cache, attention.

  Args:
    q: projected queries ``[batch, seq, heads, head_dim]``.
    k, v: projected keys/values ``[batch, seq, kv_heads, head_dim]``.
    causal, mode, config, implementation, use_rope, rope_base: the layer's settings.
    rng: the key of the LSH/sampling draws (used where ``mode == "hyper"``).
    key_mask: ``[batch, seq]`` bool (False: padding) or None.
    positions: ``[batch, seq]`` int RoPE positions, None for ``arange(seq)``.
    cache: the decode cache (``check_decode_args`` holds for the other arguments): a
      multi-token input is a prefill, written at positions ``0 .. seq-1`` and attended with
      ``mode``; a one-token input is a decode step at position ``cache.index``, attended
      exactly over the cache positions ``<= cache.index``.

  Returns:
    ``(out [batch, seq, heads, head_dim], (q, k, v) as attended, the updated cache or None)``.
  """
  batch, seq = q.shape[:2]
  step = cache is not None and seq == 1
  start = cache.index if step else jnp.zeros((), jnp.int32)  # a prefill restarts at 0
  if cache is not None:
    max_len = cache.key.shape[1]
    if (cache.key.shape[0] != batch or cache.key.shape[2:] != k.shape[2:] or seq > max_len):
      raise ValueError(f"decode cache [batch, max_len, kv_heads, head_dim] = "
                       f"{tuple(cache.key.shape)} does not fit keys {tuple(k.shape)} (same "
                       "batch, heads and head_dim, seq <= max_len)")
  if use_rope:
    if positions is None:
      positions = jnp.broadcast_to(start + jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    q = apply_rope(q, positions, rope_base)
    k = apply_rope(k, positions, rope_base)
  if key_mask is not None:
    # Padded tokens' queries are zeroed: their rows are not used, and so the LSH sort of the
    # real queries (hence their outputs) cannot depend on what the padding holds.
    q = jnp.where(key_mask[:, :, None, None], q, jnp.zeros((), q.dtype))
  if cache is not None:
    at = (jnp.zeros((), jnp.int32), start, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
    cache = KVCache(lax.dynamic_update_slice(cache.key, k.astype(cache.key.dtype), at),
                    lax.dynamic_update_slice(cache.value, v.astype(cache.value.dtype), at),
                    (start + seq).astype(jnp.int32))
  if step:
    out = decode_attention(q, cache.key, cache.value, cache.index)
  elif mode == "hyper":
    out = hyper_attention(q, k, v, rng=rng, causal=causal, config=config, key_mask=key_mask,
                          implementation=implementation)
  else:
    out = _exact(q, k, v, causal=causal, key_mask=key_mask, implementation=implementation)
  return out, (q, k, v), cache


class HyperAttention(nn.Module):
  """Multi-head self-attention with HyperAttention: ``[batch, seq, features]`` in and out.

  Attributes:
    num_heads: query heads.
    num_kv_heads: key/value heads (GQA/MQA when smaller; must divide ``num_heads``); None means
      ``num_heads``.
    head_dim: per-head width; None means ``features // num_heads``.
    out_features: output width; None means the input's ``features``.
    causal: causal self-attention.
    mode: ``"hyper"`` (HyperAttention) or ``"exact"``; the parameters are identical in both
      modes, so a model trained with one can be evaluated with the other.
    config: :class:`HyperAttentionConfig`.
    implementation: None, ``"xla"`` or ``"pallas"`` (see :func:`hyper_attention`).
    use_rope, rope_base: rotary position embedding of q and k.
    use_bias: biases in the projections.
    dtype: computation dtype (None: from the inputs and params); param_dtype: parameters.
    rng_stream: name of the rng stream of the LSH/sampling randomness.
    decode: autoregressive decoding with a cache (``causal`` only). The cache variables
      ``cached_key``, ``cached_value`` ``[batch, max_len, kv_heads, head_dim]`` and
      ``cache_index`` (``[]`` int32) of the ``"cache"`` collection are created by a call
      without them (e.g. ``init`` on ``[batch, max_len, features]``, or ``jax.eval_shape`` of
      it), which computes plain attention. Then a call on ``[batch, seq > 1, features]`` is the
      prefill (the cache restarts: positions ``0 .. seq-1``, outputs with ``mode``) and one on
      ``[batch, 1, features]`` a decode step at position ``cache_index`` (exact attention over
      the cached positions); pass ``mutable=["cache"]``. A step at ``cache_index == max_len``
      has no room (the write would be clamped): size the cache for prompt + new tokens.
  """

  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  out_features: int | None = None
  causal: bool = True
  mode: str = "hyper"
  config: HyperAttentionConfig = HyperAttentionConfig()
  implementation: str | None = None
  use_rope: bool = True
  rope_base: float = 10000.0
  use_bias: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  rng_stream: str = "hyper"
  decode: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, key_mask: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    """x ``[batch, seq, features]``; key_mask ``[batch, seq]`` bool (False: padding);
    positions ``[batch, seq]`` int for RoPE (default ``arange(seq)``) -> ``[batch, seq,
    out_features]``. Outputs of real tokens do not depend on the content of padded tokens;
    rows with no valid key give zeros before the output projection."""
    if x.ndim != 3:
      raise ValueError(f"x must be [batch, seq, features], got shape {tuple(x.shape)}")
    batch, seq, features = x.shape
    kv_heads, head_dim = head_dims(features, self.num_heads, self.num_kv_heads, self.head_dim,
                                   self.mode, self.use_rope)
    if key_mask is not None and tuple(key_mask.shape) != (batch, seq):
      raise ValueError(f"key_mask must be [batch, seq] = {(batch, seq)}, got "
                       f"{tuple(key_mask.shape)}")
    if self.decode:
      check_decode_args(self.causal, key_mask, positions)
    dense = functools.partial(nn.DenseGeneral, axis=-1, use_bias=self.use_bias, dtype=self.dtype,
                              param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                              bias_init=self.bias_init)
    q = dense(features=(self.num_heads, head_dim), name="query")(x)
    k = dense(features=(kv_heads, head_dim), name="key")(x)
    v = dense(features=(kv_heads, head_dim), name="value")(x)
    cache = None
    if self.decode:
      # The call that creates the variables (their shape: this input's) attends without them.
      initialized = self.has_variable("cache", "cached_key")
      cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
      cache_index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
      if initialized:
        cache = KVCache(cached_key.value, cached_value.value, cache_index.value)
    rng = module_rng(self, self.rng_stream) if self.mode == "hyper" else None
    out, qkv, cache = attention_core(
        q, k, v, causal=self.causal, mode=self.mode, config=self.config,
        implementation=self.implementation, rng=rng, key_mask=key_mask, positions=positions,
        use_rope=self.use_rope, rope_base=self.rope_base, cache=cache)
    if cache is not None:
      cached_key.value, cached_value.value, cache_index.value = cache
    self.sow("intermediates", "qkv", qkv)
    return nn.DenseGeneral(features=self.out_features or features, axis=(-2, -1),
                           use_bias=self.use_bias, dtype=self.dtype,
                           param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                           bias_init=self.bias_init, name="out")(out)
