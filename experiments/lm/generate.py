"""Autoregressive generation with the LM example: prefill with each layer's mode, then a KV cache.

``generate(params, cfg, prompt_tokens, max_new_tokens, ...)`` is what ``generate_text.py`` and
``experiments/benchmarks/bench_generate.py`` run. The prompt is one call of the model with
``decode=True`` (the prefill: every attention layer writes the prompt's keys/values into its cache
and attends with its configured mode, HyperAttention where ``"hyper"``); each new token is one
call of a jitted decode step (exact attention over the cache, linear in its length). Both are
compiled ahead of the timed calls, so the timings exclude compilation (reported apart).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from experiments.lm import data as data_lib
from experiments.lm import model as model_lib

__all__ = ["Generation", "init_cache", "sample", "generate"]


@dataclasses.dataclass(frozen=True)
class Generation:
  """The new tokens and the timings of one :func:`generate` call.

  ``tokens [batch, n]`` int32: ``n <= max_new_tokens`` (fewer when every row reached EOS); a row
  that reached EOS earlier continues with EOS. ``time_to_first_token_s``: the prefill and the
  first sample, up to the token on the host. ``decode_tokens_per_s``: the tokens of the later
  steps (all rows) per second of those steps (NaN when there were none).
  """
  tokens: np.ndarray
  time_to_first_token_s: float
  decode_tokens_per_s: float
  decode_steps: int
  prefill_compile_s: float
  decode_compile_s: float


def init_cache(model: model_lib.Transformer, batch: int, max_len: int):
  """The zero ``"cache"`` collection of ``model`` for ``[batch, max_len]`` tokens (its shapes
  from ``jax.eval_shape`` of the creating call: nothing is computed)."""
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((batch, max_len), jnp.int32),
                         decode=True)["cache"])
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def sample(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int) -> jax.Array:
  """Next tokens ``[batch]`` int32 from logits ``[batch, vocab]``: the argmax where
  ``temperature == 0``, else a draw from ``softmax(logits / temperature)`` restricted to the
  ``top_k`` largest logits (all of them where ``top_k == 0``)."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]                                # [batch, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(4,))
def _prefill(model, temperature, top_k, params, cache, prompt, hyper_rng, sample_rng):
  """Prompt ``[batch, p]`` -> (first new token ``[batch]``, cache filled at ``0 .. p-1``)."""
  logits, variables = model.apply({"params": params, "cache": cache}, prompt, decode=True,
                                  mutable=["cache"], rngs={"hyper": hyper_rng})
  return sample(logits[:, -1], sample_rng, temperature, top_k), variables["cache"]


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(4,))
def _decode_step(model, temperature, top_k, params, cache, token, sample_rng, step):
  """One token ``[batch]`` in at ``cache_index`` -> (the next ``[batch]``, the cache)."""
  logits, variables = model.apply({"params": params, "cache": cache}, token[:, None],
                                  decode=True, mutable=["cache"])
  rng = jax.random.fold_in(sample_rng, step)
  return sample(logits[:, -1], rng, temperature, top_k), variables["cache"]


def _to_host_first(outputs):
  """``(token on the host, cache as it is)``."""
  token, cache = outputs
  return np.asarray(token), cache


def _timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def generate(params, cfg: model_lib.TransformerConfig, prompt_tokens, max_new_tokens: int, *,
             rng: jax.Array, temperature: float = 0.0, top_k: int = 0,
             max_len: int | None = None, eos_id: int | None = data_lib.EOS,
             progress: bool = False) -> Generation:
  """Continues ``prompt_tokens`` ``[batch, prompt_len]`` (ints in ``[0, cfg.vocab_size)``) by up
  to ``max_new_tokens`` tokens.

  Args:
    params: the model's params (e.g. ``train.restore_params``).
    cfg: its config; the prefill runs each layer's mode (``attention_modes(cfg)``).
    rng: key of the HyperAttention draws of the prefill and of the samples.
    temperature: 0 for greedy decoding, else the softmax temperature of the samples.
    top_k: sample among the ``top_k`` most likely tokens (0: all).
    max_len: the cache length, at least ``prompt_len + max_new_tokens - 1`` (default
      ``prompt_len + max_new_tokens``); a fixed one lets prompts of other lengths share the
      compiled decode step.
    eos_id: generation stops once every row has produced it (None: never).
    progress: a tqdm bar of the decode steps (tokens/s).
  """
  prompt = np.asarray(prompt_tokens)
  if prompt.ndim != 2 or 0 in prompt.shape or not np.issubdtype(prompt.dtype, np.integer):
    raise ValueError(f"prompt_tokens must be a non-empty int array [batch, prompt_len], got "
                     f"{prompt.dtype}{prompt.shape}")
  if prompt.min() < 0 or prompt.max() >= cfg.vocab_size:
    raise ValueError(f"prompt_tokens must lie in [0, vocab_size={cfg.vocab_size}), got "
                     f"[{prompt.min()}, {prompt.max()}]")
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature!r}")
  if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= cfg.vocab_size:
    raise ValueError(f"top_k must be an int in [0, vocab_size={cfg.vocab_size}], got {top_k!r}")
  batch, prompt_len = prompt.shape
  needed = prompt_len + max_new_tokens - 1  # the last new token is not fed back
  max_len = prompt_len + max_new_tokens if max_len is None else max_len
  if max_len < needed:
    raise ValueError(f"max_len ({max_len}) must be >= prompt_len + max_new_tokens - 1 = "
                     f"{needed}")
  model = model_lib.Transformer(cfg)
  temperature = float(temperature)
  hyper_rng, sample_rng = jax.random.split(rng)
  cache = init_cache(model, batch, max_len)
  prompt = jnp.asarray(prompt, jnp.int32)
  first_rng = jax.random.fold_in(sample_rng, 0)
  prefill, prefill_compile_s = _timed(
      lambda: _prefill.lower(model, temperature, top_k, params, cache, prompt, hyper_rng,
                             first_rng).compile())
  # The first token on the host ends the prefill (the cache stays on the device).
  (token, cache), ttft = _timed(lambda: _to_host_first(
      prefill(params, cache, prompt, hyper_rng, first_rng)))
  step, decode_compile_s = _timed(
      lambda: _decode_step.lower(model, temperature, top_k, params, cache, token, sample_rng,
                                 jnp.int32(1)).compile())

  stop = -1 if eos_id is None else eos_id  # no token is -1: never stops
  tokens = [token]
  done = token == stop
  bar = tqdm(total=max_new_tokens * batch, initial=batch, unit="tok", desc="decode",
             disable=not progress, dynamic_ncols=True)
  t0 = time.perf_counter()
  for i in range(1, max_new_tokens):
    if done.all():
      break
    token, cache = step(params, cache, token, sample_rng, jnp.int32(i))
    # Rows past their EOS keep EOS (the batch steps together).
    token = np.where(done, stop, np.asarray(token)).astype(np.int32)
    done = done | (token == stop)
    tokens.append(token)
    bar.update(batch)
  decode_s = time.perf_counter() - t0
  bar.close()
  steps = len(tokens) - 1
  return Generation(tokens=np.stack(tokens, axis=1).astype(np.int32),
                    time_to_first_token_s=ttft,
                    decode_tokens_per_s=steps * batch / decode_s if steps else float("nan"),
                    decode_steps=steps, prefill_compile_s=prefill_compile_s,
                    decode_compile_s=decode_compile_s)
