"""cuDNN exact attention with float32 LSE (the GPU base case) against the XLA loops.

cuDNN exists only on an NVIDIA GPU: on other backends these tests are skipped (and
``cudnn.available`` must say False, checked below everywhere). Marked ``gpu``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_qkv, rel_err
from hyperattn_jax import HyperAttentionConfig, hyper_attention
from hyperattn_jax import backends
from hyperattn_jax import cudnn
from hyperattn_jax.exact import flash_attention, kernel_backward, kernel_forward
from hyperattn_jax.merge import merge_attention

pytestmark = pytest.mark.gpu

ON_GPU = jax.default_backend() == "gpu"
gpu_only = pytest.mark.skipif(not ON_GPU, reason="cuDNN runs only on an NVIDIA GPU")


def test_available_only_where_cudnn_can_run():
  q = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
  assert cudnn.available(q, None) == ON_GPU
  assert not cudnn.available(q, jnp.ones((1, 8), bool))          # key masks: not supported
  assert not cudnn.available(q.astype(jnp.float32), None)         # float32: not supported
  assert not cudnn.available(jnp.zeros((1, 8, 2, 12), jnp.bfloat16), None)  # head_dim % 8


def _f32(*xs):
  return [x.astype(jnp.float32) for x in xs]


@gpu_only
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t", [256, 333])
def test_cudnn_merged_attention_matches_xla(seed, causal, t):
  """Forward (out, float32 lse), and the backward from the statistics of a merge with another
  part (no lse cotangent: the cuDNN backward), against the XLA loops on the same bf16 values."""
  q, k, v = make_qkv(seed, 2, t, t, 4, 2, 64, jnp.bfloat16)
  keys = jax.random.split(jax.random.key(seed + 1), 3)
  prior = (jax.random.normal(keys[0], q.shape).astype(jnp.bfloat16),
           jax.random.normal(keys[1], (2, 4, t)) + 3.0)
  d_out = jax.random.normal(keys[2], q.shape).astype(jnp.bfloat16)
  on_cudnn = backends.exact_backend(backends.resolve("pallas"), q, None)
  assert on_cudnn.cudnn
  run = lambda impl, q, k, v: kernel_forward(q, k, v, None, causal, 0.125, 64, impl)
  (out, lse), (out_x, lse_x) = run(on_cudnn, q, k, v), run(backends.XLA, *_f32(q, k, v))
  assert lse.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out, np.float32), out_x, atol=2e-2)
  np.testing.assert_allclose(lse, lse_x, atol=2e-3)
  merged_out, merged_lse = merge_attention(*prior, out, lse)
  g = kernel_backward(q, k, v, None, merged_out, merged_lse, d_out, None, causal, 0.125, 64,
                      on_cudnn)
  exact_xla = lambda q, k, v: flash_attention(q, k, v, None, causal, 0.125, 64)
  _, vjp = jax.vjp(lambda *x: merge_attention(*_f32(prior[0]), prior[1], *exact_xla(*x)),
                   *_f32(q, k, v))
  g_ref = vjp((d_out.astype(jnp.float32), jnp.zeros_like(merged_lse)))
  for a, b in zip(g, g_ref):
    assert rel_err(a, b) < 2e-2


@gpu_only
def test_hyper_causal_with_cudnn_base_matches_xla(seed):
  cfg = HyperAttentionConfig(block_size=64, sample_size=32, min_seq_len=256)
  q, k, v = make_qkv(seed, 1, 1000, 1000, 4, 2, 64, jnp.bfloat16)
  rng = jax.random.key(seed)
  run = lambda impl, q, k, v: hyper_attention(q, k, v, rng=rng, causal=True, config=cfg,
                                              implementation=impl)
  w = jax.random.normal(jax.random.key(seed + 1), q.shape)
  loss = lambda impl, *x: jnp.sum(run(impl, *x).astype(jnp.float32) * w)
  assert rel_err(run("pallas", q, k, v), run("xla", *_f32(q, k, v))) < 1e-2
  g = jax.grad(lambda *x: loss("pallas", *x), argnums=(0, 1, 2))(q, k, v)
  g_ref = jax.grad(lambda *x: loss("xla", *x), argnums=(0, 1, 2))(*_f32(q, k, v))
  for a, b in zip(g, g_ref):
    assert rel_err(a, b) < 2e-2
