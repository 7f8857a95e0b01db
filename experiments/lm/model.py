"""Decoder-only Transformer (RMSNorm, RoPE, SwiGLU, GQA) with per-layer exact/hyper attention.

The parameters do not depend on which layers use HyperAttention, so a checkpoint trained with
exact attention can be evaluated with any number of its last layers switched to HyperAttention
(the paper's patching experiment) and vice versa; with ``scan_layers`` (stacked parameters),
in the modes that keep the layers after the first alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from hyperattn_jax import HyperAttention, HyperAttentionConfig

__all__ = ["TransformerConfig", "Transformer", "attention_modes", "scannable", "per_layer",
           "stack_layers", "with_scanned_layers", "loss_fn"]


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Model hyper-parameters.

  ``attention`` is the mode of the last ``hyper_last_layers`` layers (all layers when it is
  negative); the layers before them use exact attention.

  ``scan_layers``: the layers after the first run as one ``nn.scan`` (one compiled layer
  instead of one per layer: a deep model's compile time); their parameters, cache and
  intermediates are stacked under ``layers`` with a leading axis of ``num_layers - 1``
  (:func:`per_layer` splits them). Those layers must share one attention mode, e.g.
  HyperAttention in all layers but the first.
  """
  vocab_size: int
  num_layers: int = 4
  d_model: int = 256
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 64
  mlp_dim: int = 1024
  attention: str = "exact"
  hyper_last_layers: int = -1
  hyper: HyperAttentionConfig = HyperAttentionConfig()
  implementation: str | None = None
  rope_base: float = 10000.0
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32
  scan_layers: bool = False

  def __post_init__(self):
    modes = attention_modes(self)
    if self.scan_layers and not scannable(modes):
      raise ValueError(f"TransformerConfig.scan_layers needs the layers after the first to share "
                       f"one attention mode, got {modes} (attention={self.attention!r}, "
                       f"hyper_last_layers={self.hyper_last_layers})")


def attention_modes(cfg: TransformerConfig) -> tuple[str, ...]:
  """Per-layer attention mode (``"exact"`` or ``"hyper"``)."""
  patched = cfg.num_layers if cfg.hyper_last_layers < 0 else cfg.hyper_last_layers
  first_hyper = cfg.num_layers - min(patched, cfg.num_layers)
  return tuple("hyper" if cfg.attention == "hyper" and i >= first_hyper else "exact"
               for i in range(cfg.num_layers))


def scannable(modes: tuple[str, ...]) -> bool:
  """Whether layers of these modes can run with ``scan_layers``: those after the first share
  one mode (one scanned body)."""
  return len(set(modes[1:])) <= 1


class SwiGLU(nn.Module):
  """``[batch, seq, d_model]`` -> same: ``W_out (silu(W_gate x) * W_up x)``."""
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x):
    dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=self.cfg.dtype,
                                     param_dtype=self.cfg.param_dtype, name=name)
    h = nn.silu(dense(self.cfg.mlp_dim, "gate")(x)) * dense(self.cfg.mlp_dim, "up")(x)
    return dense(x.shape[-1], "down")(h)


class Block(nn.Module):
  """Pre-norm residual block: attention then SwiGLU (``decode``: see ``Transformer``)."""
  cfg: TransformerConfig
  mode: str
  decode: bool = False

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    norm = lambda name: nn.RMSNorm(dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)
    x = x + HyperAttention(num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                           head_dim=cfg.head_dim, causal=True, mode=self.mode, config=cfg.hyper,
                           implementation=cfg.implementation, rope_base=cfg.rope_base,
                           dtype=cfg.dtype, param_dtype=cfg.param_dtype, decode=self.decode,
                           name="attention")(norm("attn_norm")(x))
    return x + SwiGLU(cfg, name="mlp")(norm("mlp_norm")(x))


class _ScanBody(nn.Module):
  """One :class:`Block` as ``nn.scan``'s body: ``(x, None) -> (x, None)``."""
  cfg: TransformerConfig
  mode: str
  decode: bool = False

  @nn.compact
  def __call__(self, x, _):
    return Block(self.cfg, self.mode, self.decode, name="block")(x), None


