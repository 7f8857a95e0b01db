"""Diagnostics vs brute-force dense computations, and on constructed attention patterns."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_qkv
from hyperattn_jax import HyperAttentionConfig, exact_attention, hyper_attention
from hyperattn_jax.diagnostics import attention_diagnostics
from hyperattn_jax.reference import lsh_blocks

CFG = HyperAttentionConfig(block_size=32, sample_size=16, lsh_num_projs=4, min_seq_len=32)


def _brute_force(q, k, v, key_mask, rng, config):
  """Dense float64 numpy transcription of the definitions."""
  q_block, k_block, _, _ = map(np.asarray, lsh_blocks(q, k, key_mask, rng, config))
  g = q.shape[2] // k.shape[2]
  q64 = np.asarray(q, np.float64).transpose(0, 2, 1, 3)
  k64 = np.repeat(np.asarray(k, np.float64), g, axis=2).transpose(0, 2, 1, 3)
  s = np.einsum("bnqh,bnkh->bnqk", q64, k64) / np.sqrt(q.shape[-1])
  mask = np.asarray(key_mask)[:, None, None, :]
  a = np.where(mask, np.exp(s), 0.0)
  p = a / a.sum(-1, keepdims=True)
  heavy = (q_block[..., :, None] == k_block[..., None, :]) & mask
  light = np.where(heavy, 0.0, a).sum(-1)
  kappa = np.array([[row[row > 0].max() / row[row > 0].min() for row in bn] for bn in light])
  return {"alpha": q.shape[1] * (p ** 2).sum(-2).max(-1), "kappa": kappa,
          "lsh_recall_mean": np.where(heavy, p, 0).sum(-1).mean(-1),
          "softmax_op_norm": np.linalg.norm(p, ord=2, axis=(-2, -1))}


@pytest.mark.parametrize("tq,tk,heads,kv_heads", [(150, 150, 2, 2), (97, 130, 4, 2)])
def test_matches_brute_force(seed, tq, tk, heads, kv_heads):
  q, k, v = make_qkv(seed, 2, tq, tk, heads, kv_heads, 8)
  key_mask = jnp.arange(tk)[None, :] < jnp.array([[tk], [tk - 23]])
  rng = jax.random.key(seed + 1)
  got = attention_diagnostics(q, k, v, rng=rng, config=CFG, key_mask=key_mask, chunk_size=40,
                              power_iters=100)
  want = _brute_force(q, k, v, key_mask, rng, CFG)
  for name, value in want.items():
    np.testing.assert_allclose(got[name], value, rtol=1e-4, err_msg=name)
  exact = np.asarray(exact_attention(q, k, v, key_mask=key_mask), np.float64)
  approx = np.asarray(hyper_attention(q, k, v, rng=rng, config=CFG, key_mask=key_mask,
                                      implementation="xla"), np.float64)
  err = (approx - exact).transpose(0, 2, 1, 3)
  rel = np.linalg.norm(err, axis=(-2, -1)) / np.linalg.norm(exact.transpose(0, 2, 1, 3),
                                                           axis=(-2, -1))
  np.testing.assert_allclose(got["rel_fro_error"], rel, rtol=1e-4)
  assert np.all(np.asarray(got["rel_fro_error"]) > 0)  # 130+ keys > block: approximate regime
  assert np.all(np.isfinite(np.asarray(got["spectral_eps"])))


def test_uniform_attention_has_alpha_and_kappa_one(seed):
  _, k, v = make_qkv(seed, 1, 128, 128, 1, 1, 8)
  q = jnp.zeros((1, 128, 1, 8))  # all scores 0: uniform attention, flat row sums
  got = attention_diagnostics(q, k, v, rng=jax.random.key(seed), config=CFG, chunk_size=64)
  np.testing.assert_allclose(got["alpha"], 1.0, rtol=1e-5)
  np.testing.assert_allclose(got["kappa"], 1.0, rtol=1e-5)
  np.testing.assert_allclose(got["softmax_op_norm"], 1.0, rtol=1e-4)


def test_one_hot_attention_has_alpha_n(seed):
  n = 64
  k = jnp.eye(n)[None, :, None, :]            # orthonormal keys
  q = 200.0 * k                               # each query picks its own key: D^-1 A ~ identity
  v = jax.random.normal(jax.random.key(seed), (1, n, 1, n))
  got = attention_diagnostics(q, k, v, rng=jax.random.key(seed), config=CFG, chunk_size=32)
  np.testing.assert_allclose(got["alpha"], float(n), rtol=1e-4)
  np.testing.assert_allclose(got["softmax_op_norm"], 1.0, rtol=1e-4)


def test_bad_arguments(seed):
  q, k, v = make_qkv(seed, 1, 16, 16, 1, 1, 8)
  with pytest.raises(ValueError, match="chunk_size"):
    attention_diagnostics(q, k, v, rng=jax.random.key(0), chunk_size=0)
  with pytest.raises(ValueError, match="rank 4"):
    attention_diagnostics(q[0], k, v, rng=jax.random.key(0))
