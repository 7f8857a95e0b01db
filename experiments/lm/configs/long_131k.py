"""One H100: the long_32k model at 131k context (paper settings of HyperAttention)."""

from experiments.lm.configs import long_32k


def get_config():
  c = long_32k.get_config()
  c.num_steps = 200
  c.seq_len = 131072
  return c
