"""Configuration of HyperAttention: a frozen, hashable dataclass (usable as a jit static arg)."""

from __future__ import annotations

import dataclasses

__all__ = ["HyperAttentionConfig"]


@dataclasses.dataclass(frozen=True)
class HyperAttentionConfig:
  """Hyper-parameters of HyperAttention (Han et al., 2024).

  Attributes:
    block_size: keys per block of the sorted key sequence; each sorted query block attends
      exactly to its matching key block.
    sample_size: keys sampled uniformly (with replacement) per (batch, kv-head) for the residual
      estimate; their weight is ``n_valid_keys / sample_size``.
    lsh_num_projs: number of random hyperplanes of the angular LSH (``2**lsh_num_projs`` buckets).
    min_seq_len: sequences with at most this many keys are computed exactly; it is also the size
      of the exact diagonal base blocks of the causal recursion.
    exact_chunk_size: query/key chunk of the memory-safe exact attention (base case and
      ``exact_attention``); only affects speed and peak memory, never the result.
  """

  block_size: int = 256
  sample_size: int = 256
  lsh_num_projs: int = 7
  min_seq_len: int = 4096
  exact_chunk_size: int = 512

  def __post_init__(self):
    for name in ("block_size", "sample_size", "lsh_num_projs", "min_seq_len", "exact_chunk_size"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"HyperAttentionConfig.{name} must be a positive int, got {value!r}")
    if self.lsh_num_projs > 30:
      raise ValueError(
          f"HyperAttentionConfig.lsh_num_projs must be <= 30 (bucket ids are int32), "
          f"got {self.lsh_num_projs}")
    if self.min_seq_len < self.block_size:
      raise ValueError(
          f"HyperAttentionConfig.min_seq_len ({self.min_seq_len}) must be >= block_size "
          f"({self.block_size}): the causal recursion's lower-left quadrants must hold at least "
          "one key block")
