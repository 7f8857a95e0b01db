"""Decoder-only language model with HyperAttention: data, model, training loop, evaluation."""
