"""Head-parallel HyperAttention on 8 virtual CPU devices (run in a subprocess: XLA_FLAGS)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from hyperattn_jax import HyperAttentionConfig
from hyperattn_jax.sharding import head_sharded_hyper_attention

SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh
    from hyperattn_jax import HyperAttentionConfig, hyper_attention
    from hyperattn_jax.sharding import head_sharded_hyper_attention
    assert jax.device_count() == 8, jax.devices()
    seed = int(sys.argv[1])
    cfg = HyperAttentionConfig(block_size=32, sample_size=16, lsh_num_projs=5, min_seq_len=64)
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (2, 300, 16, 8))
    k = jax.random.normal(ks[1], (2, 300, 8, 8))
    v = jax.random.normal(ks[2], (2, 300, 8, 8))
    rng = jax.random.key(seed + 1)
    mesh = Mesh(np.array(jax.devices()), ("heads",))
    for causal in (False, True):
      out = jax.jit(lambda q, k, v: head_sharded_hyper_attention(
          q, k, v, rng=rng, mesh=mesh, causal=causal, config=cfg))(q, k, v)
      assert len(out.sharding.device_set) == 8
      # Device i holds q heads 2i, 2i+1 and kv head i, with fold_in(rng, i).
      for i in range(8):
        ref = hyper_attention(q[:, :, 2 * i:2 * i + 2], k[:, :, i:i + 1], v[:, :, i:i + 1],
                              rng=jax.random.fold_in(rng, i), causal=causal, config=cfg)
        np.testing.assert_allclose(out[:, :, 2 * i:2 * i + 2], ref, atol=1e-6)
    print("ok")
""")


def test_head_sharded_matches_per_shard_calls(seed, tmp_path):
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") +
             " --xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
  script = tmp_path / "sharded.py"
  script.write_text(SCRIPT)
  result = subprocess.run([sys.executable, str(script), str(seed)], env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_bad_mesh_arguments():
  mesh = Mesh(jax.devices()[:1], ("data",))
  q = jnp.ones((1, 64, 2, 8))
  with pytest.raises(ValueError, match="no axis 'heads'"):
    head_sharded_hyper_attention(q, q, q, rng=jax.random.key(0), mesh=mesh)
  mesh = Mesh(jax.devices()[:1], ("heads",))
  with pytest.raises(ValueError, match="return_lse"):
    head_sharded_hyper_attention(q, q, q, rng=jax.random.key(0), mesh=mesh, return_lse=True,
                                 config=HyperAttentionConfig())
