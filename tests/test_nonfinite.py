"""Non-finite inputs propagate: a NaN reaches exactly the outputs (and gradients) that attend to
it, as in exact attention, and masked keys reach none, on every path (XLA and Pallas, exact and
hyper, causal or not)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import jit_reference, make_qkv
from hyperattn_jax import HyperAttentionConfig, hyper_attention
from hyperattn_jax.merge import merge_attention, part_cotangents

# 24 tokens are computed exactly (<= min_seq_len), 64 by the approximation (causal: 1 level).
CFG = HyperAttentionConfig(block_size=16, sample_size=16, lsh_num_projs=3, min_seq_len=32)


def _poisoned(seed, seq):
  """q ``[1, seq, 4, 16]``, k/v ``[1, seq, 2, 16]`` with a NaN in one key of kv head 0 and in one
  query of kv head 1, the lengths ``[1]`` that mask the last 3 keys, and NaN in those keys' k and
  v. Row 0 is avoided: the Pallas tiles load it into their padding slots (a NaN there spreads
  further, still visibly)."""
  q, k, v = make_qkv(seed, 1, seq, seq, 4, 2, 16)
  lengths = jnp.array([seq - 3])
  rows = np.random.default_rng(seed).choice(np.arange(1, seq - 3), 2, replace=False)
  q, k = q.at[0, rows[0], 3, 5].set(jnp.nan), k.at[0, rows[1], 0, 2].set(jnp.nan)
  k, v = k.at[0, seq - 3:].set(jnp.nan), v.at[0, seq - 3:].set(jnp.nan)
  return q, k, v, lengths


# (implementation, causal, seq): the exact regime once (its guards are those of the causal base
# case), the approximation on both paths (causal: the base case, a level's blocked stage merged
# into the running rows; the Pallas non-causal stage stores its rows without a merge).
# The Pallas cases are marked gpu: on the GPU machine they run the compiled kernels.
CASES = [("xla", True, 24), ("xla", True, 64),
         pytest.param("pallas", False, 64, marks=pytest.mark.gpu),
         pytest.param("pallas", True, 64, marks=pytest.mark.gpu)]


@pytest.mark.parametrize("implementation,causal,seq", CASES)
def test_nan_reaches_the_outputs_and_gradients_that_attend_to_it(seed, implementation, causal,
                                                                 seq):
  """The dense oracle on the same inputs and draws (the masked keys zeroed: its value product
  would spread their NaN as 0 * NaN) says which output rows attend to the NaN (its softmax
  propagates NaN); the fast paths must give NaN there and the oracle's values elsewhere (they
  once gave zeros for every row whose softmax sum was NaN, and so zero gradients: the backward
  of a -inf lse; and the masked keys' NaN values reached every row of their blocks)."""
  q, k, v, lengths = _poisoned(seed, seq)
  rng = jax.random.key(seed)
  out, pull = jax.vjp(lambda q, k, v: hyper_attention(
      q, k, v, rng=rng, causal=causal, config=CFG, key_value_seq_lengths=lengths,
      implementation=implementation), q, k, v)
  out = np.asarray(out)
  key_mask = jnp.arange(seq)[None, :] < lengths[:, None]
  clean = lambda x: jnp.where(key_mask[:, :, None, None], x, 0.0)
  ref = np.asarray(jit_reference(q, clean(k), clean(v), rng=rng, causal=causal, config=CFG,
                                 key_mask=key_mask)[0])
  nan_rows = np.isnan(ref).any(-1)
  assert nan_rows[:, :, :2].any() and nan_rows[:, :, 2:].any()  # both poisoned heads
  np.testing.assert_array_equal(np.isnan(out).any(-1), nan_rows)
  assert np.isnan(out[nan_rows]).all()
  np.testing.assert_allclose(out[~nan_rows], ref[~nan_rows], atol=1e-5, rtol=1e-5)
  dq, dk, dv = (np.asarray(g) for g in pull(jax.random.normal(jax.random.key(seed), q.shape)))
  assert np.isnan(dq[nan_rows]).all()
  assert np.isnan(dk).any() and np.isnan(dv).any()
  assert (dk[:, seq - 3:] == 0).all() and (dv[:, seq - 3:] == 0).all()  # masked: no gradient


def test_merge_and_its_part_cotangents_propagate_nan():
  """Rows: 0 finite, 1 NaN in one part, 2 empty in both parts (stays 0 / -inf, zero cotangent).
  The merge once gave the NaN row lse -inf, and its part cotangents weight 0."""
  out = jnp.ones((1, 3, 1, 2))                                   # [1, T, N, H]
  lse1 = jnp.array([[[0.5, jnp.nan, -jnp.inf]]])                 # [1, N, T]
  lse2 = jnp.array([[[0.0, 0.0, -jnp.inf]]])
  merged_out, merged_lse = (np.asarray(x) for x in merge_attention(out, lse1, out, lse2))
  assert np.isfinite(merged_lse[0, 0, 0]) and np.isnan(merged_lse[0, 0, 1])
  assert merged_lse[0, 0, 2] == -np.inf and (merged_out[0, 2] == 0).all()
  assert np.isnan(merged_out[0, 1]).all()
  d_out = jnp.ones((3, 2))
  d_part_out, d_part_lse = (np.asarray(x) for x in part_cotangents(
      out[0, :, 0], lse1[0, 0], jnp.asarray(merged_lse[0, 0]), jnp.zeros(3), d_out))
  assert np.isfinite(d_part_out[0]).all() and np.isnan(d_part_out[1]).all()
  assert np.isnan(d_part_lse[1]) and (d_part_out[2] == 0).all() and d_part_lse[2] == 0
