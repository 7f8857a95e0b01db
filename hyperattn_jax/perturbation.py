"""Which inputs a custom VJP must differentiate, from ``defvjp(..., symbolic_zeros=True)``.

With symbolic zeros the forward rule receives each argument leaf as a ``CustomVJPPrimal`` that
says whether it is perturbed (depends on what is differentiated), and the backward rule may
receive ``SymbolicZero`` cotangents for outputs nothing depends on. HyperAttention uses this to
skip the log-weights' gradient (a reduction per score tile in the Pallas kernels) where the
log-weights are constants, e.g. those of the uniform sampler, ``log(n_valid / m)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

__all__ = ["primal_values", "flag", "is_set", "dense", "nonzero"]


def primal_values(tree):
  """(values, perturbed): the forward rule's arguments as arrays, and a bool per leaf."""
  is_primal = lambda x: isinstance(x, CustomVJPPrimal)
  return (jax.tree.map(lambda x: x.value, tree, is_leaf=is_primal),
          jax.tree.map(lambda x: x.perturbed, tree, is_leaf=is_primal))


def flag(value: bool):
  """A static flag to carry in a custom VJP's residuals (which must be arrays): in their tree
  structure, ``()`` for True and ``None`` for False."""
  return () if value else None


def is_set(residual_flag) -> bool:
  return residual_flag is not None


def dense(ct):
  """A cotangent as an array: zeros for a symbolic zero."""
  return jnp.zeros(ct.shape, ct.dtype) if isinstance(ct, SymbolicZero) else ct


def nonzero(ct):
  """A cotangent, or None for a symbolic zero."""
  return None if isinstance(ct, SymbolicZero) else ct
