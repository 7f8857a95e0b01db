"""Shared test helpers: fresh random inputs on every run, with the seed in the failure report."""

import atexit
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

# CPU runs: XLA's backend (LLVM) optimisation level 0 and its older elementwise emitters. The
# suite's time is almost all XLA compiles of graphs that then run for milliseconds (a test's
# eager ops compile one by one, ~50 ms each); level 0 compiles ~2.5x faster and the older
# emitters take ~40% more off (no fast-math either way: hyper_attention's XLA outputs and
# gradients are bitwise equal under both flags; the Pallas interpreter's differ in the last
# bits). The emitter flag is kept only where this jaxlib knows it (an unknown flag is fatal to
# XLA), checked in a subprocess. Set before the backend starts; an XLA_FLAGS that names the
# level itself, or a GPU plugin (jax_plugins), keeps XLA's defaults.
def _xla_accepts(flags):
  probe = "import jax.numpy as jnp; jnp.ones(1).block_until_ready()"
  env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                        check=False).returncode == 0


if (importlib.util.find_spec("jax_plugins") is None and
    "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "")):
  _flags = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
  if _xla_accepts(_flags + " --xla_cpu_use_fusion_emitters=false"):
    _flags += " --xla_cpu_use_fusion_emitters=false"
  os.environ["XLA_FLAGS"] = _flags

# A compilation cache on disk, one per test process (an xdist worker, and the subprocesses it
# starts, which inherit the variable): the training runs, resumes and scripts compile the same
# programs again in new jit objects or processes, and then load them instead. One per process
# (a worker makes its own, not its parent's), so that no process reads an entry while another
# writes it; removed at the end of the session. A JAX_COMPILATION_CACHE_DIR of your own is kept.
_CACHE_OWNER = "HYPERATTN_TEST_JAX_CACHE_OWNER"
if ("JAX_COMPILATION_CACHE_DIR" not in os.environ or
    os.environ.get(_CACHE_OWNER, str(os.getpid())) != str(os.getpid())):
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="hyperattn-jax-cache-")
  os.environ[_CACHE_OWNER] = str(os.getpid())
  _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]
  atexit.register(shutil.rmtree, _OWN_CACHE, ignore_errors=True)
else:
  _OWN_CACHE = None


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp
import numpy as np
import pytest

from hyperattn_jax.reference import reference_hyper_attention

# (also where jax was imported before this file read the variable)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])


@pytest.fixture(autouse=True)
def _exact_fp32_matmuls():
  """fp32 references are exact fp32 on every backend (GPUs default to TF32 for fp32 dots)."""
  with jax.default_matmul_precision("highest"):
    yield


@pytest.fixture
def seed(request):
  """A fresh seed per test run; set HYPERATTN_TEST_SEED to replay a failure."""
  value = int(os.environ.get("HYPERATTN_TEST_SEED", np.random.SeedSequence().entropy % 2**31))
  request.node.user_properties.append(("seed", value))
  print(f"seed={value}")
  return value


def make_qkv(seed, batch, q_len, kv_len, q_heads, kv_heads, head_dim, dtype=jnp.float32):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(k1, (batch, q_len, q_heads, head_dim), jnp.float32).astype(dtype)
  k = jax.random.normal(k2, (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
  v = jax.random.normal(k3, (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
  return q, k, v


def rel_err(x, ref):
  x = np.asarray(x, np.float64)
  ref = np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


# The dense oracle, compiled (eager, its per-level gathers dominate the suite's time).
jit_reference = jax.jit(reference_hyper_attention, static_argnames=("causal", "config", "scale"))
