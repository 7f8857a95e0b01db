"""CPU smoke tests of the training example: learning, exact resume, configs, data, devices."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P
from jax.tree_util import DictKey

from experiments.lm import data as data_lib
from experiments.lm import eval_lm
from experiments.lm import train as train_lib
from experiments.lm.configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def micro_config(**overrides):
  c = tiny.get_config()
  c.model.update(num_layers=2, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64)
  c.hyper.update(block_size=32, sample_size=16, lsh_num_projs=3, min_seq_len=64)
  c.update(seq_len=128, batch_size=8, num_steps=8, warmup_steps=2, log_every=1, eval_every=4,
           eval_batches=1, eval_batch_size=8, checkpoint_every=3)
  c.update(overrides)
  return c


def _metric_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _train_losses(workdir):
  return {r["step"]: r["loss"] for r in _metric_rows(workdir) if r["split"] == "train"}


def test_loss_falls_and_eval_patching_runs(tmp_path):
  config = micro_config(num_steps=40, learning_rate=1e-2, eval_every=40, log_every=1)
  metrics = train_lib.train_and_evaluate(config, str(tmp_path))
  losses = _train_losses(tmp_path)
  first, last = np.mean([losses[s] for s in range(1, 6)]), np.mean(
      [losses[s] for s in range(36, 41)])
  assert last < first - 1.0, (first, last)
  assert np.isfinite(metrics["valid_loss"]) and metrics["valid_loss"] < first
  assert os.listdir(tmp_path / "tensorboard")
  rows = eval_lm.run(str(tmp_path), timing_reps=1)
  assert [r["patched_layers"] for r in rows] == [0, 1, 2]
  assert all(np.isfinite(r["loss"]) and r["checkpoint_step"] == 40 for r in rows)


def test_scanned_layers_train_shard_and_patch(tmp_path):
  """``model.scan_layers``: trains (FSDP on, the stacked layer axis left whole), evaluates the
  patch counts its one scanned mode allows, and refuses the others by name."""
  config = micro_config(num_steps=4, eval_every=4, fsdp=True)
  config.model.update(num_layers=3, scan_layers=True)
  metrics = train_lib.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(metrics["valid_loss"])
  assert all(np.isfinite(v) for v in _train_losses(tmp_path).values())
  rows = eval_lm.run(str(tmp_path), timing_reps=1)
  assert [r["patched_layers"] for r in rows] == [0, 2, 3]
  with pytest.raises(ValueError, match="scan_layers"):
    eval_lm.run(str(tmp_path), patch_last_layers=1, timing_reps=1)
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  spec = train_lib._param_sharding(mesh, fsdp=True)  # pylint: disable=protected-access
  x = jax.ShapeDtypeStruct((2, 32, 64), np.float32)
  assert spec((DictKey("layers"), DictKey("block")), x).spec == P(None, "data")
  assert spec((DictKey("layer_0"),), x).spec == P("data")


def test_killed_run_resumes_with_identical_losses(tmp_path):
  config = micro_config()
  train_lib.train_and_evaluate(config, str(tmp_path / "a"))
  # "Killed" after step 5 without a final checkpoint: the restart resumes from step 3.
  train_lib.train_and_evaluate(config, str(tmp_path / "b"), stop_after=5)
  train_lib.train_and_evaluate(config, str(tmp_path / "b"))
  a, b = _train_losses(tmp_path / "a"), _train_losses(tmp_path / "b")
  assert sorted(a) == sorted(b) == list(range(1, 9))
  for step in range(1, 9):
    assert a[step] == b[step], (step, a[step], b[step])
  # One row per (step, split): the rows of steps 4 and 5, trained again after the resume, are
  # not repeated (they once were).
  rows = lambda run: [(r["step"], r["split"]) for r in _metric_rows(tmp_path / run)]
  assert rows("b") == rows("a")


def test_invalid_config_values_raise_clear_errors():
  for field, value, match in [("attention", "fast", "config.attention"),
                              ("num_steps", 0, "config.num_steps"),
                              ("implementation", "cuda", "config.implementation")]:
    with pytest.raises(ValueError, match=match):
      train_lib.validate_config(micro_config(**{field: value}))
  bad = micro_config()
  bad.hyper.block_size = 1000  # > min_seq_len
  with pytest.raises(ValueError, match="config.hyper"):
    train_lib.validate_config(bad)


def test_command_line_overrides(tmp_path):
  base = [sys.executable, "-m", "experiments.lm.main",
          "--config=experiments/lm/configs/tiny.py", f"--workdir={tmp_path}"]
  run = lambda *extra: subprocess.run(base + list(extra), cwd=ROOT, capture_output=True,
                                      text=True, timeout=300, check=False)
  bad_value = run("--config.attention=fast")
  assert bad_value.returncode != 0 and "config.attention must be" in bad_value.stderr
  unknown = run("--config.no_such_field=1")
  assert unknown.returncode != 0 and "no_such_field" in unknown.stderr


def test_logging_is_quiet_unless_verbosity_is_given(tmp_path):
  """orbax's and jax's INFO lines (every checkpoint step) ran through the progress bar; absl's
  --verbosity=0 brings them back (the second run resumes at the last step: no training)."""
  micro = ["--config.num_steps=1", "--config.checkpoint_every=1", "--config.eval_batches=1",
           "--config.seq_len=64", "--config.batch_size=2", "--config.eval_batch_size=2",
           "--config.attention=exact", "--config.model.num_layers=1", "--config.model.d_model=32",
           "--config.model.mlp_dim=64", "--config.model.head_dim=8"]
  run = lambda *extra: subprocess.run(
      [sys.executable, "-m", "experiments.lm.main", "--config=experiments/lm/configs/tiny.py",
       f"--workdir={tmp_path}", *micro, *extra], cwd=ROOT, capture_output=True, text=True,
      timeout=300, check=True)
  info = lambda stderr: [line for line in stderr.splitlines() if line.startswith("I")]
  quiet = run()
  assert "train_loss" in quiet.stdout and not info(quiet.stderr), info(quiet.stderr)[:3]
  assert any("checkpoint" in line for line in info(run("--verbosity=0").stderr))


def test_data_errors_and_determinism(tmp_path):
  with pytest.raises(ValueError, match="config.data.path"):
    data_lib.load_corpus(str(tmp_path / "missing"))
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "a.txt").write_text("")
  with pytest.raises(ValueError, match="empty"):
    data_lib.load_corpus(str(tmp_path / "empty"))
  (tmp_path / "short").mkdir()
  for i in range(3):
    (tmp_path / "short" / f"{i}.txt").write_text("hello world " * 5)
  corpus = data_lib.load_corpus(str(tmp_path / "short"))
  with pytest.raises(ValueError, match="shorter than one sequence"):
    data_lib.train_batch(corpus.train, 0, 2, 4096, 0)
  stdlib = data_lib.load_corpus(None)
  assert stdlib.source.startswith("python-stdlib") and len(stdlib.valid) > 100_000
  b1 = data_lib.train_batch(stdlib.train, 7, 4, 64, 0)
  b2 = data_lib.train_batch(stdlib.train, 7, 4, 64, 0)
  np.testing.assert_array_equal(b1["tokens"], b2["tokens"])
  assert b1["tokens"].shape == (4, 65) and b1["tokens"].max() <= data_lib.EOS
  assert b1["answer_mask"].shape == (4, 64) and not b1["answer_mask"].any()


_DEVICE_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import jax
from test_train_lm import micro_config
from experiments.lm import train as train_lib
assert jax.device_count() == 8
out = {{}}
for fsdp in (False, True):
  train_lib.train_and_evaluate(micro_config(num_steps=3, fsdp=fsdp), {workdir!r} + str(fsdp))
  rows = [json.loads(l) for l in open({workdir!r} + str(fsdp) + "/metrics.jsonl")]
  out[str(fsdp)] = [r["loss"] for r in rows if r["split"] == "train"]
print("LOSSES" + json.dumps(out))
"""


def test_eight_device_data_parallel_matches_one_device(tmp_path):
  train_lib.train_and_evaluate(micro_config(num_steps=3), str(tmp_path / "one"))
  one = [_train_losses(tmp_path / "one")[s] for s in (1, 2, 3)]
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") +
             " --xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  script = _DEVICE_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"),
                                 workdir=str(tmp_path / "eight"))
  res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=600, check=False)
  assert res.returncode == 0, res.stderr[-3000:]
  losses = json.loads(res.stdout.split("LOSSES")[-1])
  for fsdp in ("False", "True"):
    np.testing.assert_allclose(losses[fsdp], one, rtol=2e-5)
