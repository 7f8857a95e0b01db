"""Pallas GPU kernels of hyperattn_jax (Triton backend; interpret mode off the GPU)."""

from pallas_kernels.block_attention import (blocked_attention_bwd_pallas, blocked_attention_pallas,
                                            flash_attention_bwd_pallas, flash_attention_pallas)
from pallas_kernels.run_scores import run_scores_pallas

__all__ = ["blocked_attention_pallas", "blocked_attention_bwd_pallas", "flash_attention_pallas",
           "flash_attention_bwd_pallas", "run_scores_pallas"]
