"""Compile time of the LM example's prefill on this CPU machine (XLA backend, nothing run):
the random model of `bench_generate` (d512, GQA 8/4, head_dim 64, bf16), HyperAttention in all
layers but the first, unrolled or with `scan_layers`.

  run: PYTHONPATH=. python experiments/results/2026-12-04-h200-ttft/cpu_compile_time.py \
         LAYERS PROMPT_LEN SELECT_BLOCKS SCAN(0|1)
"""
import sys
import time

import jax
import jax.numpy as jnp

from experiments.lm import generate as generate_lib
from experiments.lm import model as model_lib
from hyperattn_jax import HyperAttentionConfig

layers, n, select, scan = (int(a) for a in sys.argv[1:5])
cfg = model_lib.TransformerConfig(
    vocab_size=257, num_layers=layers, d_model=512, num_heads=8, num_kv_heads=4, head_dim=64,
    mlp_dim=1536, dtype=jnp.bfloat16, attention="hyper", hyper_last_layers=layers - 1,
    hyper=HyperAttentionConfig(select_blocks=select), implementation="xla",
    scan_layers=bool(scan))
model = model_lib.Transformer(cfg)
params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
cache = jax.eval_shape(lambda: generate_lib.init_cache(model, 1, n + 8))
key = jax.random.key(0)
start = time.time()
lowered = generate_lib._prefill.trace(  # pylint: disable=protected-access  (what generate jits)
    model, 1.0, 0, params["params"], cache, jax.ShapeDtypeStruct((1, n), jnp.int32), key,
    key).lower()
lowered_s = time.time() - start
compiled = lowered.compile()
print(f"layers={layers} n={n} select_blocks={select} scan_layers={bool(scan)}: lower "
      f"{lowered_s:.1f} s, compile {time.time() - start - lowered_s:.1f} s, optimised HLO "
      f"{compiled.as_text().count(chr(10))} lines")
