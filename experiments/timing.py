"""Wall-clock timing of jitted calls, shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time

import jax


def synchronised_ms(fn, *args, reps: int, warmup: int = 0) -> tuple[float, float, float]:
  """(median, min, max) ms of ``reps`` calls of ``fn(*args)``, each waited for with
  ``block_until_ready``, after one compiling call and ``warmup`` untimed calls."""
  jax.block_until_ready(fn(*args))
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times), min(times), max(times)


def pipelined_ms(fn, *args, reps: int) -> float:
  """Mean ms per call of ``reps`` calls issued back to back with one synchronisation at the
  end: each call's dispatch and kernel launches overlap the previous call's GPU work, as inside
  a larger jitted program (the device time of one call, launch gaps included). Call it after
  ``fn`` has been compiled."""
  t0 = time.perf_counter()
  out = None
  for _ in range(reps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) * 1e3 / reps
