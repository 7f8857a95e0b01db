"""KV-cache decoding (linen HyperAttention ``decode=True``) and the LM example's generation."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.lm import generate as generate_lib
from experiments.lm import model as model_lib
from experiments.lm import train as train_lib
from hyperattn_jax import HyperAttention, HyperAttentionConfig
from test_train_lm import micro_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = HyperAttentionConfig(block_size=16, sample_size=16, lsh_num_projs=3, min_seq_len=32)


def _tiny(**overrides) -> model_lib.TransformerConfig:
  fields = dict(vocab_size=257, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                head_dim=8, mlp_dim=64, hyper=SMALL, dtype=jnp.float32)
  return model_lib.TransformerConfig(**{**fields, **overrides})


def _model_and_params(cfg, seed):
  model = model_lib.Transformer(cfg)
  return model, model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"]


def _tokens(seed, shape):
  return jax.random.randint(jax.random.key(seed), shape, 0, 256, jnp.int32)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_cached_decoding_equals_full_prefix(seed, scan_layers):
  """Prefill + one-token steps give the logits of re-running the whole prefix (exact, fp32,
  GQA), also after a second prefill over a cache still holding a longer sequence; with the
  layers after the first scanned too (their cache stacked)."""
  model, params = _model_and_params(_tiny(num_layers=3, scan_layers=scan_layers), seed)
  call = jax.jit(lambda p, c, t: model.apply({"params": p, "cache": c}, t, decode=True,
                                             mutable=["cache"]))
  full = jax.jit(lambda p, t: model.apply({"params": p}, t))
  cache = generate_lib.init_cache(model, 2, 24)  # longer than used: empty slots must not count
  for round_seed in (seed + 1, seed + 2):
    tokens = _tokens(round_seed, (2, 20))
    expected = full(params, tokens)
    logits, cache = call(params, cache, tokens[:, :8])
    cache = cache["cache"]
    np.testing.assert_allclose(logits, expected[:, :8], rtol=1e-5, atol=1e-5)
    for i in range(8, 20):
      logits, cache = call(params, cache, tokens[:, i:i + 1])
      cache = cache["cache"]
      np.testing.assert_allclose(logits[:, 0], expected[:, i], rtol=1e-5, atol=1e-5)
    layers = model_lib.per_layer(cache)
    assert sorted(layers) == ["layer_0", "layer_1", "layer_2"]
    for layer in layers.values():
      assert int(layer["attention"]["cache_index"]) == 20


@pytest.mark.parametrize("attention", ["exact", "hyper"])
def test_scanned_layers_equal_unrolled_layers(seed, attention):
  """``scan_layers``: the same logits and per-layer intermediates as the unrolled model with the
  same parameters stacked (fp32). In hyper mode (seq 48 > min_seq_len, all layers but the
  first) the draws differ per layer in both, so only exact mode is compared value by value;
  hyper mode must run, be finite and differ from exact."""
  cfg = _tiny(num_layers=3, attention=attention, hyper_last_layers=2)
  scanned_cfg = dataclasses.replace(cfg, scan_layers=True)
  model, params = _model_and_params(cfg, seed)
  scanned = model_lib.Transformer(scanned_cfg)
  shapes = jax.eval_shape(scanned.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  stacked = model_lib.stack_layers(params)
  assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(lambda s: s.shape, shapes["params"])
  split = model_lib.per_layer(stacked)
  assert jax.tree.all(jax.tree.map(np.array_equal, split,
                                   {k: v for k, v in params.items() if k.startswith("layer_")}))
  with pytest.raises(ValueError, match="expected an unrolled model"):
    model_lib.stack_layers(stacked)
  tokens = _tokens(seed + 1, (2, 48))
  rngs = {"hyper": jax.random.key(seed + 2)}
  run = lambda m, p: m.apply({"params": p}, tokens, rngs=rngs, mutable=["intermediates"])
  (want, want_inter), (got, got_inter) = run(model, params), run(scanned, stacked)
  if attention == "exact":
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    got_layers = model_lib.per_layer(got_inter["intermediates"])
    for name, layer in model_lib.per_layer(want_inter["intermediates"]).items():
      for a, b in zip(layer["attention"]["qkv"][0], got_layers[name]["attention"]["qkv"][0]):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
  else:
    exact = model_lib.Transformer(dataclasses.replace(scanned_cfg, attention="exact"))
    assert np.all(np.isfinite(got))
    assert not np.allclose(got, exact.apply({"params": stacked}, tokens), atol=1e-3)


def test_generation_with_scanned_layers_keeps_the_tokens(seed):
  """``with_scanned_layers`` on an unrolled model's params (exact, greedy): the same tokens; a
  scanned or one-layer model is returned as it is."""
  cfg = _tiny(num_layers=3)
  _, params = _model_and_params(cfg, seed)
  scanned_params, scanned_cfg = model_lib.with_scanned_layers(params, cfg)
  assert scanned_cfg.scan_layers and "layers" in scanned_params
  assert model_lib.with_scanned_layers(scanned_params, scanned_cfg)[0] is scanned_params
  one = _tiny(num_layers=1)
  kept_params, kept_cfg = model_lib.with_scanned_layers(params, one)
  assert kept_params is params and kept_cfg is one
  prompt = np.asarray(_tokens(seed + 1, (1, 12)))
  run = lambda p, c: generate_lib.generate(p, c, prompt, 6, rng=jax.random.key(0),
                                           eos_id=None, progress=False).tokens
  np.testing.assert_array_equal(run(scanned_params, scanned_cfg), run(params, cfg))


def test_scanned_layers_need_one_mode():
  """The scanned layers share one body: a mode split among them is refused."""
  with pytest.raises(ValueError, match="scan_layers needs the layers after the first"):
    _tiny(num_layers=3, attention="hyper", hyper_last_layers=1, scan_layers=True)
  _tiny(num_layers=3, attention="hyper", hyper_last_layers=-1, scan_layers=True)


def test_hyper_prefill_equals_uncached_layer(seed):
  """A prefill with mode="hyper" (seq 128 > min_seq_len) returns the layer's plain output and
  writes the RoPE'd keys/values it attended into the cache."""
  x = jax.random.normal(jax.random.key(seed), (2, 128, 32), jnp.float32)
  layer = HyperAttention(num_heads=4, num_kv_heads=2, config=SMALL)
  decoder = layer.clone(decode=True)
  params = layer.init(jax.random.key(seed + 1), x)
  shapes = jax.eval_shape(decoder.init, jax.random.key(0), jnp.zeros((2, 160, 32)))["cache"]
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  rngs = {"hyper": jax.random.key(seed + 2)}
  y, state = layer.apply(params, x, rngs=rngs, mutable=["intermediates"])
  y_dec, variables = decoder.apply({**params, "cache": cache}, x, rngs=rngs,
                                   mutable=["cache", "intermediates"])
  np.testing.assert_allclose(y_dec, y, rtol=1e-6, atol=1e-6)
  _, k, v = state["intermediates"]["qkv"][0]
  filled = variables["cache"]
  np.testing.assert_array_equal(filled["cached_key"][:, :128], k)
  np.testing.assert_array_equal(filled["cached_value"][:, :128], v)
  assert not np.any(filled["cached_key"][:, 128:]) and int(filled["cache_index"]) == 128
  exact = layer.clone(mode="exact").apply(params, x)
  assert np.abs(np.asarray(y) - np.asarray(exact)).max() > 1e-3  # HyperAttention did run


