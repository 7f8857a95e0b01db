"""The retrieval recipe continued to 131k: ``retrieval_32k`` and then 100 steps at 131k."""

from experiments.configs import retrieval_32k


def get_config():
  c = retrieval_32k.get_config()
  c.num_steps = 1000
  c.curriculum = "4096x8:600,32768x1:900"
  c.seq_len = 131072
  c.eval_every = 500
  c.checkpoint_every = 250
  return c
