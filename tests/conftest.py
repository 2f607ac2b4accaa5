"""Float64 numpy references shared by the test files (import them: `from conftest import ...`)."""

import math

import jax
import numpy as np
import pytest

from gnorm_jax import _numerics

_FORM_AT_IMPORT = _numerics._FORCE_FORM


@pytest.fixture(autouse=True)
def _forced_forms_do_not_leak(monkeypatch):
  """After a test that forces one form of ``by_platform`` (``_numerics._FORCE_FORM``,
  set with this same ``monkeypatch``), JAX's caches are cleared: they key the
  traces of custom derivatives and jitted helpers by function, not by form, so a
  later test could otherwise be handed the forced form's trace. (Torn down before
  ``monkeypatch`` restores the form.)"""
  yield
  if _numerics._FORCE_FORM != _FORM_AT_IMPORT:
    jax.clear_caches()


def np_values(tree):
  """All leaves of ``tree`` as one float64 (complex128 for complex leaves) numpy vector."""
  leaves = [np.asarray(x) for x in jax.tree.leaves(tree)]
  if not leaves:
    return np.zeros(0)
  as64 = [x.astype(np.complex128 if np.iscomplexobj(x) else np.float64).ravel() for x in leaves]
  return np.concatenate(as64)


def np_norm(tree, ord=None):
  """The norm of all leaves of ``tree`` as one vector, in float64: ord None/2, 1 or inf."""
  x = np.abs(np_values(tree))
  if ord == 1:
    return x.sum()
  if ord == math.inf:
    return x.max(initial=0.0)
  return np.sqrt(np.sum(x * x))
