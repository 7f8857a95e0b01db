"""Sorting (stage 1b of sortLSH): the stable sorts of the rows by their sort keys.

The sort order is carried as permutations of local rows (``q_perm [P, Nkv, G, rows]``, ``k_perm
[P, Nkv, keys]``, padded, -1 for padding), never as sorted copies: the blocked stage reads and
writes rows through them. The regimes of :func:`permutations`: grouped 16-bit radix sorts, one
32-bit sort, or a stable argsort per array (``tests/test_sorting.py`` asserts which one runs).
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp

from hyperattn_jax import lsh
from hyperattn_jax.exact import grouped_q

__all__ = ["sort_keys", "permutations"]


def sort_keys(q, k, key_mask, projections):
  """The sort keys: Gray ranks of the LSH codes of every query ``[B, Nkv, G, Tq]`` and key ``[B,
  Nkv, Tk]`` (q ``[B, Tq, N, H]``, k ``[B, Tk, Nkv, H]``); masked keys get ``2**r``, so that
  they sort after every real bucket."""
  kh = k.shape[2]
  q_code = lsh.lsh_sort_keys(grouped_q(q, kh), projections)
  k_code = lsh.lsh_sort_keys(k.transpose(0, 2, 1, 3), projections)
  if key_mask is not None:
    k_code = jnp.where(key_mask[:, None, :], k_code, 2 ** projections.shape[-1])
  return q_code, k_code


# 16-bit sorts of one call/level at most (each is a few kernel launches; at 1M causal, whose
# finest level takes 16, they measured faster than one 32-bit sort: HISTORY, "Moved from code
# comments"); beyond, one 32-bit sort.
_MAX_SORTS = 16


def permutations(codes, rows, num_projs: int, masked: bool):
  """The sort: for each sort-key array ``codes[i]`` ``[..., n_i]`` (values below ``2**num_projs``,
  or equal to it on masked keys where ``masked``), the stable sort of its rows by key, as local
  row indices ``[..., rows[i]]`` int32, padded to ``rows[i]`` (padding sorts last and is -1).

  On GPU a batched sort is cub's segmented radix sort, several times slower at few long rows,
  so the arrays are flattened, concatenated and radix-sorted with the row index riding along
  as the value: the key of a row is (segment, sort key), segment = its leading position (batch,
  head, ...) numbered across the arrays. 16-bit keys take two radix passes, 32-bit ones four:
  the segments are cut into consecutive groups that each fit 16 bits with the code (a group's
  rows are a contiguous range, sorted in place), as long as that takes at most ``_MAX_SORTS``
  sorts; else one 32-bit sort, and a stable argsort per array beyond 32 bits. The radix sort
  is stable, so ties keep rows ascending. The code needs ``num_projs`` bits, one more when
  masked keys or padding rows carry the invalid code ``2**num_projs``.
  """
  padded = [jnp.pad(c, ((0, 0),) * (c.ndim - 1) + ((0, r - c.shape[-1]),),
                    constant_values=2 ** num_projs) for c, r in zip(codes, rows)]
  code_bits = num_projs + int(masked or any(r > c.shape[-1] for c, r in zip(codes, rows)))
  counts = [math.prod(c.shape[:-1]) for c in padded]
  segments = sum(counts)
  per_sort16 = 2 ** max(16 - code_bits, 0)
  if code_bits <= 16 and -(-segments // per_sort16) <= _MAX_SORTS:
    perms = _radix_perms(padded, counts, code_bits, jnp.uint16, per_sort16)
  elif (segments - 1).bit_length() + code_bits <= 32:
    perms = _radix_perms(padded, counts, code_bits, jnp.uint32, segments)
  else:
    perms = [jnp.argsort(c, axis=-1, stable=True).astype(jnp.int32) for c in padded]
  return tuple(jnp.where(p < c.shape[-1], p, -1) for p, c in zip(perms, codes))


def _radix_perms(padded, counts, code_bits: int, key_type, per_sort: int):
  """The (segment, code) radix sorts of :func:`permutations`: segments numbered across the arrays,
  ``per_sort`` consecutive ones per sort (keys relative to the group); the sorted row indices
  of each array ``[..., rows]`` int32."""
  keys, index = [], []
  # The row index rides along in 16 bits where every array's rows fit (cub's sorts measured
  # faster with 16-bit values than with 32-bit ones: see HISTORY, "Moved from code comments"),
  # else 32.
  value_type = jnp.uint16 if max(c.shape[-1] for c in padded) <= 2 ** 16 else jnp.uint32
  for c, first, count in zip(padded, itertools.accumulate([0] + counts), counts):
    segment = (first + jnp.arange(count, dtype=jnp.uint32)) % per_sort
    keys.append(((segment.reshape(c.shape[:-1] + (1,)) << code_bits)
                 | c.astype(jnp.uint32)).astype(key_type).reshape(-1))
    index.append(jax.lax.broadcasted_iota(value_type, c.shape, c.ndim - 1).reshape(-1))
  keys, index = jnp.concatenate(keys), jnp.concatenate(index)

  def flat_start(segment):  # first flat row of a segment
    start = 0
    for c, first, count in zip(padded, itertools.accumulate([0] + counts), counts):
      if segment < first + count:
        return start + (segment - first) * c.shape[-1]
      start += c.size
    return start
  bounds = [flat_start(g) for g in range(0, sum(counts), per_sort)] + [keys.size]
  index = jnp.concatenate([jax.lax.sort((keys[a:b], index[a:b]), num_keys=1, is_stable=True)[1]
                           for a, b in zip(bounds[:-1], bounds[1:])])
  ends = list(itertools.accumulate(c.size for c in padded))
  return [part.reshape(c.shape).astype(jnp.int32)
          for part, c in zip(jnp.split(index, ends[:-1]), padded)]
