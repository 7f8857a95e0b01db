"""Training loop: data-parallel AdamW on a `data` mesh, orbax checkpoints, exact resume.

``train_and_evaluate(config, workdir)`` is what ``experiments/lm/main.py`` runs. Everything a
step depends on is a pure function of ``(config.seed, step)`` -- the batch (see ``data.py``) and
the HyperAttention rng -- and the checkpoint holds params, optimizer state and the step, so a
run killed at any point and restarted with the same workdir reproduces the losses of an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from experiments.lm import data as data_lib
from experiments.lm import model as model_lib
from experiments.lm.metrics import MetricWriter
from hyperattn_jax import HyperAttentionConfig

__all__ = ["Phase", "curriculum", "validate_config", "model_config", "create_state",
           "train_and_evaluate", "evaluate", "restore_params", "restore_run"]

_POSITIVE = ("num_steps", "batch_size", "seq_len", "warmup_steps", "log_every", "eval_every",
             "eval_batches", "eval_batch_size", "checkpoint_every", "keep_checkpoints")


@dataclasses.dataclass(frozen=True)
class Phase:
  """Steps ``[start, stop)`` train on ``batch_size`` windows of ``seq_len`` tokens."""
  start: int
  stop: int
  seq_len: int
  batch_size: int


def curriculum(config: ml_collections.ConfigDict) -> tuple[Phase, ...]:
  """The length curriculum: ``config.curriculum`` is ``""`` or comma-separated
  ``SEQxBATCH:UNTIL`` phases (e.g. ``"4096x8:600"``: steps 0..599 on 8 windows of 4096 tokens);
  the steps after the last phase use ``config.seq_len`` and ``config.batch_size``."""
  phases, start = [], 0
  for item in filter(None, (p.strip() for p in config.curriculum.split(","))):
    try:
      shape, until = item.split(":")
      seq_len, batch_size = (int(x) for x in shape.split("x"))
      until = int(until)
    except ValueError:
      raise ValueError(f"config.curriculum: {item!r} is not SEQxBATCH:UNTIL") from None
    if not (start < until < config.num_steps and seq_len > 0 and batch_size > 0):
      raise ValueError(f"config.curriculum: phase {item!r} must end after step {start} and "
                       f"before num_steps={config.num_steps}, with positive sizes")
    phases.append(Phase(start, until, seq_len, batch_size))
    start = until
  phases.append(Phase(start, config.num_steps, config.seq_len, config.batch_size))
  return tuple(phases)


def _phase(phases: tuple[Phase, ...], step: int) -> Phase:
  return next(p for p in phases if p.start <= step < p.stop)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first invalid ``config.<field>``."""
  for name in _POSITIVE:
    value = config[name]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f"config.{name} must be a positive int, got {value!r}")
  if config.decay_steps is not None and not (isinstance(config.decay_steps, int) and
                                             0 < config.decay_steps <= config.num_steps):
    raise ValueError(f"config.decay_steps must be None or an int in (0, num_steps], got "
                     f"{config.decay_steps!r}")
  if not config.answer_weight > 0:
    raise ValueError(f"config.answer_weight must be > 0, got {config.answer_weight!r}")
  for phase in curriculum(config):
    if phase.batch_size % jax.device_count():
      raise ValueError(f"config.curriculum: batch size {phase.batch_size} must be divisible by "
                       f"the number of devices ({jax.device_count()})")
  data_lib.retrieval_mix(config.data.retrieval)
  for name in ("learning_rate", "grad_clip_norm"):
    if not config[name] > 0:
      raise ValueError(f"config.{name} must be > 0, got {config[name]!r}")
  if not 0 <= config.min_learning_rate_ratio <= 1:
    raise ValueError(f"config.min_learning_rate_ratio must be in [0, 1], got "
                     f"{config.min_learning_rate_ratio!r}")
  if config.attention not in ("exact", "hyper"):
    raise ValueError(f"config.attention must be 'exact' or 'hyper', got {config.attention!r}")
  if config.implementation not in (None, "xla", "pallas"):
    raise ValueError(f"config.implementation must be None, 'xla' or 'pallas', got "
                     f"{config.implementation!r}")
  if config.model.dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"config.model.dtype must be float32, bfloat16 or float16, got "
                     f"{config.model.dtype!r}")
  for name in ("batch_size", "eval_batch_size"):
    if config[name] % jax.device_count():
      raise ValueError(f"config.{name} ({config[name]}) must be divisible by the number of "
                       f"devices ({jax.device_count()})")
  try:
    HyperAttentionConfig(**config.hyper)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.hyper: {e}") from None


