"""Flax NNX integration: hyperattn_jax.nnx.HyperAttention and its attention_fn drop-in."""

import flax.linen as linen_nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hyperattn_jax import HyperAttention as LinenHyperAttention
from hyperattn_jax import HyperAttentionConfig
from hyperattn_jax.nnx import HyperAttention, make_attention_fn

SMALL = HyperAttentionConfig(block_size=16, sample_size=16, lsh_num_projs=3, min_seq_len=32)
FEATURES, HEADS = 32, 4


def _x(seed, batch=2, seq=24):
  return jax.random.normal(jax.random.key(seed), (batch, seq, FEATURES), jnp.float32)


def _params(module):
  return nnx.to_pure_dict(nnx.state(module, nnx.Param))


@pytest.mark.parametrize("causal", [False, True])
def test_equals_nnx_mha_in_exact_regime_with_padding(seed, causal):
  """Short sequences (<= min_seq_len) are exact: the layer (no RoPE) and the drop-in equal
  nnx.MultiHeadAttention's default, with GQA and a key padding mask, from one Rngs seed."""
  x = _x(seed, seq=20)
  pad = jnp.arange(20)[None, :] < jnp.array([[20], [13]])                          # [b, t]
  mha = nnx.MultiHeadAttention(HEADS, FEATURES, num_kv_heads=2, use_bias=False, decode=False,
                               rngs=nnx.Rngs(seed))
  ours = HyperAttention(HEADS, FEATURES, num_kv_heads=2, causal=causal, use_rope=False,
                        config=SMALL, rngs=nnx.Rngs(seed))
  dropin = nnx.MultiHeadAttention(HEADS, FEATURES, num_kv_heads=2, use_bias=False,
                                  decode=False, attention_fn=make_attention_fn(SMALL),
                                  rngs=nnx.Rngs(seed))
  jax.tree.map(np.testing.assert_array_equal, _params(ours), _params(mha))
  mask = pad[:, None, None, :]
  if causal:
    mask = nnx.combine_masks(mask, nnx.make_causal_mask(x[..., 0]))
  expected = np.asarray(mha(x, mask=mask))
  valid = np.asarray(pad)  # rows of padded queries are unconstrained (flax: arbitrary)
  got = {"module": ours(x, key_mask=pad),
         "drop-in": dropin(x, mask=mask, is_causal=causal),
         "drop-in, key mask": dropin(x, mask=pad[:, None, None, :], is_causal=causal)}
  for name, y in got.items():
    np.testing.assert_allclose(np.asarray(y)[valid], expected[valid], rtol=2e-5, atol=2e-5,
                               err_msg=name)


def test_hyper_regime_equals_linen_layer_and_prefill(seed):
  """seq 100 > min_seq_len (HyperAttention runs): the NNX layer with the linen layer's params
  and key gives the linen output, in both modes; the decode prefill gives it too."""
  x = _x(seed, seq=100)
  key = jax.random.key(seed + 1)
  layer = HyperAttention(HEADS, FEATURES, num_kv_heads=2, config=SMALL, rngs=nnx.Rngs(seed))
  exact_layer = HyperAttention(HEADS, FEATURES, num_kv_heads=2, config=SMALL, mode="exact",
                               rngs=nnx.Rngs(seed))
  jax.tree.map(np.testing.assert_array_equal, _params(layer), _params(exact_layer))
  linen = LinenHyperAttention(num_heads=HEADS, num_kv_heads=2, config=SMALL)
  variables = {"params": _params(layer)}
  # The key the linen layer draws from its "hyper" stream (its first make_rng of the apply).
  drawn = linen_nn.apply(lambda mdl: mdl.make_rng("hyper"), linen)(variables,
                                                                  rngs={"hyper": key})
  y = layer(x, rngs=drawn)
  np.testing.assert_allclose(y, linen.apply(variables, x, rngs={"hyper": key}), rtol=2e-5,
                             atol=2e-5)
  np.testing.assert_allclose(exact_layer(x), linen.clone(mode="exact").apply(variables, x),
                             rtol=2e-5, atol=2e-5)
  assert np.abs(np.asarray(y) - np.asarray(exact_layer(x))).max() > 1e-3
  layer.init_cache((2, 120, FEATURES))
  np.testing.assert_allclose(layer(x, decode=True, rngs=drawn), y, rtol=1e-6, atol=1e-6)
  assert int(layer.cache_index[...]) == 100


