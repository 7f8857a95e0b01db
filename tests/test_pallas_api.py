"""The kernel package's interface: ``BlockSizes`` validation, the wrappers' argument checks, tile
settings that leave the results unchanged, and the compiled kernels lowering for CUDA on any
machine (``interpret=False``: Triton IR is made at lowering, compiled only on a GPU)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_qkv, rel_err
from hyperattn_jax import backends, exact_attention, hyper_attention
from hyperattn_jax import selection as selection_lib
from hyperattn_jax.merge import output_delta
from pallas_kernels.triton import (BlockSizes, Tiles, blocked_attention_bwd_pallas,
                                   blocked_attention_pallas, flash_attention_bwd_pallas,
                                   flash_attention_pallas, run_scores_pallas)
from test_options import SMALL, _mask
from test_pallas_kernels import INTERPRET, _blocked_inputs, kernel_kw
from test_pallas_selection import _random_selection


@pytest.mark.parametrize("make,message", [
    (lambda: Tiles(block_q=48), "Tiles.block_q must be a power of two >= 16, got 48"),
    (lambda: Tiles(block_k=8), "Tiles.block_k must be a power of two >= 16, got 8"),
    (lambda: Tiles(block_q=64.0), "Tiles.block_q must be a power of two >= 16, got 64.0"),
    (lambda: Tiles(num_warps=3), "Tiles.num_warps must be a power of two >= 1, got 3"),
    (lambda: Tiles(num_stages=0), "Tiles.num_stages must be an int >= 1, got 0"),
    (lambda: Tiles(num_stages=True), "Tiles.num_stages must be an int >= 1, got True"),
    (lambda: BlockSizes(sample_groups=0), "BlockSizes.sample_groups must be an int >= 1"),
    (lambda: BlockSizes(key_chunks_per_program=-1), "BlockSizes.key_chunks_per_program"),
    (lambda: BlockSizes(flash_fwd=(64, 64)), "BlockSizes.flash_fwd must be a Tiles"),
])
def test_block_sizes_are_validated(make, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    make()


def test_block_sizes_reach_the_api_checked():
  q, k, v = make_qkv(0, 1, 64, 64, 2, 1, 16)
  with pytest.raises(ValueError, match="block_sizes must be a pallas_kernels.triton.BlockSizes"):
    hyper_attention(q, k, v, rng=jax.random.key(0), implementation="pallas",
                    block_sizes=Tiles())
  with pytest.raises(ValueError, match="block_sizes must be a pallas_kernels.triton.BlockSizes"):
    exact_attention(q, k, v, implementation="pallas", block_sizes={"block_q": 64})
  with pytest.raises(ValueError, match="implementation must be one of"):
    exact_attention(q, k, v, implementation="triton")
  backend = backends.resolve("pallas", BlockSizes(sample_groups=2))
  assert backend == backends.resolve("pallas", BlockSizes(sample_groups=2))  # a static arg
  assert backend.block_sizes.sample_groups == 2 and backend.interpret == INTERPRET
  assert backends.resolve("xla", BlockSizes()) == backends.XLA  # no tiles in XLA


def _blocked_case(seed):
  args, window = _blocked_inputs(seed, 2, 1, 3, 3, 40, 32, 20, 24, jnp.float32, [90, 0], 117,
                                 96)
  return args, window, dict(scale=0.2, block_size=32, **kernel_kw(window))


def _assert_raises(message, fn, *args, **kw):
  with pytest.raises(ValueError, match=message):
    fn(*args, **kw)


def test_blocked_wrappers_check_their_arguments(seed):
  args, window, kw = _blocked_case(seed)
  q, k, v, q_perm, k_perm, k_s, v_s, pos, n_valid, log_w = args
  fwd = blocked_attention_pallas
  _assert_raises(r"k: expected \[P, Rk, Nkv, H\] with P = 2, H = 24", fwd, q, k[..., :8], v,
                 *args[3:], **kw)
  _assert_raises(r"v: expected dtype float32, got bfloat16", fwd, q, k, v.astype(jnp.bfloat16),
                 *args[3:], **kw)
  _assert_raises(r"q_perm: expected \[P, Nkv, G, nb \* qb\] with P = 2, Nkv = 1, G = 3", fwd,
                 q, k, v, q_perm[:, :, :2], *args[4:], **kw)
  _assert_raises(r"q_perm: expected dtype int, got float32", fwd, q, k, v,
                 q_perm.astype(jnp.float32), *args[4:], **kw)
  _assert_raises(r"k_perm: expected \[P, Nkv, nb \* block_size\] with block_size = 32", fwd,
                 *args[:4], k_perm[..., :40], *args[5:], **kw)
  _assert_raises(r"log_weight: expected \[P, Nkv, m\]", fwd, *args[:9], log_w[..., :3], **kw)
  _assert_raises(r"n_valid: expected \[P\] with P = 2", fwd, *args[:8], n_valid[:1], log_w,
                 **kw)
  _assert_raises(r"window .* lies outside", fwd, *args, **{**kw, "q_len": 200})
  _assert_raises(r"block_sizes must be a BlockSizes, got None", fwd, *args,
                 **{**kw, "block_sizes": None})
  bad = _random_selection(seed, args, window, 3, 5)._replace(keep=jnp.ones((2, 1, 3, 5)))
  _assert_raises(r"selection.keep: expected dtype bool", fwd, *args, bad, **kw)
  # head_dim 24 needs padding: no in-place update (the library merges by XLA instead).
  into = (jnp.zeros_like(q), jnp.zeros((2, 3, q.shape[1])))
  _assert_raises(r"into: .* in place only for a head_dim that is a power of two", fwd, *args,
                 **kw, into=into)
  stats = jnp.zeros((2, 3, q.shape[1]))
  _assert_raises(r"lse: expected \[P, N, R\] with P = 2, N = 3, R = 122",
                 blocked_attention_bwd_pallas, *args, q, stats[..., 1:], stats, **kw)


def test_exact_and_run_score_wrappers_check_their_arguments(seed):
  q, k, v = make_qkv(seed, 1, 40, 40, 2, 1, 16)
  mask = jnp.ones((1, 40), bool)
  kw = kernel_kw()
  _assert_raises(r"key_mask: expected dtype bool, got float32", flash_attention_pallas, q, k, v,
                 mask.astype(jnp.float32), False, 0.25, **kw)
  _assert_raises(r"causal needs Tq == Tk", flash_attention_pallas, q[:, :30], k, v, mask, True,
                 0.25, **kw)
  _assert_raises(r"q: N = 2 query heads must be a multiple of Nkv = 3", flash_attention_pallas,
                 q, jnp.tile(k, (1, 1, 3, 1)), jnp.tile(v, (1, 1, 3, 1)), mask, False, 0.25,
                 **kw)
  stats = jnp.zeros((1, 2, 40))
  _assert_raises(r"d_out: expected \[P, R, N, H\]", flash_attention_bwd_pallas, q, k, v, mask,
                 q[..., :8], stats, stats, False, 0.25, **kw)
  perm = jnp.zeros((1, 1, 2, 32), jnp.int32)
  kmax = jnp.zeros((1, 1, 5, 16))
  _assert_raises(r"kmin: expected \[P, Nkv, R, H\] with P = 1, Nkv = 1, R = 5, H = 16",
                 run_scores_pallas, q, perm, kmax, kmax[..., :8], num_blocks=2, q_offset=0,
                 block_sizes=BlockSizes(), interpret=INTERPRET)


# Every kernel on tiles other than the defaults (several tiles per block, one key chunk per
# dk/dv program, two sample partials).
SMALL_TILES = BlockSizes(blocked_fwd=Tiles(16, 16), blocked_bwd=Tiles(16, 16, num_stages=1),
                         sample_groups=2, key_chunks_per_program=1,
                         flash_fwd=Tiles(16, 32), flash_bwd=Tiles(32, 16),
                         run_scores=Tiles(16, 16, num_warps=2))


def test_block_sizes_leave_the_result_unchanged(seed):
  """hyper_attention with non-default tiles == the defaults (interpret mode off the GPU): causal
  with two levels (blocked stage, base case, selection's run scores), forward and gradients."""
  q, k, v = make_qkv(seed, 1, 150, 150, 4, 2, 16)
  config = dataclasses.replace(SMALL, block_size=32, select_blocks=2, select_block_size=8)
  mask = _mask(seed, 1, 150)
  w = jax.random.normal(jax.random.key(seed + 2), q.shape)

  def run(block_sizes):
    attend = lambda q, k, v: hyper_attention(q, k, v, rng=jax.random.key(seed), causal=True,
                                             config=config, key_mask=mask,
                                             implementation="pallas", block_sizes=block_sizes)
    def loss(*x):
      out = attend(*x)
      return jnp.sum(out * w), out
    # One compile gives the output and the gradients.
    (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
    return out, grads

  (out, grads), (out_small, grads_small) = run(None), run(SMALL_TILES)
  np.testing.assert_allclose(out_small, out, atol=2e-5, rtol=0)
  for a, b in zip(grads_small, grads):
    assert rel_err(a, b) < 1e-5


def _lowers(fn, *args):
  """``fn`` lowered for CUDA with the compiled kernels (no GPU needed)."""
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "triton_kernel_call" in text or "__gpu$xla.gpu.triton" in text


def test_kernels_lower_for_cuda(seed):
  """Forward (merged into running arrays in place), dq, dk/dv (own keys, samples, selected keys),
  the exact kernels and the run scores, bf16, interpret=False."""
  args, window = _blocked_inputs(seed, 1, 2, 2, 4, 64, 64, 64, 64, jnp.bfloat16, [256], 256,
                                 256, offsets=(0, 0))
  selection = _random_selection(seed, args, window, 4, 16)
  kw = dict(scale=0.125, block_size=64, **window._asdict(), block_sizes=BlockSizes(),
            interpret=False)
  q = args[0]
  running = (jnp.zeros_like(q), jnp.full((1, q.shape[2], q.shape[1]), -jnp.inf))
  _lowers(lambda *a: blocked_attention_pallas(*a, **kw, into=running), *args, selection)
  stats = jnp.zeros(running[1].shape)
  _lowers(lambda *a: blocked_attention_bwd_pallas(*a, **kw), *args, q, stats, stats, selection)
  k, v, mask = args[1][:, :256], args[2][:, :256], jnp.ones((1, 256), bool)
  flash = dict(block_sizes=BlockSizes(), interpret=False)
  _lowers(lambda *a: flash_attention_pallas(*a, True, 0.125, **flash), q[:, :256], k, v, mask)
  out = q[:, :256]
  _lowers(lambda *a: flash_attention_bwd_pallas(*a, True, 0.125, **flash), q[:, :256], k, v,
          mask, out, stats[..., :256], output_delta(out, out))
  kmax, kmin, _ = selection_lib.run_extrema(jnp.swapaxes(k, 1, 2), mask, 16)
  _lowers(lambda *a: run_scores_pallas(*a, num_blocks=4, q_offset=0, **flash), q, args[3],
          kmax, kmin)