def model_config(config: ml_collections.ConfigDict, **overrides) -> model_lib.TransformerConfig:
  """The frozen model config of a training config (``overrides``: e.g. hyper_last_layers)."""
  fields = dict(config.model)
  fields["dtype"] = jnp.dtype(fields["dtype"])
  fields.update(attention=config.attention, hyper_last_layers=config.hyper_last_layers,
                rope_base=config.rope_base,
                hyper=HyperAttentionConfig(**config.hyper),
                implementation=config.implementation)
  fields.update(overrides)
  try:
    return model_lib.TransformerConfig(vocab_size=data_lib.VOCAB_SIZE, **fields)
  except TypeError as e:
    raise ValueError(f"config.model: {e}") from None


def _optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
      decay_steps=max(config.decay_steps or config.num_steps, config.warmup_steps + 1),
      end_value=config.learning_rate * config.min_learning_rate_ratio)
  tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm),
                   optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=config.weight_decay))
  return tx, schedule


def _param_sharding(mesh: Mesh, fsdp: bool):
  """Replicated, or (FSDP) each array split on its first axis divisible by the mesh size (past
  the layer axis of ``scan_layers``' stacked ``layers``, which the scan steps through)."""
  size = mesh.devices.size

  def spec(path, x):
    stacked = any(getattr(key, "key", None) == "layers" for key in path)
    if fsdp:
      for axis, dim in enumerate(x.shape):
        if dim % size == 0 and dim >= size and not (stacked and axis == 0):
          return NamedSharding(mesh, P(*([None] * axis + ["data"])))
    return NamedSharding(mesh, P())
  return spec


def create_state(config, cfg: model_lib.TransformerConfig, mesh: Mesh):
  """Initial ``{"params", "opt_state", "step"}`` placed on ``mesh``, and its shardings."""
  model = model_lib.Transformer(cfg)
  tx, _ = _optimizer(config)

  def init():
    dummy = jnp.zeros((1, min(config.seq_len, 8)), jnp.int32)
    params = model.init(jax.random.key(config.seed), dummy)["params"]
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

  shapes = jax.eval_shape(init)
  shardings = jax.tree_util.tree_map_with_path(_param_sharding(mesh, config.fsdp), shapes)
  return jax.jit(init, out_shardings=shardings)(), shardings


def _hyper_rng(config, step):
  return jax.random.fold_in(jax.random.key(config.seed + 1), step)


def _make_train_step(config, model, shardings, batch_sharding):
  tx, schedule = _optimizer(config)

  def step_fn(state, batch):
    rng = _hyper_rng(config, state["step"])
    (loss, aux), grads = jax.value_and_grad(model_lib.loss_fn, has_aux=True)(
        state["params"], model, batch["tokens"], rng, batch["answer_mask"],
        config.answer_weight)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
           "step": state["step"] + 1}
    return new, {"loss": loss, **aux, "grad_norm": optax.tree.norm(grads),
                 "learning_rate": schedule(state["step"])}

  return jax.jit(step_fn, in_shardings=(shardings, batch_sharding),
                 out_shardings=(shardings, None), donate_argnums=0)


_eval_loss = jax.jit(lambda *a: model_lib.loss_fn(*a)[0], static_argnums=1)


def evaluate(params, model, tokens, config, batch_sharding, rng) -> dict[str, float]:
  """Validation loss (nats/byte), bits per byte and perplexity over the first eval batches
  (plain text, no retrieval probes)."""
  losses = [float(_eval_loss(params, model, jax.device_put(b, batch_sharding), rng))
            for b in data_lib.eval_batches(tokens, config.eval_batch_size, config.seq_len,
                                           config.eval_batches)]
  mean = float(np.mean(losses))
  return {"loss": mean, "bits_per_byte": mean / math.log(2), "perplexity": math.exp(mean)}


def _checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True))


def restore_params(workdir: str, config, cfg, mesh: Mesh):
  """Params of the latest checkpoint in ``workdir`` (and its step)."""
  state, shardings = create_state(config, cfg, mesh)
  manager = _checkpoint_manager(workdir, config)
  step = manager.latest_step()
  if step is None:
    raise ValueError(f"no checkpoint in {workdir}/checkpoints")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  manager.close()
  return state["params"], step


