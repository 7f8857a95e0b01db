"""Pallas kernels (interpret mode on CPU) against their XLA references, and the blocked VJP.

The tests marked ``gpu`` are the compiled-kernel checks to run on the GPU machine (compiled
Triton checks what interpret mode does not, e.g. power-of-two load shapes)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.test_util import check_grads

from conftest import make_qkv, rel_err
from hyperattn_jax import HyperAttentionConfig, exact_attention, hyper_attention
from hyperattn_jax import backends
from hyperattn_jax import blocked as blocked_lib
from hyperattn_jax.blocked import RowWindow, blocked_attention, grouped_rows
from hyperattn_jax.exact import flash_attention, kernel_backward
from hyperattn_jax.folding import embed_rows, fold_rows, fold_stats, unfold_stats
from hyperattn_jax.merge import merge_attention, output_delta
from hyperattn_jax.plan import SampleSet, SortPlan
from hyperattn_jax.reference import dense_attention, reference_hyper_attention
from pallas_kernels.triton import (BlockSizes, Tiles, block_attention,
                                   blocked_attention_bwd_pallas, blocked_attention_pallas,
                                   flash_attention_bwd_pallas, flash_attention_pallas)

INTERPRET = jax.default_backend() != "gpu"  # the compiled kernels on the GPU


def kernel_kw(window=None, tiles=(32, 16), **sizes):
  """Keyword arguments of a kernel call: the window's rows (a ``RowWindow``, or None), every
  kernel on ``tiles`` (block_q, block_k) and ``sizes`` (other ``BlockSizes`` fields),
  interpret mode off the GPU."""
  t = Tiles(*tiles)
  kw = dict(block_sizes=BlockSizes(blocked_fwd=t, blocked_bwd=t, flash_fwd=t, flash_bwd=t,
                                   **sizes), interpret=INTERPRET)
  return kw if window is None else {**kw, **window._asdict()}


def _blocked_inputs(seed, p, kh, g, nb, qb, bs, m, h, dtype, n_valid, q_len, k_len,
                    offsets=(3, 5), ascending_samples=True):
  """Public-layout rows with the problem's window at ``offsets``; random permutations (key
  padding sorted last, as sortLSH does) and samples drawn over the valid sorted positions
  (ascending, as ``hyper_attention`` draws them, or in draw order). The window promises
  ``all_keys_valid`` where no key is masked (as ``hyper_attention`` does without a key mask)."""
  ks = jax.random.split(jax.random.key(seed), 7)
  q_off, k_off = offsets
  window = RowWindow(q_off, q_len, k_off, k_len, all_keys_valid=min(n_valid) == k_len)
  q = jax.random.normal(ks[0], (p, q_off + q_len + 2, kh * g, h)).astype(dtype)
  k = jax.random.normal(ks[1], (p, k_off + k_len + 1, kh, h)).astype(dtype)
  v = jax.random.normal(ks[2], (p, k_off + k_len + 1, kh, h)).astype(dtype)

  def perms(key, shape, n_rows, valid):
    perm = jax.vmap(lambda r: jax.random.permutation(r, n_rows))(
        jax.random.split(key, np.prod(shape))).reshape(shape + (n_rows,))
    perm = jnp.where(perm < valid, perm, -1).astype(jnp.int32)
    return jnp.take_along_axis(perm, jnp.argsort(perm < 0, axis=-1, stable=True), axis=-1)

  q_perm = perms(ks[3], (p, kh, g), nb * qb, q_len)
  k_perm = perms(ks[4], (p, kh), nb * bs, k_len)
  n_valid = jnp.asarray(n_valid, jnp.int32)
  pos = jax.random.randint(ks[5], (p, kh, m), 0, jnp.maximum(n_valid, 1)[:, None, None])
  pos = jnp.sort(pos, axis=-1) if ascending_samples else pos
  rows = jnp.take_along_axis(k_perm, pos, axis=-1)[:, :, None]
  k_s = grouped_rows(k, rows, k_off)[:, :, 0]
  v_s = grouped_rows(v, rows, k_off)[:, :, 0]
  # Per-sample log-weights: the uniform log(n_valid / m) plus noise (importance samplers).
  log_w = (jnp.log(n_valid.astype(jnp.float32) / m)[:, None, None] +
           jax.random.uniform(ks[6], (p, kh, m), minval=-1.0, maxval=1.0))
  return (q, k, v, q_perm, k_perm, k_s, v_s, pos, n_valid, log_w), window


def _stage_args(args):
  """The blocked stage's (q, k, v, sort plan, sample set) of the kernels' flat arguments."""
  q, k, v, q_perm, k_perm, k_s, v_s, pos, n_valid, log_w = args
  return q, k, v, SortPlan(q_perm, k_perm), SampleSet(k_s, v_s, pos, n_valid, log_w)


def _xla_stage(args, scale, bs, window):
  """The XLA forward without the custom VJP (plain autodiff is the gradient reference)."""
  _, _, _, sort, samples = _stage_args(args)
  return lambda q, k, v, k_s, v_s, w: blocked_lib.blocked_attention_fwd(
      q, k, v, sort, dataclasses.replace(samples, k=k_s, v=v_s, log_weight=w), None, scale, bs,
      window, backends.XLA)


def _assert_lse_close(lse, ref, atol):
  lse, ref = np.asarray(lse), np.asarray(ref)
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref))
  fin = np.isfinite(ref)
  np.testing.assert_allclose(lse[fin], ref[fin], atol=atol, rtol=0)


BLOCKED = [  # p, kh, g, nb, qb, bs, m, h, n_valid, q_len, k_len
    (2, 2, 1, 4, 32, 32, 32, 16, [128, 128], 128, 128),  # all keys valid: no key bias row
    (2, 1, 3, 3, 40, 32, 20, 24, [90, 0], 117, 96),   # odd qb, m, head_dim; GQA 3; empty batch
    (1, 2, 2, 2, 70, 64, 48, 32, [100], 139, 110),     # invalid and padding keys in last block
]


# fp32 (tight) on every shape, bf16 (loose) on the odd one: interpret mode is slow on CPU.
BLOCKED_CASES = [(s, jnp.float32, 2e-5) for s in BLOCKED] + [(BLOCKED[1], jnp.bfloat16, 3e-2)]


def _dims(shape):
  *dims, n_valid, q_len, k_len = shape
  return dims, n_valid, q_len, k_len


@pytest.mark.parametrize("shape,dtype,atol", BLOCKED_CASES)
def test_blocked_kernel_matches_xla(seed, shape, dtype, atol):
  """Rows loaded and stored by index in the kernel == the XLA stage."""
  dims, n_valid, q_len, k_len = _dims(shape)
  args, window = _blocked_inputs(seed, *dims, dtype, n_valid, q_len, k_len)
  scale, bs = dims[-1] ** -0.5, dims[5]
  out, lse = blocked_attention_pallas(*args, scale=scale, block_size=bs, **kernel_kw(window))
  q, k, v, _, _, k_s, v_s, _, _, log_w = args
  ref_out, ref_lse = _xla_stage(args, scale, bs, window)(q, k, v, k_s, v_s, log_w)
  assert out.shape == ref_out.shape == (q.shape[0], q_len) + q.shape[2:]
  assert out.dtype == dtype and lse.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out, np.float32)))
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32),
                             atol=atol, rtol=0)
  _assert_lse_close(lse, ref_lse, atol)


@pytest.mark.gpu
def test_own_block_samples_masked_in_any_order(seed):
  """Samples in draw order (not ascending): a block's samples spread over every chunk, which
  must all mask them (forward and backward == XLA); ascending samples skip the select in the
  chunks without the block's samples (every other test)."""
  shape = BLOCKED[2]  # 48 samples: 3 chunks of 16
  dims, n_valid, q_len, k_len = _dims(shape)
  args, window = _blocked_inputs(seed, *dims, jnp.float32, n_valid, q_len, k_len,
                                 ascending_samples=False)
  q, k, v, _, _, k_s, v_s, _, _, log_w = args
  assert np.any(np.diff(np.asarray(args[7]), axis=-1) < 0)
  scale, bs = dims[-1] ** -0.5, dims[5]
  kw = dict(scale=scale, block_size=bs, **kernel_kw(window))
  stage = _xla_stage(args, scale, bs, window)
  (ref_out, ref_lse), vjp = jax.vjp(stage, q, k, v, k_s, v_s, log_w)
  out, lse = blocked_attention_pallas(*args, **kw)
  np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=0)
  _assert_lse_close(lse, ref_lse, 2e-5)
  d_out, d_lse = _cotangents(seed, ref_out, ref_lse)
  rows = lambda x, axis: embed_rows(x, window.q_offset, q.shape[1], axis, jnp.nan)
  grads = blocked_attention_bwd_pallas(*args, rows(d_out, 1), rows(ref_lse, 2),
                                       rows(output_delta(ref_out, d_out, d_lse), 2), **kw)
  _assert_grads_close(grads, _window_grads(vjp((d_out, d_lse)), window), 1e-5)