def test_greedy_sampling_and_eos(seed):
  """Greedy tokens are the argmax of the full forward of prompt + tokens; top_k=1 sampling is
  greedy; sampling is reproducible per seed; EOS ends the generation."""
  cfg = _tiny()
  model, params = _model_and_params(cfg, seed)
  prompt = np.asarray(_tokens(seed + 1, (2, 12)))
  greedy = generate_lib.generate(params, cfg, prompt, 6, rng=jax.random.key(0), eos_id=None)
  assert greedy.tokens.shape == (2, 6) and greedy.decode_steps == 5
  logits = model.apply({"params": params}, np.concatenate([prompt, greedy.tokens[:, :-1]], 1))
  np.testing.assert_array_equal(np.argmax(logits[:, 11:], -1), greedy.tokens)
  top1 = generate_lib.generate(params, cfg, prompt, 6, rng=jax.random.key(1), temperature=1.0,
                               top_k=1, eos_id=None)
  np.testing.assert_array_equal(top1.tokens, greedy.tokens)
  draw = lambda s: generate_lib.generate(params, cfg, prompt, 6, rng=jax.random.key(s),
                                         temperature=1.0, eos_id=None).tokens
  np.testing.assert_array_equal(draw(3), draw(3))
  assert not np.array_equal(draw(3), draw(4))
  eos = int(greedy.tokens[0, 3])
  stop = int(np.argmax(greedy.tokens[0] == eos))  # its first occurrence in row 0
  ended = generate_lib.generate(params, cfg, prompt, 6, rng=jax.random.key(0), eos_id=eos)
  n = ended.tokens.shape[1]  # ends once both rows had EOS; row 0 continues with EOS
  assert n == 6 or eos in greedy.tokens[1, :n]
  np.testing.assert_array_equal(ended.tokens[0, :stop + 1], greedy.tokens[0, :stop + 1])
  assert np.all(ended.tokens[0, stop:] == eos)
  np.testing.assert_array_equal(ended.tokens[1], greedy.tokens[1, :n])