def restore_run(workdir: str) -> tuple[ml_collections.ConfigDict, dict, int]:
  """(config, params, step) of the training run in ``workdir``: its ``config.json`` and the
  params of its latest checkpoint (on a ``data`` mesh of all local devices)."""
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  mesh = Mesh(np.array(jax.devices()), ("data",))
  params, step = restore_params(workdir, config, model_config(config), mesh)
  return config, params, step


class _Stop:
  """Set by SIGTERM: the loop ends after the current step and checkpoints."""

  def __init__(self):
    self.requested = False

  def __call__(self, signum, frame):
    del signum, frame
    self.requested = True


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after: int | None = None) -> dict[str, float]:
  """Trains until ``config.num_steps`` (resuming from ``workdir``) and returns final metrics.

  ``stop_after``: return right after that step *without* a final checkpoint, as a killed run
  would (used to test resumption).
  """
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json(indent=1))
  corpus = data_lib.load_corpus(config.data.path, config.data.valid_fraction)
  mix = data_lib.retrieval_mix(config.data.retrieval)
  phases = curriculum(config)
  cfg = model_config(config)
  model = model_lib.Transformer(cfg)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  batch_sharding = NamedSharding(mesh, P("data"))
  state, shardings = create_state(config, cfg, mesh)
  manager = _checkpoint_manager(workdir, config)
  if manager.latest_step() is not None:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(abstract))
  start = int(state["step"])
  train_step = _make_train_step(config, model, shardings, batch_sharding)
  writer = MetricWriter(workdir, start_step=start)
  stop = _Stop()
  previous = signal.signal(signal.SIGTERM, stop)
  metrics: dict[str, float] = {}
  step = start
  try:
    bar = tqdm(range(start, config.num_steps), initial=start, total=config.num_steps,
               desc="train", unit="step", dynamic_ncols=True)
    t_last, tokens_since = time.perf_counter(), 0
    hits = jnp.zeros((2,), jnp.int32)  # answer-token argmax hits and count since the last log
    for step in bar:
      phase = _phase(phases, step)
      batch = data_lib.train_batch(corpus.train, step, phase.batch_size, phase.seq_len,
                                   config.seed, mix)
      state, out = train_step(state, jax.device_put(batch, batch_sharding))
      tokens_since += phase.batch_size * phase.seq_len
      hits = hits + jnp.stack([out.pop("answer_correct"), out.pop("answer_tokens")])
      done = step + 1
      if done % config.log_every == 0 or done == config.num_steps:
        out = jax.device_get(out)
        now = time.perf_counter()
        out["tokens_per_s"] = tokens_since / (now - t_last)
        out["seq_len"] = phase.seq_len
        correct, count = jax.device_get(hits)
        if count:
          out["answer_accuracy"] = correct / count
        t_last, tokens_since, hits = now, 0, jnp.zeros((2,), jnp.int32)
        writer.write(done, "train", out)
        bar.set_postfix(loss=f"{out['loss']:.3f}", tok_s=f"{out['tokens_per_s']:.0f}",
                        **({"recall": f"{out['answer_accuracy']:.2f}"} if count else {}))
        metrics.update({f"train_{k}": float(v) for k, v in out.items()})
      if done % config.eval_every == 0 or done == config.num_steps:
        ev = evaluate(state["params"], model, corpus.valid, config, batch_sharding,
                      jax.random.key(config.seed + 2))
        writer.write(done, "valid", ev)
        metrics.update({f"valid_{k}": v for k, v in ev.items()})
        t_last = time.perf_counter()  # keep eval time out of tokens/s
      if stop_after is not None and done >= stop_after:
        return metrics
      if done % config.checkpoint_every == 0:
        manager.save(done, args=ocp.args.StandardSave(state))
      if stop.requested:
        break
    step = int(state["step"])
  finally:
    signal.signal(signal.SIGTERM, previous)
    if stop_after is None and manager.latest_step() != int(state["step"]):
      manager.save(int(state["step"]), args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()
    manager.close()
    writer.close()
  with open(os.path.join(workdir, "final_metrics.json"), "w", encoding="utf-8") as f:
    json.dump({"step": step, **metrics}, f, indent=1)
  return metrics
