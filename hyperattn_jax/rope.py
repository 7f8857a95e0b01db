"""Rotary position embedding (RoPE, Su et al. 2021) in the half-split ("GPT-NeoX") layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["apply_rope"]


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotates feature pairs ``(i, i + head_dim/2)`` of ``x`` by ``position * base**(-2i/head_dim)``.

  Args:
    x: ``[batch, seq, heads, head_dim]`` with an even ``head_dim``.
    positions: ``[batch, seq]`` integer (or float) positions.
    base: the wavelength base.

  Returns:
    ``x`` rotated, same shape and dtype (the rotation is computed in float32). For any two
    positions the rotated dot product ``<rope(q, i), rope(k, j)>`` depends only on ``i - j``.
  """
  if x.ndim != 4:
    raise ValueError(f"x must be [batch, seq, heads, head_dim], got shape {tuple(x.shape)}")
  head_dim = x.shape[-1]
  if head_dim % 2:
    raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
  if positions.shape != x.shape[:2]:
    raise ValueError(f"positions must be [batch, seq] = {tuple(x.shape[:2])}, got "
                     f"{tuple(positions.shape)}")
  half = head_dim // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)            # [half]
  angle = positions.astype(jnp.float32)[..., None, None] * inv_freq             # [b, t, 1, half]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)
