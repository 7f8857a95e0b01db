"""Long-range retrieval probes hidden in real text: passkey and multi-key associative recall.

A *task* turns a random generator and a depth range into a :class:`Probe`: needles to hide in a
haystack of real text and (question, answer) pairs asked after it. :func:`assemble` builds the
token sequence and marks the answer tokens, which training weights (``answer_weight``) and
``eval_retrieval.py`` scores (teacher-forced: an answer is an exact match when the model's
argmax is right at every answer token, which is what greedy decoding would produce).

Built-in tasks:

* :class:`TemplateTask` -- one random value written into a needle template and asked for at the
  end; ``passkey()`` is the passkey test of Mohtashami & Jaggi (2023).
* :class:`AssociativeRecallTask` -- many key->value pairs spread through the text and several
  of them queried at the end (in the spirit of Zoology's MQAR, Arora et al. 2023).

Your own format: any object with a ``name`` and a method
``sample(rng: np.random.Generator, depth_range: tuple[float, float]) -> Probe`` is a task. The
needles of the queried facts must lie at depths inside ``depth_range`` (the evaluation bins
accuracy by the depth each query reports); the rest may go anywhere in ``[0, 1]``. Register it
with :func:`register_task` to use it from a config (``config.data.retrieval.tasks``) or from
``eval_retrieval.py --tasks``.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Callable, Protocol

import numpy as np

__all__ = ["Probe", "Query", "Task", "TemplateTask", "AssociativeRecallTask", "Assembled",
           "assemble", "passkey", "register_task", "make_task", "task_names"]

_DIGITS = string.digits
_LETTERS = string.ascii_lowercase


@dataclasses.dataclass(frozen=True)
class Query:
  """A question appended after the haystack, the answer the model must continue it with, and
  the depth in ``[0, 1]`` of the needle that holds the answer."""
  question: bytes
  answer: bytes
  depth: float


@dataclasses.dataclass(frozen=True)
class Probe:
  """Needles ``(depth, text)`` to hide in the haystack and the queries asked after it."""
  needles: tuple[tuple[float, bytes], ...]
  queries: tuple[Query, ...]

  def __post_init__(self):
    if not self.queries:
      raise ValueError("Probe.queries must hold at least one Query")
    for depth, text in self.needles:
      if not 0.0 <= depth <= 1.0 or not isinstance(text, bytes):
        raise ValueError(f"Probe.needles must be (depth in [0, 1], bytes) pairs, got "
                         f"({depth!r}, {type(text).__name__})")
    for q in self.queries:
      if not q.answer or not 0.0 <= q.depth <= 1.0:
        raise ValueError(f"Query.answer must be non-empty and Query.depth in [0, 1], got {q}")


class Task(Protocol):
  name: str

  def sample(self, rng: np.random.Generator, depth_range: tuple[float, float]) -> Probe:
    ...


def _random_text(rng: np.random.Generator, alphabet: str, length: int) -> str:
  return "".join(rng.choice(list(alphabet), size=length))


def _check_range(depth_range):
  lo, hi = depth_range
  if not 0.0 <= lo < hi <= 1.0:
    raise ValueError(f"depth_range must satisfy 0 <= lo < hi <= 1, got {depth_range}")
  return lo, hi


@dataclasses.dataclass(frozen=True)
class TemplateTask:
  """One random value (``length`` characters of ``alphabet``) in a needle, asked for at the end.

  ``needle`` contains ``{value}`` (any number of times); ``question`` is appended after the
  haystack and the model must continue it with the value.
  """
  name: str
  needle: str
  question: str
  alphabet: str = _DIGITS
  length: int = 5

  def __post_init__(self):
    if "{value}" not in self.needle:
      raise ValueError(f"TemplateTask.needle must contain '{{value}}', got {self.needle!r}")
    if self.length <= 0 or not self.alphabet:
      raise ValueError("TemplateTask.length must be > 0 and alphabet non-empty")

  def sample(self, rng, depth_range=(0.0, 1.0)) -> Probe:
    lo, hi = _check_range(depth_range)
    value = _random_text(rng, self.alphabet, self.length)
    depth = float(rng.uniform(lo, hi))
    return Probe(needles=((depth, self.needle.format(value=value).encode()),),
                 queries=(Query(self.question.encode(), value.encode(), depth),))


def passkey(digits: int = 5) -> TemplateTask:
  """The passkey test: a random number hidden at a random depth, asked for at the end."""
  return TemplateTask(
      name="passkey",
      needle="\nThe pass key is {value}. Remember it. {value} is the pass key.\n",
      question="\nWhat is the pass key? The pass key is ", alphabet=_DIGITS, length=digits)


@dataclasses.dataclass(frozen=True)
class AssociativeRecallTask:
  """``num_pairs`` distinct ``<kv KEY=VALUE>`` needles at random depths; ``num_queries`` of them
  asked for at the end as ``<kv KEY=`` (answer: ``VALUE``), in random order."""
  name: str = "mqar"
  num_pairs: int = 32
  num_queries: int = 8
  key_length: int = 4
  value_length: int = 4

  def __post_init__(self):
    if not 0 < self.num_queries <= self.num_pairs:
      raise ValueError(f"AssociativeRecallTask needs 0 < num_queries <= num_pairs, got "
                       f"{self.num_queries} and {self.num_pairs}")
    if len(_LETTERS) ** self.key_length < 4 * self.num_pairs:
      raise ValueError(f"AssociativeRecallTask.key_length={self.key_length} is too short for "
                       f"{self.num_pairs} distinct keys")

  def sample(self, rng, depth_range=(0.0, 1.0)) -> Probe:
    lo, hi = _check_range(depth_range)
    keys: list[str] = []
    while len(keys) < self.num_pairs:
      key = _random_text(rng, _LETTERS, self.key_length)
      if key not in keys:
        keys.append(key)
    values = [_random_text(rng, _DIGITS, self.value_length) for _ in keys]
    asked = rng.permutation(self.num_pairs)[:self.num_queries]
    depths = rng.uniform(0.0, 1.0, self.num_pairs)
    depths[asked] = rng.uniform(lo, hi, self.num_queries)
    needles = tuple((float(d), f"<kv {k}={v}>".encode()) for d, k, v in zip(depths, keys, values))
    queries = tuple(Query(f"\n<kv {keys[i]}=".encode(), values[i].encode(), float(depths[i]))
                    for i in asked)
    return Probe(needles=needles, queries=queries)


_REGISTRY: dict[str, Callable[[], Task]] = {
    "passkey": passkey,
    "mqar": AssociativeRecallTask,
}


def register_task(name: str, factory: Callable[[], Task]) -> None:
  """Makes ``factory()`` available as the task ``name`` in configs and ``eval_retrieval.py``."""
  _REGISTRY[name] = factory


def task_names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def make_task(name: str, **kwargs) -> Task:
  """The registered task ``name`` (``kwargs`` go to its factory)."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown retrieval task {name!r}; registered: {sorted(_REGISTRY)}")
  return _REGISTRY[name](**kwargs)


