"""The README's Python examples run as written.

The quickstart runs first; every later example runs in a copy of its namespace
(they build on its `params`, `loss`, `example_loss`, `x`, `y`, `grads`). The
"Sharded use" example needs 8 devices: tests/test_multidevice.py runs it in a
child process, and here we check that the README shows that same code.
"""

import ast
import importlib.util
import pathlib
import re

import numpy as np
import optax
import pytest

import gnorm_jax

HERE = pathlib.Path(__file__).resolve().parent
README = (HERE.parent / "README.md").read_text()
_spec = importlib.util.spec_from_file_location("_readme_multidevice", HERE / "test_multidevice.py")
test_multidevice = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(test_multidevice)
BLOCKS = [
    (section, code)
    for section, body in re.findall(r"^## (.+?)\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    for code in re.findall(r"```python\n(.*?)```", body, re.S)
]
SHARDED = "Sharded use"


def _statements(code):
  """Top-level statements as AST dumps: layout and comments do not matter."""
  return [ast.dump(node) for node in ast.parse(code).body]


@pytest.fixture(scope="module")
def quickstart():
  section, code = BLOCKS[0]
  assert section == "Quickstart"
  namespace = {}
  exec(compile(code, "README quickstart", "exec"), namespace)
  return namespace


def test_readme_has_the_examples():
  sections = {section for section, _ in BLOCKS}
  for want in ["Quickstart", "Norms", "Clipping and normalized gradient descent (Optax)",
               "Gradient-norm penalties", SHARDED, "Training diagnostics"]:
    assert any(s.startswith(want) for s in sections), want


def test_quickstart_runs_and_clips(quickstart):
  norm = float(gnorm_jax.grad_norm(quickstart["loss"])(
      quickstart["params"], quickstart["x"], quickstart["y"]))
  np.testing.assert_allclose(float(optax.tree.get(quickstart["state"], "grad_norm")), norm,
                             rtol=1e-5)


@pytest.mark.parametrize(
    "index", [i for i, (s, _) in enumerate(BLOCKS) if i > 0 and s != SHARDED],
    ids=lambda i: BLOCKS[i][0].split(" (")[0],
)
def test_example_runs(quickstart, index):
  section, code = BLOCKS[index]
  exec(compile(code, f"README {section}", "exec"), dict(quickstart))


def test_sharded_example_is_the_tested_one():
  (code,) = [c for s, c in BLOCKS if s == SHARDED]
  tested = set(_statements(test_multidevice.README_EXAMPLE))
  missing = [
      ast.unparse(node) for node in ast.parse(code).body if ast.dump(node) not in tested
  ]
  assert not missing, f"README statements not run by tests/test_multidevice.py: {missing}"
