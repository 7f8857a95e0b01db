"""Pallas kernels (interpret mode on CPU) against their XLA references, and the blocked VJP."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from conftest import make_qkv, rel_err
from hyperattn_jax import HyperAttentionConfig, exact_attention, hyper_attention
from hyperattn_jax import blocked as blocked_lib
from hyperattn_jax.blocked import blocked_attention, blocked_attention_xla
from hyperattn_jax.exact import flash_attention_grouped
from hyperattn_jax.reference import dense_attention, reference_hyper_attention
from pallas_kernels import (blocked_attention_bwd_pallas, blocked_attention_pallas,
                            flash_attention_bwd_pallas, flash_attention_pallas)


def _blocked_inputs(seed, b, kh, g, nb, qb, bs, m, h, dtype, n_valid):
  ks = jax.random.split(jax.random.key(seed), 5)
  qs = jax.random.normal(ks[0], (b, kh, g, nb * qb, h)).astype(dtype)
  k = jax.random.normal(ks[1], (b, kh, nb * bs, h)).astype(dtype)
  v = jax.random.normal(ks[2], (b, kh, nb * bs, h)).astype(dtype)
  n_valid = jnp.asarray(n_valid, jnp.int32)
  pos = jax.random.randint(ks[3], (b, kh, m), 0, jnp.maximum(n_valid, 1)[:, None, None])
  k_s = jnp.take_along_axis(k, pos[..., None], axis=2)
  v_s = jnp.take_along_axis(v, pos[..., None], axis=2)
  # Per-sample log-weights: the uniform log(n_valid / m) plus noise (importance samplers).
  log_w = (jnp.log(n_valid.astype(jnp.float32) / m)[:, None, None] +
           jax.random.uniform(ks[4], (b, kh, m), minval=-1.0, maxval=1.0))
  return qs, k, v, k_s, v_s, pos, n_valid, log_w


def _assert_lse_close(lse, ref, atol):
  lse, ref = np.asarray(lse), np.asarray(ref)
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref))
  fin = np.isfinite(ref)
  np.testing.assert_allclose(lse[fin], ref[fin], atol=atol, rtol=0)


BLOCKED = [  # b, kh, g, nb, qb, bs, m, h, n_valid
    (2, 2, 1, 4, 32, 32, 32, 16, [128, 128]),
    (2, 1, 3, 3, 40, 32, 20, 24, [90, 0]),       # odd qb, m, head_dim; GQA 3; empty batch
    (1, 2, 2, 2, 70, 64, 48, 32, [100]),         # invalid tail keys inside the last block
]


# fp32 (tight) on every shape, bf16 (loose) on the odd one: interpret mode is slow on CPU.
BLOCKED_CASES = [(s, jnp.float32, 2e-5) for s in BLOCKED] + [(BLOCKED[1], jnp.bfloat16, 3e-2)]


@pytest.mark.parametrize("shape,dtype,atol", BLOCKED_CASES)
def test_blocked_kernel_matches_xla(seed, shape, dtype, atol):
  *dims, n_valid = shape
  args = _blocked_inputs(seed, *dims, dtype, n_valid)
  scale = dims[-1] ** -0.5
  out, lse = blocked_attention_pallas(*args, scale=scale, block_size=dims[5], block_q=32,
                                      block_k=16)
  ref_out, ref_lse = blocked_attention_xla(*args, scale=scale, block_size=dims[5])
  assert out.shape == ref_out.shape and out.dtype == dtype and lse.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out, np.float32)))
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32),
                             atol=atol, rtol=0)
  _assert_lse_close(lse, ref_lse, atol)


def _flash_inputs(seed, dtype):
  """GQA 3, odd length and head_dim; keys 0..9 of batch 1 masked (causal rows 0..9 empty)."""
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (2, 2, 3, 77, 24)).astype(dtype)
  k = jax.random.normal(ks[1], (2, 2, 77, 24)).astype(dtype)
  v = jax.random.normal(ks[2], (2, 2, 77, 24)).astype(dtype)
  return q, k, v, (jax.random.uniform(ks[3], (2, 77)) > 0.3).at[1, :10].set(False)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
def test_flash_kernel_matches_xla(seed, causal, dtype, atol):
  q, k, v, mask = _flash_inputs(seed, dtype)
  out, lse = flash_attention_pallas(q, k, v, mask, causal, 0.2, block_q=32, block_k=16)
  ref_out, ref_lse = flash_attention_grouped(q, k, v, mask, causal, 0.2, 32)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32),
                             atol=atol, rtol=0)
  _assert_lse_close(lse, ref_lse, atol)


def _cotangents(seed, out, lse):
  """Random cotangents for (out, lse); rows with lse = -inf get none (their lse is constant)."""
  k1, k2 = jax.random.split(jax.random.key(seed + 7))
  d_out = jax.random.normal(k1, out.shape).astype(out.dtype)
  d_lse = jnp.where(jnp.isfinite(lse), jax.random.normal(k2, lse.shape), 0.0)
  return d_out, d_lse


def _assert_grads_close(grads, ref, tol):
  for i, (a, b) in enumerate(zip(grads, ref)):
    assert a.shape == b.shape and a.dtype == b.dtype, i
    assert np.all(np.isfinite(np.asarray(a, np.float32))), i
    assert rel_err(a, b) < tol, (i, rel_err(a, b))


@pytest.mark.parametrize("shape,dtype,tol", [(s, d, 1e-5 if d == jnp.float32 else 2e-2)
                                             for s, d, _ in BLOCKED_CASES])
def test_blocked_backward_kernel_matches_xla(seed, shape, dtype, tol):
  """Pallas dq, dk, dv, sample dk/dv (partials over groups) and d log-weight == XLA autodiff."""
  *dims, n_valid = shape
  qs, k, v, k_s, v_s, pos, nv, log_w = _blocked_inputs(seed, *dims, dtype, n_valid)
  scale, bs = dims[-1] ** -0.5, dims[5]
  stage = lambda qs, k, v, k_s, v_s, w: blocked_attention_xla(
      qs, k, v, k_s, v_s, pos, nv, w, scale=scale, block_size=bs)
  (out, lse), vjp = jax.vjp(stage, qs, k, v, k_s, v_s, log_w)
  d_out, d_lse = _cotangents(seed, out, lse)
  ref = vjp((d_out, d_lse))
  grads = blocked_attention_bwd_pallas(qs, k, v, k_s, v_s, pos, nv, log_w, out, lse, d_out,
                                       d_lse, scale=scale, block_size=bs, block_q=16,
                                       block_k=16, sample_groups=2)
  _assert_grads_close(grads[:5], ref[:5], tol)
  assert rel_err(grads[5], ref[5]) < tol


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_flash_backward_kernel_matches_xla(seed, causal, dtype, tol):
  q, k, v, mask = _flash_inputs(seed, dtype)
  (out, lse), vjp = jax.vjp(lambda q, k, v: flash_attention_grouped(q, k, v, mask, causal, 0.2,
                                                                    32), q, k, v)
  d_out, d_lse = _cotangents(seed, out, lse)
  grads = flash_attention_bwd_pallas(q, k, v, mask, out, lse, d_out, d_lse, causal, 0.2,
                                     block_q=16, block_k=32)
  _assert_grads_close(grads, vjp((d_out, d_lse)), tol)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_blocked_vjp_matches_autodiff(seed, implementation, monkeypatch):
  """Custom VJP == autodiff of the XLA stage, for out and lse cotangents and the log-weights."""
  monkeypatch.setattr(blocked_lib, "_BWD_CHUNK_ELEMENTS", 500)  # one block per chunk: 3 chunks
  qs, k, v, k_s, v_s, pos, n_valid, log_w = _blocked_inputs(
      seed, 1, 2, 2, 3, 24, 16, 12, 8, jnp.float32, [40])
  diff = (qs, k, v, k_s, v_s, log_w)
  w = jax.random.normal(jax.random.key(seed + 1), qs.shape)

  def loss(stage, qs, k, v, k_s, v_s, log_w):
    out, lse = stage(qs, k, v, k_s, v_s, pos, n_valid, log_w)
    return jnp.sum(out * w) + jnp.sum(jnp.where(jnp.isfinite(lse), jnp.sin(lse), 0.0))

  fast = lambda *x: blocked_attention(*x, 0.35, 16, implementation)
  plain = lambda *x: blocked_attention_xla(*x, scale=0.35, block_size=16)
  g = jax.grad(functools.partial(loss, fast), argnums=tuple(range(6)))(*diff)
  g_ref = jax.grad(functools.partial(loss, plain), argnums=tuple(range(6)))(*diff)
  for a, b in zip(g, g_ref):
    assert rel_err(a, b) < 1e-5
  if implementation == "pallas":
    return  # float32 kernels; the float64 finite-difference check runs on the XLA recompute
  with jax.enable_x64(True):  # finite differences need float64 to resolve the gradient
    diff64 = [x.astype(jnp.float64) for x in diff]
    check_grads(lambda *x: loss(fast, *x), diff64, order=1, modes=("rev",), atol=1e-5,
                rtol=1e-5)


SMALL = HyperAttentionConfig(block_size=32, sample_size=16, lsh_num_projs=5, min_seq_len=64,
                             exact_chunk_size=48)


@pytest.mark.parametrize("causal", [False, True])
def test_hyper_pallas_equals_xla_and_reference(seed, causal):
  q, k, v = make_qkv(seed, 2, 200, 200, 4, 2, 16)
  rng = jax.random.key(seed)
  run = lambda impl, q, k, v: hyper_attention(q, k, v, rng=rng, causal=causal, config=SMALL,
                                              implementation=impl, return_lse=True)
  out_p, lse_p = run("pallas", q, k, v)
  out_x, lse_x = run("xla", q, k, v)
  np.testing.assert_allclose(out_p, out_x, atol=2e-5)
  np.testing.assert_allclose(lse_p, lse_x, atol=2e-5)
  w = jax.random.normal(jax.random.key(seed + 2), q.shape)
  g = jax.grad(lambda q, k, v: jnp.sum(run("pallas", q, k, v)[0] * w), (0, 1, 2))(q, k, v)
  g_ref = jax.grad(lambda q, k, v: jnp.sum(reference_hyper_attention(
      q, k, v, rng=rng, causal=causal, config=SMALL)[0] * w), (0, 1, 2))(q, k, v)
  for a, b in zip(g, g_ref):
    assert rel_err(a, b) < 1e-5


def test_exact_attention_pallas(seed):
  q, k, v = make_qkv(seed, 1, 130, 130, 2, 1, 16)
  out = exact_attention(q, k, v, causal=True, implementation="pallas")
  np.testing.assert_allclose(out, dense_attention(q, k, v, causal=True)[0], atol=2e-6)