@dataclasses.dataclass(frozen=True)
class Assembled:
  """A probe written into a haystack.

  Attributes:
    tokens: ``[length]`` int32 -- haystack with the needles, then the queries.
    answer_mask: ``[length]`` bool -- True at the tokens of every answer.
    answers: per query ``(start, stop, depth)``: the answer's tokens are ``tokens[start:stop]``.
  """
  tokens: np.ndarray
  answer_mask: np.ndarray
  answers: tuple[tuple[int, int, float], ...]


def assemble(haystack: np.ndarray, probe: Probe, length: int) -> Assembled:
  """Writes ``probe`` into the first tokens of ``haystack`` so that the result has ``length``.

  Needles go at ``depth * H`` of the ``H`` haystack tokens that remain once the needles and the
  queries are counted; the queries follow the haystack and end the sequence.
  """
  needle_tokens = sum(len(t) for _, t in probe.needles)
  tail = [np.frombuffer(piece, np.uint8) for q in probe.queries for piece in (q.question,
                                                                            q.answer)]
  tail_tokens = sum(len(t) for t in tail)
  h = length - needle_tokens - tail_tokens
  if h < 0 or len(haystack) < h:
    raise ValueError(f"a probe of {needle_tokens} needle and {tail_tokens} query tokens does not "
                     f"fit a sequence of length {length} (haystack {len(haystack)} tokens)")
  pieces, cursor = [], 0
  for depth, text in sorted(probe.needles, key=lambda n: n[0]):
    at = int(round(depth * h))
    pieces += [haystack[cursor:at], np.frombuffer(text, np.uint8)]
    cursor = at
  pieces.append(haystack[cursor:h])
  start = h + needle_tokens
  answers = []
  for q in probe.queries:
    start += len(q.question)
    answers.append((start, start + len(q.answer), q.depth))
    start += len(q.answer)
  tokens = np.concatenate([p.astype(np.int32) for p in pieces + tail])
  mask = np.zeros((length,), bool)
  for a, b, _ in answers:
    mask[a:b] = True
  return Assembled(tokens=tokens, answer_mask=mask, answers=tuple(answers))
