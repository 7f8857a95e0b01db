"""Every ```python block of README.md runs as written (on CPU, each block on its own)."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _python_blocks():
  """(first line number, source) of each ```python block, in order."""
  with open(README, encoding="utf-8") as f:
    text = f.read()
  return [(text[:m.start()].count("\n") + 2, m.group(1))
          for m in re.finditer(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)]


def test_readme_has_python_blocks():
  assert len(_python_blocks()) >= 4


@pytest.mark.parametrize("line,source", _python_blocks(),
                         ids=[f"line{line}" for line, _ in _python_blocks()])
def test_readme_block_runs(line, source):
  code = compile(source, f"README.md:{line}", "exec")
  exec(code, {"__name__": f"readme_line{line}"})  # pylint: disable=exec-used
