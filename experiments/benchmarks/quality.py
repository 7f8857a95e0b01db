"""Quality study: HyperAttention's error and the paper's hardness parameters on real attention.

Sources of q/k/v (``--source``):
  * ``checkpoint``: every layer of a model trained by ``experiments/lm/main.py`` (``--workdir``),
    run with exact attention on a validation window of ``--seq_len`` bytes (the q/k/v the
    layers sow after RoPE);
  * ``planted``: Gaussian keys, each query a scaled copy of one random key plus noise (one
    heavy entry per row);
  * ``random``: Gaussian q/k/v, the contrast case (near-uniform attention).
For each layer and each (block_size, sample_size, lsh_num_projs) of the grid it records per head
alpha, kappa, LSH recall and the output errors (``hyperattn_jax.diagnostics``) as JSON, and plots
an error-vs-cost curve (cost = keys per query = block + samples) and per-layer/head heatmaps.
``--estimators`` adds the paper's estimator options (``sampler/normalizer`` pairs of
``HyperAttentionConfig``) to the grid, compared at equal keys per query in
``estimators_vs_cost.png`` (``approx_d`` also pays one more blocked pass and rows x n scores):

  python -m experiments.benchmarks.quality --source=checkpoint --workdir=/tmp/lm --seq_len=8192 \
      --out_dir=DIR
"""

import itertools
import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import provenance
from experiments.benchmarks import common
from hyperattn_jax import HyperAttentionConfig
from hyperattn_jax.diagnostics import attention_diagnostics

plt = common.pyplot()

flags.DEFINE_enum("source", "random", ["random", "planted", "checkpoint"], "Where q/k/v come from.")
flags.DEFINE_string("workdir", None, "Training workdir (source=checkpoint).")
flags.DEFINE_string("out_dir", None, "Directory for quality.json and the plots.", required=True)
flags.DEFINE_integer("seq_len", 4096, "Sequence length.")
flags.DEFINE_integer("heads", 4, "Heads (synthetic sources).")
flags.DEFINE_integer("head_dim", 64, "Head dimension (synthetic sources).")
flags.DEFINE_list("block_sizes", ["64", "128", "256"], "Grid of block sizes.")
flags.DEFINE_list("sample_sizes", ["64", "256"], "Grid of sample sizes.")
flags.DEFINE_list("lsh_num_projs", ["4", "7"], "Grid of LSH hyperplane counts.")
flags.DEFINE_list("estimators", ["uniform/merged"],
                  "sampler/normalizer pairs: uniform|value_norm / merged|approx_d.")
flags.DEFINE_float("approx_d_kappa", 100.0, "kappa of the approx_d normaliser.")
flags.DEFINE_integer("seed", 0, "Seed of the synthetic inputs and of the LSH/sampling draws.")
flags.DEFINE_integer("chunk_size", 256, "Query rows per diagnostics chunk.")
FLAGS = flags.FLAGS


def synthetic_layers(kind: str, n: int, heads: int, head_dim: int, seed: int):
  """One pseudo-layer ``{"synthetic": (q, k, v)}`` of ``[1, n, heads, head_dim]`` float32."""
  kq, kk, kv, kp = jax.random.split(jax.random.key(seed), 4)
  shape = (1, n, heads, head_dim)
  k = jax.random.normal(kk, shape)
  v = jax.random.normal(kv, shape)
  if kind == "random":
    q = jax.random.normal(kq, shape)
  else:  # planted: query i is 3x key perm[i] (unit-normalised) plus noise
    perm = jax.random.permutation(kp, n)
    heavy = k[:, perm] / jnp.linalg.norm(k[:, perm], axis=-1, keepdims=True)
    q = 3.0 * jnp.sqrt(head_dim) * heavy + 0.5 * jax.random.normal(kq, shape)
  return {kind: (q, k, v)}


def checkpoint_layers(workdir: str, seq_len: int):
  """``{"layer_i": (q, k, v)}`` of a trained model on its first validation window."""
  from experiments.lm import data as data_lib  # pylint: disable=import-outside-toplevel
  from experiments.lm import model as model_lib  # pylint: disable=import-outside-toplevel
  from experiments.lm import train as train_lib  # pylint: disable=import-outside-toplevel
  config, params, _ = train_lib.restore_run(workdir)
  corpus = data_lib.load_corpus(config.data.path, config.data.valid_fraction)
  tokens = next(data_lib.eval_batches(corpus.valid, 1, seq_len, 1))[:, :-1]
  model = model_lib.Transformer(train_lib.model_config(config, attention="exact"))
  _, state = model.apply({"params": params}, tokens, mutable=["intermediates"])
  inter = model_lib.per_layer(state["intermediates"])
  return {name: tuple(x.astype(jnp.float32) for x in inter[name]["attention"]["qkv"][0])
          for name in sorted(inter, key=lambda s: int(s.split("_")[-1]))}


