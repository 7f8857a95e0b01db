"""Needle-in-a-haystack evaluation of a trained checkpoint: exact vs HyperAttention modes.

  python -m experiments.lm.eval_retrieval --workdir=/tmp/lm --lengths=4096,8192,16384,32768 \
      --modes=exact,hyper:1,hyper:-1 --variants='{"wide": {"block_size": 512}}' \
      --out=/tmp/retrieval.json

Modes: ``exact``; ``hyper:L`` (HyperAttention in the last L layers, ``-1`` all but the first,
``0`` all); ``hyper:L:NAME`` uses the named variant of ``--variants``, a JSON object
``{"NAME": {HyperAttentionConfig overrides}}``. Scoring: ``experiments/lm/retrieval_eval.py``.
Writes JSON (``--out``) and a heatmap PNG beside it.
"""

import json
import os

from absl import app
from absl import flags

from experiments import provenance
from experiments.lm import retrieval_eval

flags.DEFINE_string("workdir", None, "Workdir of a training run (config.json + checkpoints).",
                    required=True)
flags.DEFINE_list("lengths", ["4096", "8192", "16384", "32768"], "Context lengths (tokens).")
flags.DEFINE_list("modes", ["exact", "hyper:1", "hyper:-1", "hyper:0"], "Attention modes.")
flags.DEFINE_string("variants", "{}", "JSON {name: HyperAttentionConfig overrides}.")
flags.DEFINE_list("tasks", None, "Retrieval tasks (default: the training config's).")
flags.DEFINE_integer("depth_bins", 10, "Needle-depth bins over [0, 1].")
flags.DEFINE_integer("samples", 4, "Probes per (task, length, depth bin).")
flags.DEFINE_integer("batch", 1, "Sequences per forward call.")
flags.DEFINE_integer("timing_reps", 3, "Prefill timing repetitions (median).")
flags.DEFINE_integer("ppl_seq_len", None, "Perplexity window (default: training's seq_len; "
                     "0: skip).")
flags.DEFINE_integer("seed", 0, "Seed of the probes and haystacks.")
flags.DEFINE_integer("diagnose_length", 0, "Also run the needle diagnostics "
                     "(retrieval_diagnostics.py) at this length (0: no).")
flags.DEFINE_integer("diagnose_probes", 4, "Passkey probes of the diagnostics.")
flags.DEFINE_string("out", None, "JSON path (default: WORKDIR/eval_retrieval.json).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  variants = json.loads(FLAGS.variants)
  result = {}
  if FLAGS.modes:
    result = retrieval_eval.run(FLAGS.workdir, [int(n) for n in FLAGS.lengths], FLAGS.modes,
                                variants, FLAGS.tasks, FLAGS.depth_bins, FLAGS.samples,
                                FLAGS.batch, FLAGS.timing_reps, FLAGS.ppl_seq_len, FLAGS.seed)
  if FLAGS.diagnose_length:
    result["diagnostics"] = retrieval_eval.diagnose(FLAGS.workdir, FLAGS.diagnose_length,
                                                    FLAGS.diagnose_probes, seed=FLAGS.seed)
  out = FLAGS.out or os.path.join(FLAGS.workdir, "eval_retrieval.json")
  provenance.write_results(out, provenance.run_meta(variants=variants), **result)
  if FLAGS.modes:
    retrieval_eval.plot(result, os.path.splitext(out)[0] + ".png")
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
