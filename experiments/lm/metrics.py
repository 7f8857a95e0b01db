"""Metric sinks: one JSON line per record, and TensorBoard scalar events (no TensorFlow)."""

from __future__ import annotations

import json
import os
import time

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

__all__ = ["MetricWriter"]


def _drop_rows_after(path: str, step: int):
  """Rewrites the JSON lines file ``path`` (if any) without its rows of steps after ``step``
  and without a torn last line (a run killed while writing it)."""
  if not os.path.exists(path):
    return
  kept = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if row["step"] <= step:
        kept.append(line if line.endswith("\n") else line + "\n")
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.writelines(kept)
  os.replace(path + ".tmp", path)


class MetricWriter:
  """Appends ``{"step": s, "split": ..., **scalars}`` to ``workdir/metrics.jsonl`` and writes
  the same scalars as TensorBoard events under ``workdir/tensorboard/``.

  ``start_step``: the step training starts (or resumes) from. The rows of later steps, written
  by a run killed after its last checkpoint and about to be written again, are dropped on open,
  so the file keeps one row per (step, split).
  """

  def __init__(self, workdir: str, *, start_step: int):
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    _drop_rows_after(path, start_step)
    self._jsonl = open(path, "a", encoding="utf-8")
    self._events = EventFileWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, scalars: dict[str, float]):
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": step, "split": split, **scalars}) + "\n")
    self._jsonl.flush()
    summary = summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=f"{split}/{k}", simple_value=v) for k, v in scalars.items()])
    self._events.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

  def close(self):
    self._jsonl.close()
    self._events.close()
