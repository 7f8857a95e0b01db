"""Time to first token and decode tokens/s of the LM example: exact vs HyperAttention prefill.

For each prompt length, in one process: the model with exact attention in every layer (cuDNN on
a GPU for bf16) and the same parameters with HyperAttention in all layers but the first
(``attention="hyper", hyper_last_layers=num_layers-1``); decoding is exact over the KV cache in
both. Writes one JSON (``meta`` from ``provenance.py``, one row per (prompt length, attention)).

  python -m experiments.benchmarks.bench_generate --out=experiments/results/gen.json  # random model
  python -m experiments.benchmarks.bench_generate --workdir=/tmp/lm32k --out=gen.json  # checkpoint
  python -m experiments.benchmarks.bench_generate --prompt_lens=256,512 --max_new_tokens=4 \
      --num_layers=2 --d_model=64 --mlp_dim=128 --min_seq_len=128 --block_size=64 \
      --sample_size=64 --dtype=float32 --reps=1 --out=/tmp/gen.json              # CPU smoke

Prompts are random bytes (no EOS: every run decodes --max_new_tokens tokens, greedy). Timings
exclude compilation (reported apart): time to first token = prefill + first sample, the median
of --reps runs after one untimed warm-up run; decode tokens/s = the median over those runs of
(max_new_tokens - 1) / decode time.
"""

from __future__ import annotations

import dataclasses
import statistics

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import provenance
from experiments import timing
from experiments.benchmarks import common
from experiments.lm import data as data_lib
from experiments.lm import generate as generate_lib
from experiments.lm import model as model_lib

flags.DEFINE_string("out", None, "JSON path.", required=True)
flags.DEFINE_string("workdir", None, "A training run's workdir (config.json + checkpoints): its "
                    "model, weights and HyperAttention options, the latter overridden by the "
                    "HyperAttention flags given; "
                    "default: a randomly initialised model of the flags below.")
flags.DEFINE_list("prompt_lens", ["32768", "65536", "131072"], "Prompt lengths.")
flags.DEFINE_list("attentions", ["exact", "hyper"], "Which of the two models to run: exact "
                  "attention in every layer, HyperAttention in all layers but the first.")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens decoded per run.")
flags.DEFINE_integer("reps", 3, "Runs per (prompt length, attention).")
flags.DEFINE_integer("seed", 0, "Seed of the prompts, the random params and the draws.")
flags.DEFINE_string("profile_out", None, "Also trace one more prefill per attention at the "
                    "longest prompt: per-kernel GPU time (profile_kernels' JSON) written to "
                    "PROFILE_OUT_exact.json and PROFILE_OUT_hyper.json.")
flags.DEFINE_integer("profile_new_tokens", 1, "Tokens generated in the traced call: 1 = the "
                     "prefill alone; more adds that many - 1 decode steps (their kernels' "
                     "launches count the steps). At most --max_new_tokens.")
# The random model (default: experiments/lm/configs/long_32k.py's); unused with --workdir.
flags.DEFINE_integer("num_layers", 4, "Layers.")
flags.DEFINE_integer("d_model", 512, "Model width.")
flags.DEFINE_integer("num_heads", 8, "Query heads.")
flags.DEFINE_integer("num_kv_heads", 4, "Key/value heads.")
flags.DEFINE_integer("head_dim", 64, "Head width.")
flags.DEFINE_integer("mlp_dim", 1536, "SwiGLU width.")
flags.DEFINE_bool("scan_layers", False, "The layers after the first as one nn.scan (compiled "
                  "once; TransformerConfig.scan_layers); an unrolled --workdir checkpoint's "
                  "params are stacked for it.")
common.define_dtype_flag("Compute dtype.")
common.define_hyper_flags()
flags.adopt_module_key_flags(common)  # --help lists them with this script's flags
FLAGS = flags.FLAGS


def _random_model() -> tuple[dict, model_lib.TransformerConfig]:
  cfg = model_lib.TransformerConfig(
      vocab_size=data_lib.VOCAB_SIZE, num_layers=FLAGS.num_layers, d_model=FLAGS.d_model,
      num_heads=FLAGS.num_heads, num_kv_heads=FLAGS.num_kv_heads, head_dim=FLAGS.head_dim,
      mlp_dim=FLAGS.mlp_dim, dtype=jnp.dtype(FLAGS.dtype), hyper=common.hyper_config(),
      scan_layers=FLAGS.scan_layers)
  init = jax.jit(model_lib.Transformer(cfg).init)
  return init(jax.random.key(FLAGS.seed), jnp.zeros((1, 8), jnp.int32))["params"], cfg


def _checkpoint(workdir: str) -> tuple[dict, model_lib.TransformerConfig]:
  # Imported here: the training code needs ml_collections and orbax, the random model does not.
  from experiments.lm import train as train_lib  # pylint: disable=import-outside-toplevel
  config, params, _ = train_lib.restore_run(workdir)
  cfg = train_lib.model_config(config)
  if FLAGS.scan_layers:
    params, cfg = model_lib.with_scanned_layers(params, cfg)
  return params, dataclasses.replace(cfg, hyper=common.hyper_config(cfg.hyper))


