"""The plan ``per_example_plan`` prints is the plan the engine executes, on every JAX.

* For every zoo model and every option that can change a plan (method, a global or per-leaf
  threshold, microbatches) or should not (mask, nan_safe), the call is traced (``eval_shape``:
  nothing is compiled) with an observer on the run stage; the plan it executed, described, must
  equal what ``per_example_plan`` returns, and each leaf's route the one the run took.
* Every zoo model's routes equal the ones committed in ``per_example_routes.json``, on every
  JAX version CI runs (the floor and the newest): the adapter must read each JAX alike.
  ``python tests/test_per_example_plan.py`` rewrites that file (review the diff).
"""

import dataclasses
import functools
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from per_example_harness import all_models

import gnorm_jax
from gnorm_jax._per_example import _api, _plan, _run

ROUTES_FILE = pathlib.Path(__file__).with_name("per_example_routes.json")
MODELS = all_models()


@functools.cache
def _model(name):
  loss, params, batch = MODELS[name]()
  return loss, params, tuple(batch)


def _options(params, batch_size):
  """(name, per_example_plan options, call options) of every option worth a plan."""
  tree = jax.tree.map(lambda _: 1.0, params)  # one threshold per leaf: no streaming
  mask = jnp.arange(batch_size) % 3 != 2
  mb = max(1, batch_size // 2)
  return [
    ("norms", dict(), None),
    ("ghost norms", dict(method="ghost"), None),
    ("engine", dict(method="engine", max_norm=1.0), dict(max_norm=1.0)),
    ("vmap", dict(method="vmap", max_norm=1.0), dict(max_norm=1.0)),
    ("global threshold", dict(max_norm=1.0), dict(max_norm=1.0)),
    ("threshold tree", dict(max_norm=tree), dict(max_norm=tree)),
    ("mask, nan_safe", dict(max_norm=1.0), dict(max_norm=1.0, mask=mask, nan_safe=True)),
    (
      "microbatches",
      dict(max_norm=1.0, microbatch_size=mb),
      dict(max_norm=1.0, microbatch_size=mb),
    ),
  ]


def _executed(loss, params, batch, kw, call):
  """Traces the call with an observer on the run stage: [(described plan, routes taken)]."""
  seen = []

  def observe(plan, taken):
    paths = _api._param_paths(params)
    shapes = [tuple(w.shape) for w in jax.tree.leaves(params)]
    seen.append((_api.describe(plan, paths, shapes), taken))

  batch_argnums = tuple(range(1, len(batch) + 1))
  method = kw.get("method", "auto")
  if call is None:
    fn = gnorm_jax.per_example_grad_norms(loss, batch_argnums=batch_argnums, method=method)
    run = lambda p, *b: fn(p, *b)
  else:
    call = dict(call)
    mask = call.pop("mask", None)
    fn = gnorm_jax.clipped_grad(loss, batch_argnums=batch_argnums, method=method, **call)
    run = lambda p, *b: fn(p, *b, mask=mask)
  old, _run._observe = _run._observe, observe
  try:
    jax.eval_shape(run, params, *batch)
  finally:
    _run._observe = old
  return seen


@pytest.mark.parametrize("name", sorted(MODELS))
def test_printed_plan_is_the_executed_plan(name):
  loss, params, batch = _model(name)
  batch_argnums = tuple(range(1, len(batch) + 1))
  b = jax.tree.leaves(batch)[0].shape[0]
  for what, kw, call in _options(params, b):
    if kw.get("method") == "ghost" and _routes(name, "auto")[1]:
      continue  # a fallback leaf: method="ghost" raises (tested where the zoo runs it)
    printed = gnorm_jax.per_example_plan(loss, batch_argnums=batch_argnums, **kw)(params, *batch)
    seen = _executed(loss, params, batch, kw, call)
    assert seen, (name, what, "the run stage was never reached")
    for executed, taken in seen:  # one trace per microbatch loop body
      assert executed == printed, (name, what, str(executed), str(printed))
      assert str(executed) == str(printed), (name, what)
      for i, leaf in enumerate(printed.leaves):
        want = f"streamed {leaf.route}" if leaf.streamed else leaf.route
        if printed.method == "vmap":
          want = "materialized"
        assert taken[i] == want, (name, what, leaf.path, taken[i], want)


@functools.cache
def _routes(name, method):
  """({leaf path: route, with "+streamed"}, whether any leaf is materialized) of a model."""
  loss, params, batch = _model(name)
  plan = gnorm_jax.per_example_plan(
    loss, batch_argnums=tuple(range(1, len(batch) + 1)), method=method
  )(params, *batch)
  routes = {leaf.path: leaf.route + ("+streamed" if leaf.streamed else "") for leaf in plan.leaves}
  return routes, any(leaf.route == "materialized" for leaf in plan.leaves)


def _all_routes():
  return {name: _routes(name, "auto")[0] for name in sorted(MODELS)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_routes_are_the_committed_ones_on_this_jax(name):
  committed = json.loads(ROUTES_FILE.read_text())
  assert name in committed, (
    f"{name} has no committed routes: run `python tests/test_per_example_plan.py`"
  )
  assert _routes(name, "auto")[0] == committed[name], (
    f"{name}: routes on JAX {jax.__version__} differ from the committed ones"
  )


def test_committed_routes_name_only_models_that_exist():
  assert set(json.loads(ROUTES_FILE.read_text())) == set(MODELS)


def test_plan_object_reports_vmap_only_when_it_runs_vmap():
  loss = lambda w, x: jnp.sum(jnp.tanh(x @ w))
  w, x = jnp.ones((3, 2)), np.ones((4, 5, 3), np.float32)
  assert gnorm_jax.per_example_plan(loss)(w, x).method == "engine"
  plan = gnorm_jax.per_example_plan(loss, method="vmap")(w, x)
  assert plan.method == "vmap" and {leaf.route for leaf in plan.leaves} == {"materialized"}


def _tiny_and_large():
  tiny = (lambda w, x: jnp.sum(jnp.tanh(x @ w)), jnp.ones((3, 2)), np.ones((4, 5, 3), np.float32))
  big = (
    lambda w, x: jnp.sum(jnp.tanh(x @ w)),
    jnp.ones((1024, 1024)),
    np.ones((256, 1, 1024), np.float32),
  )
  return tiny, big


def test_auto_keeps_the_engine_on_cpu_and_shows_both_estimates():
  for loss, w, x in _tiny_and_large():
    plan = gnorm_jax.per_example_plan(loss)(w, x)
    assert plan.method == "engine" and plan.platform == jax.default_backend() == "cpu"
    e = plan.estimates
    assert e["engine"] > 0 and e["vmap"] > 0 and e["vmap_bytes"] == 4 * w.size * x.shape[0]
    assert "estimated on cpu" in str(plan)


def test_auto_on_a_gpu_runs_vmap_where_estimated_faster_and_small(monkeypatch):
  monkeypatch.setattr(_plan, "_PLATFORM", "gpu")
  (loss, w, x), (big_loss, big_w, big_x) = _tiny_and_large()
  # XLA:GPU compiles the tiny model's engine and vmap(grad) to as many kernels (six):
  # the estimates are about equal, and "auto" keeps the engine.
  plan = gnorm_jax.per_example_plan(loss, max_norm=1.0)(w, x)
  assert plan.method == "engine"
  assert 0.8 * plan.estimates["engine"] < plan.estimates["vmap"] <= plan.estimates["engine"]
  # On a backend where the engine's call costs more kernels, materializing 4
  # gradients of 6 numbers is estimated cheaper, and "auto" runs vmap.
  gpu = _plan.MACHINES["gpu"]
  costly = dataclasses.replace(gpu, call_kernels={**gpu.call_kernels, "engine": 20})
  monkeypatch.setitem(_plan.MACHINES, "gpu", costly)
  plan = gnorm_jax.per_example_plan(loss, max_norm=1.0)(w, x)
  assert plan.method == "vmap" and plan.estimates["vmap"] <= 0.8 * plan.estimates["engine"]
  executed = _executed(loss, w, (x,), dict(max_norm=1.0), dict(max_norm=1.0))
  assert [p.method for p, _ in executed] == ["vmap"]
  got = gnorm_jax.clipped_grad(loss, max_norm=1.0)(w, x)
  want = gnorm_jax.clipped_grad(loss, max_norm=1.0, method="engine")(w, x)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # 256 gradients of a 1024x1024 weight: 1 GiB, where the engine's ghost route needs none.
  big = gnorm_jax.per_example_plan(big_loss)(big_w, big_x)
  assert big.method == "engine" and big.estimates["vmap_bytes"] == 2**30
  # method="engine" never switches.
  assert gnorm_jax.per_example_plan(loss, method="engine")(w, x).method == "engine"


if __name__ == "__main__":
  ROUTES_FILE.write_text(json.dumps(_all_routes(), indent=1, sort_keys=True) + "\n")
  print(f"wrote {ROUTES_FILE} ({len(MODELS)} models) with JAX {jax.__version__}", file=sys.stderr)
