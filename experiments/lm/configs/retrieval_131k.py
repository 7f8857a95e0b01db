"""The retrieval recipe continued to 131k: ``retrieval_32k``'s 2500 steps (same schedule, so a
``retrieval_32k`` workdir can be continued with this config), then 900 steps at 131k at the
final learning rate (100 and 400 were too few, see HISTORY)."""

from experiments.lm.configs import retrieval_32k


def get_config():
  c = retrieval_32k.get_config()
  c.num_steps = 3400
  c.decay_steps = 2500
  c.curriculum = "512x64:700,4096x8:1100,16384x2:1300,32768x1:2500"
  c.seq_len = 131072
  c.eval_every = 1000
  c.checkpoint_every = 50  # a 131k step takes ~1.5 s: lose little when killed
  return c
