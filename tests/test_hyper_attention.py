"""The XLA path of hyper_attention against the dense reference, exact attention, and its rules."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import jit_reference, make_qkv, rel_err
from hyperattn_jax import HyperAttentionConfig, exact_attention, hyper_attention
from hyperattn_jax import causal as causal_lib
from hyperattn_jax import exact
from hyperattn_jax.reference import dense_attention, reference_hyper_attention

SMALL = HyperAttentionConfig(block_size=32, sample_size=16, lsh_num_projs=5, min_seq_len=64,
                             exact_chunk_size=48)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (4, 2), (3, 1)])
def test_exact_attention_matches_dense(seed, causal, q_heads, kv_heads):
  q, k, v = make_qkv(seed, 2, 173, 173, q_heads, kv_heads, 16)
  out, lse = exact_attention(q, k, v, causal=causal, return_lse=True, chunk_size=40)
  ref_out, ref_lse = dense_attention(q, k, v, causal=causal)
  np.testing.assert_allclose(out, ref_out, atol=2e-6, rtol=1e-5)
  np.testing.assert_allclose(lse, ref_lse, atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_exact_attention_gradients(seed, causal):
  q, k, v = make_qkv(seed, 1, 97, 97, 4, 2, 8)
  w = jax.random.normal(jax.random.key(seed + 1), q.shape)

  def loss(fn, q, k, v):
    out, lse = fn(q, k, v)
    return jnp.sum(out * w) + jnp.sum(jnp.sin(lse))

  fast = functools.partial(exact_attention, causal=causal, return_lse=True, chunk_size=32)
  dense = functools.partial(dense_attention, causal=causal)
  g_fast = jax.grad(functools.partial(loss, fast), argnums=(0, 1, 2))(q, k, v)
  g_ref = jax.grad(functools.partial(loss, dense), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_fast, g_ref):
    assert rel_err(a, b) < 1e-5


@pytest.mark.gpu  # on the GPU the base case's backward is cuDNN's (without an lse cotangent)
@pytest.mark.parametrize("attend", ["hyper_causal", "exact", "exact_causal"])
def test_lse_cotangent_only_where_the_lse_is_differentiated(seed, attend, monkeypatch):
  """The exact backward (exact attention, the causal recursion's base case) receives an lse
  cotangent only where the caller differentiates the returned lse: a dropped or unused lse is
  a symbolic zero, which lets the GPU base case run cuDNN's backward."""
  seen = []

  def spy(real):
    def bwd(q, k, v, key_mask, out, lse, d_out, d_lse, *args):
      seen.append(d_lse is not None)
      return real(q, k, v, key_mask, out, lse, d_out, d_lse, *args)
    return bwd

  monkeypatch.setattr(causal_lib, "kernel_backward", spy(causal_lib.kernel_backward))
  monkeypatch.setattr(exact, "kernel_backward", spy(exact.kernel_backward))
  fn = (functools.partial(hyper_attention, rng=jax.random.key(seed), causal=True, config=SMALL)
        if attend == "hyper_causal" else
        functools.partial(exact_attention, causal=attend == "exact_causal", chunk_size=32))
  q, k, v = make_qkv(seed, 1, 70, 70, 2, 1, 16)  # hyper: one level over base blocks of 35

  def loss(q, return_lse, lse_used):
    res = fn(q, k, v, return_lse=return_lse)
    if not return_lse:
      return jnp.sum(res)
    return jnp.sum(res[0]) + (jnp.sum(jnp.sin(res[1])) if lse_used else 0.0)

  jax.clear_caches()  # traces of the same shapes by other tests would not reach the spies
  for return_lse, lse_used in ((False, False), (True, False), (True, True)):
    seen.clear()  # each case traces its own backward (static return_lse, or a zero lse ct)
    jax.grad(loss)(q, return_lse, lse_used)
    assert seen == [lse_used], (return_lse, lse_used, seen)


@pytest.mark.parametrize("causal", [False, True])
def test_exact_regime_equals_exact_attention(seed, causal):
  # n <= min_seq_len, and non-causal with the block covering all keys (min_seq_len small).
  q, k, v = make_qkv(seed, 2, 64, 64, 2, 2, 16)
  out = hyper_attention(q, k, v, rng=jax.random.key(seed), causal=causal, config=SMALL)
  np.testing.assert_allclose(out, dense_attention(q, k, v, causal=causal)[0], atol=2e-6)
  cfg = HyperAttentionConfig(block_size=256, sample_size=8, min_seq_len=256)
  q, k, v = make_qkv(seed, 1, 200, 250, 2, 1, 16)
  out = hyper_attention(q, k, v, rng=jax.random.key(seed), config=cfg)
  np.testing.assert_allclose(out, dense_attention(q, k, v)[0], atol=2e-6)


CASES = [  # batch, q_len, kv_len, q_heads, kv_heads, head_dim, causal
    (2, 300, 300, 2, 2, 16, False),
    (1, 301, 301, 4, 2, 8, True),     # odd length, GQA, 3 recursion levels
    (2, 130, 517, 3, 1, 16, False),   # cross attention, MQA, partial last blocks
    (1, 517, 200, 2, 2, 16, False),   # more queries than keys
    (2, 1000, 1000, 2, 1, 8, True),   # 4 levels
]


@pytest.mark.parametrize("case", CASES)
def test_matches_dense_reference_fp32(seed, case):
  b, tq, tk, nq, nkv, h, causal = case
  q, k, v = make_qkv(seed, b, tq, tk, nq, nkv, h)
  rng = jax.random.key(seed + 7)
  out, lse = hyper_attention(q, k, v, rng=rng, causal=causal, config=SMALL, return_lse=True)
  ref_out, ref_lse = jit_reference(q, k, v, rng=rng, causal=causal, config=SMALL)
  assert out.shape == q.shape and lse.shape == (b, nq, tq) and lse.dtype == jnp.float32
  np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(lse, ref_lse, atol=1e-5, rtol=1e-5)
  # The approximation really differs from exact attention here (the test can fail).
  assert rel_err(out, dense_attention(q, k, v, causal=causal)[0]) > 1e-3


@pytest.mark.parametrize("dtype,tol", [(jnp.bfloat16, 1e-2), (jnp.float16, 2e-3)])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference_low_precision(seed, dtype, tol, causal):
  q, k, v = make_qkv(seed, 1, 400, 400, 4, 2, 16, dtype)
  rng = jax.random.key(seed)
  out = hyper_attention(q, k, v, rng=rng, causal=causal, config=SMALL)
  assert out.dtype == dtype
  ref = jit_reference(q, k, v, rng=rng, causal=causal, config=SMALL)[0]
  assert rel_err(out, ref) < tol


@pytest.mark.parametrize("causal", [False, True])
def test_key_mask_and_lengths(seed, causal):
  q, k, v = make_qkv(seed, 2, 260, 260, 2, 1, 16)
  mask = jax.random.uniform(jax.random.key(seed + 3), (2, 260)) > 0.4
  rng = jax.random.key(seed)
  out = hyper_attention(q, k, v, rng=rng, causal=causal, config=SMALL, key_mask=mask)
  ref = jit_reference(q, k, v, rng=rng, causal=causal, config=SMALL, key_mask=mask)
  np.testing.assert_allclose(out, ref[0], atol=1e-5, rtol=1e-5)
  # Masked keys get no weight: changing them changes nothing.
  k2 = jnp.where(mask[:, :, None, None], k, 100.0)
  v2 = jnp.where(mask[:, :, None, None], v, -100.0)
  out2 = hyper_attention(q, k2, v2, rng=rng, causal=causal, config=SMALL, key_mask=mask)
  np.testing.assert_allclose(out, out2, atol=1e-6)
  lengths = jnp.array([260, 77])
  a = hyper_attention(q, k, v, rng=rng, causal=causal, config=SMALL,
                      key_value_seq_lengths=lengths)
  b = hyper_attention(q, k, v, rng=rng, causal=causal, config=SMALL,
                      key_mask=jnp.arange(260)[None] < lengths[:, None])
  np.testing.assert_array_equal(a, b)


def test_fully_masked_rows_give_zeros(seed):
  q, k, v = make_qkv(seed, 2, 300, 300, 2, 2, 8)
  mask = jnp.ones((2, 300), bool).at[1].set(False)
  out, lse = hyper_attention(q, k, v, rng=jax.random.key(0), config=SMALL, key_mask=mask,
                             return_lse=True)
  assert np.all(np.asarray(out[1]) == 0) and np.all(np.isneginf(np.asarray(lse[1])))
  left_pad = jnp.arange(300)[None] >= jnp.array([[0], [120]])  # causal rows < 120 see no key
  out = hyper_attention(q, k, v, rng=jax.random.key(0), config=SMALL, causal=True,
                        key_mask=left_pad)
  assert np.all(np.isfinite(np.asarray(out))) and np.all(np.asarray(out[1, :120]) == 0)
  g = jax.grad(lambda q: hyper_attention(q, k, v, rng=jax.random.key(0), config=SMALL,
                                         causal=True, key_mask=left_pad).sum())(q)
  assert np.all(np.isfinite(np.asarray(g)))


def test_causality_across_levels(seed):
  """n=8192, min_seq_len=1024: 3 recursion levels; the future never leaks."""
  cfg = HyperAttentionConfig(block_size=128, sample_size=64, lsh_num_projs=6, min_seq_len=1024)
  q, k, v = make_qkv(seed, 1, 8192, 8192, 2, 1, 16)
  rng = jax.random.key(seed)
  f = jax.jit(lambda q, k, v: hyper_attention(q, k, v, rng=rng, causal=True, config=cfg))
  out = f(q, k, v)
  for t in (1000, 4095, 5000):
    k2 = k.at[:, t + 1:].add(jax.random.normal(jax.random.key(t), k[:, t + 1:].shape))
    v2 = v.at[:, t + 1:].mul(-3.0)
    np.testing.assert_array_equal(f(q, k2, v2)[:, :t + 1], out[:, :t + 1])
  t = 5000
  grads = jax.grad(lambda k, v: f(q, k, v)[:, :t + 1].sum(), argnums=(0, 1))(k, v)
  for g in grads:
    assert np.all(np.asarray(g[:, t + 1:]) == 0)
    assert np.any(np.asarray(g[:, :t + 1]) != 0)


def test_planted_heavy_entries(seed):
  """Each query has one key with a dominant score: LSH finds it, uniform sampling does not."""
  n, h = 2048, 64
  key = jax.random.key(seed)
  q = jax.random.normal(key, (1, n, 1, h))
  q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
  v = jax.random.normal(jax.random.fold_in(key, 2), (1, n, 1, h))
  cfg = HyperAttentionConfig(block_size=64, sample_size=64, lsh_num_projs=7, min_seq_len=256)
  # The estimator of uniform sampling alone: attention over sample_size uniform keys.
  picked = jax.random.randint(jax.random.fold_in(key, 4), (cfg.sample_size,), 0, n)
  for shuffled, bound in ((False, 0.01), (True, 0.45)):
    # key j is a scaled copy of query perm[j]: score 16, all others ~N(0, 2**2).
    perm = jax.random.permutation(jax.random.fold_in(key, 1), n) if shuffled else jnp.arange(n)
    k = 16.0 * np.sqrt(h) * q[:, perm]
    exact = dense_attention(q, k, v)[0]
    hyper = hyper_attention(q, k, v, rng=jax.random.fold_in(key, 3), config=cfg)
    sampled = dense_attention(q, k[:, picked], v[:, picked])[0]
    # Shuffled, ~1/3 of the matching pairs straddle a block boundary of the sorted order.
    assert rel_err(hyper, exact) < bound
    assert rel_err(sampled, exact) > 0.9


def test_determinism_and_key_dependence(seed):
  q, k, v = make_qkv(seed, 1, 500, 500, 2, 2, 16)
  a = hyper_attention(q, k, v, rng=jax.random.key(1), config=SMALL)
  b = hyper_attention(q, k, v, rng=jax.random.key(1), config=SMALL)
  c = hyper_attention(q, k, v, rng=jax.random.key(2), config=SMALL)
  np.testing.assert_array_equal(a, b)
  assert rel_err(a, c) > 1e-3
  legacy = hyper_attention(q, k, v, rng=jax.random.PRNGKey(1), config=SMALL)
  assert legacy.shape == a.shape


def test_jit_vmap_grad(seed):
  q, k, v = make_qkv(seed, 2, 200, 200, 2, 1, 8)  # 2 causal levels
  rng = jax.random.key(seed)
  f = lambda q, k, v, r: hyper_attention(q, k, v, rng=r, causal=True, config=SMALL)
  direct = f(q, k, v, rng)
  np.testing.assert_allclose(jax.jit(f)(q, k, v, rng), direct, atol=1e-6)
  rngs = jax.random.split(rng, 2)
  mapped = jax.vmap(f, in_axes=(0, 0, 0, 0))(q[:, None], k[:, None], v[:, None], rngs)
  for i in range(2):
    np.testing.assert_allclose(mapped[i], f(q[i:i + 1], k[i:i + 1], v[i:i + 1], rngs[i]),
                               atol=1e-6)
  # Gradient of the approximation == gradient of the dense reference for the same key.
  # Without return_lse (no lse cotangent) and with it (the lse differentiated too).
  w = jax.random.normal(jax.random.key(seed + 1), q.shape)
  ref = lambda q, k, v: reference_hyper_attention(q, k, v, rng=rng, causal=True, config=SMALL)
  with_lse = lambda q, k, v: hyper_attention(q, k, v, rng=rng, causal=True, config=SMALL,
                                             return_lse=True)
  for fn, loss in ((lambda *x: (f(*x, rng), None), lambda o, l: jnp.sum(o * w)),
                   (with_lse, lambda o, l: jnp.sum(o * w) + jnp.sum(jnp.sin(l)))):
    g = jax.jit(jax.grad(lambda *x: loss(*fn(*x)), argnums=(0, 1, 2)))(q, k, v)
    g_ref = jax.jit(jax.grad(lambda *x: loss(*ref(*x)), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g, g_ref):
      assert rel_err(a, b) < 1e-5


BAD = [
    (dict(q=(2, 10, 4)), ValueError, "query must have rank 4"),
    (dict(k=(3, 64, 2, 8)), ValueError, "key batch"),
    (dict(k=(2, 64, 2, 4), v=(2, 64, 2, 4)), ValueError, "head_dim"),
    (dict(k=(2, 64, 3, 8), v=(2, 64, 3, 8)), ValueError, "divisible"),
    (dict(v=(2, 63, 2, 8)), ValueError, "same shape"),
    (dict(dtype=jnp.int32), TypeError, "floating dtype"),
    (dict(q=(2, 60, 4, 8), causal=True), ValueError, "causal=True"),
    (dict(key_mask=jnp.ones((2, 63), bool)), ValueError, "key_mask"),
    (dict(key_mask=jnp.ones((2, 64), jnp.int32)), ValueError, "key_mask"),
    (dict(rng=None), ValueError, "rng"),
    (dict(rng=jax.random.split(jax.random.key(0))), ValueError, "single jax.random key"),
    (dict(rng=jax.random.split(jax.random.PRNGKey(0))), ValueError, "single jax.random key"),
    (dict(rng=jax.random.split(jax.random.key(0)), q=(2, 200, 4, 8), k=(2, 200, 2, 8)),
     ValueError, "single jax.random key"),                                  # the hyper path
    (dict(key_value_seq_lengths=jnp.array([-1, 64])), ValueError, r"\[0, kv_seq\] = \[0, 64\]"),
    (dict(key_value_seq_lengths=jnp.array([3, 65])), ValueError, r"\[0, kv_seq\] = \[0, 64\]"),
    (dict(implementation="cuda"), ValueError, "implementation"),
    (dict(config=dict(block_size=1)), TypeError, "config"),
]


@pytest.mark.parametrize("spec,err,match", BAD)
def test_bad_input(spec, err, match):
  dtype = spec.get("dtype", jnp.float32)
  q = jnp.ones(spec.get("q", (2, 64, 4, 8)), dtype)
  k = jnp.ones(spec.get("k", (2, 64, 2, 8)), dtype)
  v = jnp.ones(spec.get("v", spec.get("k", (2, 64, 2, 8))), dtype)
  kwargs = dict(rng=spec.get("rng", jax.random.key(0)), causal=spec.get("causal", False),
                config=spec.get("config", SMALL), key_mask=spec.get("key_mask"),
                key_value_seq_lengths=spec.get("key_value_seq_lengths"),
                implementation=spec.get("implementation"))
  with pytest.raises(err, match=match):
    hyper_attention(q, k, v, **kwargs)


def test_traced_lengths_act_clamped(seed):
  """Under jit the lengths cannot be checked: below 0 no key is valid, above kv_seq every key."""
  q, k, v = make_qkv(seed, 2, 41, 41, 2, 1, 8)
  f = jax.jit(lambda n: exact_attention(q, k, v, key_value_seq_lengths=n))
  np.testing.assert_array_equal(f(jnp.array([-1, 100])), f(jnp.array([0, 41])))
  assert np.all(np.asarray(f(jnp.array([-1, 100]))[0]) == 0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_size=0), "block_size"), (dict(sample_size=-1), "sample_size"),
    (dict(lsh_num_projs=31), "lsh_num_projs"), (dict(min_seq_len=8, block_size=16), "min_seq_len"),
    (dict(block_size=2.0), "block_size")])
