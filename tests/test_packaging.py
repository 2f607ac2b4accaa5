"""What an install gets: the core dependencies, the extras, the errors that name a missing extra,
`python -OO`, and shipped text that speaks of the library, not of its making."""

from __future__ import annotations

import ast
import json
import pathlib
import re
import subprocess
import sys
import tomllib

import numpy as np
import pytest

import gnorm_jax
from gnorm_jax import demo

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]


def _name(requirement: str) -> str:
  """The distribution a requirement names, normalized (PEP 503)."""
  return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement)[0]).lower()


def _extra_names(extra: str) -> set[str]:
  """Every distribution an extra installs, following its references to other extras."""
  names = set()
  for requirement in EXTRAS[extra]:
    self_ref = re.fullmatch(r"gnorm_jax\[(.+)\]", requirement)
    if self_ref:
      for other in self_ref[1].split(","):
        names |= _extra_names(other.strip())
    else:
      names.add(_name(requirement))
  return names


def hide(monkeypatch, module: str) -> None:
  """Makes ``module`` and its submodules unimportable, as if not installed."""
  for name in [m for m in sys.modules if m.startswith(module + ".")]:
    monkeypatch.setitem(sys.modules, name, None)
  monkeypatch.setitem(sys.modules, module, None)


# ---------------------------------------------------------------------------
# pyproject.toml


def test_core_install_is_jax_optax_numpy():
  assert sorted(map(_name, PROJECT["dependencies"])) == ["jax", "jaxlib", "numpy", "optax"]


@pytest.mark.parametrize(
  "extra,wanted",
  [
    ("dp", {"dp-accounting", "scipy"}),
    ("demo", {"scikit-learn", "tqdm", "matplotlib"}),
    (
      "test",
      {
        "pytest",
        "hypothesis",
        "flax",
        "equinox",
        "dm-haiku",
        "chex",
        "dp-accounting",
        "scikit-learn",
        "tqdm",
        "matplotlib",
      },
    ),
    ("docs", {"sphinx", "myst-nb", "sphinx-book-theme", "ipykernel", "matplotlib"}),
    ("bench", {"jax-privacy", "transformers"}),
  ],
)
def test_extra_holds_what_it_is_for(extra, wanted):
  assert wanted <= _extra_names(extra)


def _unguarded_imports(code: str) -> set[str]:
  """Top-level modules imported outside a try block (a guarded import is optional)."""
  tree = ast.parse(code)
  guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) for n in ast.walk(t)}
  modules = set()
  for node in ast.walk(tree):
    if id(node) in guarded:
      continue
    if isinstance(node, ast.Import):
      modules |= {alias.name.split(".")[0] for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      modules.add(node.module.split(".")[0])
  return modules


@pytest.mark.parametrize(
  "notebook", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem
)
def test_docs_extra_installs_what_the_notebooks_import(notebook):
  """The docs build executes the notebooks: `pip install ".[docs]"` must be enough."""
  from importlib.metadata import packages_distributions

  cells = json.loads(notebook.read_text())["cells"]
  code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
  installed = packages_distributions()
  provided = _extra_names("docs") | set(map(_name, PROJECT["dependencies"]))
  for module in _unguarded_imports(code) - set(sys.stdlib_module_names) - {"gnorm_jax"}:
    distributions = {_name(d) for d in installed.get(module, [])}
    assert distributions & provided, f"{notebook.name} imports {module}, not in [docs]"


# ---------------------------------------------------------------------------
# A missing extra is named.


DP_MISSING = re.escape('pip install "gnorm_jax[dp]"')
DEMO_MISSING = re.escape('pip install "gnorm_jax[demo]"')


@pytest.mark.parametrize(
  "call",
  [
    lambda: gnorm_jax.dp_epsilon(1.0, 0.01, 100, 1e-5),
    lambda: gnorm_jax.dp_epsilon(1.0, 0.01, 100, 1e-5, accountant="rdp"),
    lambda: gnorm_jax.dp_noise_multiplier(8.0, 0.01, 100, 1e-5),
  ],
  ids=["dp_epsilon_pld", "dp_epsilon_rdp", "dp_noise_multiplier"],
)
def test_accounting_without_dp_accounting_names_the_extra(monkeypatch, call):
  hide(monkeypatch, "dp_accounting")
  with pytest.raises(ImportError, match=DP_MISSING):
    call()


def test_poisson_max_batch_size_without_scipy_names_the_extra(monkeypatch):
  hide(monkeypatch, "scipy")
  with pytest.raises(ImportError, match=DP_MISSING):
    gnorm_jax.poisson_max_batch_size(1000, 0.01)


def test_sampling_needs_no_extra(monkeypatch):
  hide(monkeypatch, "dp_accounting")
  hide(monkeypatch, "scipy")
  idx, mask = next(iter(gnorm_jax.poisson_batches(10, 0.5, max_batch_size=10, seed=0)))
  assert idx.shape == mask.shape == (10,)


@pytest.mark.parametrize(
  "module,call",
  [
    ("sklearn", lambda: demo.make_data(demo.Config())),
    ("tqdm", lambda: demo.train(demo.RUNS, demo.Config(steps=1), None, None, None)),
    ("matplotlib", lambda: demo.main(["--steps", "1"])),  # before training, not after
    ("matplotlib", lambda: demo.plot(demo.RUNS, {}, [], np.ones(3), [], "unused.png")),
  ],
  ids=["sklearn", "tqdm", "matplotlib_main", "matplotlib_plot"],
)
def test_demo_without_its_extra_names_it(monkeypatch, module, call):
  hide(monkeypatch, module)
  with pytest.raises(ImportError, match=DEMO_MISSING):
    call()


# ---------------------------------------------------------------------------
# python -OO strips docstrings.


def test_imports_under_python_OO():
  proc = subprocess.run(
    [sys.executable, "-OO", "-c", "import gnorm_jax, gnorm_jax.demo"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------
# Shipped text: what the library does and measures now, not the history of its making.


HISTORY = re.compile(
  r"\b[Ii]ssue #?\d|\b[Dd]efect #?\d|\bwas lent\b|BENCHMARKS\.md|\bmissed\b|\(was \d"
  r"|\bwas \d[\d.]*\s?[×x]"
)


def _shipped_texts():
  for path in [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]:
    yield path.relative_to(ROOT), path.read_text()
  for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
    cells = json.loads(path.read_text())["cells"]
    yield path.relative_to(ROOT), "\n".join("".join(c["source"]) for c in cells)
  for path in sorted([*(ROOT / "gnorm_jax").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]):
    yield path.relative_to(ROOT), path.read_text()


SHIPPED = list(_shipped_texts())


@pytest.mark.parametrize("path,text", SHIPPED, ids=[str(path) for path, _ in SHIPPED])
def test_shipped_text_has_no_development_history(path, text):
  found = [m.group(0) for m in HISTORY.finditer(text)]
  assert not found, f"{path}: {found}"
