"""The samples' draws (the |v|^2 sampler's statistics: ``test_estimators.py``)."""

import jax
import jax.numpy as jnp
import numpy as np

from hyperattn_jax import sampling


def test_samples_cover_only_valid_positions(seed):
  n_valid = jnp.array([5, 1000, 0], jnp.int32)
  pos = np.asarray(sampling.draw_sample_positions(jax.random.key(seed), n_valid, 2, 4000))
  assert pos[0].max() < 5 and pos[0].min() >= 0 and len(np.unique(pos[0])) == 5
  assert pos[1].max() < 1000 and len(np.unique(pos[1])) > 900
  assert np.all(np.diff(pos, axis=-1) >= 0)  # ascending: each block's samples are consecutive
