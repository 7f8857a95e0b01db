"""One H100: a small model at 32k context (paper settings of HyperAttention)."""

from experiments.lm.configs import base


def get_config():
  c = base.get_config()
  c.num_steps = 300
  c.batch_size = 1
  c.seq_len = 32768
  c.learning_rate = 1e-3
  c.warmup_steps = 30
  c.model.update(num_layers=4, d_model=512, num_heads=8, num_kv_heads=4, head_dim=64,
                 mlp_dim=1536, dtype="bfloat16")
  c.log_every = 10
  c.eval_every = 100
  c.eval_batches = 2
  c.eval_batch_size = 1
  c.checkpoint_every = 100
  return c
