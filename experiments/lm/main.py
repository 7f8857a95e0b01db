"""Train a decoder-only byte-level LM with exact or HyperAttention.

  python -m experiments.lm.main --config=experiments/lm/configs/tiny.py --workdir=/tmp/lm
  python -m experiments.lm.main --config=experiments/lm/configs/long_32k.py \
      --config.attention=hyper --workdir=/tmp/lm32k
  python -m experiments.lm.main --config=experiments/lm/configs/tiny.py --workdir=/tmp/lm2 \
      --config.data.path=/some/texts --config.num_steps=200

Restarting with the same --workdir resumes from the latest checkpoint. Logging is quiet by
default (warnings and errors only); absl's --verbosity=0 shows the INFO lines of orbax and jax
(every checkpoint step), --verbosity=1 debug lines too.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments.lm.train import train_and_evaluate

config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and TensorBoard events.",
                    required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # absl's verbosity sets python's root logger level, which orbax's and jax's loggers inherit:
    # their INFO lines would otherwise run through the progress bar. (app.run sets INFO after
    # parsing when the flag is not given, so a changed default would not hold.)
    logging.set_verbosity(logging.WARNING)
  metrics = train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  print({k: round(v, 4) for k, v in metrics.items()})


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
