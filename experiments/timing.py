"""Timing of jitted calls, shared by the benchmark scripts: wall clock (synchronised, pipelined)
and per-kernel GPU time from a profiler trace."""

from __future__ import annotations

import collections
import glob
import statistics
import tempfile
import time
from typing import Callable

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


def _kernel_times(trace_dir: str) -> dict[str, list[float]]:
  """{kernel name: [total ns, launches]} over the GPU planes' stream lines."""
  totals = collections.defaultdict(lambda: [0.0, 0])
  for path in glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True):
    for plane in jax.profiler.ProfileData.from_file(path).planes:
      if not plane.name.startswith("/device:GPU"):
        continue
      for line in plane.lines:
        if "stream" not in line.name.lower():
          continue
        for event in line.events:
          totals[event.name][0] += event.duration_ns
          totals[event.name][1] += 1
  return totals


def kernel_table(run: Callable[[], object], reps: int) -> dict:
  """Per-kernel GPU time of ``reps`` traced calls of ``run`` (compiled and warmed up before):
  ``wall_ms_per_call_traced``, ``kernel_ms_per_call`` (the sum) and ``kernels`` (``name``,
  ``ms_per_call``, ``launches_per_call``; largest first). No GPU: no kernels."""
  trace_dir = tempfile.mkdtemp()
  t0 = time.perf_counter()
  with jax.profiler.trace(trace_dir):
    for _ in range(reps):
      jax.block_until_ready(run())
  wall_ms = (time.perf_counter() - t0) * 1e3 / reps
  kernels = sorted(({"name": name, "ms_per_call": ns / reps / 1e6,
                     "launches_per_call": count / reps}
                    for name, (ns, count) in _kernel_times(trace_dir).items()),
                   key=lambda r: -r["ms_per_call"])
  return {"wall_ms_per_call_traced": wall_ms,
          "kernel_ms_per_call": sum(r["ms_per_call"] for r in kernels), "kernels": kernels}


def report_kernels(table: dict, title: str, top: int) -> dict:
  """Prints ``table``'s ``top`` kernels under ``title``; returns the table cut to them (the sum
  stays that of all kernels)."""
  print(f"{title}: kernels {table['kernel_ms_per_call']:.2f} ms/call "
        f"(traced wall {table['wall_ms_per_call_traced']:.2f} ms)")
  for r in table["kernels"][:top]:
    print(f"{r['ms_per_call']:9.3f} ms {r['launches_per_call']:6.1f}x  {r['name'][:110]}")
  return table | {"kernels": table["kernels"][:top]}
