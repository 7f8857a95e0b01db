"""The paper's patching experiment: a trained checkpoint with its last L layers switched to
HyperAttention, L = 0 ... num_layers; validation perplexity and prefill time per L.

  python -m experiments.lm.eval_lm --workdir=/tmp/lm --patch_last_layers=4 --seq_len=32768

Without --patch_last_layers every L is evaluated. Works on exact- and hyper-trained checkpoints
(the parameters do not depend on the attention mode). Prints a table and writes JSON.
"""

import os

from absl import app
from absl import flags
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from experiments.lm import data as data_lib
from experiments.lm import model as model_lib
from experiments.lm import train as train_lib
from experiments import provenance
from experiments import timing

flags.DEFINE_string("workdir", None, "Workdir of a training run (config.json + checkpoints).",
                    required=True)
flags.DEFINE_integer("patch_last_layers", None, "Evaluate only this L (default: all L).")
flags.DEFINE_integer("seq_len", None, "Evaluation sequence length (default: training's).")
flags.DEFINE_integer("eval_batches", None, "Validation batches (default: training's).")
flags.DEFINE_integer("timing_reps", 3, "Prefill timing repetitions (median).")
flags.DEFINE_string("out", None, "JSON path (default: WORKDIR/eval_patching.json).")
FLAGS = flags.FLAGS


def _prefill_ms(params, model, tokens, reps: int) -> float:
  forward = jax.jit(lambda p, t: model.apply({"params": p}, t))
  return timing.synchronised_ms(forward, params, tokens, reps=reps)[0]


def run(workdir: str, patch_last_layers=None, seq_len=None, eval_batches=None,
        timing_reps: int = 3) -> list[dict]:
  """Rows ``{"patched_layers", "loss", "bits_per_byte", "perplexity", "prefill_ms"}``."""
  config, params, step = train_lib.restore_run(workdir)
  config.seq_len = seq_len or config.seq_len
  config.eval_batches = eval_batches or config.eval_batches
  batch_sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
  corpus = data_lib.load_corpus(config.data.path, config.data.valid_fraction)
  num_layers = config.model.num_layers
  # A scanned model patches only the counts its one scanned body allows.
  scanned = bool(config.model.get("scan_layers", False))
  modes = lambda n: model_lib.attention_modes(train_lib.model_config(
      config, attention="hyper", hyper_last_layers=n, scan_layers=False))
  layers = ([n for n in range(num_layers + 1) if not scanned or model_lib.scannable(modes(n))]
            if patch_last_layers is None else [patch_last_layers])
  if any(not 0 <= n <= num_layers for n in layers):
    raise ValueError(f"--patch_last_layers must be in [0, {num_layers}], got {patch_last_layers}")
  prompt = next(data_lib.eval_batches(corpus.valid, 1, config.seq_len, 1))[:, :-1]
  rows = []
  for n in layers:
    cfg = train_lib.model_config(config, attention="hyper", hyper_last_layers=n)
    model = model_lib.Transformer(cfg)
    metrics = train_lib.evaluate(params, model, corpus.valid, config, batch_sharding,
                                 jax.random.key(config.seed + 2))
    rows.append({"patched_layers": n, "checkpoint_step": step, "seq_len": config.seq_len,
                 **metrics, "prefill_ms": _prefill_ms(params, model, prompt, timing_reps)})
    print(f"L={n:>2}  loss={metrics['loss']:.4f}  ppl={metrics['perplexity']:.3f}  "
          f"prefill={rows[-1]['prefill_ms']:.1f} ms", flush=True)
  return rows


def main(argv):
  del argv
  rows = run(FLAGS.workdir, FLAGS.patch_last_layers, FLAGS.seq_len, FLAGS.eval_batches,
             FLAGS.timing_reps)
  out = FLAGS.out or os.path.join(FLAGS.workdir, "eval_patching.json")
  provenance.write_results(out, provenance.run_meta(), rows=rows)
  print(f"{'L':>3} {'loss':>8} {'ppl':>8} {'prefill_ms':>11}")
  for r in rows:
    print(f"{r['patched_layers']:>3} {r['loss']:>8.4f} {r['perplexity']:>8.3f} "
          f"{r['prefill_ms']:>11.1f}")
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
