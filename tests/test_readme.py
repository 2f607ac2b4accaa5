"""The README is a front page: at most 8 KB, its commands as CI runs them, and its Python
examples run as written, in order (the quickstart first).
The other examples live on the guide pages (tests/test_docs.py runs them)."""

import pathlib
import re

import numpy as np
import optax
import pytest

import gnorm_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = [
  (section, code)
  for section, body in re.findall(r"^## (.+?)\n(.*?)(?=^## |\Z)", README, re.S | re.M)
  for code in re.findall(r"```python\n(.*?)```", body, re.S)
]
COMMANDS = [
  'pip install -e ".[demo]" && python -m gnorm_jax.demo',
  'pip install -e ".[test,docs]" && pytest && sphinx-build -W -b html docs docs/_build/html',
  'pip install -e ".[docs]" && sphinx-build -W -b html docs docs/_build/html',
]


@pytest.fixture(scope="module")
def quickstart():
  """The namespace after every example, in order; the quickstart comes first."""
  assert BLOCKS and BLOCKS[0][0] == "Quickstart"
  namespace = {}
  for section, code in BLOCKS:
    exec(compile(code, f"README {section}", "exec"), namespace)
  return namespace


def test_readme_is_a_front_page():
  assert len(README.encode()) <= 8 * 1024


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_shows_the_set_up_command(command):
  assert re.search(rf"^{re.escape(command)}$", README, re.M), command


def test_readme_links_resolve():
  for target in re.findall(r"\]\(((?!https?:)[^)#]+)\)", README):
    assert (ROOT / target).exists(), target


def test_quickstart_runs_and_clips(quickstart):
  norm = float(
    gnorm_jax.grad_norm(quickstart["loss"])(quickstart["params"], quickstart["x"], quickstart["y"])
  )
  np.testing.assert_allclose(
    float(optax.tree.get(quickstart["state"], "grad_norm")), norm, rtol=1e-5
  )
