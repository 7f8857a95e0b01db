"""What the benchmark scripts share: their flags (attention shape, HyperAttention settings,
timing), random inputs, the jitted forward / forward+backward pass, timed calls, error records
and a headless pyplot. Used by this folder's scripts and by ``experiments/research/``."""

from __future__ import annotations

import dataclasses

from absl import flags
import jax
import jax.numpy as jnp

from experiments import timing
from hyperattn_jax import HyperAttentionConfig

FLAGS = flags.FLAGS

# The HyperAttentionConfig fields the benchmarks set from flags, with the issues' setting.
_HYPER_FLAGS = {"block_size": (256, "HyperAttentionConfig.block_size."),
                "sample_size": (256, "HyperAttentionConfig.sample_size (samples per query)."),
                "lsh_num_projs": (7, "HyperAttentionConfig.lsh_num_projs (LSH hyperplanes)."),
                "min_seq_len": (4096, "HyperAttentionConfig.min_seq_len (exact base case "
                                "length)."),
                "sink_size": (0, "HyperAttentionConfig.sink_size (first keys exact)."),
                "local_window": (0, "HyperAttentionConfig.local_window (causal exact band)."),
                "select_blocks": (0, "HyperAttentionConfig.select_blocks (query-aware key "
                                  "runs per block)."),
                "select_block_size": (64, "HyperAttentionConfig.select_block_size.")}


def define_shape_flags(*, kv_heads: bool = True) -> None:
  """``--heads``, ``--kv_heads`` (unless ``kv_heads`` is False), ``--head_dim``: 32 heads of
  64 by default (the issues' setting)."""
  flags.DEFINE_integer("heads", 32, "Query heads.")
  if kv_heads:
    flags.DEFINE_integer("kv_heads", 32, "Key/value heads.")
  flags.DEFINE_integer("head_dim", 64, "Head dimension.")


def define_dtype_flag(help_text: str = "Input dtype.") -> None:
  """``--dtype``: bfloat16 (default), float16 or float32."""
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"], help_text)


def define_hyper_flags(*names: str) -> None:
  """Flags named as the HyperAttentionConfig fields ``names`` (default: all of
  ``_HYPER_FLAGS``: the paper's four and the options sinks, band, selection)."""
  for name in names or _HYPER_FLAGS:
    flags.DEFINE_integer(name, *_HYPER_FLAGS[name])


def hyper_config(base: HyperAttentionConfig | None = None) -> HyperAttentionConfig:
  """The HyperAttentionConfig of the flags of ``define_hyper_flags()`` (all of them); with
  ``base``: its fields, overridden only by the flags given on the command line."""
  if base is None:
    return HyperAttentionConfig(**{name: FLAGS[name].value for name in _HYPER_FLAGS})
  return dataclasses.replace(base, **{name: FLAGS[name].value for name in _HYPER_FLAGS
                                      if FLAGS[name].present})


def define_timing_flags(reps: int, warmup: int = 0) -> None:
  """``--reps`` (timed calls, median) and ``--warmup`` (untimed calls after compilation)."""
  flags.DEFINE_integer("reps", reps, "Timed repetitions (median).")
  flags.DEFINE_integer("warmup", warmup, "Untimed calls after compilation.")


def synchronised_ms(fn, *args) -> tuple[float, float, float]:
  """``timing.synchronised_ms`` with ``--reps`` and ``--warmup``: (median, min, max) ms."""
  return timing.synchronised_ms(fn, *args, reps=FLAGS.reps, warmup=FLAGS.warmup)


def random_inputs(key, q_shape, kv_shape, dtype, q_scale: float = 1.0):
  """q ``q_shape`` (times ``q_scale``), k and v ``kv_shape``, the cotangent d_out ``q_shape``:
  standard normal draws in float32 cast to ``dtype``, one key each from ``split(key, 4)``."""
  kq, kk, kv, kd = jax.random.split(key, 4)
  q = (q_scale * jax.random.normal(kq, q_shape, jnp.float32)).astype(dtype)
  k = jax.random.normal(kk, kv_shape, jnp.float32).astype(dtype)
  v = jax.random.normal(kv, kv_shape, jnp.float32).astype(dtype)
  d_out = jax.random.normal(kd, q_shape, jnp.float32).astype(dtype)
  return q, k, v, d_out


def jitted_pass(attn, mode: str, q, k, v, d_out, *, with_output: bool = False):
  """(jitted function, its arguments) of ``attn(q, k, v)``: ``mode="fwd"`` the forward on
  (q, k, v); ``"fwdbwd"`` the forward and the VJP with cotangent ``d_out`` on (q, k, v, d_out),
  returning the gradients (and first the output, if ``with_output``)."""
  if mode == "fwd":
    return jax.jit(attn), (q, k, v)

  def fwdbwd(q, k, v, d_out):
    out, vjp = jax.vjp(attn, q, k, v)
    return (out, vjp(d_out)) if with_output else vjp(d_out)
  return jax.jit(fwdbwd), (q, k, v, d_out)


def error_text(e: Exception, limit: int) -> str:
  """The ``"error"`` of a record whose measurement raised: the exception's type and the first
  ``limit`` characters of its message."""
  return f"{type(e).__name__}: {str(e)[:limit]}"


def pyplot():
  """``matplotlib.pyplot`` on the non-interactive Agg backend (the scripts run headless)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt
