"""Head-parallel HyperAttention over several devices (``jax.shard_map`` over a heads mesh axis).

Heads are independent in attention, so splitting them over devices needs no communication: each
device runs :func:`hyperattn_jax.hyper_attention` on its ``q_heads / D`` query heads and
``kv_heads / D`` key/value heads (GQA groups stay whole). The random draws of device ``i`` come
from ``fold_in(rng, i)``, so the result is a pure function of ``rng`` and the mesh size.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import Mesh, PartitionSpec as P

from hyperattn_jax.hyper import hyper_attention

__all__ = ["head_sharded_hyper_attention"]


def head_sharded_hyper_attention(query, key, value, *, rng, mesh: Mesh, axis: str = "heads",
                                 **kwargs):
  """:func:`hyper_attention` with the heads split over ``mesh.shape[axis]`` devices.

  Args:
    query: ``[batch, q_seq, q_heads, head_dim]``; key, value ``[batch, kv_seq, kv_heads,
      head_dim]``; ``kv_heads`` (hence ``q_heads``) divisible by the axis size.
    rng: a ``jax.random`` key; device ``i`` of the axis uses ``fold_in(rng, i)``.
    mesh: a mesh with an axis named ``axis``.
    **kwargs: the other arguments of :func:`hyper_attention` (``causal``, ``config``, ``scale``,
      ``key_mask``, ``implementation``; ``return_lse`` is not supported here).
  Returns:
    ``[batch, q_seq, q_heads, head_dim]`` sharded over the heads axis.
  """
  if axis not in mesh.shape:
    raise ValueError(f"mesh has no axis {axis!r}; its axes are {tuple(mesh.shape)}")
  if kwargs.get("return_lse"):
    raise ValueError("return_lse is not supported by head_sharded_hyper_attention")
  devices = mesh.shape[axis]
  kv_heads = key.shape[2]
  if kv_heads % devices:
    raise ValueError(f"key/value heads ({kv_heads}) must be divisible by the mesh axis "
                     f"{axis!r} of size {devices}")
  heads = P(None, None, axis, None)
  key_mask = kwargs.pop("key_mask", None)
  replicated = P()

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(heads, heads, heads, replicated,
                                                          replicated),
                     out_specs=heads, check_vma=False)
  def per_device(q, k, v, rng, key_mask):
    local_rng = jax.random.fold_in(rng, jax.lax.axis_index(axis))
    return hyper_attention(q, k, v, rng=local_rng, key_mask=key_mask, **kwargs)

  return per_device(query, key, value, rng, key_mask)
