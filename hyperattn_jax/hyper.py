"""HyperAttention (Han et al., ICLR 2024) and exact attention: the public functions.

Public layout ``[batch, seq, heads, head_dim]`` (as ``jax.nn.dot_product_attention``) from end
to end: the sort order is carried as permutations (local row indices), never as sorted copies
of q/k/v; GQA without repeating K/V (query head ``kv * G + g`` uses kv head ``kv``).

The algorithm's stages, one file each:

Non-causal (``noncausal.py``):
  0+1. the plan (``plan.py``: pytrees, one builder): the LSH hyperplanes and the samples drawn
     from ``rng`` (``sampling.py``: uniform or ``|v|^2``, ApproxD's rows); sortLSH: hash q and
     k (``lsh.py``: angular LSH, Gray rank of the bucket) and stable-sort both (``sorting.py``,
     invalid keys last): the permutations ``q_perm [B, Nkv, G, rows]``, ``k_perm [B, Nkv,
     keys]``; the ``select_blocks`` option's keys (``selection.py``);
  2+3. the blocked stage (``blocked.py``): the i-th sorted query block attends to the i-th
     sorted key block and to the shared samples (reweighted, own-block samples masked), in one
     softmax, reading rows by index (XLA there, ``pallas_kernels`` on GPU); the ``"approx_d"``
     normaliser (``approx_d.py``);
  4. the outputs are written back to the unsorted rows by the same index.
Causal (``causal.py``): every query and key is hashed once; first, exact causal attention on
the ``2**L`` diagonal base blocks (``exact.py``: cuDNN on GPU where it can run it, else the
Pallas/XLA flash loops) starts the running (out, lse); then for each recursion level ``d`` the
``2**d`` lower-left quadrants at once, batched (row windows of the folded views of the same
arrays, ``folding.py``), through the non-causal stages, merged into the running (out, lse) by
log-sum-exp (``merge.py``; in place, inside the Pallas kernel). One custom VJP covers the whole
recursion: every part's backward starts from the final (out, lse) and adds into one dq/dk/dv.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hyperattn_jax import backends
from hyperattn_jax import checks
from hyperattn_jax.causal import hyper_causal
from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.exact import flash_attention
from hyperattn_jax.noncausal import hyper_noncausal

__all__ = ["hyper_attention", "exact_attention"]


def _zero_masked_keys(k, v, key_mask):
  """k, v ``[B, Tk, Nkv, H]`` with the masked keys' rows (key_mask ``[B, Tk]`` False) zeroed: a
  masked key's value is multiplied by its zero probability, and ``0 * NaN`` is NaN, so NaN
  padding would otherwise reach every output of its key block. Masked keys get no gradient
  either way."""
  if key_mask is None:
    return k, v
  keep = key_mask[:, :, None, None]
  return jnp.where(keep, k, jnp.zeros((), k.dtype)), jnp.where(keep, v, jnp.zeros((), v.dtype))


@functools.partial(jax.jit, static_argnames=("causal", "config", "scale", "implementation",
                                             "return_lse"))
def _hyper_jit(q, k, v, key_mask, rng, causal, config, scale, implementation, return_lse):
  """(out, lse), or out alone when not ``return_lse``. Where the lse is dropped or not
  differentiated, its cotangent is a symbolic zero and the backward has no lse term."""
  k, v = _zero_masked_keys(k, v, key_mask)
  if causal and q.shape[1] > config.min_seq_len:
    out, lse = hyper_causal(q, k, v, key_mask, rng, config, scale, implementation)
  elif causal or k.shape[1] <= max(config.min_seq_len, config.block_size):
    out, lse = flash_attention(q, k, v, key_mask, causal, scale, config.exact_chunk_size,
                               backends.exact_backend(implementation, q, key_mask))
  else:
    out, lse = hyper_noncausal(q, k, v, key_mask, rng, config, scale, implementation)
  return (out, lse) if return_lse else out


def hyper_attention(query, key, value, *, rng, causal: bool = False,
                    config: HyperAttentionConfig | None = None, scale: float | None = None,
                    key_mask=None, key_value_seq_lengths=None, return_lse: bool = False,
                    implementation: str | None = None, block_sizes=None):
  """HyperAttention: near-linear-time approximate softmax attention.

  Args:
    query: ``[batch, q_seq, q_heads, head_dim]``.
    key, value: ``[batch, kv_seq, kv_heads, head_dim]``; ``q_heads`` divisible by ``kv_heads``
      (grouped-query / multi-query attention without repeating K/V).
    rng: a ``jax.random`` key; the LSH hyperplanes and the samples are drawn from it (same key,
      same result).
    causal: query ``i`` attends to keys ``j <= i`` (needs ``q_seq == kv_seq``).
    config: :class:`HyperAttentionConfig` (default: the paper's benchmark settings).
    scale: logit scale, ``1/sqrt(head_dim)`` when None.
    key_mask: optional ``[batch, kv_seq]`` bool, False keys get no weight.
    key_value_seq_lengths: optional ``[batch]`` int in ``[0, kv_seq]``, keys at and beyond the
      length get no weight (``jax.nn.dot_product_attention``'s convention); at most one of the
      two masks. Out-of-range lengths are refused where concrete; traced ones act as if clamped
      to ``[0, kv_seq]``.
    return_lse: also return the log-sum-exp of the (approximate) scores, ``[batch, heads,
      q_seq]`` float32.
    implementation: None (Pallas on GPU when available, else XLA), ``"xla"`` or ``"pallas"``
      (``backends.py``).
    block_sizes: the Pallas kernels' tiles, a ``pallas_kernels.triton.BlockSizes`` (None: the
      tuned defaults; ``experiments/benchmarks/tune_kernels.py`` prints one); the XLA path has
      no tiles and ignores it.

  Returns:
    ``[batch, q_seq, q_heads, head_dim]`` in the dtype of the inputs (and the lse). Query rows
    whose keys are all masked give zeros (lse ``-inf``). A NaN or Inf in the inputs reaches the
    outputs (and gradients) that attend to it, as in exact attention, so that a diverging model
    is visible; keys masked by key_mask / key_value_seq_lengths reach no output whatever they
    hold.
  """
  config = HyperAttentionConfig() if config is None else config
  if not isinstance(config, HyperAttentionConfig):
    raise TypeError(f"config must be a HyperAttentionConfig, got {type(config).__name__}")
  dims = checks.check_qkv(query, key, value, causal)
  key_mask = checks.check_key_mask(key_mask, key_value_seq_lengths, dims)
  scale = checks.check_scale(scale, dims.head_dim)
  checks.check_rng(rng)
  if config.local_window and not causal:
    raise ValueError(f"HyperAttentionConfig.local_window={config.local_window} is an exact band "
                     "of the causal recursion: use causal=True or local_window=0")
  implementation = backends.resolve(implementation, block_sizes)
  return _hyper_jit(query, key, value, key_mask, rng, bool(causal), config, scale,
                    implementation, bool(return_lse))


@functools.partial(jax.jit, static_argnames=("causal", "scale", "chunk_size", "implementation",
                                             "return_lse"))
def _exact_jit(q, k, v, key_mask, causal, scale, chunk_size, implementation, return_lse):
  k, v = _zero_masked_keys(k, v, key_mask)
  out, lse = flash_attention(q, k, v, key_mask, causal, scale, chunk_size, implementation)
  return (out, lse) if return_lse else out


def exact_attention(query, key, value, *, causal: bool = False, scale: float | None = None,
                    key_mask=None, key_value_seq_lengths=None, return_lse: bool = False,
                    chunk_size: int = 512, implementation: str | None = None,
                    block_sizes=None):
  """Exact softmax attention, memory-safe at long sequences (chunked online softmax).

  Same layouts, masks, GQA rules and ``implementation`` / ``block_sizes`` choices as
  :func:`hyper_attention` (``"pallas"``: the flash kernels of ``pallas_kernels``, tiles
  ``block_sizes.flash_fwd`` / ``flash_bwd``); no ``n x n`` matrix is
  materialised (peak extra memory ``O(chunk_size**2)`` per head in XLA), and the gradient is the
  flash-attention recomputation from the saved log-sum-exp.
  """
  dims = checks.check_qkv(query, key, value, causal)
  key_mask = checks.check_key_mask(key_mask, key_value_seq_lengths, dims)
  scale = checks.check_scale(scale, dims.head_dim)
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  implementation = backends.resolve(implementation, block_sizes)
  return _exact_jit(query, key, value, key_mask, bool(causal), scale, chunk_size,
                    implementation, bool(return_lse))
