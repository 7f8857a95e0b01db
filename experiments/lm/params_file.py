"""Move a trained model between machines as a few small files: bf16 params only.

  python -m experiments.lm.params_file export --workdir=/tmp/lm --out=/tmp/out/params --parts=3
  python -m experiments.lm.params_file import --files=/tmp/out/params-*.npz --workdir=/tmp/lm2

``export`` writes the latest checkpoint's params, rounded to bfloat16 (the compute dtype of the
example's models, so a bf16 model evaluates exactly as before), as ``parts`` ``.npz`` files plus
``config.json`` inside the first; ``import`` rebuilds a workdir (config + an orbax checkpoint of
those params at the exported step) that ``eval_*.py`` can read. The optimizer's moments are not
moved (they would triple the files): training resumed from an imported workdir continues the
learning-rate schedule at the exported step (the optimizer's step counts are set to it) with
fresh Adam moments, which is close to, not the same as, the uninterrupted run.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from experiments.lm import train as train_lib

__all__ = ["export_params", "import_params"]


def export_params(workdir: str, out_prefix: str, parts: int) -> list[str]:
  """Writes ``{out_prefix}-{i}.npz`` (uint16 bit patterns of bf16 leaves, by tree path)."""
  config, params, step = train_lib.restore_run(workdir)
  leaves = [(jax.tree_util.keystr(path),
             np.asarray(jnp.asarray(x, jnp.bfloat16)).view(np.uint16))
            for path, x in jax.tree_util.tree_leaves_with_path(params)]
  os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
  paths = []
  for i in range(parts):
    arrays = dict(leaves[i::parts])
    if i == 0:
      arrays["__config__"] = np.frombuffer(config.to_json().encode(), np.uint8)
      arrays["__step__"] = np.array(step)
    paths.append(f"{out_prefix}-{i}.npz")
    np.savez(paths[-1], **arrays)
  return paths


def import_params(files: list[str], workdir: str) -> int:
  """Rebuilds ``workdir`` from exported files; returns the checkpoint step."""
  arrays = {}
  for path in files:
    with np.load(path) as data:
      arrays.update({k: data[k] for k in data.files})
  config = ml_collections.ConfigDict(json.loads(arrays.pop("__config__").tobytes().decode()))
  step = int(arrays.pop("__step__"))
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json(indent=1))
  mesh = Mesh(np.array(jax.devices()), ("data",))
  state, _ = train_lib.create_state(config, train_lib.model_config(config), mesh)

  def load(path, x):
    bits = arrays[jax.tree_util.keystr(path)]
    return jnp.asarray(bits.view(jnp.bfloat16), x.dtype).reshape(x.shape)

  def count(path, x):  # optax's step counts (adam's, the schedule's): continue at `step`
    name = getattr(path[-1], "name", None)
    return jnp.full_like(x, step) if name == "count" else x

  state["params"] = jax.tree_util.tree_map_with_path(load, state["params"])
  state["opt_state"] = jax.tree_util.tree_map_with_path(count, state["opt_state"])
  state["step"] = jnp.asarray(step, jnp.int32)
  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                  options=ocp.CheckpointManagerOptions(create=True))
  manager.save(step, args=ocp.args.StandardSave(state), force=True)
  manager.wait_until_finished()
  manager.close()
  return step


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  ex = sub.add_parser("export")
  ex.add_argument("--workdir", required=True)
  ex.add_argument("--out", required=True, help="path prefix of the .npz files")
  ex.add_argument("--parts", type=int, default=3)
  im = sub.add_parser("import")
  im.add_argument("--files", required=True, help="glob of the exported .npz files")
  im.add_argument("--workdir", required=True)
  args = parser.parse_args()
  if args.command == "export":
    print(export_params(args.workdir, args.out, args.parts))
  else:
    files = sorted(glob.glob(args.files))
    if not files:
      raise SystemExit(f"--files={args.files!r} matches no file")
    print("step", import_params(files, args.workdir))


if __name__ == "__main__":
  main()
