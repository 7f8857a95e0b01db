"""Why an approximation misses a needle: the trained model's own attention on the answer rows.

For passkey probes whose needle lies in the first half of the sequence (so the top causal
recursion level's quadrant -- queries of the second half, keys of the first -- is where the
question meets the needle), per layer and head of the *exact* model:

* ``needle_mass``: the exact attention mass the first answer row puts on the needle's tokens
  (a retrieval head puts most of its mass there);
* ``co_blocked``: over ``draws`` random LSH/sample draws of that quadrant, how often the
  needle's highest-scoring key shares the answer row's sorted block (attended exactly);
* ``sampled``: how often it is among the uniform samples instead (seen with weight n/m);
* ``needle_cosine``: the cosine of the answer row's query with that key (what angular LSH
  sees), and ``needle_norm_ratio``: that key's norm over the median key norm of the quadrant;
* ``lsh_recall_mean`` (first probe only: it costs a dense pass): the share of each row's
  attention mass inside its own block over all rows of the quadrant, from
  :func:`hyperattn_jax.diagnostics.attention_diagnostics` (one draw).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from experiments.lm import model as model_lib
from experiments.lm import retrieval
from hyperattn_jax import HyperAttentionConfig
from hyperattn_jax.diagnostics import attention_diagnostics
from hyperattn_jax.reference import lsh_blocks

__all__ = ["needle_diagnostics"]


def _layer_qkv(params, cfg: model_lib.TransformerConfig, tokens):
  """Each layer's (q, k, v) ``[1, n, heads, head_dim]`` float32, exact attention everywhere."""
  model = model_lib.Transformer(cfg)
  _, state = jax.jit(lambda p, t: model.apply({"params": p}, t, mutable=["intermediates"]))(
      params, tokens)
  inter = model_lib.per_layer(state["intermediates"])
  names = sorted(inter, key=lambda s: int(s.split("_")[-1]))
  return [tuple(x.astype(jnp.float32) for x in inter[n]["attention"]["qkv"][0]) for n in names]


def needle_diagnostics(params, cfg: model_lib.TransformerConfig, haystack: np.ndarray,
                       length: int, hyper: HyperAttentionConfig, probes: int = 4,
                       draws: int = 4, seed: int = 0) -> list[dict]:
  """Rows ``{probe, depth, layer, needle_mass, co_blocked, sampled, lsh_recall_mean}`` (per
  head lists), for ``probes`` passkey probes at depths in ``[0.05, 0.45)``."""
  half = length // 2
  rows = []
  for p in range(probes):
    rng = np.random.default_rng([seed, p])
    start = int(rng.integers(0, len(haystack) - length))
    probe = retrieval.passkey().sample(rng, (0.05, 0.45))
    item = retrieval.assemble(haystack[start:start + length], probe, length)
    needle = bytes(probe.needles[0][1])
    at = bytes(item.tokens.astype(np.uint8)).find(needle)
    span = np.arange(at, at + len(needle))
    row = item.answers[0][0] - 1  # predicts the first answer token
    for layer, (q, k, v) in enumerate(_layer_qkv(params, cfg, jnp.asarray(item.tokens[None]))):
      g = q.shape[2] // k.shape[2]
      kr = jnp.repeat(k, g, axis=2)
      scores = jnp.einsum("nh,knh->nk", q[0, row], kr[0, :row + 1]) * q.shape[-1] ** -0.5
      p_row = jax.nn.softmax(scores, axis=-1)                                 # [heads, keys]
      needle_mass = np.asarray(p_row[:, span].sum(-1))
      top = span[np.asarray(jnp.argmax(scores[:, span], axis=-1))]            # [heads]
      heads = np.arange(q.shape[2])
      q2, k1, v1 = q[:, half:], k[:, :half], v[:, :half]
      mask = jnp.ones((1, half), bool)
      co, samp = np.zeros(q.shape[2]), np.zeros(q.shape[2])
      for d in range(draws):
        q_block, k_block, sample_w, _ = lsh_blocks(q2, k1, mask, jax.random.key(1000 * p + d),
                                                   hyper, v1)
        co += np.asarray(q_block[0, heads, row - half] == k_block[0, heads, top])
        samp += np.asarray(sample_w[0, heads, top] > 0)
      k_top = kr[0, top, heads]                                               # [heads, H]
      q_row = q[0, row]
      cosine = jnp.sum(q_row * k_top, -1) / (jnp.linalg.norm(q_row, axis=-1) *
                                             jnp.linalg.norm(k_top, axis=-1))
      norm_ratio = jnp.linalg.norm(k_top, axis=-1) / jnp.median(
          jnp.linalg.norm(kr[0, :half], axis=-1), axis=0)
      rows.append({"probe": p, "depth": probe.queries[0].depth, "layer": layer,
                   "needle_mass": needle_mass.tolist(), "co_blocked": (co / draws).tolist(),
                   "sampled": (samp / draws).tolist(),
                   "needle_cosine": np.asarray(cosine).tolist(),
                   "needle_norm_ratio": np.asarray(norm_ratio).tolist()})
      if p == 0:
        diag = attention_diagnostics(q2, k1, v1, rng=jax.random.key(p), config=hyper,
                                     power_iters=5)
        rows[-1]["lsh_recall_mean"] = np.asarray(diag["lsh_recall_mean"][0]).tolist()
  return rows