def test_bad_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    HyperAttentionConfig(**kwargs)


def test_mixed_dtypes_rejected():
  q = jnp.ones((1, 8, 1, 4), jnp.float32)
  with pytest.raises(TypeError, match="one dtype"):
    exact_attention(q, q.astype(jnp.bfloat16), q.astype(jnp.bfloat16))


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_finite_with_huge_scores_and_zero_for_masked_keys(seed, causal):
  """Scores up to ~1e4 (no overflow in the exps or merges); masked keys get exactly 0."""
  q, k, v = make_qkv(seed, 2, 160, 160, 2, 1, 16)
  q, k = 50.0 * q, 50.0 * k  # |q.k| / sqrt(16) reaches ~1e4
  scores = jnp.einsum("bqnh,bknh->bnqk", q, jnp.repeat(k, 2, axis=2)) / 4.0
  assert float(jnp.max(jnp.abs(scores))) > 5e3
  key_mask = jnp.arange(160)[None, :] < jnp.array([[160], [97]])
  f = lambda q, k, v: hyper_attention(q, k, v, rng=jax.random.key(seed), causal=causal,
                                      config=SMALL, key_mask=key_mask, return_lse=True)
  w = jax.random.normal(jax.random.key(seed + 1), q.shape)

  def loss(q, k, v):
    out, lse = f(q, k, v)
    return jnp.sum(out * w) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

  grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
  for g in grads[1:]:
    assert np.all(np.asarray(g[1, 97:]) == 0)
    assert np.any(np.asarray(g[1, :97]) != 0)


@pytest.mark.parametrize("causal", [False, True])
def test_check_grads_of_the_full_function(seed, causal):
  """Finite differences (float64, modes "rev") of hyper_attention's out and lse: GQA, odd
  length, 2 causal levels. The hash buckets and samples are fixed by the key; the tiny step
  keeps every LSH code unchanged under the perturbation (finite differences of a bucket flip
  would be meaningless)."""
  from jax.test_util import check_grads  # pylint: disable=import-outside-toplevel
  with jax.enable_x64(True):
    q, k, v = (x.astype(jnp.float64) for x in make_qkv(seed, 1, 173, 173, 4, 2, 8))
    f = lambda q, k, v: hyper_attention(q, k, v, rng=jax.random.key(seed), causal=causal,
                                        config=SMALL, return_lse=True)
    out, lse = f(q, k, v)
    assert out.dtype == jnp.float64 and lse.dtype == jnp.float64
    check_grads(f, (q, k, v), order=1, modes=("rev",), eps=1e-7, atol=1e-6, rtol=1e-6)

