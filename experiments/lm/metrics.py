"""Metric sinks: one JSON line per record, and TensorBoard scalar events (no TensorFlow)."""

from __future__ import annotations

import json
import os
import time

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

__all__ = ["MetricWriter"]


class MetricWriter:
  """Appends ``{"step": s, "split": ..., **scalars}`` to ``workdir/metrics.jsonl`` and writes
  the same scalars as TensorBoard events under ``workdir/tensorboard/``."""

  def __init__(self, workdir: str):
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
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
