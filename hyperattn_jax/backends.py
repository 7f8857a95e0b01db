"""The backends: how the library's stages run, one table from the public ``implementation`` name.

``"xla"`` runs everything in plain JAX (the references: ``blocked.py``, ``exact.py``,
``selection.py``); ``"pallas"`` runs the kernels of a folder of ``pallas_kernels/`` (today
``pallas_kernels/triton/``) and lets cuDNN take the exact attention it can (the causal base
case: ``exact_backend``). A second kernel backend is one more folder exporting the same functions
(``blocked_attention_pallas``, ``blocked_attention_bwd_pallas``, ``flash_attention_pallas``,
``flash_attention_bwd_pallas``, ``run_scores_pallas``, ``in_place``, ``BlockSizes``) and one row
of ``_TABLE``. A :class:`Backend` is hashable and compared by value: it is the static
``implementation`` argument every stage receives, carrying the kernels' tiles and interpret mode.
"""

from __future__ import annotations

import dataclasses
import importlib
import types

import jax

from hyperattn_jax import cudnn

__all__ = ["Backend", "XLA", "resolve", "exact_backend", "pallas_available"]

# name -> (kernel package: a folder of pallas_kernels/, or None: XLA; cuDNN takes the exact
# attention it can run)
_TABLE = {"xla": (None, False), "pallas": ("pallas_kernels.triton", True)}


@dataclasses.dataclass(frozen=True)
class Backend:
  """One way to run the stages.

  name: its ``implementation`` name (a key of the table).
  kernels: the kernel package (a module of ``pallas_kernels``), or None: XLA everywhere.
  cudnn_base_case: cuDNN's fused kernels may take exact attention (``exact_backend``).
  interpret: the kernels run in Pallas' interpreter (off the GPU).
  block_sizes: the kernels' tiles (the package's ``BlockSizes``; None for XLA).
  cudnn: this exact attention runs on cuDNN (set by ``exact_backend`` only).
  """
  name: str
  kernels: types.ModuleType | None = None
  cudnn_base_case: bool = False
  interpret: bool = False
  block_sizes: object = None
  cudnn: bool = False

  @property
  def options(self) -> dict:
    """The keyword arguments every kernel call takes: the tiles and interpret mode."""
    return dict(block_sizes=self.block_sizes, interpret=self.interpret)


XLA = Backend("xla")


def pallas_available() -> bool:
  """Whether the default implementation is ``"pallas"``: on a GPU whose jax has the kernels'
  Pallas backend."""
  if jax.default_backend() != "gpu":
    return False
  try:
    importlib.import_module(_TABLE["pallas"][0])
  except ImportError:
    return False
  return True


def resolve(implementation: str | None = None, block_sizes=None) -> Backend:
  """The :class:`Backend` of a public ``implementation`` (None: ``"pallas"`` where
  :func:`pallas_available`, else ``"xla"``) with the kernels' ``block_sizes`` (None: the
  package's defaults; the XLA backend has no tiles and ignores them). Kernels off the GPU run
  in Pallas' interpreter."""
  if not isinstance(implementation, (str, type(None))) or (
      implementation is not None and implementation not in _TABLE):
    raise ValueError(f"implementation must be one of {(None, *_TABLE)}, got {implementation!r}")
  name = implementation or ("pallas" if pallas_available() else "xla")
  package, cudnn_base_case = _TABLE[name]
  if package is None:
    return Backend(name)
  kernels = importlib.import_module(package)
  if block_sizes is None:
    block_sizes = kernels.BlockSizes()
  elif not isinstance(block_sizes, kernels.BlockSizes):
    raise ValueError(f"block_sizes must be a {package}.BlockSizes or None, got {block_sizes!r}")
  return Backend(name, kernels, cudnn_base_case, jax.default_backend() != "gpu", block_sizes)


def exact_backend(backend: Backend, q, key_mask) -> Backend:
  """The backend of an exact attention of q ``[B, T, N, H]`` (key_mask ``[B, Tk]`` or None):
  on cuDNN's fused kernels where the backend lets them and they can (no key mask, bf16/fp16:
  faster than the Pallas flash kernel, see ``experiments/benchmarks/bench_attention.py``'s
  breakdown); else ``backend``."""
  if backend.cudnn_base_case and cudnn.available(q, key_mask):
    return dataclasses.replace(backend, cudnn=True)
  return backend