def per_layer(tree: dict) -> dict:
  """A Transformer's params, cache or intermediates as ``{"layer_i": subtree}`` for every layer
  (``scan_layers``' stacked ``layers`` split along their leading axis)."""
  out = {name: sub for name, sub in tree.items() if name.startswith("layer_")}
  if "layers" in tree:
    stacked = tree["layers"]["block"]
    for i in range(jax.tree.leaves(stacked)[0].shape[0]):
      out[f"layer_{i + 1}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return out


def stack_layers(params: dict) -> dict:
  """An unrolled Transformer's params (``layer_0`` .. ``layer_{L-1}``) in the structure of
  ``scan_layers`` (``layer_1`` on stacked under ``layers``); the inverse of :func:`per_layer`."""
  names = sorted((name for name in params if name.startswith("layer_")),
                 key=lambda name: int(name.split("_")[-1]))
  if len(names) < 2 or "layers" in params:
    raise ValueError(f"params: expected an unrolled model of >= 2 layers (layer_0, layer_1, "
                     f"...), got {sorted(params)}")
  rest = {name: sub for name, sub in params.items() if name not in names[1:]}
  return {**rest, "layers": {"block": jax.tree.map(lambda *x: jnp.stack(x),
                                                   *(params[name] for name in names[1:]))}}


def with_scanned_layers(params: dict, cfg: TransformerConfig) -> tuple[dict, TransformerConfig]:
  """``(params, cfg)`` with ``scan_layers`` on: an unrolled model's params stacked
  (:func:`stack_layers`); a scanned or one-layer model as it is."""
  if cfg.scan_layers or cfg.num_layers < 2:
    return params, cfg
  return stack_layers(params), dataclasses.replace(cfg, scan_layers=True)


class Transformer(nn.Module):
  """tokens ``[batch, seq]`` int -> logits ``[batch, seq, vocab_size]`` float32.

  ``decode=True``: autoregressive decoding with each attention layer's KV cache (the ``"cache"``
  collection; see ``HyperAttention.decode``): a call creating the cache on ``[batch,
  max_len]`` tokens, then the prompt (prefill), then one token per call.
  """
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, tokens, decode: bool = False):
    cfg = self.cfg
    x = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                 name="embed")(tokens)
    modes = attention_modes(cfg)
    if cfg.scan_layers and cfg.num_layers > 1:
      x = Block(cfg, modes[0], decode, name="layer_0")(x)
      layers = nn.scan(_ScanBody, variable_axes={"params": 0, "cache": 0, "intermediates": 0},
                       split_rngs={"params": True, "hyper": True}, length=cfg.num_layers - 1)
      x, _ = layers(cfg, modes[1], decode, name="layers")(x, None)
    else:
      for i, mode in enumerate(modes):
        x = Block(cfg, mode, decode, name=f"layer_{i}")(x)
    x = nn.RMSNorm(dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="final_norm")(x)
    logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.dtype,
                      param_dtype=cfg.param_dtype, name="lm_head")(x)
    return logits.astype(jnp.float32)


def loss_fn(params, model: Transformer, tokens: jax.Array, rng: jax.Array,
            answer_mask: jax.Array | None = None, answer_weight: float = 1.0):
  """Next-token cross-entropy (nats) of ``tokens [b, seq + 1]`` and its parts.

  The loss is the weighted mean over targets: weight ``answer_weight`` where ``answer_mask
  [b, seq]`` marks an answer token of a retrieval probe, 1 elsewhere. Returns ``(loss, aux)``
  with ``aux``: ``text_loss`` (mean over the other targets), ``answer_correct`` and
  ``answer_tokens`` (argmax hits and count over the answer targets).
  """
  logits = model.apply({"params": params}, tokens[:, :-1], rngs={"hyper": rng})
  targets = tokens[:, 1:]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  if answer_mask is None:
    answer_mask = jnp.zeros(targets.shape, bool)
  weights = jnp.where(answer_mask, answer_weight, 1.0)
  text = (~answer_mask).astype(jnp.float32)
  hits = (jnp.argmax(logits, -1) == targets) & answer_mask
  aux = {"text_loss": (ce * text).sum() / jnp.maximum(text.sum(), 1.0),
         "answer_correct": hits.sum(), "answer_tokens": answer_mask.sum()}
  return (ce * weights).sum() / weights.sum(), aux
