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
    sampler: how the residual keys are drawn. ``"uniform"`` (default, the practical
      algorithm): uniformly, weight ``n / sample_size``. ``"value_norm"`` (the paper's
      approximate matrix product): with probability ``p_j`` proportional to ``|v_j|^2``, weight
      ``1 / (sample_size * p_j)``.
    normalizer: the row normaliser. ``"merged"`` (default, the practical algorithm): the
      block and sampled parts share one softmax (their LSEs add). ``"approx_d"`` (the paper's
      ApproxD): the same, but the residual part of each row sum is clamped from below by
      ``tau / approx_d_kappa``, where ``tau`` is the largest exact residual row sum over
      ``approx_d_rows`` uniformly drawn query rows (costs one more blocked-stage pass and
      ``approx_d_rows x n`` exact scores).
    approx_d_kappa: the paper's kappa (ratio of the largest to the smallest residual row sum)
      assumed by ``"approx_d"``; must be >= 1.
    approx_d_rows: query rows drawn to estimate ``tau`` for ``"approx_d"``.
    sink_size: attention sinks: the first ``sink_size`` keys are attended exactly by every
      query (weight 1, never hashed or sampled). 0: none (the paper's algorithm).
    local_window: causal only: an exact band. In every quadrant of the causal recursion, the
      last ``local_window`` keys of its left half are attended exactly by every query of its
      right half (and taken out of the approximation there), so every query sees at least the
      ``local_window`` keys just before it exactly -- also at the start of a base block, where
      the paper's algorithm has none. 0: none.
    Both must fit the smallest quadrant: ``sink_size + local_window <= min_seq_len // 2``.
    select_blocks: query-aware key-block selection: the keys of every problem (the non-causal
      call, each causal quadrant) are cut into runs of ``select_block_size`` consecutive keys,
      and each sorted query block also attends exactly to the ``select_blocks`` runs whose
      upper bound on ``q . k`` over the block's queries is largest (the per-channel bound of
      Quest, Tang et al. 2024: ``sum_d max(q_d kmax_d, q_d kmin_d)``); the samples that fall in
      a selected run are left out of that block's residual (so every key is counted once). It
      finds a key whose score is large through its norm, which angular LSH misses. 0: none
      (the paper's algorithm). In the Pallas kernels the selected keys are loaded by index
      like the block's own. Choosing them bounds every query against every run (a Pallas
      kernel on GPU, XLA's top-k after it): ``O(n^2 / select_block_size)`` work, ~1/64 of
      exact attention's with runs of 64 -- small at 131k, but quadratic.
    select_block_size: keys per selectable run (see ``select_blocks``).
  """

  block_size: int = 256
  sample_size: int = 256
  lsh_num_projs: int = 7
  min_seq_len: int = 4096
  exact_chunk_size: int = 512
  sampler: str = "uniform"
  normalizer: str = "merged"
  approx_d_kappa: float = 100.0
  approx_d_rows: int = 256
  sink_size: int = 0
  local_window: int = 0
  select_blocks: int = 0
  select_block_size: int = 64

  def __post_init__(self):
    for name, allowed in (("sampler", ("uniform", "value_norm")),
                          ("normalizer", ("merged", "approx_d"))):
      if getattr(self, name) not in allowed:
        raise ValueError(f"HyperAttentionConfig.{name} must be one of {allowed}, got "
                         f"{getattr(self, name)!r}")
    kappa = self.approx_d_kappa
    if isinstance(kappa, bool) or not isinstance(kappa, (int, float)) or not kappa >= 1:
      raise ValueError(f"HyperAttentionConfig.approx_d_kappa must be a number >= 1, got {kappa!r}")
    for name in ("block_size", "sample_size", "lsh_num_projs", "min_seq_len", "exact_chunk_size",
                 "approx_d_rows", "select_block_size"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"HyperAttentionConfig.{name} must be a positive int, got {value!r}")
    for name in ("sink_size", "local_window", "select_blocks"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"HyperAttentionConfig.{name} must be an int >= 0, got {value!r}")
    if self.sink_size + self.local_window > self.min_seq_len // 2:
      raise ValueError(
          f"HyperAttentionConfig.sink_size + local_window ({self.sink_size} + "
          f"{self.local_window}) must be <= min_seq_len // 2 ({self.min_seq_len // 2}): both "
          "must fit the left half of the smallest causal quadrant")
    if self.select_blocks and self.normalizer != "merged":
      raise ValueError(
          f"HyperAttentionConfig.select_blocks={self.select_blocks} needs normalizer='merged' "
          f"(ApproxD's residual is defined without the selected keys), got {self.normalizer!r}")
    if self.lsh_num_projs > 30:
      raise ValueError(
          f"HyperAttentionConfig.lsh_num_projs must be <= 30 (bucket ids are int32), "
          f"got {self.lsh_num_projs}")
    if self.min_seq_len < self.block_size:
      raise ValueError(
          f"HyperAttentionConfig.min_seq_len ({self.min_seq_len}) must be >= block_size "
          f"({self.block_size}): the causal recursion's lower-left quadrants must hold at least "
          "one key block")
