"""The paper's estimator options: the |v|^2 sampler and the ApproxD normaliser."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_qkv, rel_err
from hyperattn_jax import HyperAttentionConfig, hyper_attention
from hyperattn_jax import blocked, sampling
from hyperattn_jax import causal as causal_lib
from hyperattn_jax.reference import reference_hyper_attention

SMALL = HyperAttentionConfig(block_size=32, sample_size=16, lsh_num_projs=5, min_seq_len=64,
                             exact_chunk_size=48)
OPTIONS = [  # sampler, normalizer, causal
    ("value_norm", "merged", False),
    ("uniform", "approx_d", False),
    ("value_norm", "approx_d", True),
]


@pytest.mark.parametrize("sampler,normalizer,causal", OPTIONS)
def test_options_match_dense_reference_values_and_gradients(seed, sampler, normalizer, causal):
  cfg = dataclasses.replace(SMALL, sampler=sampler, normalizer=normalizer, approx_d_kappa=3.0,
                            approx_d_rows=8)
  q, k, v = make_qkv(seed, 2, 201, 201, 4, 2, 16)  # causal: 2 levels
  v = v * jnp.linspace(0.1, 3.0, 201)[None, :, None, None]  # uneven |v|: non-uniform draws
  key_mask = jnp.arange(201)[None, :] < jnp.array([[201], [170]])
  rng = jax.random.key(seed)
  run = lambda cfg, q, k, v: hyper_attention(q, k, v, rng=rng, causal=causal, config=cfg,
                                             key_mask=key_mask, return_lse=True)
  w = jax.random.normal(jax.random.key(seed + 1), q.shape)

  def values_and_grads(f):  # (out, lse) and the gradient of a loss of both, in one compile
    def loss(q, k, v):
      out, lse = f(q, k, v)
      return jnp.sum(out * w) + jnp.sum(lse), (out, lse)
    (_, values), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
    return values, grads

  (out, lse), g = values_and_grads(lambda *x: run(cfg, *x))
  (ref_out, ref_lse), g_ref = values_and_grads(lambda *x: reference_hyper_attention(
      *x, rng=rng, causal=causal, config=cfg, key_mask=key_mask))
  np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(lse, ref_lse, atol=1e-5, rtol=1e-5)
  for a, b in zip(g, g_ref):
    assert rel_err(a, b) < 1e-5
  # The option changes the result (the test can fail if it were ignored); checked on the
  # non-causal cases (the causal levels run the same stages; each run is another compile).
  if not causal:
    assert rel_err(out, run(SMALL, q, k, v)[0]) > 1e-3
  if normalizer == "approx_d" and not causal:  # the clamp only ever adds mass
    base = run(dataclasses.replace(cfg, normalizer="merged"), q, k, v)[1]
    assert np.all(np.asarray(lse) >= np.asarray(base) - 1e-5)
    assert np.any(np.asarray(lse) > np.asarray(base) + 1e-3)


def test_value_norm_sampler_is_unbiased_and_follows_norms(seed):
  """E[sum_s w_s f(pos_s)] = sum_j f(j); draws land in proportion to |v_j|^2."""
  n, m = 40, 40000
  v = jax.random.normal(jax.random.key(seed), (1, 1, n + 8, 4)) * jnp.linspace(0.2, 2.0, n + 8)[
      None, None, :, None]
  n_valid = jnp.array([n], jnp.int32)
  pos, log_w = sampling.draw_samples(jax.random.key(seed + 1), "value_norm", v, n_valid, m)
  pos, w = np.asarray(pos[0, 0]), np.exp(np.asarray(log_w[0, 0], np.float64))
  assert pos.min() >= 0 and pos.max() < n and np.all(np.diff(pos) >= 0)
  sq = np.sum(np.asarray(v[0, 0, :n], np.float64) ** 2, axis=-1)
  np.testing.assert_allclose(w, 1.0 / (m * sq[pos] / sq.sum()), rtol=1e-4)
  freq = np.bincount(pos, minlength=n) / m
  p = sq / sq.sum()
  assert np.all(np.abs(freq - p) < 6 * np.sqrt(p * (1 - p) / m) + 1e-4)
  f = np.sin(np.arange(n)) + 2.0
  assert abs(np.sum(w * f[pos]) - f.sum()) / f.sum() < 0.05
  empty = sampling.draw_samples(jax.random.key(0), "value_norm", v, jnp.array([0]), 8)[1]
  assert np.all(np.isneginf(np.asarray(empty)))


@pytest.mark.parametrize("causal", [False, True])
def test_log_weight_gradient_only_where_the_sampler_makes_it_differentiable(seed, causal,
                                                                           monkeypatch):
  """The blocked backward computes the log-weights' gradient (a reduction per score tile in the
  Pallas kernels) for the |v|^2 sampler, whose weights depend on v, and skips it for the
  uniform sampler's constants (the custom VJPs read which inputs are perturbed)."""
  asked = []

  def spy(real):
    def bwd(*args, weight_grad=True, **kwargs):
      asked.append(weight_grad)
      grads = real(*args, weight_grad=weight_grad, **kwargs)
      assert (grads[-1] is not None) == weight_grad
      return grads
    return bwd

  monkeypatch.setattr(blocked, "blocked_attention_bwd", spy(blocked.blocked_attention_bwd))
  monkeypatch.setattr(causal_lib, "blocked_attention_bwd", spy(causal_lib.blocked_attention_bwd))
  q, k, v = make_qkv(seed, 1, 130, 130, 2, 1, 16)  # causal: 2 levels
  for sampler in ("uniform", "value_norm"):
    asked.clear()
    cfg = dataclasses.replace(SMALL, sampler=sampler)
    jax.grad(lambda v: jnp.sum(hyper_attention(q, k, v, rng=jax.random.key(seed), causal=causal,
                                               config=cfg)))(v)
    assert asked == [sampler == "value_norm"] * (2 if causal else 1), (sampler, asked)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sampler="importance"), "sampler"),
    (dict(normalizer="exact"), "normalizer"),
    (dict(approx_d_kappa=0.5), "approx_d_kappa"),
    (dict(approx_d_kappa="10"), "approx_d_kappa"),
    (dict(approx_d_rows=0), "approx_d_rows"),
])
def test_bad_options(kwargs, match):
  with pytest.raises(ValueError, match=match):
    HyperAttentionConfig(**kwargs)
