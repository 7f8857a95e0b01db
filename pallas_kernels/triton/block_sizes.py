"""The Triton kernels' tile settings: a frozen, validated value (a jit static argument).

``BlockSizes()`` holds the tuned defaults (H100, re-checked on the H200: HISTORY, records
``*-tune*``); ``experiments/benchmarks/tune_kernels.py`` prints what a sweep finds as a
``BlockSizes(...)`` to pass to ``hyper_attention(..., block_sizes=...)``.
"""

from __future__ import annotations

import dataclasses

__all__ = ["BlockSizes", "Tiles", "check_block_sizes"]


def _check_int(owner: str, name: str, value, *, power_of_two=False, lo=1):
  """Raises a ValueError naming ``owner.name`` unless ``value`` is an int ``>= lo`` (and a power of
  two where asked)."""
  ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo
  if ok and power_of_two:
    ok = value & (value - 1) == 0
  if not ok:
    want = f"a power of two >= {lo}" if power_of_two else f"an int >= {lo}"
    raise ValueError(f"{owner}.{name} must be {want}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Tiles:
  """One kernel's launch: ``block_q`` query rows and ``block_k`` keys (the run-score kernel:
  runs) per tile, powers of two >= 16 (Triton's dot and load shapes); ``num_warps`` a power of
  two; ``num_stages`` software-pipeline stages >= 1."""
  block_q: int = 64
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      _check_int("Tiles", name, getattr(self, name), power_of_two=True, lo=16)
    _check_int("Tiles", "num_warps", self.num_warps, power_of_two=True)
    _check_int("Tiles", "num_stages", self.num_stages)

  @property
  def compiler(self) -> dict:
    """The ``num_warps`` / ``num_stages`` compiler parameters."""
    return dict(num_warps=self.num_warps, num_stages=self.num_stages)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of every Triton kernel (defaults: the tuned values).

  blocked_fwd: the blocked stage's forward (``blocked_attention_pallas``).
  blocked_bwd: its dq and dk/dv kernels (``blocked_attention_bwd_pallas``).
  sample_groups: float32 partials of the samples' dk/dv per kv head, over all problems of a
    call (per problem: the largest divisor of the block count not above ``sample_groups / P``).
  key_chunks_per_program: ``block_k`` key chunks per dk/dv program of a block's own keys (the
    exact kernels: of the keys), at most: the largest divisor of the chunk count not above it.
  flash_fwd, flash_bwd: the exact kernels (``flash_attention_pallas`` / ``_bwd_pallas``: the
    causal base case).
  run_scores: the ``select_blocks`` run-score kernel (``block_k``: runs per program).
  """
  blocked_fwd: Tiles = Tiles()
  blocked_bwd: Tiles = Tiles()
  sample_groups: int = 8
  key_chunks_per_program: int = 2
  flash_fwd: Tiles = Tiles(block_q=128, num_stages=3)
  flash_bwd: Tiles = Tiles()
  run_scores: Tiles = Tiles(num_stages=3)

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if isinstance(field.default, Tiles) and not isinstance(value, Tiles):
        raise ValueError(f"BlockSizes.{field.name} must be a Tiles, got {value!r}")
    _check_int("BlockSizes", "sample_groups", self.sample_groups)
    _check_int("BlockSizes", "key_chunks_per_program", self.key_chunks_per_program)

  @classmethod
  def from_dict(cls, fields: dict) -> BlockSizes:
    """The inverse of ``dataclasses.asdict`` (e.g. ``tune_kernels.py``'s JSON): missing fields
    keep their defaults."""
    tiles = {f.name for f in dataclasses.fields(cls) if isinstance(f.default, Tiles)}
    return cls(**{name: Tiles(**value) if name in tiles else value
                  for name, value in fields.items()})


def check_block_sizes(block_sizes) -> None:
  """A kernel wrapper's check of its ``block_sizes`` argument."""
  if not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"block_sizes must be a BlockSizes, got {block_sizes!r}")
