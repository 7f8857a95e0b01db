"""What every recorded JSON says about the run that produced it."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import jax


def command() -> str:
  """The command line of this process: ``python -m MODULE ARGS`` for a script run as a module
  (how the experiments run: ``sys.argv[0]`` is then the module's absolute path), else
  ``sys.argv`` joined."""
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  if spec is not None and spec.origin and sys.argv and sys.argv[0] == spec.origin:
    return " ".join(["python", "-m", spec.name.removesuffix(".__main__"), *sys.argv[1:]])
  return " ".join(sys.argv)


def run_meta(**fields) -> dict:
  """``meta`` of a results JSON: device, platform, jax and Python versions, date, the command
  line (to reproduce it, from the repository root), then ``fields`` (the run's settings)."""
  dev = jax.devices()[0]
  return {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
          "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
          "command": command(), **fields}


def write_results(path, meta: dict, **parts) -> None:
  """Writes ``{"meta": meta, **parts}`` as indented JSON to ``path`` (parents created)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({"meta": meta, **parts}, indent=1))
