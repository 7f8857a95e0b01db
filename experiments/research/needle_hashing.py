"""How often sortLSH puts a trained retrieval head's needle key in its query's block, under
hashing variants (research script, not a library path).

For passkey probes with the needle in the first half of a ``--length`` window, per retrieval
layer (``--layers``) the head with the most exact attention mass on the needle is taken; over
``--draws`` random draws, the script counts how often the needle's top key shares the answer
row's sorted block in the top causal quadrant, for transforms of (q, k) before hashing (none;
keys centred; queries and keys centred; the MIPS-to-angular transform of Neyshabur & Srebro)
and for LSH settings (bits, block size). Random placement gives ``block_size / (length / 2)``.

  python -m experiments.research.needle_hashing --workdir=/tmp/lm --out=/tmp/hashing.json
"""

import dataclasses

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

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
flags.DEFINE_integer("probes", 3, "Passkey probes.")
flags.DEFINE_integer("draws", 16, "LSH draws per (probe, layer, variant).")
flags.DEFINE_string("out", None, "JSON path.", required=True)
FLAGS = flags.FLAGS


def _mips(q, k):
  """Queries to unit norm, keys scaled by the largest key norm and lifted to the unit sphere:
  the angle then orders keys by inner product with the query."""
  qn = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
  kk = k / jnp.max(jnp.linalg.norm(k, axis=-1))
  lift = jnp.sqrt(jnp.maximum(1.0 - jnp.sum(kk * kk, -1, keepdims=True), 0.0))
  return (jnp.concatenate([qn, jnp.zeros_like(qn[..., :1])], -1),
          jnp.concatenate([kk, lift], -1))


TRANSFORMS = {
    "none": lambda q, k: (q, k),
    "center_k": lambda q, k: (q, k - k.mean(1, keepdims=True)),
    "center_qk": lambda q, k: (q - q.mean(1, keepdims=True), k - k.mean(1, keepdims=True)),
    "mips": _mips,
}


def main(argv):
  del argv
  config, params, _ = train_lib.restore_run(FLAGS.workdir)
  valid = data_lib.load_corpus(config.data.path, config.data.valid_fraction).valid
  cfg = train_lib.model_config(config, attention="exact", dtype=jnp.float32)
  base = HyperAttentionConfig(**config.hyper)
  settings = {"paper": base, "bits4": dataclasses.replace(base, lsh_num_projs=4),
              "bits10": dataclasses.replace(base, lsh_num_projs=10),
              "block1024": dataclasses.replace(base, block_size=1024)}
  n, half = FLAGS.length, FLAGS.length // 2
  hits: dict = {}
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
      kr = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
      s = jnp.einsum("nh,knh->nk", q[0, row], kr[0, :row + 1]) * q.shape[-1] ** -0.5
      head = int(np.argmax(np.asarray(jax.nn.softmax(s, -1)[:, span].sum(-1))))
      top = span[int(jnp.argmax(s[head, span]))]
      for tname, transform in TRANSFORMS.items():
        q2, k1 = transform(q[:, half:], k[:, :half])
        for sname, setting in settings.items():
          same = []
          for d in range(FLAGS.draws):
            q_block, k_block, _, _ = lsh_blocks(q2, k1, jnp.ones((1, half), bool),
                                                jax.random.key(d), setting)
            same.append(int(q_block[0, head, row - half] == k_block[0, head, top]))
          hits.setdefault(f"{tname}/{sname}", []).append(float(np.mean(same)))
  rows = [{"variant": key, "co_blocked_mean": float(np.mean(v)), "per_case": v,
           "random": settings[key.split("/")[1]].block_size / half} for key, v in hits.items()]
  for r in rows:
    print(f"{r['variant']:>22}  co-blocked {r['co_blocked_mean']:.2f}  (random {r['random']:.2f})")
  provenance.write_results(FLAGS.out, provenance.run_meta(), rows=rows)


if __name__ == "__main__":
  app.run(main)
