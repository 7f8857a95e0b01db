"""hyperattn_jax.dot_product_attention against jax.nn.dot_product_attention: the same calls give
the same results where HyperAttention computes exactly, and clear errors where it cannot
honour an argument."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_qkv
from hyperattn_jax import HyperAttentionConfig, dot_product_attention, hyper_attention

SMALL = HyperAttentionConfig(block_size=16, sample_size=16, lsh_num_projs=3, min_seq_len=32)


def _lengths(batch, seq, short):
  return jnp.array([seq] + [short] * (batch - 1), jnp.int32)


def _pad_mask(lengths, seq):
  """Key padding as jax.nn's 4-D mask ``[batch, 1, 1, seq]``."""
  return (jnp.arange(seq)[None, :] < lengths[:, None])[:, None, None, :]


# (batch, q_seq, kv_seq, heads, kv_heads, head_dim, keyword arguments of both functions); the
# lengths and masks are built from the shapes by _kwargs. Every query row keeps a valid key.
CASES = [
    (2, 37, 53, 4, 4, 16, dict(scale=0.3)),                                # odd lengths, scale
    (2, 41, 41, 6, 2, 12, dict(is_causal=True, key_value_seq_lengths=21)),  # GQA, causal
    (2, 27, 27, 3, 1, 8, dict(is_causal=True, mask="causal")),      # MQA, explicit causal mask
    (3, 23, 31, 2, 2, 16, dict(mask="keys", key_value_seq_lengths=17)),   # mask AND lengths
    (2, 27, 27, 4, 4, 8, dict(mask="outer", query_seq_lengths=14)),   # flax-style outer mask
    (None, 30, 34, 4, 2, 16, dict(key_value_seq_lengths=25)),         # unbatched [seq, N, H]
]


def _kwargs(batch, q_seq, kv_seq, spec):
  """The case's keyword arguments with lengths as ``[batch]`` arrays (the first row full) and
  masks built: "keys" = key padding at the second-to-last length, "outer" = the outer product
  of query and key padding (flax's make_attention_mask), "causal" = the lower triangle."""
  kw = dict(spec)
  b = batch or 1
  if "key_value_seq_lengths" in kw:
    kw["key_value_seq_lengths"] = _lengths(b, kv_seq, kw["key_value_seq_lengths"])
  if "query_seq_lengths" in kw:
    kw["query_seq_lengths"] = _lengths(b, q_seq, kw["query_seq_lengths"])
  if kw.get("mask") == "keys":
    kw["mask"] = _pad_mask(_lengths(b, kv_seq, kv_seq - 2), kv_seq)
  elif kw.get("mask") == "outer":
    q_pad = jnp.arange(q_seq)[None, :] < kw["query_seq_lengths"][:, None]
    k_pad = jnp.arange(kv_seq)[None, :] < _lengths(b, kv_seq, kv_seq - 5)[:, None]
    kw["mask"] = q_pad[:, None, :, None] & k_pad[:, None, None, :]
  elif kw.get("mask") == "causal":
    kw["mask"] = jnp.tril(jnp.ones((q_seq, kv_seq), bool))[None, None]
  return kw


@pytest.mark.parametrize("case", CASES)
def test_equals_jax_nn_where_exact(seed, case):
  """config=None: sequences up to min_seq_len (4096) are computed exactly."""
  batch, q_seq, kv_seq, heads, kv_heads, head_dim, spec = case
  q, k, v = make_qkv(seed, batch or 1, q_seq, kv_seq, heads, kv_heads, head_dim)
  if batch is None:
    q, k, v = q[0], k[0], v[0]
  kw = _kwargs(batch, q_seq, kv_seq, spec)
  expected = jax.nn.dot_product_attention(q, k, v, **kw)
  got = dot_product_attention(q, k, v, **kw, rng=jax.random.key(seed))
  assert got.shape == expected.shape == q.shape and got.dtype == q.dtype
  np.testing.assert_allclose(got, expected, atol=2e-6, rtol=1e-5)


def test_the_approximate_regime(seed):
  """Beyond min_seq_len the config, rng and implementation reach hyper_attention unchanged."""
  q, k, v = make_qkv(seed, 2, 100, 100, 4, 2, 16)
  lengths, rng = jnp.array([100, 61]), jax.random.key(seed)
  np.testing.assert_array_equal(
      dot_product_attention(q, k, v, key_value_seq_lengths=lengths, rng=rng, config=SMALL,
                            implementation="xla"),
      hyper_attention(q, k, v, key_value_seq_lengths=lengths, rng=rng, config=SMALL,
                      implementation="xla"))


def test_rows_without_keys_give_zeros(seed):
  """Where jax.nn averages all values (its masked scores are a large finite number), rows
  without any valid key give zeros."""
  q, k, v = make_qkv(seed, 2, 12, 12, 2, 2, 8)
  out = dot_product_attention(q, k, v, key_value_seq_lengths=jnp.array([12, 0]),
                              rng=jax.random.key(0))
  assert np.all(np.asarray(out[1]) == 0) and np.all(np.isfinite(np.asarray(out[0])))


REFUSED = [
    (dict(bias=jnp.zeros((1, 1, 16, 16))), "bias must be None"),
    (dict(local_window_size=(3, 2)), "local_window_size must be None"),
    (dict(implementation="triton"), "implementation must be one of"),
    (dict(implementation="cudnn"), "implementation='cudnn' needs a GPU"),
    (dict(mask=jnp.tril(jnp.ones((16, 16), bool))[None, None]),
     "not a key padding mask.*is_causal"),
    (dict(mask=jnp.ones((2, 16, 16), bool)), r"mask must be \[batch, heads\|1"),
    (dict(query_seq_lengths=jnp.array([16, 17])), r"query_seq_lengths must lie in \[0, q_seq\]"),
    (dict(key_value_seq_lengths=jnp.array([-1, 3])), r"must lie in \[0, kv_seq\]"),
    (dict(rng=jax.random.split(jax.random.key(0))), "single jax.random key"),
    (dict(k_seq=12, is_causal=True), "is_causal=True needs q_seq == kv_seq"),
]


@pytest.mark.parametrize("kwargs,match", REFUSED)
def test_refuses_what_it_cannot_honour(kwargs, match):
  kwargs = dict(kwargs)
  q = jnp.ones((2, 16, 2, 8))
  k = jnp.ones((2, kwargs.pop("k_seq", 16), 2, 8))
  kwargs.setdefault("rng", jax.random.key(0))
  with pytest.raises(ValueError, match=match):
    dot_product_attention(q, k, k, **kwargs)


def test_refuses_a_traced_mask_that_is_not_key_padding():
  q = jnp.ones((2, 16, 2, 8))
  f = jax.jit(lambda m: dot_product_attention(q, q, q, mask=m, rng=jax.random.key(0)))
  with pytest.raises(ValueError, match="traced"):
    f(jnp.ones((2, 1, 16, 16), bool))
