"""One H100: the long_32k model at 131k context (paper settings of HyperAttention)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import long_32k  # noqa: E402  pylint: disable=wrong-import-position


def get_config():
  c = long_32k.get_config()
  c.num_steps = 200
  c.seq_len = 131072
  return c
