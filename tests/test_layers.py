"""Flax integration: HyperAttention module, attention_fn drop-in, RoPE, masks, params."""

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperattn_jax import HyperAttention, HyperAttentionConfig, hyper_attention, make_attention_fn
from hyperattn_jax.rope import apply_rope

SMALL = HyperAttentionConfig(block_size=16, sample_size=16, lsh_num_projs=3, min_seq_len=32)
FEATURES, HEADS = 32, 4


def _x(seed, batch=2, seq=24, features=FEATURES):
  return jax.random.normal(jax.random.key(seed), (batch, seq, features), jnp.float32)


def _init(module, x, seed):
  return module.init(jax.random.key(seed + 1), x)


@pytest.mark.parametrize("causal", [False, True])
def test_module_equals_flax_mha_in_exact_regime(seed, causal):
  x = _x(seed)
  ours = HyperAttention(num_heads=HEADS, causal=causal, use_rope=False)
  params = _init(ours, x, seed)
  mha = nn.MultiHeadDotProductAttention(num_heads=HEADS, use_bias=False)
  mask = nn.make_causal_mask(x[..., 0]) if causal else None
  expected = mha.apply(params, x, x, mask=mask)
  np.testing.assert_allclose(ours.apply(params, x), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_fn_dropin_equals_flax_with_padding(seed, causal):
  x = _x(seed, seq=20)
  lengths = jnp.array([20, 13])
  pad = jnp.arange(20)[None, :] < lengths[:, None]                              # [b, t]
  plain = nn.MultiHeadDotProductAttention(num_heads=HEADS)
  params = plain.init(jax.random.key(seed + 1), x)
  ours = nn.MultiHeadDotProductAttention(
      num_heads=HEADS, attention_fn=make_attention_fn(causal=causal))
  masks = [pad[:, None, None, :], nn.make_attention_mask(pad, pad)]   # key mask, flax's outer
  for mask in masks:
    full = nn.combine_masks(mask, nn.make_causal_mask(x[..., 0])) if causal else mask
    expected = plain.apply(params, x, mask=full)
    got = ours.apply(params, x, mask=full)
    valid = np.asarray(pad)  # rows of padded queries are unconstrained (flax: arbitrary)
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(expected)[valid], rtol=2e-5,
                               atol=2e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_module_equals_functional_in_hyper_regime(seed, causal):
  x = _x(seed, seq=100)
  module = HyperAttention(num_heads=HEADS, num_kv_heads=2, causal=causal, config=SMALL)
  params = _init(module, x, seed)
  key = jax.random.key(seed + 2)
  y, state = module.apply(params, x, rngs={"hyper": key}, mutable=["intermediates"])
  q, k, v = state["intermediates"]["qkv"][0]
  assert q.shape == (2, 100, HEADS, FEATURES // HEADS) and k.shape == (2, 100, 2, 8)
  out_kernel = params["params"]["out"]["kernel"]
  # The out projection is linear without bias: y = attention(q, k, v) @ out_kernel.
  attn = hyper_attention(q, k, v, rng=_hyper_key(module, params, x, key), causal=causal,
                         config=SMALL)
  np.testing.assert_allclose(y, jnp.einsum("btnh,nhf->btf", attn, out_kernel), rtol=2e-5,
                             atol=2e-5)


def _hyper_key(module, params, x, key):
  """The key the module draws from the "hyper" stream in one apply (its first make_rng)."""
  return nn.apply(lambda mdl, x: mdl.make_rng("hyper"), module)(params, x, rngs={"hyper": key})


def test_padded_keys_get_no_weight_in_hyper_regime(seed):
  """Changing the tokens behind padded keys leaves every real token's output unchanged."""
  x = _x(seed, seq=90)
  key_mask = jnp.arange(90)[None, :] < jnp.array([[90], [61]])
  for causal in (False, True):
    module = HyperAttention(num_heads=HEADS, causal=causal, config=SMALL)
    params = _init(module, x, seed)
    noise = jnp.where(key_mask[..., None], 0.0, 100.0 * _x(seed + 3, seq=90))
    y1 = module.apply(params, x, key_mask=key_mask)
    y2 = module.apply(params, x + noise, key_mask=key_mask)
    real = np.asarray(key_mask)
    np.testing.assert_allclose(np.asarray(y2)[real], np.asarray(y1)[real], rtol=1e-5, atol=1e-5)


def test_appended_padding_leaves_real_tokens_unchanged_in_exact_regime(seed):
  x = _x(seed, seq=20)
  module = HyperAttention(num_heads=HEADS, causal=False)
  params = _init(module, x, seed)
  padded = jnp.concatenate([x, _x(seed + 5, seq=7)], axis=1)
  mask = jnp.arange(27)[None, :].repeat(2, 0) < 20
  np.testing.assert_allclose(module.apply(params, padded, key_mask=mask)[:, :20],
                             module.apply(params, x), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("mode", ["hyper", "exact"])
def test_fully_padded_rows_are_zero_not_nan(seed, mode):
  x = _x(seed, seq=70)
  module = HyperAttention(num_heads=HEADS, causal=False, config=SMALL, mode=mode)
  params = _init(module, x, seed)
  key_mask = jnp.stack([jnp.ones(70, bool), jnp.zeros(70, bool)])
  y = module.apply(params, x, key_mask=key_mask)
  assert np.all(np.isfinite(y)) and np.all(np.asarray(y[1]) == 0)


def test_gqa_rope_shapes_jit_grad(seed):
  x = _x(seed, seq=80)
  module = HyperAttention(num_heads=8, num_kv_heads=2, head_dim=6, out_features=12,
                          config=SMALL, dtype=jnp.float32)
  params = _init(module, x, seed)
  shapes = jax.tree.map(jnp.shape, params["params"])
  assert shapes["query"]["kernel"] == (FEATURES, 8, 6)
  assert shapes["key"]["kernel"] == (FEATURES, 2, 6)
  assert shapes["out"]["kernel"] == (8, 6, 12)
  loss = jax.jit(lambda p, x: jnp.sum(module.apply(p, x, rngs={"hyper": jax.random.key(1)})**2))
  grads = jax.grad(loss)(params, x)
  assert module.apply(params, x).shape == (2, 80, 12)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["params"]["key"]["kernel"]).sum()) > 0


def test_rope_depends_only_on_relative_position(seed):
  kq, kk = jax.random.split(jax.random.key(seed))
  q = jax.random.normal(kq, (1, 1, 1, 16))
  k = jax.random.normal(kk, (1, 1, 1, 16))
  dot = lambda i, j: float(jnp.sum(apply_rope(q, jnp.array([[i]]))
                                   * apply_rope(k, jnp.array([[j]]))))
  np.testing.assert_allclose(dot(5, 2), dot(103, 100), rtol=1e-4)
  np.testing.assert_allclose(dot(0, 0), float(jnp.sum(q * k)), rtol=1e-5)
  assert abs(dot(5, 2) - dot(2, 5)) > 1e-6  # not symmetric: it sees the direction


def test_rng_stream_and_deterministic_default(seed):
  x = _x(seed, seq=100)
  module = HyperAttention(num_heads=HEADS, causal=False, config=SMALL)
  params = _init(module, x, seed)
  default1, default2 = module.apply(params, x), module.apply(params, x)
  streamed = module.apply(params, x, rngs={"hyper": jax.random.key(seed)})
  np.testing.assert_array_equal(default1, default2)
  assert not np.allclose(default1, streamed)


def test_modes_share_params_and_serialize(seed):
  x = _x(seed, seq=40)
  hyper = HyperAttention(num_heads=HEADS, num_kv_heads=1, config=SMALL)
  exact = HyperAttention(num_heads=HEADS, num_kv_heads=1, config=SMALL, mode="exact")
  p_hyper, p_exact = _init(hyper, x, seed), _init(exact, x, seed)
  assert jax.tree.structure(p_hyper) == jax.tree.structure(p_exact)
  assert jax.tree.map(jnp.shape, p_hyper) == jax.tree.map(jnp.shape, p_exact)
  restored = flax.serialization.from_bytes(p_exact, flax.serialization.to_bytes(p_hyper))
  jax.tree.map(np.testing.assert_array_equal, restored, p_hyper)
  np.testing.assert_array_equal(hyper.apply(restored, x), hyper.apply(p_hyper, x))


def test_bad_arguments_raise_clear_errors(seed):
  x = _x(seed)
  with pytest.raises(ValueError, match="num_kv_heads"):
    HyperAttention(num_heads=4, num_kv_heads=3).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="even head_dim"):
    HyperAttention(num_heads=4, head_dim=5).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="mode"):
    HyperAttention(num_heads=4, mode="fast").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="key_mask"):
    HyperAttention(num_heads=4).init(jax.random.key(0), x, key_mask=jnp.ones((2, 5), bool))
  with pytest.raises(ValueError, match=r"x must be \[batch, seq, features\]"):
    HyperAttention(num_heads=4).init(jax.random.key(0), x[0])
  fn = make_attention_fn()
  q = x.reshape(2, 24, 4, 8)
  with pytest.raises(ValueError, match="bias"):
    fn(q, q, q, bias=jnp.zeros((2, 4, 24, 24)))
  with pytest.raises(ValueError, match="dropout"):
    fn(q, q, q, dropout_rate=0.1, deterministic=False)
  with pytest.raises(ValueError, match="not a key padding mask"):
    fn(q, q, q, mask=jnp.tril(jnp.ones((24, 24), bool))[None, None])  # causal needs causal=True
  with pytest.raises(ValueError, match="traced"):
    jax.jit(lambda m: fn(q, q, q, mask=m))(jnp.ones((2, 1, 24, 24), bool))
  with pytest.raises(TypeError, match="HyperAttentionConfig"):
    make_attention_fn({"block_size": 4})


def test_dropin_refuses_sow_weights(seed):
  """flax passes ``module`` to attention_fn only to sow the weights: there are none to sow
  (the drop-in once ran and sowed nothing)."""
  x = _x(seed)
  mha = nn.MultiHeadDotProductAttention(num_heads=HEADS, attention_fn=make_attention_fn(SMALL))
  params = mha.init(jax.random.key(seed), x)
  with pytest.raises(ValueError, match="sow_weights=True is not supported"):
    mha.apply(params, x, sow_weights=True, mutable=["intermediates"])
