"""Byte-level corpus and a deterministic, resumable stream of fixed-length windows.

Tokens are bytes (0..255) plus ``EOS`` (256) between documents. The default corpus is the
Python standard library's own source files (present on every machine, no download). Files are
split into train/validation deterministically by a hash of their relative path. The batch of
training step ``s`` is a pure function of ``(seed, s)``: each epoch is a fresh permutation of
the windows, so a run resumed from a checkpoint at step ``s`` sees exactly the batches an
uninterrupted run would have seen. With a :class:`RetrievalMix`, a fraction of the windows carry
a retrieval probe (``retrieval.py``) chosen by the same ``(seed, step)``.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sysconfig
import zlib

import numpy as np

from experiments.lm import retrieval

__all__ = ["EOS", "VOCAB_SIZE", "Corpus", "RetrievalMix", "load_corpus", "train_batch",
           "eval_batches", "retrieval_mix"]

EOS = 256
VOCAB_SIZE = 257


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Token streams (``uint16``) of the two splits and where they came from."""
  train: np.ndarray
  valid: np.ndarray
  source: str
  num_files: int


def _stdlib_files() -> tuple[str, list[str]]:
  root = sysconfig.get_paths()["stdlib"]
  files = [f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
           if "site-packages" not in f and "dist-packages" not in f]
  return root, files


def _user_files(path: str) -> tuple[str, list[str]]:
  if os.path.isdir(path):
    files = [f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
             if os.path.isfile(f)]
    return path, files
  files = [f for f in glob.glob(path, recursive=True) if os.path.isfile(f)]
  if not files:
    raise ValueError(f"config.data.path={path!r} is neither a directory nor a glob matching "
                     "any file")
  return os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files]), files


def load_corpus(path: str | None, valid_fraction: float = 0.05) -> Corpus:
  """Reads the corpus at ``path`` (directory or glob of text files; None: Python stdlib)."""
  if not 0.0 < valid_fraction < 1.0:
    raise ValueError(f"config.data.valid_fraction must be in (0, 1), got {valid_fraction}")
  root, files = _stdlib_files() if not path else _user_files(path)
  splits = {True: [], False: []}
  for f in sorted(files):
    rel = os.path.relpath(f, root)
    with open(f, "rb") as fh:
      data = fh.read()
    if data:
      is_valid = (zlib.crc32(rel.encode()) % 10_000) < valid_fraction * 10_000
      splits[is_valid].append(np.frombuffer(data, np.uint8))
  if not splits[False] and not splits[True]:
    raise ValueError(f"config.data.path={path!r}: the corpus is empty ({len(files)} files)")
  eos = np.array([EOS], np.uint16)

  def join(docs):
    parts = [p for d in docs for p in (d.astype(np.uint16), eos)]
    return np.concatenate(parts) if parts else np.zeros((0,), np.uint16)

  train, valid = join(splits[False]), join(splits[True])
  if not len(valid):  # tiny corpora: the last file validates
    train, valid = join(splits[False][:-1]), join(splits[False][-1:])
  return Corpus(train=train, valid=valid, source=path or f"python-stdlib:{root}",
                num_files=len(files))


def _windows(tokens: np.ndarray, seq_len: int, split: str) -> int:
  count = (len(tokens) - 1) // seq_len
  if count < 1:
    raise ValueError(f"the {split} split has {len(tokens)} tokens, shorter than one sequence of "
                     f"seq_len + 1 = {seq_len + 1}; use a larger corpus or a smaller seq_len")
  return count


@dataclasses.dataclass(frozen=True)
class RetrievalMix:
  """Which training windows carry a retrieval probe: each with probability ``rate``, the task
  drawn uniformly from ``tasks``."""
  rate: float
  tasks: tuple[retrieval.Task, ...]

  def __post_init__(self):
    if not 0.0 <= self.rate <= 1.0:
      raise ValueError(f"config.data.retrieval.rate must be in [0, 1], got {self.rate!r}")
    if self.rate > 0 and not self.tasks:
      raise ValueError("config.data.retrieval.tasks is empty but rate > 0")


def retrieval_mix(cfg, names=None) -> RetrievalMix:
  """The mix of ``config.data.retrieval`` (``rate``, comma-separated ``tasks``, and per task
  name an optional dict of arguments for its factory); ``names`` replaces its task list."""
  names = names or [n.strip() for n in cfg.tasks.split(",") if n.strip()]
  return RetrievalMix(rate=cfg.rate, tasks=tuple(
      retrieval.make_task(n, **dict(cfg.get(n, None) or {})) for n in names))


def train_batch(tokens: np.ndarray, step: int, batch_size: int, seq_len: int, seed: int,
                mix: RetrievalMix | None = None) -> dict[str, np.ndarray]:
  """Training step ``step``'s (0-based) batch: ``tokens [batch_size, seq_len + 1]`` int32 and
  ``answer_mask [batch_size, seq_len]`` bool (True where the *target* is an answer token)."""
  count = _windows(tokens, seq_len, "train")
  out = np.empty((batch_size, seq_len + 1), np.int32)
  mask = np.zeros((batch_size, seq_len + 1), bool)
  for j in range(batch_size):
    i = step * batch_size + j
    epoch, pos = divmod(i, count)
    window = np.random.default_rng([seed, epoch]).permutation(count)[pos]
    out[j] = tokens[window * seq_len: window * seq_len + seq_len + 1]
    rng = np.random.default_rng([seed, step, j, 1])
    if mix is not None and mix.rate > 0 and rng.random() < mix.rate:
      task = mix.tasks[rng.integers(len(mix.tasks))]
      probe = retrieval.assemble(out[j], task.sample(rng, (0.0, 1.0)), seq_len + 1)
      out[j], mask[j] = probe.tokens, probe.answer_mask
  return {"tokens": out, "answer_mask": mask[:, 1:]}


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int):
  """The first ``max_batches`` full batches of consecutive validation windows."""
  count = _windows(tokens, seq_len, "validation")
  num = max(1, min(max_batches, count // batch_size))
  if count < batch_size:
    raise ValueError(f"the validation split has {count} windows of seq_len={seq_len}, fewer "
                     f"than eval batch_size={batch_size}")
  for b in range(num):
    rows = [tokens[w * seq_len: w * seq_len + seq_len + 1]
            for w in range(b * batch_size, (b + 1) * batch_size)]
    yield np.stack(rows).astype(np.int32)