def test_decode_and_generate_errors():
  x = jnp.zeros((1, 8, 32))
  with pytest.raises(ValueError, match="decode=True needs causal=True"):
    HyperAttention(num_heads=4, causal=False, decode=True).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="key_mask is not supported with decode=True"):
    HyperAttention(num_heads=4, decode=True).init(jax.random.key(0), x,
                                                   key_mask=jnp.ones((1, 8), bool))
  with pytest.raises(ValueError, match="positions must be None with decode=True"):
    HyperAttention(num_heads=4, decode=True).init(jax.random.key(0), x,
                                                   positions=jnp.zeros((1, 8), jnp.int32))
  layer = HyperAttention(num_heads=4, decode=True)
  variables = layer.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="does not fit keys"):  # prompt longer than the cache
    layer.apply(variables, jnp.zeros((1, 9, 32)), mutable=["cache"])
  cfg = _tiny()
  params = _model_and_params(cfg, 0)[1]
  prompt = np.zeros((1, 4), np.int32)
  for kwargs, match in [(dict(max_new_tokens=0), "max_new_tokens"),
                        (dict(temperature=-1.0), "temperature"),
                        (dict(top_k=300), "top_k"),
                        (dict(max_len=5), "max_len"),
                        (dict(prompt_tokens=prompt + 300), "vocab_size"),
                        (dict(prompt_tokens=prompt[0]), r"\[batch, prompt_len\]")]:
    args = {"prompt_tokens": prompt, "max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
      generate_lib.generate(params, cfg, args.pop("prompt_tokens"), args.pop("max_new_tokens"),
                            rng=jax.random.key(0), **args)


def test_generate_script_end_to_end(tmp_path):
  """``python -m experiments.lm.generate_text`` on a tiny checkpoint, HyperAttention in the last
  layer's prefill: the prompt keeps its last seq_len - max_new_tokens bytes and its first new
  token is the argmax of that model's forward on them."""
  config = micro_config(num_steps=1, attention="exact", eval_every=1, checkpoint_every=1)
  train_lib.train_and_evaluate(config, str(tmp_path / "run"))
  prompt_file = tmp_path / "prompt.txt"
  prompt_file.write_bytes(b"def main():\n  return 0\n" * 8)        # 192 bytes
  out = tmp_path / "gen.json"
  res = subprocess.run(
      [sys.executable, "-m", "experiments.lm.generate_text", f"--workdir={tmp_path / 'run'}",
       f"--prompt_file={prompt_file}", "--max_new_tokens=5", "--seq_len=105",
       "--hyper_last_layers=1", f"--out={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert res.returncode == 0, res.stderr[-3000:]
  record = json.loads(out.read_text())
  assert record["prompt_len"] == 100 and "time_to_first_token_s=" in res.stderr
  assert record["meta"]["command"].startswith("python -m experiments.lm.generate_text --workdir=")
  cfg = train_lib.model_config(config, attention="hyper", hyper_last_layers=1)
  assert model_lib.attention_modes(cfg) == ("exact", "hyper")
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  params, _ = train_lib.restore_params(str(tmp_path / "run"), config, cfg, mesh)
  prompt = np.frombuffer(prompt_file.read_bytes()[-100:], np.uint8).astype(np.int32)[None]
  hyper_rng = jax.random.split(jax.random.key(0))[0]  # generate()'s prefill key for --seed=0
  logits = model_lib.Transformer(cfg).apply({"params": params}, prompt,
                                            rngs={"hyper": hyper_rng})
  assert record["tokens"][0] == int(np.argmax(logits[0, -1]))
  assert 1 <= len(record["tokens"]) <= 5 and res.stdout == record["text"] + "\n"
