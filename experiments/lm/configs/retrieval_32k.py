"""One H200, a few minutes: a byte-level LM that must retrieve at 32k (passkey + associative
recall), exact attention by default. ``--config.attention=hyper`` trains it with HyperAttention.

Recipe (why each part): retrieval probes in 90% of the windows with the answer tokens weighted
64x (otherwise ~40 answer bytes in 32k text barely move the loss); 700 steps on 64 windows of
512 tokens first (64 probes per step: the copy circuit forms there, see HISTORY), then 400 on
8 windows of 4k, 200 on 2 windows of 16k and 1200 at 32k (every depth of the long context; 200
and 600 steps at 32k were too few for associative recall, see HISTORY); RoPE base 5e5 so that the
slowest rotary frequencies barely turn over 131k tokens and can match content at any distance.
"""

from experiments.lm.configs import base


def get_config():
  c = base.get_config()
  c.num_steps = 2500
  c.decay_steps = 2500  # retrieval_131k continues this schedule
  c.curriculum = "512x64:700,4096x8:1100,16384x2:1300"
  c.batch_size = 1
  c.seq_len = 32768
  c.learning_rate = 1e-3
  c.warmup_steps = 50
  c.answer_weight = 64.0
  c.rope_base = 5e5
  c.model.update(num_layers=6, d_model=512, num_heads=8, num_kv_heads=4, head_dim=64,
                 mlp_dim=1536, dtype="bfloat16")
  c.data.retrieval.update(rate=0.9, tasks="passkey,mqar")
  c.data.retrieval.mqar.update(num_pairs=16, num_queries=8)  # fits 512-token windows
  c.log_every = 25
  c.eval_every = 500
  c.eval_batches = 2
  c.eval_batch_size = 1
  c.checkpoint_every = 500
  return c
