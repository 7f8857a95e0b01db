"""The sort stage: the stable radix sorts of the rows by sort key, and which regime runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperattn_jax.sorting import permutations


def test_sort_is_stable():
  codes = jnp.array([3, 1, 3, 0, 1, 3, 0])
  perm = np.asarray(jnp.argsort(codes, stable=True))
  np.testing.assert_array_equal(perm, [3, 6, 1, 4, 0, 2, 5])


def _sort_operand_types(jaxpr, operand=0):
  """The dtype of operand ``operand`` (0: the key, 1: the value) of every sort in a jaxpr,
  nested calls included."""
  types = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "sort":
      types.append(str(eqn.invars[operand].aval.dtype))
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", param)
      if hasattr(inner, "eqns"):
        types += _sort_operand_types(inner, operand)
  return types


# Flat radix sorts of (segment, key): one or several 16-bit sorts (groups of segments that span
# the two arrays), one 32-bit sort, or a stable argsort per array; with and without the code's
# extra bit for masked keys and padding rows.
@pytest.mark.parametrize("num_projs,masked,rows,sorts,key_type", [
    (3, True, (64, 48), 1, "uint16"), (12, True, (64, 48), 3, "uint16"),
    (13, False, (50, 45), 3, "uint16"), (16, True, (64, 48), 1, "uint32"),
    (29, True, (64, 48), 2, "int32")])
def test_perms_are_the_stable_sorts_with_padding_last(seed, num_projs, masked, rows, sorts,
                                                      key_type):
  rng = np.random.default_rng(seed)
  codes = [rng.integers(0, 2 ** num_projs + int(masked), size=shape).astype(np.int32)
           for shape in ((2, 3, 2, 50), (2, 3, 45))]
  for code in codes:
    code[..., ::7] = code[..., 1:2]  # ties: the stable order keeps rows ascending
  fn = lambda *c: permutations(c, rows, num_projs, masked)
  assert _sort_operand_types(jax.make_jaxpr(fn)(*codes).jaxpr) == [key_type] * sorts
  perms = jax.jit(fn)(*codes)
  for code, perm, r in zip(codes, perms, rows):
    n = code.shape[-1]
    assert perm.shape == code.shape[:-1] + (r,) and perm.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(perm)[..., :n], np.argsort(code, axis=-1,
                                                                        kind="stable"))
    assert np.all(np.asarray(perm)[..., n:] == -1)


# The row index rides along as a 16-bit value where every array's rows fit, else 32-bit.
@pytest.mark.parametrize("rows,value_type", [(2 ** 16, "uint16"), (2 ** 16 + 5, "uint32")])
def test_perms_row_index_value_fits_the_rows(seed, rows, value_type):
  rng = np.random.default_rng(seed)
  codes = (rng.integers(0, 2 ** 7, size=(2, rows)).astype(np.int32),
           rng.integers(0, 2 ** 7, size=(1, 300)).astype(np.int32))
  fn = lambda *c: permutations(c, (rows, 300), 7, False)
  assert _sort_operand_types(jax.make_jaxpr(fn)(*codes).jaxpr, operand=1) == [value_type]
  for code, perm in zip(codes, jax.jit(fn)(*codes)):
    np.testing.assert_array_equal(np.asarray(perm), np.argsort(code, axis=-1, kind="stable"))
