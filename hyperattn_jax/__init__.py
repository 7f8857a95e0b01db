"""hyperattn_jax: HyperAttention (Han et al., ICLR 2024) in JAX, with Pallas GPU kernels."""

from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.dot_product import dot_product_attention
from hyperattn_jax.hyper import exact_attention, hyper_attention
from hyperattn_jax.merge import merge_attention
from hyperattn_jax.layers import HyperAttention, make_attention_fn
from hyperattn_jax import nnx  # the flax NNX layer: hyperattn_jax.nnx.HyperAttention

__all__ = [
    "HyperAttentionConfig", "hyper_attention", "exact_attention", "merge_attention",
    "dot_product_attention", "HyperAttention", "make_attention_fn", "nnx",
]
__version__ = "0.1.0"
