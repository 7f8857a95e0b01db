"""The Pallas Triton backend: the blocked stage's and the exact kernels, forward and backward,
and the ``select_blocks`` run scores; their tiles (:class:`BlockSizes`); :func:`in_place` (which
head_dims the kernels update running arrays of in place)."""

from pallas_kernels.triton.block_attention import (blocked_attention_bwd_pallas,
                                                   blocked_attention_pallas,
                                                   flash_attention_bwd_pallas,
                                                   flash_attention_pallas, in_place)
from pallas_kernels.triton.block_sizes import BlockSizes, Tiles
from pallas_kernels.triton.run_scores import run_scores_pallas

__all__ = ["BlockSizes", "Tiles", "blocked_attention_pallas", "blocked_attention_bwd_pallas",
           "flash_attention_pallas", "flash_attention_bwd_pallas", "run_scores_pallas",
           "in_place"]
