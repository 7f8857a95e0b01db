"""The retrieval recipe continued to 131k: ``retrieval_32k``'s 1200 steps (same schedule, so a
``retrieval_32k`` workdir can be continued with this config), then 100 steps at 131k at the
final learning rate."""

from experiments.configs import retrieval_32k


def get_config():
  c = retrieval_32k.get_config()
  c.num_steps = 1300
  c.decay_steps = 1200
  c.curriculum = "512x64:700,4096x8:1000,32768x1:1200"
  c.seq_len = 131072
  c.eval_every = 650
  c.checkpoint_every = 325
  return c
