"""The shared reference harness of the per-example engine's tests.

Every check compares gnorm_jax against an independent reference,
``jax.vmap(jax.grad(loss))``, whose per-example gradients are measured, clipped
and summed in float64 numpy. A rule's test module (``tests/rules/test_<rule>.py``)
builds models that use its layer and calls :func:`check` (values of every
method) and :func:`check_plan` (every leaf ruled, by the rules named).

A module with zoo models (builders in ``per_example_models``) exposes them as ``MODELS``
(name -> a function of no arguments returning ``(loss, params, batch)``) and gets the two
zoo tests, every model against vmap(grad) under every method and its plan, from
:func:`zoo_tests`::

  test_zoo_matches_vmap_of_grad, test_zoo_plan_materializes_nothing = zoo_tests(MODELS, RULES)

:func:`all_models` gathers the MODELS of every such module.
"""

import functools
import importlib.util
import pathlib
import sys

import jax
import numpy as np
import pytest

import gnorm_jax

RTOL = 2e-4
METHODS = ("auto", "ghost")
# The rules a model may use unless the test names others (check_plan(..., rules=...)).
RULES = {"dot_general", "bias", "scale", "gather"}


def _batch_argnums(args, batch_argnums):
  return tuple(range(1, len(args) + 1)) if batch_argnums is None else batch_argnums


def _per_example_grads(loss, params, args, batch_argnums, jit=True):
  """The reference: vmap of jax.grad, its leaves widened to float64 (complex128)."""
  in_axes = (None,) + tuple(0 if i in batch_argnums else None for i in range(1, len(args) + 1))
  grads = jax.vmap(jax.grad(loss), in_axes=in_axes)
  leaves = jax.tree.leaves((jax.jit(grads) if jit else grads)(params, *args))
  assert all(np.all(np.isfinite(g)) for g in leaves), "the float32 reference overflowed"
  return [np.asarray(g).astype(np.result_type(g.dtype, np.float64)) for g in leaves]


def _norms(per_example):
  b = per_example[0].shape[0]
  return np.sqrt(sum(np.sum(np.abs(g.reshape(b, -1)) ** 2, axis=1) for g in per_example))


def _clipped_sum(per_example, max_norm):
  """Σᵢ wᵢgᵢ and Σᵢ wᵢ|gᵢ| (the size of the summed terms, which bounds float32 rounding)."""
  norms = _norms(per_example)
  w = np.minimum(1.0, max_norm / np.where(norms > 0, norms, 1.0))
  clipped = [np.tensordot(w, g, axes=1) for g in per_example]
  return clipped, [np.tensordot(w, np.abs(g), axes=1) for g in per_example]


def _assert_tree_close(got, want, magnitude, what):
  """rtol RTOL; near-zero entries to RTOL of their leaf's largest summed term.

  A leaf that is zero in exact arithmetic (an attention key bias: softmax ignores it) holds
  float32 noise of the whole computation, so no leaf is held tighter than about one float32
  rounding of the largest term in the tree.
  """
  got = jax.tree.leaves(got)
  assert len(got) == len(want), what
  floor = 1e-3 * max(np.max(m) for m in magnitude)
  for i, (g, w, m) in enumerate(zip(got, want, magnitude)):
    assert g.shape == w.shape, (what, i, g.shape, w.shape)
    atol = RTOL * max(np.max(m), floor)
    np.testing.assert_allclose(np.asarray(g), w, rtol=RTOL, atol=atol, err_msg=f"{what}, leaf {i}")


def _run(loss, params, args, batch_argnums, method, max_norm, jit=True):
  """(norms, clipped mean, its norms, clipped sum) of one method, from one (jitted) call."""
  kw = dict(batch_argnums=batch_argnums, method=method)
  norms_fn = gnorm_jax.per_example_grad_norms(loss, **kw)
  mean_fn = gnorm_jax.clipped_grad(loss, max_norm=max_norm, return_norms=True, **kw)
  sum_fn = gnorm_jax.clipped_grad(loss, max_norm=max_norm, reduce="sum", **kw)
  run = lambda *a: (norms_fn(*a), *mean_fn(*a), sum_fn(*a))
  return (jax.jit(run) if jit else run)(params, *args)


def _assert_norms(got, want, what):
  assert np.all(np.isfinite(got)) and np.all(np.asarray(got) >= 0), (what, got)
  np.testing.assert_allclose(got, want, rtol=RTOL, err_msg=what)


def check(loss, params, *args, batch_argnums=None, methods=METHODS, jit=True):
  """Norms, clipped mean and clipped sum of every method in `methods` against vmap(grad)."""
  batch_argnums = _batch_argnums(args, batch_argnums)
  per_example = _per_example_grads(loss, params, args, batch_argnums, jit)
  want_norms = _norms(per_example)
  max_norm = float(np.median(want_norms))  # about half the examples are clipped
  want_sum, magnitude = _clipped_sum(per_example, max_norm)
  b = len(want_norms)
  for method in methods:
    norms, mean, norms2, total = _run(loss, params, args, batch_argnums, method, max_norm, jit)
    _assert_norms(norms, want_norms, f"{method} per_example_grad_norms")
    _assert_norms(norms2, want_norms, f"{method} clipped_grad norms")
    assert jax.tree.structure(mean) == jax.tree.structure(params), method
    _assert_tree_close(
      mean, [s / b for s in want_sum], [m / b for m in magnitude], f"{method} clipped mean"
    )
    _assert_tree_close(total, want_sum, magnitude, f"{method} clipped sum")