@pytest.mark.parametrize("k_len,key_bias", [(128, False), (120, True)])
def test_key_bias_only_where_a_block_has_padding(seed, k_len, key_bias):
  """Every key valid (no key mask): the kernels drop the per-key bias row only where all blocks
  are full; a padded last block keeps it, and its padding slots stay masked."""
  args, window = _blocked_inputs(seed, 1, 1, 2, 4, 32, 32, 16, 16, jnp.float32, [k_len], 128,
                                 k_len)
  assert window.all_keys_valid
  lay = block_attention._blocked_inputs(*args, None, block_size=32,
                                        window=block_attention._Window(*window),
                                        tiles=Tiles(32, 16), interpret=INTERPRET)
  assert lay.geo.key_bias == key_bias
  out, lse = blocked_attention_pallas(*args, scale=0.25, block_size=32, **kernel_kw(window))
  q, k, v, _, _, k_s, v_s, _, _, log_w = args
  ref_out, ref_lse = _xla_stage(args, 0.25, 32, window)(q, k, v, k_s, v_s, log_w)
  np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=0)
  _assert_lse_close(lse, ref_lse, 2e-5)


def _inputs_77(seed, dtype):
  """GQA 3, odd length and head_dim; keys 0..9 of batch 1 masked (causal rows 0..9 empty)."""
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (2, 77, 6, 24)).astype(dtype)
  k = jax.random.normal(ks[1], (2, 77, 2, 24)).astype(dtype)
  v = jax.random.normal(ks[2], (2, 77, 2, 24)).astype(dtype)
  return q, k, v, (jax.random.uniform(ks[3], (2, 77)) > 0.3).at[1, :10].set(False)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
