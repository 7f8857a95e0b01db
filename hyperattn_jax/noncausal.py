"""Non-causal HyperAttention: every query over every key, the stages in order.

  0+1. the plan (``plan.py``): the hyperplanes, the sortLSH permutations, the samples;
  2+3. the blocked stage (``blocked.py``): the i-th sorted query block attends to the i-th sorted
     key block and to the shared samples (reweighted, own-block samples masked), in one softmax,
     reading rows by index, normalised as configured (``approx_d.py`` for ``"approx_d"``);
  4. the outputs are written back to the unsorted rows by the same index.
With sinks, the first ``sink_size`` keys are taken out of the approximation and attended
exactly, merged in by log-sum-exp. The causal levels (``causal.py``) run the same stages on
row windows.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from hyperattn_jax import approx_d
from hyperattn_jax import backends
from hyperattn_jax.blocked import RowWindow, blocked_attention
from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.exact import flash_attention
from hyperattn_jax.merge import merge_attention
from hyperattn_jax.plan import Plan, build_plan

__all__ = ["hyper_noncausal", "attend_blocks"]

_NEG_INF = float("-inf")


def hyper_noncausal(q, k, v, key_mask, rng, config: HyperAttentionConfig, scale,
                    implementation):
  """Approximate attention of every query over every key: q ``[B, Tq, Nq, H]``, k/v ``[B, Tk,
  Nkv, H]``, key_mask ``[B, Tk]`` or None -> out ``[B, Tq, Nq, H]``, lse ``[B, Nq, Tq]``."""
  sinks = config.sink_size
  approx_mask = key_mask
  if sinks:
    rest = jnp.broadcast_to(jnp.arange(k.shape[1]) >= sinks, k.shape[:2])
    approx_mask = rest if key_mask is None else key_mask & rest
  window = RowWindow(0, q.shape[1], 0, k.shape[1], all_keys_valid=approx_mask is None)
  plan = build_plan(q, k, v, approx_mask, rng, config, window, implementation)
  out, lse = attend_blocks(q, k, v, plan, config, scale, implementation, window)
  if not sinks:
    return out, lse
  head = lambda x: x[:, :sinks]
  sink_mask = None if key_mask is None else head(key_mask)
  return merge_attention(out, lse, *flash_attention(
      q, head(k), head(v), sink_mask, False, scale, config.exact_chunk_size,
      backends.exact_backend(implementation, q, sink_mask)))


def attend_blocks(q, k, v, plan: Plan, config: HyperAttentionConfig, scale, implementation,
                  window: RowWindow):
  """Stages 2+3+4: the blocked stage of the window's problems (q ``[P, Rq, Nq, H]``, k/v ``[P,
  Rk, Nkv, H]``) with the sampled residual, normalised as configured, the outputs written back
  to the unsorted rows: out ``[P, q_len, Nq, H]``, lse ``[P, Nq, q_len]``."""
  samples = plan.samples.gather(k, v, window)
  stage = lambda w: blocked_attention(
      q, k, v, plan.sort, dataclasses.replace(samples, log_weight=w), plan.selection, scale,
      config.block_size, window, implementation)
  out, lse = stage(samples.log_weight)
  if config.normalizer == "merged":
    return out, lse
  _, lse_heavy = stage(jnp.full_like(samples.log_weight, _NEG_INF))
  return approx_d.normalise(q, k, out, lse, lse_heavy, plan, scale, config, window)
