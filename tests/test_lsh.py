"""Hashing: Gray codes and ranks, angular LSH codes."""

import jax
import jax.numpy as jnp
import numpy as np

from hyperattn_jax import lsh


def test_gray_neighbours_differ_in_one_bit():
  bits = 7
  i = jnp.arange(2 ** bits - 1)
  diff = np.asarray(lsh.gray_code(i) ^ lsh.gray_code(i + 1))
  assert np.all(diff > 0) and np.all(diff & (diff - 1) == 0)  # exactly one bit set


def test_gray_rank_inverts_gray_code():
  for bits in (1, 3, 7, 12):
    i = jnp.arange(2 ** bits)
    np.testing.assert_array_equal(lsh.gray_rank(lsh.gray_code(i), bits), i)


def test_sort_key_order_is_hamming_path(seed):
  """Consecutive buckets in sort order differ in exactly one hyperplane."""
  bits = 6
  codes = jnp.arange(2 ** bits)
  order = np.asarray(jnp.argsort(lsh.gray_rank(codes, bits)))
  diff = order[1:] ^ order[:-1]
  assert np.all(diff & (diff - 1) == 0) and np.all(diff > 0)


def test_identical_and_scaled_vectors_collide(seed):
  key = jax.random.key(seed)
  proj = lsh.draw_projections(key, 2, 16, 7)
  x = jax.random.normal(jax.random.fold_in(key, 1), (3, 2, 50, 16))
  same = jnp.concatenate([x, x, 3.5 * x], axis=2)
  codes = np.asarray(lsh.lsh_codes(same, proj))
  np.testing.assert_array_equal(codes[..., :50], codes[..., 50:100])
  np.testing.assert_array_equal(codes[..., :50], codes[..., 100:])
  assert codes.min() >= 0 and codes.max() < 2 ** 7


def test_codes_are_sign_patterns(seed):
  key = jax.random.key(seed)
  proj = lsh.draw_projections(key, 1, 8, 5)
  x = jax.random.normal(jax.random.fold_in(key, 1), (1, 1, 40, 8))
  codes = np.asarray(lsh.lsh_codes(x, proj))[0, 0]
  signs = np.asarray(x[0, 0] @ proj[0]) > 0
  np.testing.assert_array_equal(codes, (signs * (1 << np.arange(5))).sum(-1))
