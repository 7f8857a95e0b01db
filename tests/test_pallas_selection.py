"""The ``select_blocks`` option in the Pallas kernels (interpret mode on CPU): the blocked
stage's third softmax part (each block's selected key rows, loaded by index) and the samples
left out of a block's residual, forward and backward, against the XLA stage and the oracle."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_qkv, rel_err
from hyperattn_jax import hyper_attention, reference
from hyperattn_jax import backends
from hyperattn_jax import blocked as blocked_lib
from hyperattn_jax.folding import embed_rows
from hyperattn_jax.merge import merge_attention, output_delta
from hyperattn_jax import selection as selection_lib
from hyperattn_jax.selection import Selection
from pallas_kernels.triton import blocked_attention_bwd_pallas, blocked_attention_pallas
from test_options import SMALL, _mask
from test_pallas_kernels import (BLOCKED, _assert_grads_close, _assert_lse_close,
                                 _blocked_inputs, _cotangents, _dims, _random_prior,
                                 _stage_args, _window_grads, kernel_kw)


def _random_selection(seed, args, window, nb, s):
  """A selection of ``s`` key rows per block: random local rows (repeats across blocks, some
  -1), ``keep`` random (never on -1 rows), random dropped samples."""
  q_perm, m = args[3], args[5].shape[2]
  p, kh = q_perm.shape[:2]
  ks = jax.random.split(jax.random.key(seed + 11), 4)
  rows = jax.random.randint(ks[0], (p, kh, nb, s), 0, window.k_len)
  rows = jnp.where(jax.random.uniform(ks[1], rows.shape) < 0.1, -1, rows).astype(jnp.int32)
  keep = (jax.random.uniform(ks[2], rows.shape) < 0.7) & (rows >= 0)
  drop = jax.random.uniform(ks[3], (p, kh, nb, m)) < 0.3
  return Selection(rows, keep, drop)


def _stage(args, selection, scale, bs, window):
  """The XLA stage with the selection (plain autodiff of it is the gradient reference)."""
  _, _, _, sort, samples = _stage_args(args)
  return lambda q, k, v, k_s, v_s, w: blocked_lib.blocked_attention_fwd(
      q, k, v, sort, dataclasses.replace(samples, k=k_s, v=v_s, log_weight=w), selection, scale,
      bs, window, backends.XLA)


SELECT_CASES = [  # shape, selected rows per block, dtype, forward atol, gradient tolerance
    (BLOCKED[1], 9, jnp.float32, 2e-5, 1e-5),    # odd shapes, GQA 3, an empty batch row
    (BLOCKED[0], 20, jnp.bfloat16, 3e-2, 2e-2),  # all keys valid (no key bias), 2 chunks
]


@pytest.mark.parametrize("shape,s,dtype,atol,tol", SELECT_CASES)
def test_selected_keys_kernels_match_xla(seed, shape, s, dtype, atol, tol):
  """Forward (out, lse) and the gradients of the stage merged with another part (dq, dk, dv
  with the selected keys' partials scatter-added, sample dk/dv, log-weights) == the XLA stage
  and its autodiff."""
  dims, n_valid, q_len, k_len = _dims(shape)
  args, window = _blocked_inputs(seed, *dims, dtype, n_valid, q_len, k_len)
  q, k, v, _, _, k_s, v_s, _, _, log_w = args
  scale, nb, bs = dims[-1] ** -0.5, dims[3], dims[5]
  selection = _random_selection(seed, args, window, nb, s)
  kw = dict(scale=scale, block_size=bs,
            **kernel_kw(window, (16, 16), sample_groups=2 * q.shape[0]))  # two partials each
  stage = _stage(args, selection, scale, bs, window)
  ref_out, ref_lse = jax.jit(stage)(q, k, v, k_s, v_s, log_w)  # jitted: one compile, not one per op
  out, lse = jax.jit(functools.partial(blocked_attention_pallas, **kw))(*args, selection)
  assert out.dtype == dtype and np.all(np.isfinite(np.asarray(out, np.float32)))
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32),
                             atol=atol, rtol=0)
  _assert_lse_close(lse, ref_lse, atol)
  # the selection changes the stage (the test can fail)
  plain = jax.jit(_stage(args, None, scale, bs, window))(q, k, v, k_s, v_s, log_w)[0]
  assert rel_err(ref_out, plain) > 1e-2

  prior = _random_prior(seed, ref_out, ref_lse)
  merged = lambda *x: merge_attention(*prior, *stage(*x))

  @jax.jit
  def reference_grads(*x):
    (m_out, m_lse), vjp = jax.vjp(merged, *x)
    d_out, d_lse = _cotangents(seed, m_out, m_lse)
    return m_out, m_lse, d_out, d_lse, vjp((d_out, d_lse))

  m_out, m_lse, d_out, d_lse, ref = reference_grads(q, k, v, k_s, v_s, log_w)
  ref = _window_grads(ref, window)

  @jax.jit
  def kernel_grads(args, d_out, m_out, m_lse, d_lse, selection):
    rows = lambda x, axis: embed_rows(x, window.q_offset, q.shape[1], axis, jnp.nan)
    return blocked_attention_bwd_pallas(
        *args, rows(d_out, 1), rows(m_lse, 2), rows(output_delta(m_out, d_out, d_lse), 2),
        selection, **kw)

  grads = kernel_grads(args, d_out, m_out, m_lse, d_lse, selection)
  _assert_grads_close(grads[:5], ref[:5], tol)
  assert rel_err(grads[5], ref[5]) < tol


def test_hyper_attention_pallas_selection_matches_reference(seed):
  """End to end with ``implementation="pallas"``, causal (the non-causal call is one such
  problem; the levels merge and add into the running arrays in place, head_dim 16): the
  selection with sinks and the band, key padding, GQA, an odd length; forward and gradients
  against the oracle."""
  b, n, causal = 1, 150, True
  q, k, v = make_qkv(seed, b, n, n, 4, 2, 16)
  rng = jax.random.key(seed + 1)
  mask = _mask(seed, b, n)
  config = dataclasses.replace(SMALL, select_blocks=2, select_block_size=8, sink_size=3,
                               local_window=9)
  run = lambda q, k, v: hyper_attention(q, k, v, rng=rng, causal=causal, config=config,
                                        key_mask=mask, implementation="pallas")
  ref = lambda q, k, v: reference.reference_hyper_attention(q, k, v, rng=rng, causal=causal,
                                                           config=config, key_mask=mask)[0]
  np.testing.assert_allclose(run(q, k, v), jax.jit(ref)(q, k, v), atol=2e-5, rtol=0)
  w = jax.random.normal(jax.random.key(seed + 2), q.shape)
  g = jax.jit(jax.grad(lambda *x: jnp.sum(run(*x) * w), (0, 1, 2)))(q, k, v)
  g_ref = jax.jit(jax.grad(lambda *x: jnp.sum(ref(*x) * w), (0, 1, 2)))(q, k, v)
  for a, b_ in zip(g, g_ref):
    assert rel_err(a, b_) < 1e-5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_run_scores_kernel_matches_xla(seed, dtype):
  """The run-score kernel (bound tiles maxed in registers) == the XLA scores: odd block and
  run counts, GQA, padding query rows (left out), a window offset; products exact in both, so
  only the summation order differs."""
  p, kh, g, nb, qb, h, runs, q_off = 2, 2, 3, 3, 40, 24, 70, 3
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (p, q_off + nb * qb + 1, kh * g, h)).astype(dtype)
  k = jax.random.normal(ks[1], (p, kh, runs * 5 - 3, h)).astype(dtype)
  valid = jax.random.uniform(ks[2], (p, k.shape[2])) > 0.3
  kmax, kmin, _ = selection_lib.run_extrema(k, valid, 5)
  q_len = nb * qb - 7
  perm = jax.vmap(lambda r: jax.random.permutation(r, nb * qb))(
      jax.random.split(ks[3], p * kh * g)).reshape(p, kh, g, nb * qb)
  perm = jnp.where(perm < q_len, perm, -1).astype(jnp.int32)
  perm = perm.at[1, 0, :, :qb].set(-1)  # a block without a valid query
  got = selection_lib.run_scores(q, perm, q_off, kmax, kmin, nb, backends.resolve("pallas"))
  want = selection_lib.run_scores(q, perm, q_off, kmax, kmin, nb, backends.XLA)
  assert got.shape == want.shape == (p, kh, nb, runs)
  assert np.all(np.asarray(got[1, 0, 0]) == -np.inf)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