def study(layers, grid, seed: int, chunk_size: int, estimators, kappa: float):
  rows = []
  for (name, (q, k, v)), (bs, m, r), est in itertools.product(layers.items(), grid, estimators):
    sampler, normalizer = est.split("/")
    config = HyperAttentionConfig(block_size=bs, sample_size=m, lsh_num_projs=r,
                                  min_seq_len=bs, sampler=sampler, normalizer=normalizer,
                                  approx_d_kappa=kappa)
    diag = attention_diagnostics(q, k, v, rng=jax.random.key(seed), config=config,
                                 chunk_size=chunk_size)
    rows.append({"layer": name, "block_size": bs, "sample_size": m, "lsh_num_projs": r,
                 "estimator": est, "keys_per_query": bs + m,
                 **{key: np.asarray(val[0]).tolist() for key, val in diag.items()}})
    print(f"{name:>10} bs={bs:<4} m={m:<4} r={r} {est:>20}  rel_err="
          f"{np.mean(rows[-1]['rel_fro_error']):.4f}  recall={np.mean(rows[-1]['lsh_recall_mean']):.3f}"
          f"  alpha={np.max(rows[-1]['alpha']):.1f}  kappa={np.max(rows[-1]['kappa']):.3g}",
          flush=True)
  return rows


def plot_estimators(rows, out_dir: str):
  """Mean relative error over layers/heads vs keys per query, one line per (estimator, r)."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for est, r in sorted({(row["estimator"], row["lsh_num_projs"]) for row in rows}):
    sel = [x for x in rows if x["estimator"] == est and x["lsh_num_projs"] == r]
    cost = sorted({x["keys_per_query"] for x in sel})
    err = [np.mean([x["rel_fro_error"] for x in sel if x["keys_per_query"] == c]) for c in cost]
    ax.plot(cost, err, "o-", label=f"{est}, r={r}")
  _save_error_vs_cost(fig, ax, "mean relative Frobenius error", "estimators at equal cost",
                      os.path.join(out_dir, "estimators_vs_cost.png"))
  plt.close(fig)


def _save_error_vs_cost(fig, ax, ylabel: str, title: str, path: str):
  """Log-log axes of error against keys per query, legend, saved to ``path``."""
  ax.set(xlabel="keys per query (block + samples)", ylabel=ylabel, xscale="log", yscale="log",
         title=title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def plot(rows, out_dir: str):
  if len({row["estimator"] for row in rows}) > 1:
    plot_estimators(rows, out_dir)
  rows = [x for x in rows if x["estimator"] == rows[0]["estimator"]]
  fig, ax = plt.subplots(figsize=(6, 4))
  for (layer, r) in sorted({(row["layer"], row["lsh_num_projs"]) for row in rows}):
    sel = sorted((x for x in rows if x["layer"] == layer and x["lsh_num_projs"] == r),
                 key=lambda x: x["keys_per_query"])
    ax.plot([x["keys_per_query"] for x in sel], [np.mean(x["rel_fro_error"]) for x in sel],
            "o-", label=f"{layer}, r={r}")
  _save_error_vs_cost(fig, ax, "relative Frobenius error", "error vs cost",
                      os.path.join(out_dir, "error_vs_cost.png"))
  largest = max(rows, key=lambda x: (x["keys_per_query"], x["lsh_num_projs"]))
  setting = {k: largest[k] for k in ("block_size", "sample_size", "lsh_num_projs")}
  sel = [x for x in rows if all(x[k] == v for k, v in setting.items())]
  metrics = ("rel_fro_error", "lsh_recall_mean", "alpha", "kappa")
  fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 0.6 * len(sel) + 2))
  for ax, metric in zip(axes, metrics):
    data = np.array([x[metric] for x in sel], np.float64)
    im = ax.imshow(np.log10(data) if metric in ("alpha", "kappa") else data, aspect="auto")
    ax.set(title=("log10 " if metric in ("alpha", "kappa") else "") + metric, xlabel="head",
           yticks=range(len(sel)), yticklabels=[x["layer"] for x in sel])
    fig.colorbar(im, ax=ax)
  fig.suptitle(f"per layer/head at {setting}")
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "per_head.png"), dpi=120)
  plt.close("all")


def main(argv):
  del argv
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  if FLAGS.source == "checkpoint":
    if not FLAGS.workdir:
      raise app.UsageError("--source=checkpoint needs --workdir")
    layers = checkpoint_layers(FLAGS.workdir, FLAGS.seq_len)
  else:
    layers = synthetic_layers(FLAGS.source, FLAGS.seq_len, FLAGS.heads, FLAGS.head_dim,
                              FLAGS.seed)
  grid = list(itertools.product(*(map(int, x) for x in (FLAGS.block_sizes, FLAGS.sample_sizes,
                                                        FLAGS.lsh_num_projs))))
  rows = study(layers, grid, FLAGS.seed, FLAGS.chunk_size, FLAGS.estimators,
               FLAGS.approx_d_kappa)
  provenance.write_results(os.path.join(FLAGS.out_dir, "quality.json"), provenance.run_meta(),
                           rows=rows)
  plot(rows, FLAGS.out_dir)
  print(f"wrote {FLAGS.out_dir}")


if __name__ == "__main__":
  app.run(main)
