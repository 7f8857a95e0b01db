"""What every recorded JSON says about the run that produced it."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import jax


def run_meta(**fields) -> dict:
  """``meta`` of a results JSON: device, platform, jax and Python versions, date, the command
  line (to reproduce it), then ``fields`` (the run's settings)."""
  dev = jax.devices()[0]
  return {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
          "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
          "command": " ".join(sys.argv), **fields}


def write_results(path, meta: dict, **parts) -> None:
  """Writes ``{"meta": meta, **parts}`` as indented JSON to ``path`` (parents created)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({"meta": meta, **parts}, indent=1))
