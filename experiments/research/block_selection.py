"""Would a query-aware choice of key blocks find a trained retrieval head's needle? (research
script, not a library path).

For passkey probes with the needle in the first half of a ``--length`` window, per retrieval
layer the head with the most exact attention mass on the needle; in the top causal quadrant
(queries of the second half, keys of the first) the keys are cut into consecutive blocks of
``--key_blocks`` sizes and each block is scored for the answer row by:

  * ``oracle``: the block's largest exact score q.k (what a selection should approximate);
  * ``bound_row``: the per-channel bound of Quest (Tang et al. 2024), sum_d max(q_d kmax_d,
    q_d kmin_d), for the answer row alone (per-query selection);
  * ``bound_lsh_block``: that bound maxed over the rows of the answer row's sortLSH query block
    (all query heads of its kv head: one selection per sorted block, as the blocked stage runs);
  * ``bound_q_block``: maxed over the answer row's block of 128 consecutive queries;
  * ``mean_key``: q . mean(k) of the block (MoBA, Lu et al. 2025), the answer row alone.

Printed and written: for each rule and block size, how often the needle's block ranks within
the top 1 / 2 / 4 / 8 / 16 blocks.

  python -m experiments.research.block_selection --workdir=/tmp/lm --out=/tmp/selection.json
"""

import json
import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from experiments import provenance
from experiments.lm import data as data_lib
from experiments.lm import retrieval
from experiments.lm import train as train_lib
from experiments.lm.retrieval_diagnostics import _layer_qkv
from hyperattn_jax import HyperAttentionConfig
from hyperattn_jax.reference import lsh_blocks

flags.DEFINE_string("workdir", None, "Training run workdir.", required=True)
flags.DEFINE_integer("length", 8192, "Window length.")
flags.DEFINE_list("layers", ["2", "3", "4"], "Layers with retrieval heads.")
flags.DEFINE_list("key_blocks", ["32", "64", "128"], "Key block sizes.")
flags.DEFINE_integer("probes", 6, "Passkey probes.")
flags.DEFINE_string("out", None, "JSON path.", required=True)
FLAGS = flags.FLAGS

TOPS = (1, 2, 4, 8, 16)


def _bound(q, kmax, kmin):
  """Quest's upper bound of q.k over a block: q ``[..., H]``, kmax/kmin ``[nb, H]`` -> ``[...,
  nb]`` (positive channels meet the block's max, negative ones its min)."""
  return jnp.maximum(q, 0) @ kmax.T + jnp.minimum(q, 0) @ kmin.T


def main(argv):
  del argv
  with open(os.path.join(FLAGS.workdir, "config.json"), encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  mesh = Mesh(np.array(jax.devices()), ("data",))
  params, _ = train_lib.restore_params(FLAGS.workdir, config, train_lib.model_config(config),
                                       mesh)
  valid = data_lib.load_corpus(config.data.path, config.data.valid_fraction).valid
  cfg = train_lib.model_config(config, attention="exact", dtype=jnp.float32)
  hyper = HyperAttentionConfig(**config.hyper)
  n, half = FLAGS.length, FLAGS.length // 2
  ranks: dict = {}
  for p in range(FLAGS.probes):
    rng = np.random.default_rng([0, p])
    start = int(rng.integers(0, len(valid) - n))
    probe = retrieval.passkey().sample(rng, (0.05, 0.45))
    item = retrieval.assemble(valid[start:start + n], probe, n)
    at = bytes(item.tokens.astype(np.uint8)).find(probe.needles[0][1])
    span = np.arange(at, at + len(probe.needles[0][1]))
    row = item.answers[0][0] - 1
    for layer, (q, k, _) in enumerate(_layer_qkv(params, cfg, jnp.asarray(item.tokens[None]))):
      if str(layer) not in FLAGS.layers:
        continue
      g = q.shape[2] // k.shape[2]
      kr = jnp.repeat(k, g, axis=2)
      s = jnp.einsum("nh,knh->nk", q[0, row], kr[0, :row + 1]) * q.shape[-1] ** -0.5
      head = int(np.argmax(np.asarray(jax.nn.softmax(s, -1)[:, span].sum(-1))))
      kv = head // g
      top = span[int(jnp.argmax(s[head, span]))]
      q2, k1 = q[0, half:], k[0, :half, kv]                       # [half, N, H], [half, H]
      q_row = q2[row - half, head]
      q_block, _, _, _ = lsh_blocks(q[:, half:], k[:, :half], jnp.ones((1, half), bool),
                                    jax.random.key(p), hyper)
      own = np.asarray(q_block[0, kv * g:(kv + 1) * g] == q_block[0, head, row - half])
      lsh_rows = q2[:, kv * g:(kv + 1) * g][own.T]                # [rows, H] of its sorted block
      c0 = (row - half) // 128 * 128
      near_rows = q2[c0:c0 + 128, kv * g:(kv + 1) * g].reshape(-1, q2.shape[-1])
      for bk in (int(b) for b in FLAGS.key_blocks):
        kb = k1.reshape(half // bk, bk, -1)
        kmax, kmin = kb.max(1), kb.min(1)
        scores = {
            "oracle": jnp.einsum("h,bsh->bs", q_row, kb).max(-1),
            "bound_row": _bound(q_row, kmax, kmin),
            "bound_lsh_block": _bound(lsh_rows, kmax, kmin).max(0),
            "bound_q_block": _bound(near_rows, kmax, kmin).max(0),
            "mean_key": kb.mean(1) @ q_row,
        }
        for rule, sc in scores.items():
          rank = int(jnp.sum(sc > sc[top // bk]))
          ranks.setdefault((rule, bk), []).append(rank)
  rows = []
  for (rule, bk), r in ranks.items():
    r = np.asarray(r)
    row = {"rule": rule, "key_block": bk, "blocks": half // bk, "ranks": r.tolist(),
           **{f"top{t}": float(np.mean(r < t)) for t in TOPS}}
    rows.append(row)
    print(f"{rule:>16} bk {bk:4d} ({half // bk} blocks): " +
          "  ".join(f"top{t} {row[f'top{t}']:.2f}" for t in TOPS))
  provenance.write_results(FLAGS.out, provenance.run_meta(), rows=rows)


if __name__ == "__main__":
  app.run(main)