def test_flash_kernel_matches_xla(seed, causal, dtype, atol):
  q, k, v, mask = _inputs_77(seed, dtype)
  out, lse = flash_attention_pallas(q, k, v, mask, causal, 0.2, **kernel_kw())
  ref_out, ref_lse = flash_attention(q, k, v, mask, causal, 0.2, 32)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32),
                             atol=atol, rtol=0)
  _assert_lse_close(lse, ref_lse, atol)


def test_every_output_element_is_written(seed):
  """Poisoned outputs: interpret mode starts every output at NaN, and no NaN survives (empty
  rows, padding rows and tail tiles included)."""
  poisoned = pl.pallas_call(lambda o_ref: None, out_shape=jax.ShapeDtypeStruct((4, 4),
                                                                             jnp.float32),
                            interpret=True)()
  assert np.all(np.isnan(np.asarray(poisoned)))  # the premise of this test
  args, window = _blocked_inputs(seed, 2, 1, 3, 3, 40, 32, 20, 24, jnp.float32, [90, 0], 117,
                                 96)
  q, k, v, mask = _inputs_77(seed, jnp.float32)
  outs = (blocked_attention_pallas(*args, scale=0.2, block_size=32, **kernel_kw(window)) +
          flash_attention_pallas(q, k, v, mask, True, 0.2, **kernel_kw()))
  d_out = jnp.ones_like(outs[0])
  rows = lambda x, axis: embed_rows(x, window.q_offset, args[0].shape[1], axis, jnp.nan)
  grads = blocked_attention_bwd_pallas(*args, rows(d_out, 1), rows(outs[1], 2),
                                       rows(output_delta(outs[0], d_out), 2), scale=0.2,
                                       block_size=32, **kernel_kw(window, (16, 16),
                                                                  sample_groups=6))  # 3 / problem
  grads += flash_attention_bwd_pallas(q, k, v, mask, jnp.ones_like(q), outs[3],
                                      output_delta(outs[2], jnp.ones_like(q)), True, 0.2,
                                      **kernel_kw(tiles=(16, 32)))
  for x in outs[::2] + grads:
    assert not np.any(np.isnan(np.asarray(x))), x.shape
  for lse in outs[1::2]:
    assert not np.any(np.isnan(np.asarray(lse)))


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


