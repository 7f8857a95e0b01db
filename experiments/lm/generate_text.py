"""Generate text with a trained LM checkpoint: prefill the prompt (each layer's attention mode,
HyperAttention where configured), then decode with a KV cache.

  python -m experiments.lm.generate_text --workdir=/tmp/lm --prompt_file=prompt.txt \
      --max_new_tokens=200
  python -m experiments.lm.generate_text --workdir=/tmp/lm --prompt_file=long.py \
      --temperature=0.8 --top_k=40 --seed=1 --hyper_last_layers=1

Tokens are bytes (as in training); generation stops at EOS (the end of a document) or after
--max_new_tokens. The text goes to stdout, the timings (time to first token, decode tokens/s) to
stderr; --out also writes them and the tokens as JSON.
"""

import sys

from absl import app
from absl import flags
import jax
import numpy as np

from experiments import provenance
from experiments.lm import data as data_lib
from experiments.lm import generate as generate_lib
from experiments.lm import model as model_lib
from experiments.lm import train as train_lib

flags.DEFINE_string("workdir", None, "Workdir of a training run (config.json + checkpoints).",
                    required=True)
flags.DEFINE_string("prompt_file", None, "The prompt (read as bytes).", required=True)
flags.DEFINE_integer("max_new_tokens", 256, "Tokens to generate at most.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0: greedy.")
flags.DEFINE_integer("top_k", 0, "Sample among the top_k most likely tokens (0: all).")
flags.DEFINE_integer("seed", 0, "Seed of the samples and of the prefill's HyperAttention draws.")
flags.DEFINE_integer("seq_len", None, "Cache length (prompt + new tokens; default: exactly that). "
                     "A longer prompt keeps its last seq_len - max_new_tokens bytes.")
flags.DEFINE_integer("hyper_last_layers", None, "Prefill the last L layers with HyperAttention "
                     "(default: the training config's attention).")
flags.DEFINE_bool("scan_layers", False, "Run the layers after the first as one nn.scan (compiled "
                  "once; an unrolled checkpoint's params are stacked for it).")
flags.DEFINE_string("out", None, "Optional JSON path: tokens, text, timings.")
FLAGS = flags.FLAGS


def read_prompt(path: str, max_len: int | None) -> np.ndarray:
  """The prompt's bytes as tokens ``[1, prompt_len]`` int32 (the last ``max_len`` if given)."""
  with open(path, "rb") as f:
    tokens = np.frombuffer(f.read(), np.uint8).astype(np.int32)
  if not len(tokens):
    raise ValueError(f"--prompt_file={path!r} is empty")
  return tokens[-max_len:][None] if max_len else tokens[None]


def run(workdir, prompt_file, max_new_tokens, temperature=0.0, top_k=0, seed=0, seq_len=None,
        hyper_last_layers=None, progress=True, scan_layers=False):
  """(text, :class:`generate_lib.Generation`, prompt length) of the checkpoint in ``workdir``."""
  if seq_len is not None and seq_len <= max_new_tokens:
    raise ValueError(f"--seq_len ({seq_len}) must exceed --max_new_tokens ({max_new_tokens})")
  config, params, _ = train_lib.restore_run(workdir)
  overrides = ({} if hyper_last_layers is None else
               {"attention": "hyper", "hyper_last_layers": hyper_last_layers})
  cfg = train_lib.model_config(config, **overrides)
  if scan_layers:
    params, cfg = model_lib.with_scanned_layers(params, cfg)
  prompt = read_prompt(prompt_file, None if seq_len is None else seq_len - max_new_tokens)
  result = generate_lib.generate(params, cfg, prompt, max_new_tokens, rng=jax.random.key(seed),
                                 temperature=temperature, top_k=top_k, max_len=seq_len,
                                 progress=progress)
  new = result.tokens[0]
  text = bytes(int(t) for t in new if t != data_lib.EOS).decode("utf-8", errors="replace")
  return text, result, prompt.shape[1]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  text, result, prompt_len = run(FLAGS.workdir, FLAGS.prompt_file, FLAGS.max_new_tokens,
                                 FLAGS.temperature, FLAGS.top_k, FLAGS.seed, FLAGS.seq_len,
                                 FLAGS.hyper_last_layers, scan_layers=FLAGS.scan_layers)
  print(text, flush=True)
  timings = {"prompt_len": prompt_len, "new_tokens": int(result.tokens.shape[1]),
             "time_to_first_token_s": result.time_to_first_token_s,
             "decode_tokens_per_s": result.decode_tokens_per_s,
             "prefill_compile_s": result.prefill_compile_s,
             "decode_compile_s": result.decode_compile_s}
  print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                 for k, v in timings.items()), file=sys.stderr)
  if FLAGS.out:
    provenance.write_results(FLAGS.out, provenance.run_meta(), text=text,
                             tokens=result.tokens[0].tolist(), **timings)


if __name__ == "__main__":
  app.run(main)
