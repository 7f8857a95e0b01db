"""Non-finite inputs propagate: a NaN reaches exactly the outputs (and gradients) that attend to
it, as in exact attention, and masked keys reach none, on every path (XLA and Pallas, exact and
hyper, causal or not)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import jit_reference, make_qkv
from hyperattn_jax import HyperAttentionConfig, backends, hyper_attention
from hyperattn_jax import blocked as blocked_lib
from hyperattn_jax.blocked import grouped_rows
from hyperattn_jax.exact import flash_attention
from hyperattn_jax.folding import embed_rows
from hyperattn_jax.merge import merge_attention, output_delta, part_cotangents
from hyperattn_jax.plan import SampleSet, SortPlan
from pallas_kernels.triton import (blocked_attention_bwd_pallas, blocked_attention_pallas,
                                   flash_attention_bwd_pallas, flash_attention_pallas)
from test_pallas_kernels import _blocked_inputs, _cotangents, _window_grads, kernel_kw
from test_pallas_selection import _random_selection

# 24 tokens are computed exactly (<= min_seq_len), 64 by the approximation (causal: 1 level).
CFG = HyperAttentionConfig(block_size=16, sample_size=16, lsh_num_projs=3, min_seq_len=32)


def _poisoned(seed, seq):
  """q ``[1, seq, 4, 16]``, k/v ``[1, seq, 2, 16]`` with a NaN in one key of kv head 0 and in one
  query of kv head 1, the lengths ``[1]`` that mask the last 3 keys, and NaN in those keys' k and
  v. Row 0 (which the Pallas tiles' padding slots once loaded) has tests of its own below."""
  q, k, v = make_qkv(seed, 1, seq, seq, 4, 2, 16)
  lengths = jnp.array([seq - 3])
  rows = np.random.default_rng(seed).choice(np.arange(1, seq - 3), 2, replace=False)
  q, k = q.at[0, rows[0], 3, 5].set(jnp.nan), k.at[0, rows[1], 0, 2].set(jnp.nan)
  k, v = k.at[0, seq - 3:].set(jnp.nan), v.at[0, seq - 3:].set(jnp.nan)
  return q, k, v, lengths


# (implementation, causal, seq): the exact regime once (its guards are those of the causal base
# case), the approximation on both paths (causal: the base case, a level's blocked stage merged
# into the running rows; the Pallas non-causal stage stores its rows without a merge).
# The Pallas cases are marked gpu: on the GPU machine they run the compiled kernels.
CASES = [("xla", True, 24), ("xla", True, 64),
         pytest.param("pallas", False, 64, marks=pytest.mark.gpu),
         pytest.param("pallas", True, 64, marks=pytest.mark.gpu)]


@pytest.mark.parametrize("implementation,causal,seq", CASES)
def test_nan_reaches_the_outputs_and_gradients_that_attend_to_it(seed, implementation, causal,
                                                                 seq):
  """The dense oracle on the same inputs and draws (the masked keys zeroed: its value product
  would spread their NaN as 0 * NaN) says which output rows attend to the NaN (its softmax
  propagates NaN); the fast paths must give NaN there and the oracle's values elsewhere (they
  once gave zeros for every row whose softmax sum was NaN, and so zero gradients: the backward
  of a -inf lse; and the masked keys' NaN values reached every row of their blocks)."""
  q, k, v, lengths = _poisoned(seed, seq)
  rng = jax.random.key(seed)
  out, pull = jax.vjp(lambda q, k, v: hyper_attention(
      q, k, v, rng=rng, causal=causal, config=CFG, key_value_seq_lengths=lengths,
      implementation=implementation), q, k, v)
  out = np.asarray(out)
  key_mask = jnp.arange(seq)[None, :] < lengths[:, None]
  clean = lambda x: jnp.where(key_mask[:, :, None, None], x, 0.0)
  ref = np.asarray(jit_reference(q, clean(k), clean(v), rng=rng, causal=causal, config=CFG,
                                 key_mask=key_mask)[0])
  nan_rows = np.isnan(ref).any(-1)
  assert nan_rows[:, :, :2].any() and nan_rows[:, :, 2:].any()  # both poisoned heads
  np.testing.assert_array_equal(np.isnan(out).any(-1), nan_rows)
  assert np.isnan(out[nan_rows]).all()
  np.testing.assert_allclose(out[~nan_rows], ref[~nan_rows], atol=1e-5, rtol=1e-5)
  dq, dk, dv = (np.asarray(g) for g in pull(jax.random.normal(jax.random.key(seed), q.shape)))
  assert np.isnan(dq[nan_rows]).all()
  assert np.isnan(dk).any() and np.isnan(dv).any()
  assert (dk[:, seq - 3:] == 0).all() and (dv[:, seq - 3:] == 0).all()  # masked: no gradient


def test_merge_and_its_part_cotangents_propagate_nan():
  """Rows: 0 finite, 1 NaN in one part, 2 empty in both parts (stays 0 / -inf, zero cotangent).
  The merge once gave the NaN row lse -inf, and its part cotangents weight 0."""
  out = jnp.ones((1, 3, 1, 2))                                   # [1, T, N, H]
  lse1 = jnp.array([[[0.5, jnp.nan, -jnp.inf]]])                 # [1, N, T]
  lse2 = jnp.array([[[0.0, 0.0, -jnp.inf]]])
  merged_out, merged_lse = (np.asarray(x) for x in merge_attention(out, lse1, out, lse2))
  assert np.isfinite(merged_lse[0, 0, 0]) and np.isnan(merged_lse[0, 0, 1])
  assert merged_lse[0, 0, 2] == -np.inf and (merged_out[0, 2] == 0).all()
  assert np.isnan(merged_out[0, 1]).all()
  d_out = jnp.ones((3, 2))
  d_part_out, d_part_lse = (np.asarray(x) for x in part_cotangents(
      out[0, :, 0], lse1[0, 0], jnp.asarray(merged_lse[0, 0]), jnp.zeros(3), d_out))
  assert np.isfinite(d_part_out[0]).all() and np.isnan(d_part_out[1]).all()
  assert np.isnan(d_part_lse[1]) and (d_part_out[2] == 0).all() and d_part_lse[2] == 0


# ----------------------------------------------------------------------------------------------
# Padding slots: the Pallas tiles' rows -1 (sort padding, whole-tile padding, unselected keys)


def _nan_patterns_match(got, want, atol, name, masked=None):
  """NaN exactly where ``want`` has NaN, ``want``'s values elsewhere (``-inf`` where it has
  it). ``masked`` (broadcasting against the arrays): entries where ``got`` may also be NaN."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape, name
  extra = np.isnan(got) & ~np.isnan(want)
  if masked is not None:
    extra &= ~np.broadcast_to(masked, got.shape)
  np.testing.assert_array_equal(np.isnan(want) & ~np.isnan(got), False, err_msg=name)
  np.testing.assert_array_equal(extra, False, err_msg=name)
  np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=name)
  fin = np.isfinite(want) & np.isfinite(got)
  np.testing.assert_allclose(got[fin], want[fin], atol=atol, rtol=0, err_msg=name)


def _own_block(pos, bs, nb):
  """``[P, Nkv, nb, m]`` bool: sample ``j`` (sorted position ``pos [P, Nkv, m]``) lies in key
  block ``i`` of ``bs`` keys."""
  return (np.asarray(pos) // bs)[:, :, None, :] == np.arange(nb)[None, None, :, None]


def _masked_in_nan_blocks(nan_out, q_perm, k_perm, pos, n_valid, selection, bs, k_len):
  """Where the kernels' gradients may be NaN beyond XLA's: the keys and samples that the stage
  masks for a block with a NaN output row. Such a row's lse is NaN, so the kernels' probability
  of a masked score there is ``exp2(-inf - NaN)`` = NaN (XLA's select gives its masked scores
  gradient 0): the invalid keys' dk, the samples' dk and log-weight gradients (masked for their
  own block, or dropped by ``select_blocks``). Neither reaches a gradient of
  ``hyper_attention``: masked keys get none, and a sample of such a block is a valid key of it,
  whose own dk is NaN there (a dropped one is a selected key of the block).

  nan_out ``[P, q_len, N]``, q_perm ``[P, Nkv, G, nb * qb]``, k_perm ``[P, Nkv, nb * bs]``, pos
  ``[P, Nkv, m]``, n_valid ``[P]``, ``bs`` keys per block -> (dk ``[P, k_len, Nkv, 1]``,
  samples ``[P, Nkv, m, 1]``) bool."""
  q_perm, k_perm, pos = np.asarray(q_perm), np.asarray(k_perm), np.asarray(pos)
  p, kh, g, n = q_perm.shape
  nb = k_perm.shape[-1] // bs
  qb = n // nb
  nan_block = np.zeros((p, kh, nb), bool)
  for b, kv, gi, i in np.ndindex(p, kh, g, n):
    r = q_perm[b, kv, gi, i]
    nan_block[b, kv, i // qb] |= r >= 0 and nan_out[b, r, kv * g + gi]
  dk = np.zeros((p, k_len, kh, 1), bool)
  for b, kv, i in np.ndindex(p, kh, k_perm.shape[-1]):
    r = k_perm[b, kv, i]
    if r >= 0 and i >= n_valid[b]:
      dk[b, r, kv] |= nan_block[b, kv, i // bs]
  drop = (np.zeros((p, kh, nb, pos.shape[-1]), bool) if selection is None else
          np.asarray(selection.drop_samples))
  samples = ((_own_block(pos, bs, nb) | drop) & nan_block[..., None]).any(axis=2)[..., None]
  return dk, samples


def _row_0_poisoned(seed, which, shape):
  """The blocked stage's kernel arguments (``test_pallas_kernels._blocked_inputs``) with a NaN in
  local row 0 of ``which`` (``"q"``: query head 1, ``"k"`` / ``"v"``: kv head 0), that row a
  valid key (moved to sorted position 0 where it was not: only its own block attends to it,
  and the samples that hold it), and the samples gathered after the poisoning (as
  ``hyper_attention`` gathers them)."""
  (p, kh, g, nb, qb, bs, m, h), n_valid, q_len, k_len = shape[:8], *shape[8:]
  args, window = _blocked_inputs(seed, p, kh, g, nb, qb, bs, m, h, jnp.float32, n_valid, q_len,
                                 k_len)
  q, k, v, q_perm, k_perm, _, _, pos, nv, log_w = args
  k_perm = np.array(k_perm)
  for b in range(p):
    for kv in range(kh):
      at = int(np.flatnonzero(k_perm[b, kv] == 0)[0])
      if at >= n_valid[b]:
        k_perm[b, kv, [0, at]] = k_perm[b, kv, [at, 0]]
  k_perm = jnp.asarray(k_perm)
  x = dict(q=q, k=k, v=v)
  if which == "q":
    x["q"] = q.at[:, window.q_offset, 1, 3].set(jnp.nan)
  else:
    x[which] = x[which].at[:, window.k_offset, 0, 2].set(jnp.nan)
  q, k, v = x["q"], x["k"], x["v"]
  rows = jnp.take_along_axis(k_perm, pos, axis=-1)[:, :, None]
  k_s = grouped_rows(k, rows, window.k_offset)[:, :, 0]
  v_s = grouped_rows(v, rows, window.k_offset)[:, :, 0]
  return (q, k, v, q_perm, k_perm, k_s, v_s, pos, nv, log_w), window


def _consistent(selection, k_perm, pos, bs):
  """``selection`` with only the drops that ``selection.build_selection`` can make: a block drops
  a sample only where that block attends to its key exactly (a kept selected row, or a key of
  its own block), so a NaN there reaches the block anyway. The kernels rely on it: they leave a
  dropped sample out by a -inf bias, which a NaN score survives (XLA's select does not)."""
  rows, keep, drop = selection
  samp_rows = jnp.take_along_axis(k_perm, pos, axis=-1)                     # [P, Nkv, m]
  kept = jnp.where(keep, rows, -2)                                          # [P, Nkv, nb, S]
  chosen = (kept[:, :, :, :, None] == samp_rows[:, :, None, None, :]).any(3)
  return selection._replace(drop_samples=drop & (chosen | _own_block(pos, bs, rows.shape[2])))


# p, kh, g, nb, qb, bs, m, h, n_valid, q_len, k_len: query blocks of 24 rows on 16-row tiles,
# key blocks of 24 on 16-key chunks (both padded per block), q_len / k_len short of nb * 24
# (-1 rows in the permutations), invalid keys (n_valid < k_len), GQA 2, 12 samples.
PADDED = (1, 2, 2, 2, 24, 24, 12, 16, [40], 45, 45)


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("select", [False, True])
def test_row_0_reaches_only_what_attends_to_it_in_the_blocked_kernels(seed, which, select):
  """A NaN in row 0 of q, k or v: the Pallas stage (out, lse; dq, dk, dv, the samples' dk, dv
  and log-weights, from the XLA result's statistics) is NaN exactly where the XLA stage and its
  autodiff are, also with ``select_blocks`` rows (some -1, the selected keys' own kernel), up
  to the masked keys' gradients in blocks with a NaN row (:func:`_masked_in_nan_blocks`). The
  kernels once loaded row 0 into every padding slot: its NaN reached every row of a tile with a
  padding key (0 * NaN in P V), and every key of a block with padding queries."""
  args, window = _row_0_poisoned(seed, which, PADDED)
  q, k, v, q_perm, k_perm, k_s, v_s, pos, nv, log_w = args
  scale, nb, bs = PADDED[7] ** -0.5, PADDED[3], PADDED[5]
  selection = _consistent(_random_selection(seed, args, window, nb, 5), k_perm, pos, bs) if (
      select) else None
  sort, samples = SortPlan(q_perm, k_perm), SampleSet(k_s, v_s, pos, nv, log_w)
  stage = lambda q, k, v, k_s, v_s, w: blocked_lib.blocked_attention_fwd(
      q, k, v, sort, dataclasses.replace(samples, k=k_s, v=v_s, log_weight=w), selection, scale,
      bs, window, backends.XLA)
  (ref_out, ref_lse), vjp = jax.vjp(stage, q, k, v, k_s, v_s, log_w)
  assert np.isnan(np.asarray(ref_out)).any()
  assert not np.isnan(np.asarray(ref_out)).all()  # the test can fail
  kw = dict(scale=scale, block_size=bs, **kernel_kw(window, (16, 16)))
  out, lse = blocked_attention_pallas(*args, selection, **kw)
  _nan_patterns_match(out, ref_out, 2e-5, "out")
  _nan_patterns_match(lse, ref_lse, 2e-5, "lse")

  d_out, d_lse = _cotangents(seed, ref_out, ref_lse)
  d_lse = jnp.where(jnp.isnan(ref_lse), 0.0, d_lse)
  ref = _window_grads(vjp((d_out, d_lse)), window)
  rows = lambda x, axis: embed_rows(x, window.q_offset, q.shape[1], axis, jnp.nan)
  grads = blocked_attention_bwd_pallas(
      *args, rows(d_out, 1), rows(ref_lse, 2), rows(output_delta(ref_out, d_out, d_lse), 2),
      selection, **kw)
  dk_masked, samples_masked = _masked_in_nan_blocks(
      np.isnan(np.asarray(ref_out)).any(-1), q_perm, k_perm, pos, np.asarray(nv), selection, bs,
      window.k_len)
  masked = (None, dk_masked, None, samples_masked, None, samples_masked[..., 0])
  for name, got, want, where in zip(("dq", "dk", "dv", "dk_samp", "dv_samp", "d_log_weight"),
                                    grads, ref, masked):
    _nan_patterns_match(got, want, 2e-4, name, where)


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("causal", [False, True])
def test_row_0_reaches_only_what_attends_to_it_in_the_exact_kernels(seed, which, causal):
  """The exact kernels on 45 rows (a padded last tile of queries and of keys): a NaN in row 0 of
  q, k or v (head 0 / kv head 0) is NaN in the Pallas (out, lse, dq, dk, dv) exactly where XLA's
  are."""
  q, k, v = make_qkv(seed, 1, 45, 45, 4, 2, 16)
  x = dict(q=q, k=k, v=v)
  x[which] = x[which].at[0, 0, 0, 2].set(jnp.nan)
  q, k, v = x["q"], x["k"], x["v"]
  mask = jnp.ones((1, 45), bool)
  (ref_out, ref_lse), vjp = jax.vjp(
      lambda q, k, v: flash_attention(q, k, v, mask, causal, 0.25, 32), q, k, v)
  out, lse = flash_attention_pallas(q, k, v, mask, causal, 0.25, **kernel_kw())
  _nan_patterns_match(out, ref_out, 2e-5, "out")
  _nan_patterns_match(lse, ref_lse, 2e-5, "lse")
  d_out, d_lse = _cotangents(seed, ref_out, ref_lse)
  d_lse = jnp.where(jnp.isnan(ref_lse), 0.0, d_lse)
  grads = flash_attention_bwd_pallas(q, k, v, mask, d_out, ref_lse,
                                     output_delta(ref_out, d_out, d_lse), causal, 0.25,
                                     **kernel_kw(tiles=(16, 32)))
  for name, got, want in zip(("dq", "dk", "dv"), grads, vjp((d_out, d_lse))):
    _nan_patterns_match(got, want, 2e-4, name)


@pytest.mark.parametrize("causal", [False, True])
def test_row_0_reaches_only_what_attends_to_it_in_hyper_attention(seed, causal):
  """``hyper_attention`` on 61 tokens (padded blocks and tiles everywhere), Pallas against XLA
  (same draws): batch row 0 has a NaN in row 0 of k, row 1 in row 0 of v, row 2 in row 0 of q
  (head 1); row 3 masks key 0, which holds NaN in k and v, and its last 3 keys. The outputs and
  the gradients are NaN at the same places, equal elsewhere, and the masked keys reach nothing:
  batch row 3 is finite, its masked keys get zero gradients."""
  seq = 61
  q, k, v = make_qkv(seed, 4, seq, seq, 2, 1, 16)
  q = q.at[2, 0, 1, 3].set(jnp.nan)
  k = k.at[0, 0, 0, 2].set(jnp.nan).at[3, 0].set(jnp.nan)
  v = v.at[1, 0, 0, 2].set(jnp.nan).at[3, 0].set(jnp.nan)
  key_mask = jnp.ones((4, seq), bool).at[3, 0].set(False).at[3, seq - 3:].set(False)
  rng = jax.random.key(seed)
  d_out = jax.random.normal(jax.random.key(seed + 1), q.shape)

  def run(implementation):
    out, pull = jax.vjp(lambda q, k, v: hyper_attention(
        q, k, v, rng=rng, causal=causal, config=CFG, key_mask=key_mask,
        implementation=implementation), q, k, v)
    return [np.asarray(x) for x in (out, *pull(d_out))]

  got, want = run("pallas"), run("xla")
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    _nan_patterns_match(a, b, 1e-4, name)
  for a in want[:2]:
    assert np.isnan(a[:3]).any(axis=(1, 2, 3)).all()  # each poisoned batch row shows its NaN
    assert not np.isnan(a[:3]).all()                   # and not everywhere (the test can fail)
  for a in got:
    assert np.isfinite(a[3]).all()
  for a in got[2:]:
    assert (a[3, 0] == 0).all() and (a[3, seq - 3:] == 0).all()


def test_padded_kernels_lower_for_cuda(seed):
  """The zero-filled loads of padding slots (forward and dq keys, dk/dv queries; the blocked
  stage with padded blocks and the exact kernels with a padded last tile) lower for CUDA
  (``test_pallas_api.test_kernels_lower_for_cuda`` covers whole tiles, which load no zeros)."""
  from test_pallas_api import _lowers
  args, window = _row_0_poisoned(seed, "k", PADDED)
  kw = {**kernel_kw(window, (16, 16)), "interpret": False}
  kw.update(scale=0.25, block_size=PADDED[5])
  q = args[0]
  _lowers(lambda *a: blocked_attention_pallas(*a, **kw), *args)
  stats = jnp.zeros((q.shape[0], q.shape[2], q.shape[1]))
  _lowers(lambda *a: blocked_attention_bwd_pallas(*a, **kw), *args, q, stats, stats)
  q, k, v = make_qkv(seed, 1, 45, 45, 4, 2, 16)
  mask = jnp.ones((1, 45), bool)
  flash = {**kernel_kw(), "interpret": False}
  _lowers(lambda *a: flash_attention_pallas(*a, True, 0.25, **flash), q, k, v, mask)
  _lowers(lambda *a: flash_attention_bwd_pallas(*a, True, 0.25, **flash), q, k, v, mask, q,
          stats[..., :45], stats[..., :45])