def _window_grads(grads, window):
  """Reference (dq, dk, dv, ...) of the full rows -> dq, dk, dv at the window's rows (what the
  kernels return)."""
  dq, dk, dv, *rest = grads
  q_rows = slice(window.q_offset, window.q_offset + window.q_len)
  k_rows = slice(window.k_offset, window.k_offset + window.k_len)
  return [dq[:, q_rows], dk[:, k_rows], dv[:, k_rows], *rest]


def _random_prior(seed, out, lse):
  """(out, lse) of a made-up other part of the same query rows (some rows empty: -inf)."""
  ks = jax.random.split(jax.random.key(seed + 3), 2)
  prior_lse = jax.random.normal(ks[1], lse.shape) + 1.0
  return (jax.random.normal(ks[0], out.shape).astype(out.dtype),
          prior_lse.at[..., :5].set(-jnp.inf))


@pytest.mark.gpu
@pytest.mark.parametrize("shape,dtype,tol",
                         [(s, d, 1e-5 if d == jnp.float32 else 2e-2) for s, d, _ in BLOCKED_CASES])
def test_blocked_backward_kernel_matches_xla(seed, shape, dtype, tol):
  """The stage's part of the gradient of its merge with another part: Pallas dq, dk, dv, sample
  dk/dv (partials over groups) and d log-weight from the merged statistics == XLA autodiff of
  the merge (window rows only: the kernels return the window's gradients)."""
  dims, n_valid, q_len, k_len = _dims(shape)
  args, window = _blocked_inputs(seed, *dims, dtype, n_valid, q_len, k_len)
  q, k, v, q_perm, k_perm, k_s, v_s, pos, nv, log_w = args
  scale, bs = dims[-1] ** -0.5, dims[5]
  stage = _xla_stage(args, scale, bs, window)
  prior = _random_prior(seed, *stage(q, k, v, k_s, v_s, log_w))
  merged = lambda *x: merge_attention(*prior, *stage(*x))
  (out, lse), vjp = jax.vjp(merged, q, k, v, k_s, v_s, log_w)
  d_out, d_lse = _cotangents(seed, out, lse)
  ref = _window_grads(vjp((d_out, d_lse)), window)
  rows = lambda x, axis: embed_rows(x, window.q_offset, q.shape[1], axis, jnp.nan)
  grads = blocked_attention_bwd_pallas(
      *args, rows(d_out, 1), rows(lse, 2), rows(output_delta(out, d_out, d_lse), 2),
      scale=scale, block_size=bs,
      **kernel_kw(window, (16, 16), sample_groups=2 * q.shape[0]))  # two partials per problem
  _assert_grads_close(grads[:5], ref[:5], tol)
  assert rel_err(grads[5], ref[5]) < tol


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["pallas", "xla"])
@pytest.mark.parametrize("shape", BLOCKED[:2])  # head_dim 16: in place; 24: padded, merged by XLA
def test_blocked_stage_updates_running_arrays(seed, shape, implementation):
  """``into=``: the stage merged into a running (out, lse) of the unfolded rows (a causal level:
  the problems are ``parts`` row groups of each batch row), and its gradients added into
  running (dq, dk, dv); the window's rows only, every other row untouched."""
  dims, n_valid, q_len, k_len = _dims(shape)
  args, window = _blocked_inputs(seed, *dims, jnp.float32, n_valid, q_len, k_len)
  q, k, v, q_perm, k_perm, k_s, v_s, pos, nv, log_w = args
  scale, bs, parts = dims[-1] ** -0.5, dims[5], q.shape[0]  # P problems = 1 row x P parts
  unfold = lambda x: x.reshape((1, -1) + x.shape[2:])
  backend = backends.resolve(implementation)
  fwd = lambda into=None: blocked_lib.blocked_attention_fwd(
      *_stage_args(args), None, scale, bs, window, backend, into=into)
  o_d, l_d = fwd()
  prior_out, prior_lse = _random_prior(seed, jnp.zeros_like(q), jnp.zeros(
      (q.shape[0], q.shape[2], q.shape[1])))
  running = (unfold(prior_out), unfold_stats(prior_lse, parts))
  out, lse = fwd(running)
  assert out.shape == running[0].shape and lse.shape == running[1].shape
  win = slice(window.q_offset, window.q_offset + q_len)
  want_out, want_lse = merge_attention(prior_out[:, win], prior_lse[..., win], o_d, l_d)
  want_out = prior_out.at[:, win].set(want_out)
  want_lse = prior_lse.at[..., win].set(want_lse)
  np.testing.assert_allclose(fold_rows(out, parts), want_out, atol=2e-5, rtol=0)
  _assert_lse_close(fold_stats(lse, parts), want_lse, 2e-5)
  rest = np.ones(q.shape[1], bool)
  rest[win] = False
  np.testing.assert_array_equal(fold_rows(out, parts)[:, rest], prior_out[:, rest])

  d_out, _ = _cotangents(seed, q, jnp.zeros(q.shape[:1]))
  lse_rows = jnp.where(jnp.isfinite(prior_lse), prior_lse, 0.0) + 2.0
  delta = jax.random.normal(jax.random.key(seed + 5), lse_rows.shape)
  bwd = lambda into=None: blocked_lib.blocked_attention_bwd(
      *_stage_args(args), None, d_out, lse_rows, delta, scale, bs, window, backend,
      into=into)
  dq, dk, dv, *samples = bwd()
  grads_in = tuple(jax.random.normal(jax.random.key(seed + 9 + i), unfold(x).shape)
                   for i, x in enumerate((q, k, v)))
  got = bwd(grads_in)
  for a, b in zip(got[3:], samples):
    np.testing.assert_array_equal(a, b)
  for g, acc, d, offset in zip(got[:3], grads_in, (dq, dk, dv),
                               (window.q_offset, window.k_offset, window.k_offset)):
    want = fold_rows(acc, parts).at[:, offset:offset + d.shape[1]].add(d)
    np.testing.assert_allclose(fold_rows(g, parts), want, atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_flash_backward_kernel_matches_xla(seed, causal, dtype, tol):
  q, k, v, mask = _inputs_77(seed, dtype)
  (out, lse), vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, mask, causal, 0.2, 32),
                            q, k, v)
  d_out, d_lse = _cotangents(seed, out, lse)
  grads = flash_attention_bwd_pallas(q, k, v, mask, d_out, lse, output_delta(out, d_out, d_lse),
                                     causal, 0.2, **kernel_kw(tiles=(16, 32)))
  _assert_grads_close(grads, vjp((d_out, d_lse)), tol)


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_exact_backward_from_merged_statistics(seed, implementation):
  """kernel_backward from the statistics of a merge with another part == autodiff of that
  merge (out and lse cotangents, and none: ``d_lse=None``). Includes rows empty in the other
  part and rows empty in both (batch 1, causal rows 0..9 have no valid key)."""
  q, k, v, mask = _inputs_77(seed, jnp.float32)
  attend = lambda q, k, v: flash_attention(q, k, v, mask, True, 0.2, 32)
  prior = _random_prior(seed, *attend(q, k, v))
  (out, lse), vjp = jax.vjp(lambda *x: merge_attention(*prior, *attend(*x)), q, k, v)
  assert np.all(np.isneginf(np.asarray(lse[1, :, :5])))
  d_out, d_lse = _cotangents(seed, out, lse)
  for cot_lse in (d_lse, None):
    got = kernel_backward(q, k, v, mask, out, lse, d_out, cot_lse, True, 0.2, 32,
                          backends.resolve(implementation))
    want = vjp((d_out, jnp.zeros_like(d_lse) if cot_lse is None else d_lse))
    _assert_grads_close(got, want, 1e-5)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_blocked_vjp_matches_autodiff(seed, implementation, monkeypatch):
  """Custom VJP == autodiff of the XLA stage, for out and lse cotangents and the log-weights."""
  monkeypatch.setattr(blocked_lib, "_BWD_CHUNK_ELEMENTS", 500)  # one block per chunk: 3 chunks
  args, window = _blocked_inputs(seed, 1, 2, 2, 3, 24, 16, 12, 8, jnp.float32, [40], 70, 45)
  q, k, v, q_perm, k_perm, k_s, v_s, pos, n_valid, log_w = args
  diff = (q, k, v, k_s, v_s, log_w)
  w = jax.random.normal(jax.random.key(seed + 1), (q.shape[0], 70) + q.shape[2:])

  def loss(stage, *x):
    out, lse = stage(*x)
    return jnp.sum(out * w) + jnp.sum(jnp.where(jnp.isfinite(lse), jnp.sin(lse), 0.0))

  fast = lambda q, k, v, k_s, v_s, log_w: blocked_attention(
      q, k, v, SortPlan(q_perm, k_perm), SampleSet(k_s, v_s, pos, n_valid, log_w), None, 0.35,
      16, window, backends.resolve(implementation))
  plain = _xla_stage(args, 0.35, 16, window)
  grads = lambda stage: jax.jit(jax.grad(functools.partial(loss, stage),
                                          argnums=tuple(range(6))))(*diff)
  for a, b in zip(grads(fast), grads(plain)):
    assert rel_err(a, b) < 1e-5
  if implementation == "pallas":
    return  # float32 kernels; the float64 finite-difference check runs on the XLA recompute
  with jax.enable_x64(True):  # finite differences need float64 to resolve the gradient
    diff64 = [x.astype(jnp.float64) for x in diff]
    check_grads(jax.jit(lambda *x: loss(fast, *x)), diff64, order=1, modes=("rev",), atol=1e-5,
                rtol=1e-5)


