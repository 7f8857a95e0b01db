"""Needle-in-a-haystack scoring of a checkpoint in several attention modes.

The logic behind ``experiments/lm/eval_retrieval.py`` (see there for the command line). For each
mode, context length and needle-depth bin, the probes of every task (``retrieval.py``) are
written into validation text and scored teacher-forced: per-token accuracy over the answer
tokens and exact match per query (every answer token the argmax: what greedy decoding would
answer). The probes are the same for every mode. Beside the accuracies: the prefill time of one
sequence per (mode, length) and the validation perplexity (plain text).

Modes: ``exact``; ``hyper:L`` (HyperAttention in the last L layers, ``-1`` all but the first,
``0`` all); ``hyper:L:NAME`` uses the named variant, a dict of HyperAttentionConfig overrides
applied on top of the checkpoint's settings.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from experiments import timing
from experiments.lm import data as data_lib
from experiments.lm import model as model_lib
from experiments.lm import retrieval
from experiments.lm import retrieval_diagnostics
from experiments.lm import train as train_lib
from hyperattn_jax import HyperAttentionConfig

__all__ = ["parse_mode", "probes", "score", "run", "diagnose", "plot"]


def parse_mode(mode: str, num_layers: int, variants: dict) -> tuple[int, dict]:
  """``mode`` -> (number of HyperAttention layers, HyperAttentionConfig overrides)."""
  parts = mode.split(":")
  if parts == ["exact"]:
    return 0, {}
  if parts[0] != "hyper" or len(parts) not in (2, 3):
    raise ValueError(f"--modes: {mode!r} is not 'exact', 'hyper:L' or 'hyper:L:NAME'")
  layers = int(parts[1])
  layers = {0: num_layers, -1: num_layers - 1}.get(layers, layers)
  if not 0 < layers <= num_layers:
    raise ValueError(f"--modes: {mode!r}: L must be in [-1, {num_layers}]")
  if len(parts) == 3 and parts[2] not in variants:
    raise ValueError(f"--modes: {mode!r}: variant {parts[2]!r} is not in --variants")
  return layers, variants[parts[2]] if len(parts) == 3 else {}


def _model_config(config, layers: int, overrides: dict) -> model_lib.TransformerConfig:
  """The checkpoint's model with HyperAttention (``config.hyper`` + ``overrides``) in its last
  ``layers`` layers (0: exact everywhere)."""
  return train_lib.model_config(
      config, attention="hyper" if layers else "exact", hyper_last_layers=layers,
      hyper=HyperAttentionConfig(**{**config.hyper, **overrides}))


def probes(corpus_tokens: np.ndarray, tasks, length: int, bins: int, samples: int, seed: int):
  """The probes of one length: ``(task_name, bin, Assembled)``; independent of the mode."""
  out = []
  for t, task in enumerate(tasks):
    for b in range(bins):
      for s in range(samples):
        rng = np.random.default_rng([seed, length, t, b, s])
        start = int(rng.integers(0, len(corpus_tokens) - length))
        probe = task.sample(rng, (b / bins, (b + 1) / bins))
        out.append((task.name, b, retrieval.assemble(corpus_tokens[start:start + length],
                                                     probe, length)))
  return out


def score(predictions: np.ndarray, item: retrieval.Assembled):
  """Per query of ``item``: (exact match, correct answer tokens, answer tokens, depth);
  ``predictions[i]`` is the argmax after token ``i``."""
  rows = []
  for start, stop, depth in item.answers:
    hits = predictions[start - 1:stop - 1] == item.tokens[start:stop]
    rows.append((bool(hits.all()), int(hits.sum()), stop - start, depth))
  return rows


def _argmax_fn(model):
  return jax.jit(lambda p, t: jnp.argmax(model.apply({"params": p}, t), -1).astype(jnp.int32))


def evaluate_mode(params, model, items, bins: int, batch: int, timing_reps: int) -> dict:
  """Accuracy cells ``{task: {bin: [em, correct, tokens, queries]}}`` and the prefill time."""
  fn = _argmax_fn(model)
  cells: dict = {}
  for i in range(0, len(items), batch):
    chunk = items[i:i + batch]
    tokens = np.stack([a.tokens for _, _, a in chunk + [chunk[-1]] * (batch - len(chunk))])
    preds = np.asarray(fn(params, tokens))
    for (name, _, item), pred in zip(chunk, preds):
      for em, correct, count, depth in score(pred, item):
        cell = cells.setdefault(name, {}).setdefault(min(int(depth * bins), bins - 1),
                                                     [0, 0, 0, 0])
        cell[0] += em
        cell[1] += correct
        cell[2] += count
        cell[3] += 1
  ms = timing.synchronised_ms(fn, params, items[0][2].tokens[None], reps=timing_reps)[0]
  return {"cells": cells, "prefill_ms": ms}


def run(workdir: str, lengths, modes, variants: dict, tasks=None, depth_bins: int = 10,
        samples: int = 4, batch: int = 1, timing_reps: int = 3, ppl_seq_len=None, seed: int = 0):
  """Rows ``{mode, task, seq_len, depth_bin, exact_match, token_accuracy, queries}``, the
  prefill/perplexity row of every (mode, length), and the checkpoint step."""
  config, params, step = train_lib.restore_run(workdir)
  corpus = data_lib.load_corpus(config.data.path, config.data.valid_fraction)
  task_list = data_lib.retrieval_mix(config.data.retrieval, tasks).tasks
  num_layers = config.model.num_layers
  parsed = [(m, *parse_mode(m, num_layers, variants)) for m in modes]
  ppl_len = config.seq_len if ppl_seq_len is None else ppl_seq_len
  rows, timing = [], []
  for length in lengths:
    items = probes(corpus.valid, task_list, length, depth_bins, samples, seed)
    for mode, layers, overrides in parsed:
      model = model_lib.Transformer(_model_config(config, layers, overrides))
      t0 = time.perf_counter()
      res = evaluate_mode(params, model, items, depth_bins, batch, timing_reps)
      for name, by_bin in res["cells"].items():
        for b, (em, correct, count, queries) in sorted(by_bin.items()):
          rows.append({"mode": mode, "task": name, "seq_len": length, "depth_bin": b,
                       "exact_match": em / queries, "token_accuracy": correct / count,
                       "queries": queries})
      summary = {name: float(np.mean([r["exact_match"] for r in rows if r["mode"] == mode and
                                      r["task"] == name and r["seq_len"] == length]))
                 for name in res["cells"]}
      timing.append({"mode": mode, "seq_len": length, "prefill_ms": res["prefill_ms"],
                     "eval_s": time.perf_counter() - t0, "exact_match": summary})
      print(f"{mode:>18} n={length:>6}  " + "  ".join(f"{k}={v:.3f}" for k, v in summary.items())
            + f"  prefill={res['prefill_ms']:.1f} ms", flush=True)
  ppl = []
  if ppl_len:
    eval_config = ml_collections.ConfigDict(config.to_dict())
    eval_config.seq_len = ppl_len
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
    for mode, layers, overrides in parsed:
      model = model_lib.Transformer(_model_config(config, layers, overrides))
      ev = train_lib.evaluate(params, model, corpus.valid, eval_config, sharding,
                              jax.random.key(config.seed + 2))
      ppl.append({"mode": mode, "seq_len": ppl_len, **ev})
      print(f"{mode:>18} perplexity@{ppl_len} = {ev['perplexity']:.4f}", flush=True)
  return {"checkpoint_step": step, "rows": rows, "timing": timing, "perplexity": ppl}


def diagnose(workdir: str, length: int, probes: int = 4, draws: int = 4, seed: int = 0):
  """``retrieval_diagnostics.needle_diagnostics`` of the checkpoint (float32, exact) with its
  HyperAttention settings."""
  config, params, _ = train_lib.restore_run(workdir)
  corpus = data_lib.load_corpus(config.data.path, config.data.valid_fraction)
  cfg = train_lib.model_config(config, attention="exact", dtype=jnp.float32)
  return retrieval_diagnostics.needle_diagnostics(params, cfg, corpus.valid, length,
                                                  HyperAttentionConfig(**config.hyper),
                                                  probes, draws, seed)


def plot(result: dict, path: str) -> None:
  """Heatmaps of exact match: one panel per (mode, task), depth bins x lengths."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  rows = result["rows"]
  modes = list(dict.fromkeys(r["mode"] for r in rows))
  tasks = list(dict.fromkeys(r["task"] for r in rows))
  lengths = sorted({r["seq_len"] for r in rows})
  bins = max(r["depth_bin"] for r in rows) + 1
  fig, axes = plt.subplots(len(modes), len(tasks), squeeze=False,
                           figsize=(1.1 * len(lengths) * len(tasks) + 1.5, 2.4 * len(modes)))
  for i, mode in enumerate(modes):
    for j, task in enumerate(tasks):
      grid = np.full((bins, len(lengths)), np.nan)
      for r in rows:
        if r["mode"] == mode and r["task"] == task:
          grid[r["depth_bin"], lengths.index(r["seq_len"])] = r["exact_match"]
      ax = axes[i, j]
      ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
      ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" for n in lengths], fontsize=7)
      ax.set_yticks(range(bins), [f"{b / bins:.1f}" for b in range(bins)], fontsize=6)
      ax.set_title(f"{task} | {mode}", fontsize=8)
      if j == 0:
        ax.set_ylabel("needle depth")
  fig.suptitle(f"exact match (checkpoint step {result['checkpoint_step']})", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
