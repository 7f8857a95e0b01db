"""Flax (linen) integration: a self-attention module and an ``attention_fn`` drop-in.

Two ways to use HyperAttention in a flax model:

* :class:`HyperAttention` -- a multi-head self-attention layer (q/k/v/out projections, GQA,
  rotary embedding, key padding masks, ``mode="hyper"`` or ``"exact"`` with identical params);
* :func:`make_attention_fn` -- ``nn.MultiHeadDotProductAttention(..., attention_fn=fn)``.

Randomness: the LSH hyperplanes and samples come from the rng stream ``"hyper"`` when the caller
provides one (``model.apply(..., rngs={"hyper": key})``); otherwise from a fixed key derived from
the module's path, so evaluation is reproducible and two layers never share their draws.
"""

from __future__ import annotations

import functools
import zlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from hyperattn_jax.checks import key_mask_from_attention_mask
from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.hyper import exact_attention, hyper_attention
from hyperattn_jax.rope import apply_rope

__all__ = ["HyperAttention", "make_attention_fn"]

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
  (computation dtype), ``deterministic``/``dropout_rate`` without dropout. Refused with a ValueError: a dense
  ``bias``, attention dropout (``dropout_rate > 0`` and not ``deterministic``), a custom
  ``precision`` or einsum override, inputs with more than one batch axis, and
  ``sow_weights=True`` (flax then passes ``module``: HyperAttention never forms the dense
  attention weights, so there are none to sow).
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
    if bias is not None:
      raise ValueError("HyperAttention cannot add a dense attention bias (bias must be None)")
    if dropout_rate > 0.0 and not deterministic:
      raise ValueError(f"HyperAttention has no attention-probability dropout (got dropout_rate="
                       f"{dropout_rate} with deterministic=False); use dropout_rate=0")
    if precision is not None:
      raise ValueError(f"precision={precision!r} is not supported (accumulation is fp32)")
    if qk_attn_weights_einsum is not None or attn_weights_value_einsum is not None:
      raise ValueError("custom attention einsums are not supported by HyperAttention")
    if query.ndim != 4:
      raise ValueError(f"query must be [batch, q_len, heads, head_dim] (one batch axis), got "
                       f"shape {tuple(query.shape)}")
    if dtype is not None:
      query, key, value = (x.astype(dtype) for x in (query, key, value))
    key_mask = None if mask is None else key_mask_from_attention_mask(
        mask, query.shape[0], query.shape[1], key.shape[1], causal,
        causal_arg="make_attention_fn(causal=True)")
    return hyper_attention(query, key, value, rng=module_rng(_calling_module(), rng_stream),
                           causal=causal, config=config, key_mask=key_mask,
                           implementation=implementation)

  return attention_fn


def _exact(q, k, v, *, causal: bool, key_mask, implementation):
  """Exact attention: cuDNN on GPU for bf16/fp16 without masks, else the chunked kernel."""
  if (implementation is None and key_mask is None and jax.default_backend() == "gpu" and
      q.dtype in (jnp.bfloat16, jnp.float16)):
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
  return exact_attention(q, k, v, causal=causal, key_mask=key_mask,
                         implementation=implementation)


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

  def _dims(self, features: int) -> tuple[int, int]:
    kv_heads = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
    if self.num_heads <= 0 or kv_heads <= 0 or self.num_heads % kv_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be a positive multiple of "
                       f"num_kv_heads ({kv_heads})")
    if self.mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
    if self.head_dim is None and features % self.num_heads:
      raise ValueError(f"features ({features}) must be divisible by num_heads "
                       f"({self.num_heads}) when head_dim is None")
    head_dim = self.head_dim or features // self.num_heads
    if self.use_rope and head_dim % 2:
      raise ValueError(f"use_rope needs an even head_dim, got {head_dim}")
    return kv_heads, head_dim

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
    kv_heads, head_dim = self._dims(features)
    if key_mask is not None and tuple(key_mask.shape) != (batch, seq):
      raise ValueError(f"key_mask must be [batch, seq] = {(batch, seq)}, got "
                       f"{tuple(key_mask.shape)}")
    dense = functools.partial(nn.DenseGeneral, axis=-1, use_bias=self.use_bias, dtype=self.dtype,
                              param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                              bias_init=self.bias_init)
    q = dense(features=(self.num_heads, head_dim), name="query")(x)
    k = dense(features=(kv_heads, head_dim), name="key")(x)
    v = dense(features=(kv_heads, head_dim), name="value")(x)
    if self.use_rope:
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
      q = apply_rope(q, positions, self.rope_base)
      k = apply_rope(k, positions, self.rope_base)
    if key_mask is not None:
      # Padded tokens' queries are zeroed: their rows are not used, and so the LSH sort of the
      # real queries (hence their outputs) cannot depend on what the padding holds.
      q = jnp.where(key_mask[:, :, None, None], q, jnp.zeros((), q.dtype))
    self.sow("intermediates", "qkv", (q, k, v))
    if self.mode == "hyper":
      out = hyper_attention(q, k, v, rng=module_rng(self, self.rng_stream), causal=self.causal,
                            config=self.config, key_mask=key_mask,
                            implementation=self.implementation)
    else:
      out = _exact(q, k, v, causal=self.causal, key_mask=key_mask,
                   implementation=self.implementation)
    return nn.DenseGeneral(features=self.out_features or features, axis=(-2, -1),
                           use_bias=self.use_bias, dtype=self.dtype,
                           param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                           bias_init=self.bias_init, name="out")(out)
