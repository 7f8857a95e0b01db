"""When does HyperAttention work? The paper's hardness parameters and error metrics.

For queries/keys/values ``[batch, seq, heads, head_dim]`` and a config and key (the same draws
as :func:`hyperattn_jax.hyper_attention`), with ``A = exp(scale * Q K^T)`` (masked keys removed),
``D = diag(A 1)`` and ``M`` the LSH block mask (query and key in the same sorted block),
Han et al. (ICLR 2024, Theorem 1) bound the error through

* ``alpha = n * max_j ||D^-1 A e_j||_2^2`` -- the largest squared column norm of the normalised
  attention matrix, times n (1 for uniform attention, n for one-hot attention on one key);
* ``kappa = max_i (A - M∘A)_i 1 / min_i (A - M∘A)_i 1`` -- the ratio of the largest to the
  smallest row sum of the un-normalised attention once the heavy (LSH-block) entries are
  removed (rows with nothing left are skipped);

and guarantee ``||Att - Att~||_op <= eps ||D^-1 A||_op ||V||_op``. :func:`attention_diagnostics`
computes these exactly (query rows in chunks, so memory is ``O(chunk * kv_seq)`` per head), the
LSH-block recall (share of each row's attention mass inside its own block), and the errors of
the approximation: relative Frobenius error, the same normalised by ``||V||_F``, and the
spectral ratio ``eps = ||Att - Att~||_op / (||D^-1 A||_op ||V||_op)`` (``||D^-1 A||_op`` by
power iteration). Non-causal attention (for causal models, apply it per recursion quadrant).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from hyperattn_jax import checks
from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.hyper import exact_attention, hyper_attention
from hyperattn_jax.reference import lsh_blocks

__all__ = ["attention_diagnostics"]

_NEG_INF = float("-inf")


def _heads_major(q, k, v):
  """-> q ``[B, N, Tq, H]``, k/v ``[B, N, Tk, H]`` float32 (kv heads repeated for GQA)."""
  g = q.shape[2] // k.shape[2]
  rep = lambda x: jnp.repeat(x, g, axis=2).transpose(0, 2, 1, 3).astype(jnp.float32)
  return q.transpose(0, 2, 1, 3).astype(jnp.float32), rep(k), rep(v)


def _row_chunks(x, chunk):
  """``[B, N, T, ...]`` -> ``[T // chunk, B, N, chunk, ...]`` (T padded by the caller)."""
  b, n, t = x.shape[:3]
  return jnp.moveaxis(x.reshape((b, n, t // chunk, chunk) + x.shape[3:]), 2, 0)


class _ChunkedRows(NamedTuple):
  """The query rows in chunks of ``chunk`` (padded to a multiple of it) and the keys they are
  scored against, per head: what every pass over the attention matrix reads."""
  q: jax.Array          # [Tq_padded // chunk, B, N, chunk, H] float32
  k: jax.Array          # [B, N, Tk, H] float32
  key_mask: jax.Array   # [B, 1, 1, Tk] bool
  scale: float
  q_len: int
  chunk: int

  @classmethod
  def build(cls, qh, kh, key_mask, scale, chunk):
    """From ``qh [B, N, Tq, H]``, ``kh [B, N, Tk, H]`` and ``key_mask [B, Tk]``."""
    pad = -qh.shape[2] % chunk
    q = _row_chunks(jnp.pad(qh, ((0, 0), (0, 0), (0, pad), (0, 0))), chunk)
    return cls(q, kh, key_mask[:, None, None, :], scale, qh.shape[2], chunk)

  def chunks(self, x, fill=0):
    """``[B, N, Tq]`` -> ``[Tq_padded // chunk, B, N, chunk]``, the padding rows ``fill``."""
    pad = -self.q_len % self.chunk
    return _row_chunks(jnp.pad(x, ((0, 0), (0, 0), (0, pad)), constant_values=fill), self.chunk)

  def unchunk(self, x):
    """The inverse of :meth:`chunks` (padding rows dropped)."""
    return jnp.moveaxis(x, 0, 2).reshape(x.shape[1:3] + (-1,))[..., :self.q_len]

  def logits(self, q_chunk):
    """``[B, N, chunk, Tk]`` scaled scores, masked keys -inf."""
    s = jnp.einsum("bnqh,bnkh->bnqk", q_chunk, self.k, precision="highest") * self.scale
    return jnp.where(self.key_mask, s, _NEG_INF)


def _hardness(rows: _ChunkedRows, q_block, k_block):
  """alpha, kappa and the LSH-block recall, in one pass over the query chunks."""
  blocks = rows.chunks(q_block, fill=-1)
  valid = rows.chunks(jnp.ones(q_block.shape, bool), fill=False)

  def stats(col_sq, xs):
    q_chunk, blk, valid = xs
    s = rows.logits(q_chunk)
    lse = jax.nn.logsumexp(s, axis=-1)                                   # log D_i
    heavy = blk[..., None] == k_block[:, :, None, :]
    p = jnp.exp(s - lse[..., None])
    recall = jnp.sum(jnp.where(heavy, p, 0.0), axis=-1)
    light_lse = jax.nn.logsumexp(jnp.where(heavy, _NEG_INF, s), axis=-1)  # log (A - M∘A)_i 1
    col_sq = col_sq + jnp.sum(jnp.where(valid[..., None], p * p, 0.0), axis=-2)
    return col_sq, (recall, light_lse)

  col_sq, (recall, light_lse) = jax.lax.scan(
      stats, jnp.zeros(rows.k.shape[:3], jnp.float32), (rows.q, blocks, valid))
  recall, light_lse = rows.unchunk(recall), rows.unchunk(light_lse)
  # Rows with no light entry left (everything in their block) are skipped.
  has_light = jnp.isfinite(light_lse)
  log_kappa = (jnp.max(jnp.where(has_light, light_lse, _NEG_INF), axis=-1) -
               jnp.min(jnp.where(has_light, light_lse, jnp.inf), axis=-1))
  return {
      "alpha": rows.q_len * jnp.max(col_sq, axis=-1),
      "kappa": jnp.exp(log_kappa),
      "lsh_recall_mean": jnp.mean(recall, axis=-1),
      "lsh_recall_min": jnp.min(recall, axis=-1),
  }


def _softmax_op_norm(rows: _ChunkedRows, power_iters):
  """``||D^-1 A||_op`` ``[B, N]`` by power iteration on ``(D^-1 A)^T D^-1 A``, chunk by chunk."""
  def apply_p(x):        # D^-1 A x, x [B, N, Tk] -> [B, N, Tq]
    def one(_, q_chunk):
      s = rows.logits(q_chunk)
      return None, jnp.einsum("bnqk,bnk->bnq", jax.nn.softmax(s, axis=-1), x)
    return rows.unchunk(jax.lax.scan(one, None, rows.q)[1])

  def apply_pt(y):       # (D^-1 A)^T y, y [B, N, Tq] -> [B, N, Tk]
    def one(acc, xs):
      q_chunk, y_chunk = xs
      return acc + jnp.einsum("bnqk,bnq->bnk", jax.nn.softmax(rows.logits(q_chunk), axis=-1),
                              y_chunk), None
    return jax.lax.scan(one, jnp.zeros(rows.k.shape[:3], jnp.float32), (rows.q, rows.chunks(y)))[0]

  def power(_, x):
    x = apply_pt(apply_p(x))
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  # Start from the uniform vector over the valid keys.
  x0 = jnp.where(rows.key_mask[:, :, 0], 1.0, 0.0) * jnp.ones(rows.k.shape[:3])
  x = jax.lax.fori_loop(0, power_iters, power, x0 / jnp.linalg.norm(x0, axis=-1, keepdims=True))
  return jnp.linalg.norm(apply_p(x), axis=-1)


def _output_errors(q, k, v, vh, key_mask, rng, config, scale, p_op):
  """The approximation's errors against exact attention (``vh`` the values heads-major)."""
  exact = exact_attention(q, k, v, scale=scale, key_mask=key_mask).astype(jnp.float32)
  approx = hyper_attention(q, k, v, rng=rng, config=config, scale=scale, key_mask=key_mask,
                           implementation="xla").astype(jnp.float32)
  err = (approx - exact).transpose(0, 2, 1, 3)                           # [B, N, Tq, H]
  ref = exact.transpose(0, 2, 1, 3)
  fro = lambda x: jnp.sqrt(jnp.sum(x * x, axis=(-2, -1)))
  op = lambda x: jnp.linalg.norm(x, ord=2, axis=(-2, -1))
  v_masked = jnp.where(key_mask[:, None, :, None], vh, 0.0)
  return {
      "rel_fro_error": fro(err) / fro(ref),
      "fro_error_over_v": fro(err) / fro(v_masked),
      "spectral_eps": op(err) / (p_op * op(v_masked)),
      "softmax_op_norm": p_op,
  }


@functools.partial(jax.jit, static_argnames=("config", "scale", "chunk", "power_iters"))
def _diagnostics(q, k, v, key_mask, rng, config, scale, chunk, power_iters):
  q_block, k_block, _, _ = lsh_blocks(q, k, key_mask, rng, config, v)
  qh, kh, vh = _heads_major(q, k, v)
  rows = _ChunkedRows.build(qh, kh, key_mask, scale, chunk)
  hardness = _hardness(rows, q_block, k_block)
  p_op = _softmax_op_norm(rows, power_iters)
  return {**hardness, **_output_errors(q, k, v, vh, key_mask, rng, config, scale, p_op)}


def attention_diagnostics(query, key, value, *, rng, config: HyperAttentionConfig | None = None,
                          scale: float | None = None, key_mask=None, chunk_size: int = 256,
                          power_iters: int = 30) -> dict[str, jax.Array]:
  """Hardness parameters and errors of non-causal HyperAttention, per (batch, head).

  Args:
    query ``[batch, q_seq, heads, head_dim]``; key, value ``[batch, kv_seq, kv_heads,
    head_dim]``; rng, config, scale, key_mask as in :func:`hyperattn_jax.hyper_attention`
    (the same key gives the blocks and samples that call uses).
    chunk_size: query rows per chunk (memory ``chunk_size * kv_seq`` floats per head).
    power_iters: iterations of the power method for ``||D^-1 A||_op``.

  Returns:
    dict of ``[batch, heads]`` float32 arrays: ``alpha``, ``kappa``, ``lsh_recall_mean``,
    ``lsh_recall_min``, ``rel_fro_error``, ``fro_error_over_v``, ``spectral_eps``,
    ``softmax_op_norm`` (see the module docstring).
  """
  config = HyperAttentionConfig() if config is None else config
  dims = checks.check_qkv(query, key, value, False)
  key_mask = checks.check_key_mask(key_mask, None, dims)
  if key_mask is None:
    key_mask = jnp.ones((dims.batch, dims.kv_len), bool)
  scale = checks.check_scale(scale, dims.head_dim)
  checks.check_rng(rng)
  for name, value_ in (("chunk_size", chunk_size), ("power_iters", power_iters)):
    if isinstance(value_, bool) or not isinstance(value_, int) or value_ <= 0:
      raise ValueError(f"{name} must be a positive int, got {value_!r}")
  return _diagnostics(query, key, value, key_mask, rng, config, scale, chunk_size, power_iters)
