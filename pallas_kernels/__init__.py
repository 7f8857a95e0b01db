"""Pallas GPU kernels of hyperattn_jax, one folder per Pallas backend (a leaf package: it
imports nothing from ``hyperattn_jax``).

``triton/``: the Pallas Triton kernels (``interpret=True``: Pallas' interpreter, off the GPU).
Every backend folder exports the same functions (``blocked_attention_pallas``,
``blocked_attention_bwd_pallas``, ``flash_attention_pallas``, ``flash_attention_bwd_pallas``,
``run_scores_pallas``, ``in_place``) and its tile settings (``BlockSizes``); the library picks
one in ``hyperattn_jax/backends.py``. Import a backend's folder itself (its Pallas backend may
be missing from a jax install).
"""
