"""Every example runs in --smoke mode, including its equivalence check."""
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("name", ["transformer", "rnn", "wavenet",
                                  "torch_pipeline", "flax_llama",
                                  "sharded"])
def test_example_smoke(name):
  args = [sys.executable, str(EXAMPLES / f"{name}.py"), "--smoke"]
  result = subprocess.run(args, capture_output=True, text=True, timeout=600,
                          cwd=EXAMPLES.parent)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "equivalence: max |step - training mode|" in result.stdout


def test_example_help():
  result = subprocess.run([sys.executable, str(EXAMPLES / "rnn.py"),
                           "--help"], capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0 and "--smoke" in result.stdout