SMALL = HyperAttentionConfig(block_size=32, sample_size=16, lsh_num_projs=5, min_seq_len=64,
                             exact_chunk_size=48)


@pytest.mark.gpu
@pytest.mark.parametrize("n,masked,block_size", [(200, False, 32), (256, True, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_hyper_pallas_equals_xla_and_reference(seed, causal, n, masked, block_size):
  """GQA, causal with 2 levels; odd length (padded blocks), or whole kernel tiles (block_size
  64) with a key mask, which must keep the kernels' per-key bias (a window promises valid keys
  only without a mask)."""
  q, k, v = make_qkv(seed, 1, n, n, 2, 1, 16)
  rng = jax.random.key(seed)
  config = dataclasses.replace(SMALL, block_size=block_size)
  mask = (jax.random.uniform(jax.random.key(seed + 1), (1, n)) > 0.25) if masked else None
  run = lambda impl, q, k, v: hyper_attention(q, k, v, rng=rng, causal=causal, config=config,
                                              key_mask=mask, implementation=impl,
                                              return_lse=True)
  out_p, lse_p = run("pallas", q, k, v)
  out_x, lse_x = run("xla", q, k, v)
  np.testing.assert_allclose(out_p, out_x, atol=2e-5)
  np.testing.assert_allclose(lse_p, lse_x, atol=2e-5)
  w = jax.random.normal(jax.random.key(seed + 2), q.shape)
  g = jax.jit(jax.grad(lambda q, k, v: jnp.sum(run("pallas", q, k, v)[0] * w), (0, 1, 2)))(
      q, k, v)
  g_ref = jax.jit(jax.grad(lambda q, k, v: jnp.sum(reference_hyper_attention(
      q, k, v, rng=rng, causal=causal, config=config, key_mask=mask)[0] * w), (0, 1, 2)))(q, k, v)
  for a, b in zip(g, g_ref):
    assert rel_err(a, b) < 1e-5


def test_exact_attention_pallas(seed):
  q, k, v = make_qkv(seed, 1, 130, 130, 2, 1, 16)
  out = exact_attention(q, k, v, causal=True, implementation="pallas")
  np.testing.assert_allclose(out, dense_attention(q, k, v, causal=True)[0], atol=2e-6)
