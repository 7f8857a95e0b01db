"""The plan of one approximation (stages 0+1): its random draws and its sortLSH order.

A plan is everything the blocked stage reads besides q, k and v, as registered pytrees (int
arrays: fixed under differentiation; the log-weights are differentiable in v for the
``"value_norm"`` sampler), for ``P`` problems of ``Nkv`` kv heads, ``G`` query heads each,
``nb`` key blocks of ``block_size`` keys and ``qb`` query rows, ``m`` samples:

  * :class:`SortPlan`: the permutations of local rows (``sorting.py``);
  * :class:`SampleDraw`: which keys are sampled (``sampling.py``), and :class:`SampleSet`, their
    k/v rows gathered as the blocked stage reads them;
  * ``selection.Selection``: the ``select_blocks`` option's keys; ApproxD's query rows;
  * the problem's rows themselves: a static ``blocked.RowWindow``.

:func:`build_plan` builds one (``rng`` split by :func:`rng_streams`); the non-causal
orchestration, the causal levels and the benchmarks' stage breakdown use it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from hyperattn_jax import backends
from hyperattn_jax import lsh
from hyperattn_jax import sampling
from hyperattn_jax import selection as selection_lib
from hyperattn_jax import sorting
from hyperattn_jax.blocked import RowWindow, grouped_rows
from hyperattn_jax.config import HyperAttentionConfig

__all__ = ["SortPlan", "SampleDraw", "SampleSet", "Plan", "rng_streams", "build_plan"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SortPlan:
  """The sortLSH order of the problems' rows."""
  q_perm: jax.Array  # [P, Nkv, G, nb * qb] int32 local query rows in sorted order (-1: padding)
  k_perm: jax.Array  # [P, Nkv, nb * block_size] int32 local key rows in sorted order (-1: padding)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleSet:
  """The shared samples of the residual as the blocked stage reads them."""
  k: jax.Array           # [P, Nkv, m, H] the sampled keys
  v: jax.Array           # [P, Nkv, m, H] their values
  pos: jax.Array         # [P, Nkv, m] int32 their sorted positions, ascending
  n_valid: jax.Array     # [P] int32 valid keys (sorted positions >= n_valid are invalid)
  log_weight: jax.Array  # [P, Nkv, m] float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleDraw:
  """The drawn samples: which keys, at which sorted positions, with which log-weights."""
  rows: jax.Array        # [P, Nkv, m] int32 local key rows of the samples
  pos: jax.Array         # [P, Nkv, m] int32 their sorted positions, ascending
  n_valid: jax.Array     # [P] int32 valid keys
  log_weight: jax.Array  # [P, Nkv, m] float32

  def gather(self, k, v, window: RowWindow) -> SampleSet:
    """The samples' rows of k/v ``[P, Rk, Nkv, H]`` (the window's keys at ``k_offset``)."""
    rows = lambda x: grouped_rows(x, self.rows[:, :, None], window.k_offset)[:, :, 0]
    return SampleSet(rows(k), rows(v), self.pos, self.n_valid, self.log_weight)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Plan:
  """One approximation's sort order and draws (the residuals a causal level keeps)."""
  sort: SortPlan
  samples: SampleDraw
  tau_rows: jax.Array | None  # [P, Nkv, approx_d_rows] ApproxD's sorted query rows, or None
  selection: selection_lib.Selection | None  # the select_blocks option's keys, or None

  def with_log_weight(self, log_weight) -> Plan:
    """The plan with the samples' log-weights ``[P, Nkv, m]`` replaced."""
    return dataclasses.replace(
        self, samples=dataclasses.replace(self.samples, log_weight=log_weight))


def rng_streams(rng):
  """The keys of one approximation: (LSH hyperplanes, samples, ApproxD rows)."""
  return jax.random.split(rng, 3)


def build_plan(q, k, v, key_mask, rng, config: HyperAttentionConfig, window: RowWindow,
               implementation: backends.Backend, codes=None) -> Plan:
  """Stages 0+1 of the window's problem: the draws from ``rng`` and the sortLSH orders.

  q ``[P, Rq, Nq, H]``, k/v ``[P, Rk, Nkv, H]``, key_mask ``[P, k_len]`` bool or None;
  ``codes``: the window's sort keys (q ``[P, Nkv, G, q_len]``, k ``[P, Nkv, k_len]``) when the
  caller hashed already (the causal levels share one hashing per call); else they are hashed
  here with hyperplanes drawn from ``rng``. ``implementation``: the backend of the
  selection's run scores (``select_blocks``).
  """
  b, kh = q.shape[0], k.shape[2]
  tq, tk = window.q_len, window.k_len
  nb = -(-tk // config.block_size)
  qb = -(-tq // nb)

  # 0. randomness: hyperplanes shared by q and k of a kv head; samples per (batch, kv head).
  proj_rng, sample_rng, rows_rng = rng_streams(rng)
  n_valid = (jnp.full((b,), tk, jnp.int32) if key_mask is None
             else jnp.sum(key_mask, axis=-1, dtype=jnp.int32))

  # 1. sortLSH (padding rows/keys get the invalid code, so they sort last): local row orders.
  if codes is None:
    window_rows = lambda x, start, n: jax.lax.slice_in_dim(x, start, start + n, axis=1)
    projections = lsh.draw_projections(proj_rng, kh, q.shape[-1], config.lsh_num_projs)
    codes = sorting.sort_keys(window_rows(q, window.q_offset, tq),
                              window_rows(k, window.k_offset, tk), key_mask, projections)
  sort = SortPlan(*sorting.permutations(codes, (nb * qb, nb * config.block_size),
                                        config.lsh_num_projs, masked=key_mask is not None))

  samples = _draw_samples(sample_rng, v, sort.k_perm, n_valid, config, window)
  tau_rows = (sampling.draw_rows(rows_rng, b, kh, tq, config.approx_d_rows)
              if config.normalizer == "approx_d" else None)
  selection = None
  if config.select_blocks:
    keys = jax.lax.slice_in_dim(k, window.k_offset, window.k_offset + tk, axis=1)
    selection = selection_lib.build_selection(
        q, sort.q_perm, keys.transpose(0, 2, 1, 3),
        jnp.ones((b, tk), jnp.bool_) if key_mask is None else key_mask, sort.k_perm,
        samples.rows, q_offset=window.q_offset, block_size=config.block_size,
        count=config.select_blocks, run=config.select_block_size,
        implementation=implementation)
  return Plan(sort, samples, tau_rows, selection)


def _draw_samples(rng, v, k_perm, n_valid, config: HyperAttentionConfig,
                  window: RowWindow) -> SampleDraw:
  """The samples: sorted positions in ``[0, n_valid)`` (drawn over the valid keys, ``n_valid``
  ``[P]``) and their local key rows through ``k_perm`` ``[P, Nkv, nb * block_size]``."""
  vs = (grouped_rows(v, k_perm[:, :, None], window.k_offset)[:, :, 0]
        if config.sampler == "value_norm"
        else jnp.zeros(k_perm.shape + (1,), v.dtype))  # the uniform draw needs only the shape
  pos, log_weight = sampling.draw_samples(rng, config.sampler, vs, n_valid, config.sample_size)
  return SampleDraw(jnp.take_along_axis(k_perm, pos, axis=-1), pos, n_valid, log_weight)