def test_decode_steps_equal_full_sequence(seed):
  x = _x(seed, seq=20)
  layer = HyperAttention(HEADS, FEATURES, num_kv_heads=1, mode="exact", rngs=nnx.Rngs(seed))
  full = layer(x)
  layer.init_cache((2, 24, FEATURES))
  step = nnx.jit(lambda m, t: m(t, decode=True))  # the cache is updated through nnx.jit
  outs = [step(layer, x[:, :8])] + [step(layer, x[:, i:i + 1]) for i in range(8, 20)]
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)
  assert int(layer.cache_index[...]) == 20


def test_padding_invariance_in_hyper_regime(seed):
  """Changing the tokens behind padded keys leaves every real token's output unchanged."""
  x = _x(seed, seq=90)
  key_mask = jnp.arange(90)[None, :] < jnp.array([[90], [61]])
  layer = HyperAttention(HEADS, FEATURES, causal=False, config=SMALL, rngs=nnx.Rngs(seed))
  noise = jnp.where(key_mask[..., None], 0.0, 100.0 * _x(seed + 3, seq=90))
  real = np.asarray(key_mask)
  np.testing.assert_allclose(np.asarray(layer(x + noise, key_mask=key_mask))[real],
                             np.asarray(layer(x, key_mask=key_mask))[real], rtol=1e-5,
                             atol=1e-5)


def test_rngs_jit_split_merge_grad(seed):
  """Draws (seq 40 > min_seq_len): a fixed default key per layer, a fresh key per call from a
  "hyper" stream; nnx.jit and split/merge keep the output; gradients reach every kernel."""
  x = _x(seed, seq=40)
  rngs = nnx.Rngs(seed)
  layer = HyperAttention(HEADS, FEATURES, num_kv_heads=2, config=SMALL, rngs=rngs)
  other = HyperAttention(HEADS, FEATURES, num_kv_heads=2, config=SMALL, rngs=rngs)
  assert not np.array_equal(jax.random.key_data(layer.default_key),
                            jax.random.key_data(other.default_key))
  forward = nnx.jit(lambda m, x: m(x))
  y = forward(layer, x)
  np.testing.assert_array_equal(y, forward(layer, x))           # default key: deterministic
  np.testing.assert_allclose(y, layer(x), rtol=1e-6, atol=1e-6)
  graphdef, state = nnx.split(layer)
  np.testing.assert_array_equal(forward(nnx.merge(graphdef, state), x), y)
  streamed = HyperAttention(HEADS, FEATURES, num_kv_heads=2, config=SMALL,
                            rngs=nnx.Rngs(params=seed, hyper=seed + 1))
  nnx.update(streamed, nnx.state(layer, nnx.Param))
  first, second = forward(streamed, x), forward(streamed, x)   # a fresh key per call
  assert not np.allclose(first, second) and not np.allclose(first, y)
  short = x[:, :24]  # the gradient in the exact regime (the hyper backward: tests/test_layers)
  grads = nnx.grad(lambda m, x: jnp.sum(m(x) ** 2))(layer, short)
  leaves = jax.tree.leaves(grads)
  assert len(leaves) == 4 and all(np.all(np.isfinite(g)) for g in leaves)
  assert all(float(jnp.abs(g).sum()) > 0 for g in leaves)


def test_bad_arguments_raise_clear_errors():
  x = _x(0)
  with pytest.raises(ValueError, match="num_kv_heads"):
    HyperAttention(4, FEATURES, num_kv_heads=3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="mode"):
    HyperAttention(4, FEATURES, mode="fast", rngs=nnx.Rngs(0))
  layer = HyperAttention(4, FEATURES, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="in_features=32"):
    layer(x[..., :16])
  with pytest.raises(ValueError, match="init_cache"):
    layer(x, decode=True)
  with pytest.raises(ValueError, match="decode=True needs causal=True"):
    HyperAttention(4, FEATURES, causal=False, rngs=nnx.Rngs(0))(x, decode=True)
  q = x.reshape(2, 24, 4, 8)
  fn = make_attention_fn()
  for kwargs, match in [(dict(bias=jnp.zeros((2, 4, 24, 24))), "bias"),
                        (dict(dropout_rate=0.1, deterministic=False), "dropout"),
                        (dict(precision=jax.lax.Precision.HIGHEST), "precision"),
                        (dict(module=layer), "sow_weights"),
                        (dict(mask=jnp.tril(jnp.ones((24, 24), bool))[None, None]),
                         "not a key padding mask")]:
    with pytest.raises(ValueError, match=match):
      fn(q, q, q, **kwargs)
  mha = nnx.MultiHeadAttention(4, FEATURES, decode=False, attention_fn=fn, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="sow_weights"):
    mha(x, sow_weights=True)
  with pytest.raises(ValueError, match="causal attention needs q_len == kv_len"):
    fn(q[:, :1], q, q, is_causal=True)
