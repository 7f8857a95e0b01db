"""Retrieval probes in the LM example: assembly, the mix in training batches, the curriculum,
the teacher-forced scoring, eval_retrieval end to end, and moving params between machines."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments.lm import data as data_lib
from experiments.lm import params_file
from experiments.lm import retrieval
from experiments.lm import retrieval_eval
from experiments.lm import train as train_lib
from test_train_lm import micro_config


def _haystack(n=5000, seed=0):
  return np.random.default_rng(seed).integers(32, 127, n).astype(np.int32)


@pytest.mark.parametrize("task", [retrieval.passkey(), retrieval.AssociativeRecallTask(
    num_pairs=6, num_queries=3)])
def test_assembled_probe_holds_needles_and_answers(task):
  rng = np.random.default_rng(1)
  probe = task.sample(rng, (0.3, 0.4))
  item = retrieval.assemble(_haystack(), probe, 1000)
  assert item.tokens.shape == (1000,) and item.answer_mask.sum() == sum(
      len(q.answer) for q in probe.queries)
  text = bytes(item.tokens.astype(np.uint8))
  assert text.endswith(probe.queries[-1].question + probe.queries[-1].answer)
  for q, (start, stop, depth) in zip(probe.queries, item.answers):
    assert 0.3 <= depth < 0.4 and bytes(item.tokens[start:stop].astype(np.uint8)) == q.answer
  for depth, needle in probe.needles:
    at = text.find(needle)
    assert at >= 0
    if depth in [q.depth for q in probe.queries]:  # asked for: at its depth of the haystack
      assert abs(at / (1000 - len(needle)) - depth) < 0.1


def test_user_template_task_and_registry():
  task = retrieval.TemplateTask(name="color", needle="The color of the door is {value}.",
                                question="What color is the door? ", alphabet="RGB", length=3)
  retrieval.register_task("color", lambda: task)
  assert "color" in retrieval.task_names()
  made = retrieval.make_task("color")
  probe = made.sample(np.random.default_rng(0), (0.0, 1.0))
  assert set(probe.queries[0].answer.decode()) <= set("RGB")
  with pytest.raises(ValueError, match="must contain '{value}'"):
    retrieval.TemplateTask(name="x", needle="no slot", question="?")
  with pytest.raises(ValueError, match="unknown retrieval task 'nope'"):
    retrieval.make_task("nope")
  with pytest.raises(ValueError, match="does not fit"):
    retrieval.assemble(_haystack(), probe, 40)


def test_mix_in_training_batches_is_deterministic_and_rated(tmp_path):
  tokens = _haystack(200_000).astype(np.uint16)
  mix = data_lib.RetrievalMix(rate=0.5, tasks=(retrieval.passkey(),))
  a = data_lib.train_batch(tokens, 3, 64, 256, 0, mix)
  b = data_lib.train_batch(tokens, 3, 64, 256, 0, mix)
  np.testing.assert_array_equal(a["tokens"], b["tokens"])
  np.testing.assert_array_equal(a["answer_mask"], b["answer_mask"])
  with_probe = a["answer_mask"].any(axis=1)
  assert 16 < with_probe.sum() < 48  # rate 0.5 of 64 windows
  # Rows without a probe are the plain windows; the mask marks the targets of the answers.
  plain = data_lib.train_batch(tokens, 3, 64, 256, 0)
  np.testing.assert_array_equal(a["tokens"][~with_probe], plain["tokens"][~with_probe])
  row = int(np.argmax(with_probe))
  assert a["answer_mask"][row].sum() == 5 and a["answer_mask"][row, -5:].all()
  with pytest.raises(ValueError, match="rate must be in"):
    data_lib.RetrievalMix(rate=1.5, tasks=())


def test_curriculum_phases_and_errors():
  config = micro_config(num_steps=10, curriculum="64x8:4,96x4:7")
  phases = train_lib.curriculum(config)
  assert [(p.start, p.stop, p.seq_len, p.batch_size) for p in phases] == [
      (0, 4, 64, 8), (4, 7, 96, 4), (7, 10, 128, 8)]
  for bad in ("64x8", "64x8:12", "64x8:5,96x4:3"):
    with pytest.raises(ValueError, match="config.curriculum"):
      train_lib.curriculum(micro_config(num_steps=10, curriculum=bad))


def test_score_counts_exact_match_and_tokens():
  item = retrieval.assemble(_haystack(), retrieval.passkey().sample(np.random.default_rng(2)),
                            600)
  start, stop, _ = item.answers[0]
  perfect = np.roll(item.tokens, -1)  # prediction after token i == token i + 1
  assert retrieval_eval.score(perfect, item) == [(True, stop - start, stop - start,
                                                  item.answers[0][2])]
  wrong = perfect.copy()
  wrong[stop - 2] += 1
  em, correct, count, _ = retrieval_eval.score(wrong, item)[0]
  assert not em and correct == count - 1


def test_retrieval_training_and_evaluation_end_to_end(tmp_path):
  """A probe-mixed, curriculum run trains and resumes; eval_retrieval scores every (mode,
  length, bin) cell and writes its heatmap; params move through the bf16 files unchanged."""
  config = micro_config(num_steps=4, curriculum="192x8:2", seq_len=256, answer_weight=8.0,
                        eval_every=4)
  config.data.retrieval.update(rate=1.0)
  config.data.retrieval.mqar.update(num_pairs=4, num_queries=2)
  workdir = str(tmp_path / "run")
  train_lib.train_and_evaluate(config, workdir)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  train_rows = [r for r in rows if r["split"] == "train"]
  assert [r["seq_len"] for r in train_rows] == [192] * 2 + [256] * 2
  assert all(0 <= r["answer_accuracy"] <= 1 for r in train_rows)
  result = retrieval_eval.run(workdir, [200], ["exact", "hyper:0:band"],
                              {"band": {"local_window": 16}}, depth_bins=2, samples=1,
                              timing_reps=1)
  cells = {(r["mode"], r["task"], r["depth_bin"]) for r in result["rows"]}
  assert len(cells) == 2 * 2 * 2 and len(result["perplexity"]) == 2
  retrieval_eval.plot(result, str(tmp_path / "h.png"))
  assert os.path.getsize(tmp_path / "h.png") > 1000
  diag = retrieval_eval.diagnose(workdir, 256, probes=1, draws=2)
  assert [r["layer"] for r in diag] == [0, 1] and "lsh_recall_mean" in diag[0]
  for r in diag:
    assert all(0 <= x <= 1 + 1e-6 for key in ("needle_mass", "co_blocked", "sampled")
               for x in r[key]) and all(-1 <= c <= 1 for c in r["needle_cosine"])
  with pytest.raises(ValueError, match="variant 'x' is not in --variants"):
    retrieval_eval.parse_mode("hyper:1:x", 2, {})
  files = params_file.export_params(workdir, str(tmp_path / "p" / "params"), 2)
  assert params_file.import_params(files, str(tmp_path / "copy")) == 4
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  restore = lambda w: train_lib.restore_params(w, config, train_lib.model_config(config), mesh)[0]
  for a, b in zip(jax.tree.leaves(restore(workdir)), jax.tree.leaves(restore(str(tmp_path /
                                                                                 "copy")))):
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16).astype(jnp.float32)), b)
  # Resuming the copy continues the schedule at step 4: the optimizer's step counts say 4.
  state, _ = train_lib.create_state(config, train_lib.model_config(config), mesh)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  with ocp.CheckpointManager(str(tmp_path / "copy" / "checkpoints")) as manager:
    restored = manager.restore(4, args=ocp.args.StandardRestore(abstract))
  counts = [x for path, x in jax.tree_util.tree_leaves_with_path(restored["opt_state"])
            if getattr(path[-1], "name", None) == "count"]
  assert len(counts) == 2 and all(int(c) == 4 for c in counts)
