"""CPU-sized run (2 cores, < 2 minutes): 2 layers, seq 512, HyperAttention exercised (seq >
min_seq_len). ``python -m experiments.lm.main --config=experiments/lm/configs/tiny.py
--workdir=/tmp/lm``"""

from experiments.lm.configs import base


def get_config():
  c = base.get_config()
  c.num_steps = 150
  c.batch_size = 8
  c.seq_len = 512
  c.learning_rate = 3e-3
  c.warmup_steps = 15
  c.attention = "hyper"
  c.hyper.update(block_size=64, sample_size=64, lsh_num_projs=4, min_seq_len=128)
  c.model.update(num_layers=2, d_model=128, num_heads=4, num_kv_heads=2, head_dim=32,
                 mlp_dim=384, dtype="float32")
  c.log_every = 10
  c.eval_every = 50
  c.eval_batches = 2
  c.checkpoint_every = 50
  return c