def check_plan(loss, params, *args, batch_argnums=None, rules=None):
  """per_example_plan names every parameter leaf and routes none of them to materialization;
  each leaf's rules are among ``rules`` (default RULES)."""
  batch_argnums = _batch_argnums(args, batch_argnums)
  plan = gnorm_jax.per_example_plan(loss, batch_argnums=batch_argnums)(params, *args)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  assert {leaf.path: tuple(leaf.shape) for leaf in plan.leaves} == {
    jax.tree_util.keystr(path): x.shape for path, x in leaves
  }
  table = str(plan)
  for leaf in plan.leaves:
    assert leaf.route in ("ghost", "direct"), f"{leaf.path}: route {leaf.route!r} ({leaf.why})"
    assert leaf.rules and set(leaf.rules) <= (RULES if rules is None else set(rules)), (
      leaf.path,
      leaf.rules,
    )
    assert leaf.path in table, (leaf.path, table)
  return plan


# ------------------------------------------------------------------ the zoo against vmap


# Compiling is most of the zoo's time; LLVM's optimizations of XLA's CPU code were a fifth of it,
# and these tiny models do not need them (XLA's own HLO passes still run).
QUICK_COMPILE = {"xla_backend_optimization_level": 0}


# Loss scales every zoo model is checked at: the engine's norms and sums must neither overflow
# nor underflow where float32 holds the per-example gradients themselves.
SCALES = (1.0, 1e20, 1e-20)


def case_runner(models: dict):
  """A cached function of a model's name: its params, reference per-example gradients, max_norm,
  and every method's results at every loss scale in SCALES (or the error a method raised).

  The methods are traced separately but compiled as one jit, the loss scale and threshold its
  arguments: XLA merges what their graphs share (all of it when every leaf has a rule), which
  saves a third of their compile time, and the scales cost no compile. The reference is
  vmap(grad) at scale 1, scaled exactly in float64 (the gradient is linear in the loss scale).
  """

  @functools.cache
  def case(name):
    loss, params, batch = models[name]()
    batch_argnums = tuple(range(1, len(batch) + 1))
    per_example = _per_example_grads(loss, params, batch, batch_argnums)
    max_norm = float(np.median(_norms(per_example)))  # about half the examples are clipped
    errors = {}

    def methods(params, batch, scale, threshold):
      def scaled(p, *b):
        value = loss(p, *b)
        return value * scale.astype(value.dtype)

      results = {}
      for method in METHODS:
        try:
          results[method] = _run(scaled, params, batch, batch_argnums, method, threshold, jit=False)
        except Exception as e:  # raised again by that method's test
          errors[method] = e
      return results

    compiled = jax.jit(methods, compiler_options=QUICK_COMPILE)
    results = {
      s: compiled(params, tuple(batch), np.float32(s), np.float32(s * max_norm)) for s in SCALES
    }
    return params, per_example, max_norm, results, errors

  return case


def check_case(case, name, method, scale=1.0):
  """The zoo's `check` for one method of a cached case, at loss scale ``scale``."""
  params, per_example, max_norm, results, errors = case(name)
  if method in errors:
    raise errors[method]
  per_example = [g * scale for g in per_example]
  want_norms = _norms(per_example)
  want_sum, magnitude = _clipped_sum(per_example, max_norm * scale)
  b = len(want_norms)
  norms, mean, norms2, total = results[scale][method]
  what = f"{method} at loss scale {scale:g}"
  _assert_norms(norms, want_norms, f"{what}: per_example_grad_norms")
  _assert_norms(norms2, want_norms, f"{what}: clipped_grad norms")
  assert jax.tree.structure(mean) == jax.tree.structure(params), method
  _assert_tree_close(
    mean, [s / b for s in want_sum], [m / b for m in magnitude], f"{what}: clipped mean"
  )
  _assert_tree_close(total, want_sum, magnitude, f"{what}: clipped sum")


def zoo_tests(models: dict, rules=None):
  """The zoo's two tests of ``models``: (every model and method against vmap(grad) by
  :func:`check_case`, every model's plan by :func:`check_plan` with ``rules``), to be bound at
  module level under the names ``test_...`` pytest collects."""
  case = case_runner(models)

  @pytest.mark.parametrize("scale", SCALES, ids=[f"{s:g}" for s in SCALES])
  @pytest.mark.parametrize("method", METHODS)
  @pytest.mark.parametrize("name", sorted(models))
  def test_zoo_matches_vmap_of_grad(name, method, scale):
    check_case(case, name, method, scale)

  @pytest.mark.parametrize("name", sorted(models))
  def test_zoo_plan_materializes_nothing(name):
    loss, params, batch = models[name]()
    check_plan(loss, params, *batch, rules=rules)

  return test_zoo_matches_vmap_of_grad, test_zoo_plan_materializes_nothing


_TESTS = pathlib.Path(__file__).resolve().parent
MODEL_MODULES = ("rules/test_*.py", "test_per_example_control.py")


def _module(path: pathlib.Path):
  """The test module at ``path``, imported under its file name as pytest's default import mode
  does (the one pytest already imported, if it did)."""
  name = path.stem
  module = sys.modules.get(name)
  if module is not None and pathlib.Path(module.__file__).resolve() == path:
    return module
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[name]
    raise
  return module


def all_models() -> dict:
  """Every zoo model: the union of ``MODELS`` of tests/rules/test_*.py and
  tests/test_per_example_control.py. Raises ValueError if two modules name a model alike."""
  models, where = {}, {}
  paths = sorted({p for pattern in MODEL_MODULES for p in _TESTS.glob(pattern)})
  for path in paths:
    for name, build in getattr(_module(path), "MODELS", {}).items():
      if name in models:
        raise ValueError(
          f"zoo model {name!r} is defined by both {where[name]} and {path.name}; rename one"
        )
      models[name], where[name] = build, path.name
  return models
