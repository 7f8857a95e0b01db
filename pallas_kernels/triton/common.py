"""What the Triton kernels share: padding arithmetic, the exact dot, the input checks."""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

NEG_INF = float("-inf")
LOG2E = math.log2(math.e)


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def pow2_at_least(x: int, lo: int = 16) -> int:
  p = lo
  while p < x:
    p *= 2
  return p


def pad_to(x, axis: int, size: int, value=0):
  """``x`` padded with ``value`` to ``size`` along ``axis`` (no copy when it has that size)."""
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def dot(a, b, trans_a=False, trans_b=False):
  """fp32 accumulation; fp32 operands are multiplied exactly (no TF32), like XLA at HIGHEST."""
  return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, allow_tf32=False)


def check_array(name: str, x, shape: tuple, kind: str, dtype=None):
  """Raises a ValueError naming ``name`` unless ``x`` has ``shape`` (``(label, size)`` pairs,
  size None: any) and a dtype of ``kind`` (``"float"``, ``"int"``, ``"bool"``), ``dtype`` itself
  where given."""
  labels = ", ".join(label for label, _ in shape)
  want = tuple(size for _, size in shape)
  got = getattr(x, "shape", None)
  if got is None or len(got) != len(want) or any(w is not None and g != w
                                                 for g, w in zip(got, want)):
    sizes = ", ".join(f"{label} = {size}" for label, size in shape if size is not None)
    raise ValueError(f"{name}: expected [{labels}]{' with ' + sizes if sizes else ''}, got "
                     f"{got}")
  kinds = {"float": jnp.floating, "int": jnp.integer, "bool": jnp.bool_}
  if not jnp.issubdtype(x.dtype, kinds[kind]) or (dtype is not None and x.dtype != dtype):
    raise ValueError(f"{name}: expected dtype {dtype or kind}, got {x.dtype}")