def _variants(cfg: model_lib.TransformerConfig) -> dict[str, model_lib.TransformerConfig]:
  """Of ``--attentions``: exact attention in every layer; HyperAttention in all layers but the
  first."""
  variants = {"exact": dataclasses.replace(cfg, attention="exact"),
              "hyper": dataclasses.replace(cfg, attention="hyper",
                                           hyper_last_layers=cfg.num_layers - 1)}
  return {name: variants[name] for name in FLAGS.attentions}


def _prompt(seed: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, n]).integers(0, 256, (1, n), dtype=np.int32)


def profile(params, cfg: model_lib.TransformerConfig, n: int, max_new_tokens: int, seed: int,
            out: str, new_tokens: int) -> None:
  """Per-kernel GPU time of one generation of ``new_tokens`` after an ``n``-token prompt per
  attention (1: the prefill alone; after the benchmark's runs, with their cache length:
  compiled and warm), written to ``{out}_{attention}.json``."""
  for name, variant in _variants(cfg).items():
    run = lambda variant=variant: generate_lib.generate(
        params, variant, _prompt(seed, n), new_tokens, rng=jax.random.key(seed),
        max_len=n + max_new_tokens, eos_id=None).tokens
    table = timing.report_kernels(timing.kernel_table(run, reps=1),
                                  f"prefill n={n} + {new_tokens - 1} decode steps, {name}",
                                  top=40)
    meta = provenance.run_meta(prompt_len=n, attention=name, new_tokens=new_tokens,
                               modes=list(model_lib.attention_modes(variant)))
    provenance.write_results(f"{out}_{name}.json", meta, **table)


def bench(params, cfg: model_lib.TransformerConfig, prompt_lens, max_new_tokens: int,
          reps: int, seed: int) -> list[dict]:
  """One row per (prompt length, attention): medians and every run's timings."""
  rows = []
  for n in prompt_lens:
    prompt = _prompt(seed, n)
    for name, variant in _variants(cfg).items():
      # Run 0 compiles and warms up (first executions of the compiled programs, allocations):
      # only its compile times are kept.
      warmup, *runs = [generate_lib.generate(params, variant, prompt, max_new_tokens,
                                             rng=jax.random.key(seed + rep), eos_id=None)
                       for rep in range(reps + 1)]
      ttft = [r.time_to_first_token_s * 1e3 for r in runs]
      tok_s = [r.decode_tokens_per_s for r in runs]
      rows.append({"prompt_len": n, "attention": name,
                   "modes": list(model_lib.attention_modes(variant)),
                   "time_to_first_token_ms": statistics.median(ttft),
                   "decode_tokens_per_s": statistics.median(tok_s),
                   "time_to_first_token_ms_runs": ttft, "decode_tokens_per_s_runs": tok_s,
                   "prefill_compile_s": warmup.prefill_compile_s,
                   "decode_compile_s": warmup.decode_compile_s})
      print(f"n={n:>7} {name:>5}: first token {rows[-1]['time_to_first_token_ms']:9.1f} ms, "
            f"decode {rows[-1]['decode_tokens_per_s']:8.1f} tok/s (compiled in "
            f"{warmup.prefill_compile_s:.1f} + {warmup.decode_compile_s:.1f} s)", flush=True)
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  prompt_lens = [int(n) for n in FLAGS.prompt_lens]
  if not FLAGS.attentions or set(FLAGS.attentions) - {"exact", "hyper"}:
    raise app.UsageError(f"--attentions: expected a list of exact/hyper, got {FLAGS.attentions}")
  if FLAGS.max_new_tokens < 2 or FLAGS.reps < 1 or min(prompt_lens) < 1:
    raise app.UsageError("--max_new_tokens must be >= 2 (decode steps to time), --reps >= 1, "
                         "--prompt_lens positive")
  if not 1 <= FLAGS.profile_new_tokens <= FLAGS.max_new_tokens:
    raise app.UsageError(f"--profile_new_tokens must be in [1, --max_new_tokens="
                         f"{FLAGS.max_new_tokens}], got {FLAGS.profile_new_tokens}")
  params, cfg = _checkpoint(FLAGS.workdir) if FLAGS.workdir else _random_model()
  rows = bench(params, cfg, prompt_lens, FLAGS.max_new_tokens, FLAGS.reps, FLAGS.seed)
  model = {f.name: str(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
  meta = provenance.run_meta(model=model, max_new_tokens=FLAGS.max_new_tokens, reps=FLAGS.reps,
                             workdir=FLAGS.workdir)
  provenance.write_results(FLAGS.out, meta, rows=rows)
  print(f"wrote {FLAGS.out}")
  if FLAGS.profile_out:
    profile(params, cfg, max(prompt_lens), FLAGS.max_new_tokens, FLAGS.seed, FLAGS.profile_out,
            FLAGS.profile_new_tokens)


if __name__ == "__main__":
  app.run(main)
