"""Float64 numpy references shared by the test files (import them: `from conftest import ...`)."""

import math

import jax
import numpy as np


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
