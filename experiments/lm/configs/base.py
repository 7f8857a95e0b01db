"""Defaults shared by every training config (``python -m experiments.lm.main --config=...``)."""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_steps = 1000
  c.batch_size = 8                 # global; must be divisible by the number of devices
  c.seq_len = 1024
  c.curriculum = ""                # "SEQxBATCH:UNTIL,...": shorter windows first (train.py)
  c.learning_rate = 1e-3           # peak of warmup + cosine decay
  c.warmup_steps = 100
  c.min_learning_rate_ratio = 0.1  # final lr = ratio * peak
  c.decay_steps = config_dict.placeholder(int)  # end of the cosine (None: num_steps); then final lr
  c.weight_decay = 0.1
  c.grad_clip_norm = 1.0
  c.answer_weight = 1.0            # loss weight of retrieval answer tokens (text: 1)
  c.fsdp = False                   # shard params + optimizer state over the `data` mesh axis

  c.attention = "exact"            # "exact" | "hyper"
  c.hyper_last_layers = -1         # with attention="hyper": the last L layers (-1: all)
  c.implementation = config_dict.placeholder(str)  # None (auto) | "xla" | "pallas"
  c.hyper = ml_collections.ConfigDict(dict(
      block_size=256, sample_size=256, lsh_num_projs=7, min_seq_len=4096, sink_size=0,
      local_window=0, select_blocks=0, select_block_size=64))

  # scan_layers: the layers after the first as one nn.scan (compiled once; stacked params).
  c.model = ml_collections.ConfigDict(dict(
      num_layers=4, d_model=256, num_heads=4, num_kv_heads=2, head_dim=64, mlp_dim=768,
      dtype="bfloat16", scan_layers=False))
  c.rope_base = 10000.0

  c.data = ml_collections.ConfigDict()
  c.data.path = config_dict.placeholder(str)  # None: the Python standard library's sources
  c.data.valid_fraction = 0.05
  # Retrieval probes (experiments/lm/retrieval.py) in a fraction `rate` of the training windows;
  # per task name, the arguments of its factory.
  c.data.retrieval = ml_collections.ConfigDict(dict(
      rate=0.0, tasks="passkey,mqar", passkey=dict(digits=5),
      mqar=dict(num_pairs=32, num_queries=8)))

  c.log_every = 10
  c.eval_every = 200
  c.eval_batches = 4
  c.eval_batch_size = 4
  c.checkpoint_every = 200
  c.keep_checkpoints = 2
  return c
