"""The cost model's estimates rank the alternatives as their compiled programs do.

``per_example_plan`` estimates what each alternative adds to the plain gradient
(flops, bytes and kernels priced with the backend's constants) without
compiling anything. Here each alternative is compiled on the benchmark models
(small sizes) and measured from the optimized program itself: XLA's cost
analysis gives its flops and bytes accessed, the census its kernels, priced
with the same CPU constants; the CPU form's rare paths (conditionals taken on
non-finite, overflowing or cancelling examples) are left out. No clock is
read: the checks are on ranking, not seconds.

* ``method="vmap"`` against the engine: the estimated ratio of what each adds
  to the plain gradient is within a factor of two of the compiled one on every
  model where the two differ, picks the same winner wherever the compiled costs differ by
  more than half, and orders any two models whose compiled ratios differ by more than
  half as those do. Where one alternative's compiled program adds less than a tenth of
  the plain gradient's cost (below what the measure resolves), the estimate names it
  the cheaper by a clear margin instead.
* The mixed rule (each leaf on its cheaper route) against the ghost route on
  every leaf that has one: wherever the estimates prefer the mix, so does the
  compiled program, and on a layer over a long sequence the direct route saves
  most of the ghost route's cost in both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

import gnorm_jax
from gnorm_jax import _numerics
from gnorm_jax._per_example import _plan

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))
import _models  # noqa: E402
import per_example as bench  # noqa: E402
from _census import _entry, _kernels  # noqa: E402

CPU = _plan.MACHINES["cpu"]


def _long_sequence(key):
  """A layer over 256 positions of 8 features: each example's gradient is 8×8,
  its ghost Gram 256×256. The direct route is far cheaper."""
  k1, k2, k3 = jax.random.split(key, 3)
  params = {"w": jax.random.normal(k1, (8, 8)) / 3, "b": jnp.zeros(8)}

  def loss(p, x, y):
    return jnp.mean((jnp.tanh(x @ p["w"] + p["b"]) - y) ** 2)

  x = jax.random.normal(k2, (8, 256, 8))
  y = jax.random.normal(k3, (8, 256, 8))
  return loss, params, (x, y)


BUILDERS = {
  "mlp": lambda k: bench.mlp(k, [512, 256, 256, 10], 64),
  "transformer": lambda k: bench.transformer(k, 8, 32, d=64, vocab=128),
  "gpt": lambda k: _models.gpt(k, batch=8, seq=16, d=32, heads=4, vocab=500),
  "cnn": lambda k: _models.cnn(k, batch=8),
  "lstm": lambda k: _models.lstm(k, batch=8, seq=8, hidden=16),
  "long_sequence": _long_sequence,
}


def compiled_seconds(fn, *args) -> float:
  """The compiled program's flops, bytes accessed and kernels, priced for the CPU.

  Its rare paths (the CPU form's conditionals: rescaled norms, cancellation
  rescue, non-finite examples) are left out of the trace: XLA's cost analysis
  counts a conditional's dearest branch, and the estimates price what a call
  on ordinary data runs."""
  # Traces are cached by function and argument types, not by the switch: the
  # caches are cleared on both sides of it.
  jax.clear_caches()
  _numerics._COMMON_ONLY = True
  try:
    compiled = jax.jit(fn).lower(*args).compile()
  finally:
    _numerics._COMMON_ONLY = False
    jax.clear_caches()
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
    analysis = analysis[0]
  text = compiled.as_text()
  return CPU.seconds(analysis["flops"], analysis["bytes accessed"], _kernels(text, _entry(text)))


@contextlib.contextmanager
def _ghost_everywhere():
  """Plans made inside take the ghost route on every leaf that has one."""
  mixed = _plan.plan_leaf

  def ghost(uses, w, b, platform="cpu"):
    r = mixed(uses, w, b, platform)
    options = {name: (flops, nbytes) for name, flops, nbytes in r.options}
    if "ghost" not in options:
      return r
    flops, nbytes = options["ghost"]
    return dataclasses.replace(r, route="ghost", flops=flops, bytes=nbytes)

  _plan.plan_leaf = ghost
  try:
    yield
  finally:
    _plan.plan_leaf = mixed


def _costs(name):
  loss, params, batch = BUILDERS[name](jax.random.PRNGKey(0))
  argnums = tuple(range(1, 1 + len(batch)))

  def clipped(method):
    fn = gnorm_jax.clipped_grad(loss, max_norm=1.0, batch_argnums=argnums, method=method)
    return compiled_seconds(fn, params, *batch)

  def plain(p, *b):
    return jax.grad(lambda p: jnp.mean(jax.vmap(lambda *e: loss(p, *e))(*b)))(p)

  def plan(method):
    make = gnorm_jax.per_example_plan(loss, batch_argnums=argnums, max_norm=1.0, method=method)
    return make(params, *batch)

  base = compiled_seconds(plain, params, *batch)
  mixed = plan("engine")
  compiled = {m: clipped(m) - base for m in ("engine", "vmap")}
  with _ghost_everywhere():
    ghost = plan("engine")
    compiled["ghost"] = clipped("engine") - base
  return {
    "plain": base,
    "compiled": compiled,
    "estimated": {
      "engine": mixed.estimates["engine"],
      "vmap": mixed.estimates["vmap"],
      "ghost": ghost.estimates["engine"],
    },
    "routes": [leaf.route for leaf in mixed.leaves],
    "ghost_routes": [leaf.route for leaf in ghost.leaves],
  }


@pytest.fixture(scope="module")
def costs():
  return {name: _costs(name) for name in BUILDERS}


def _ratio(c, kind):
  return c[kind]["vmap"] / c[kind]["engine"]


# The models whose engine and vmap(grad) differ. The long-sequence layer's only
# weight goes direct, and its engine compiles to vmap's program: both add next
# to nothing to the plain gradient (its ghost route is what it checks).
RANKED = [name for name in BUILDERS if name != "long_sequence"]


# What a compiled program adds is resolved no finer than this fraction of the plain
# gradient's own cost: XLA's cost analysis counts one contraction differently as a
# convolution and as a dot (the CNN's engine, whose per-example kernel gradients are dots
# of gathered patches, counts 15% fewer flops than the plain gradient, whose kernel
# gradients are convolutions). Below it, a ratio of added costs is not defined.
RESOLUTION = 0.1


def _resolved(c, kind):
  return c["compiled"][kind] >= RESOLUTION * c["plain"]


@pytest.mark.parametrize("name", RANKED)
def test_estimated_vmap_to_engine_ratio_is_within_two_of_the_compiled(costs, name):
  c = costs[name]
  assert all(v > 0 for v in c["estimated"].values()), c
  estimated = _ratio(c, "estimated")
  if not _resolved(c, "engine") or not _resolved(c, "vmap"):
    # One alternative adds next to nothing: the estimate must name it, by a clear margin.
    cheap = "engine" if c["compiled"]["engine"] < c["compiled"]["vmap"] else "vmap"
    assert _resolved(c, "vmap" if cheap == "engine" else "engine"), c
    assert (estimated > 3 / 2) if cheap == "engine" else (estimated < 2 / 3), (name, c)
    return
  compiled = _ratio(c, "compiled")
  assert abs(math.log(estimated / compiled)) <= math.log(2), (name, estimated, compiled)
  if not 2 / 3 <= compiled <= 3 / 2:  # a clear winner: the estimate names it
    assert (estimated > 1) == (compiled > 1), (name, estimated, compiled)


def test_estimates_order_the_models_as_the_compiled_programs_do(costs):
  # (The MLP's engine adds about a tenth of its plain gradient's cost: at the resolution.)
  ranked = [n for n in RANKED if _resolved(costs[n], "engine") and _resolved(costs[n], "vmap")]
  assert len(ranked) >= 3, ranked
  ratios = {n: (_ratio(costs[n], "estimated"), _ratio(costs[n], "compiled")) for n in ranked}
  for (a, (ea, ca)), (b, (eb, cb)) in itertools.combinations(ratios.items(), 2):
    if max(ca, cb) > 1.5 * min(ca, cb):  # clearly apart: the estimates order them alike
      assert (ea > eb) == (ca > cb), (a, ratios[a], b, ratios[b])


@pytest.mark.parametrize("name", list(BUILDERS))
def test_mixed_rule_is_cheaper_than_ghost_where_estimated(costs, name):
  c = costs[name]
  est, comp = c["estimated"], c["compiled"]
  if c["routes"] == c["ghost_routes"]:  # no leaf where the mix differs: the same program
    assert comp["engine"] == pytest.approx(comp["ghost"], rel=0.02), (name, comp)
  elif est["engine"] < 0.8 * est["ghost"]:  # estimated clearly cheaper: compiled cheaper
    assert comp["engine"] < comp["ghost"], (name, est, comp)


def test_the_long_sequence_layer_goes_direct_and_saves_most_of_the_ghost_cost(costs):
  c = costs["long_sequence"]
  assert set(c["routes"]) == {"direct"} and "ghost" in c["ghost_routes"], c
  comp = c["compiled"]
  assert abs(comp["engine"] - comp["vmap"]) <= 0.05 * c["plain"], c  # one program
  est, comp = c["estimated"], c["compiled"]
  assert est["engine"] < 0.5 * est["ghost"] and comp["engine"] < 0.5 * comp["ghost"], (est, comp)
