"""The options beyond the paper: attention sinks, the exact causal band, key-block selection."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import jit_reference, make_qkv, rel_err
from hyperattn_jax import HyperAttentionConfig, hyper_attention
from hyperattn_jax import reference
from hyperattn_jax.reference import dense_attention

SMALL = HyperAttentionConfig(block_size=16, sample_size=8, lsh_num_projs=4, min_seq_len=64,
                             exact_chunk_size=48)


def _mask(seed, b, n):
  """Random key padding with key 0 valid: every causal row keeps a key, so its lse is finite
  (the lse-cotangent test differentiates sin(lse))."""
  return (jax.random.uniform(jax.random.key(seed + 5), (b, n)) > 0.2).at[:, 0].set(True)


@pytest.mark.parametrize("causal,options,masked", [
    (True, dict(sink_size=3, local_window=17), True),
    (True, dict(local_window=24), False),
    (False, dict(sink_size=5), True),
    (False, dict(select_blocks=2, select_block_size=8), True),
    (True, dict(select_blocks=3, select_block_size=5, sink_size=3, local_window=17), True),
])
def test_options_match_dense_reference(seed, causal, options, masked):
  """Odd length (2 causal levels, padding), GQA; out and lse against the oracle, and the
  option really changes the approximation (the test can fail)."""
  b, n = 2, 201
  q, k, v = make_qkv(seed, b, n, n, 4, 2, 16)
  rng = jax.random.key(seed + 1)
  mask = _mask(seed, b, n) if masked else None
  config = dataclasses.replace(SMALL, **options)
  out, lse = hyper_attention(q, k, v, rng=rng, causal=causal, config=config, key_mask=mask,
                             return_lse=True, implementation="xla")
  ref_out, ref_lse = jit_reference(q, k, v, rng=rng, causal=causal, config=config,
                                   key_mask=mask)
  np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(lse, ref_lse, atol=1e-5, rtol=1e-5)
  paper = hyper_attention(q, k, v, rng=rng, causal=causal, config=SMALL, key_mask=mask,
                          implementation="xla")
  assert rel_err(out, paper) > 1e-3
  assert rel_err(out, dense_attention(q, k, v, causal=causal, key_mask=mask)[0]) > 1e-3


def test_reference_weights_are_exact_on_sinks_and_band(seed):
  """The oracle's own semantics: every query sees the sinks and the ``local_window`` keys
  before it with their exact score (weight 1: not sampled, not reweighted)."""
  n, w, s = 200, 20, 4
  q, k, v = make_qkv(seed, 1, n, n, 2, 1, 8)
  config = dataclasses.replace(SMALL, sink_size=s, local_window=w)
  weights = jax.jit(reference._causal_log_weights, static_argnums=(5, 6))
  log_w, _ = weights(q, k, v, jnp.ones((1, n), bool), jax.random.key(seed), config, 8 ** -0.5)
  scores = np.asarray(reference._scores(q, k, 8 ** -0.5))
  log_w = np.asarray(log_w)
  i, j = np.nonzero(np.tril(np.ones((n, n), bool)))
  exact = (j < s) | (i - j <= w)
  np.testing.assert_allclose(log_w[..., i[exact], j[exact]], scores[..., i[exact], j[exact]],
                             rtol=1e-6, atol=1e-6)
  assert np.all(log_w[..., np.triu_indices(n, 1)[0], np.triu_indices(n, 1)[1]] == -np.inf)


def test_option_gradients_match_reference(seed):
  """The causal recursion's VJP with the exact parts (from the final statistics) equals
  autodiff of the oracle, the lse differentiated too."""
  q, k, v = make_qkv(seed, 1, 200, 200, 2, 1, 8)
  rng = jax.random.key(seed)
  mask = _mask(seed, 1, 200)
  config = dataclasses.replace(SMALL, sink_size=4, local_window=16)
  w = jax.random.normal(jax.random.key(seed + 1), q.shape)
  loss = lambda o, l: jnp.sum(o * w) + jnp.sum(jnp.sin(l))
  fast = lambda q, k, v: hyper_attention(q, k, v, rng=rng, causal=True, config=config,
                                         key_mask=mask, return_lse=True, implementation="xla")
  ref = lambda q, k, v: reference.reference_hyper_attention(q, k, v, rng=rng, causal=True,
                                                           config=config, key_mask=mask)
  g = jax.jit(jax.grad(lambda *x: loss(*fast(*x)), argnums=(0, 1, 2)))(q, k, v)
  g_ref = jax.jit(jax.grad(lambda *x: loss(*ref(*x)), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g, g_ref):
    assert rel_err(a, b) < 1e-5


def test_options_pallas_match_reference(seed):
  """The Pallas kernels (interpret mode on CPU) with both options: forward and gradients."""
  n, causal = 200, True
  q, k, v = make_qkv(seed, 1, n, n, 2, 1, 16)
  rng = jax.random.key(seed)
  mask = _mask(seed, 1, n)
  config = dataclasses.replace(SMALL, sink_size=4, local_window=16)
  run = lambda q, k, v: hyper_attention(q, k, v, rng=rng, causal=causal, config=config,
                                        key_mask=mask, implementation="pallas")
  ref = lambda q, k, v: reference.reference_hyper_attention(q, k, v, rng=rng, causal=causal,
                                                           config=config, key_mask=mask)[0]
  np.testing.assert_allclose(run(q, k, v), jax.jit(ref)(q, k, v), atol=2e-5)
  w = jax.random.normal(jax.random.key(seed + 2), q.shape)
  g = jax.jit(jax.grad(lambda *x: jnp.sum(run(*x) * w), (0, 1, 2)))(q, k, v)
  g_ref = jax.jit(jax.grad(lambda *x: jnp.sum(ref(*x) * w), (0, 1, 2)))(q, k, v)
  for a, b in zip(g, g_ref):
    assert rel_err(a, b) < 1e-5


def test_options_bf16(seed):
  q, k, v = make_qkv(seed, 1, 200, 200, 4, 2, 16, jnp.bfloat16)
  rng = jax.random.key(seed)
  config = dataclasses.replace(SMALL, sink_size=4, local_window=16)
  out = hyper_attention(q, k, v, rng=rng, causal=True, config=config)
  assert out.dtype == jnp.bfloat16
  assert rel_err(out, jit_reference(q, k, v, rng=rng, causal=True, config=config)[0]) < 1e-2


def test_selection_gradients_match_reference(seed):
  """The selected keys' gradients (scatter-added: several blocks may choose one key) through
  the causal recursion's VJP and the non-causal custom VJP equal autodiff of the oracle."""
  q, k, v = make_qkv(seed, 1, 160, 160, 2, 1, 8)
  rng = jax.random.key(seed)
  mask = _mask(seed, 1, 160)
  config = dataclasses.replace(SMALL, select_blocks=2, select_block_size=8)
  w = jax.random.normal(jax.random.key(seed + 1), q.shape)
  loss = lambda o, l: jnp.sum(o * w) + jnp.sum(jnp.sin(l))
  for causal in (True, False):
    fast = lambda q, k, v: hyper_attention(q, k, v, rng=rng, causal=causal, config=config,
                                           key_mask=mask, return_lse=True, implementation="xla")
    ref = lambda q, k, v: reference.reference_hyper_attention(q, k, v, rng=rng, causal=causal,
                                                             config=config, key_mask=mask)
    g = jax.jit(jax.grad(lambda *x: loss(*fast(*x)), argnums=(0, 1, 2)))(q, k, v)
    g_ref = jax.jit(jax.grad(lambda *x: loss(*ref(*x)), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g, g_ref):
      assert rel_err(a, b) < 1e-5


def test_selection_finds_a_large_norm_key(seed):
  """The case the option exists for: one key at a moderate angle (cosine 0.6) to one query but
  with a large norm, so that it holds nearly all of that query's attention. Its run's bound is
  at least the key's score, so the query's block chooses it: the output is the needle's value,
  wherever LSH put the pair (the paper's algorithm finds it only when they share a block)."""
  n, h = 512, 16
  q, k, v = make_qkv(seed, 1, n, n, 1, 1, h)
  target = jax.random.normal(jax.random.key(seed + 3), (h,))
  target = target / jnp.linalg.norm(target)
  side = jnp.roll(target, 1) - jnp.dot(jnp.roll(target, 1), target) * target
  q = q.at[0, n - 1, 0].set(4.0 * target)
  k = k.at[0, 37, 0].set(40.0 * (0.6 * target + 0.8 * side / jnp.linalg.norm(side)))
  config = dataclasses.replace(SMALL, select_blocks=1, select_block_size=16)
  out = hyper_attention(q, k, v, rng=jax.random.key(seed), config=config,
                        implementation="xla")[0, n - 1]
  assert rel_err(out, dense_attention(q, k, v)[0][0, n - 1]) < 1e-3


@pytest.mark.parametrize("kwargs,match", [
    (dict(sink_size=-1), "sink_size must be an int >= 0"),
    (dict(local_window=2.0), "local_window must be an int >= 0"),
    (dict(sink_size=20, local_window=13), r"must be <= min_seq_len // 2 \(32\)"),
    (dict(select_blocks=-2), "select_blocks must be an int >= 0"),
    (dict(select_block_size=0), "select_block_size must be a positive int"),
    (dict(select_blocks=2, normalizer="approx_d"), "select_blocks=2 needs normalizer='merged'"),
])
def test_bad_option_values(kwargs, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(SMALL, **kwargs)


def test_band_refused_without_causal():
  q, k, v = make_qkv(0, 1, 100, 100, 2, 1, 8)
  with pytest.raises(ValueError, match="local_window=8 is an exact band of the causal"):
    hyper_attention(q, k, v, rng=jax.random.key(0), config=dataclasses.replace(
        SMALL, local_window=8))
