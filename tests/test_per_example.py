"""Per-example norms and clipped gradients: the ghost engine against vmap of jax.grad."""

import dataclasses
import math
import re

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import gnorm_jax
from gnorm_jax import _numerics
from gnorm_jax._per_example import _api, _jaxpr, _plan, _program


def analyze(closed, param_positions):
  return _program.build(_jaxpr.read(closed), param_positions)


RTOL = 2e-4


def _normal(key, *shape):
  return 0.5 * jax.random.normal(key, shape)


# ------------------------------------------------------------------ the zoo
# Each builder returns (loss, params, batch) with loss(params, *example).


def mlp(bias=True):
  k = jax.random.split(jax.random.key(0), 5)
  params = {"w1": _normal(k[0], 5, 7), "w2": _normal(k[1], 7, 3)}
  if bias:
    params.update(b1=_normal(k[2], 7), b2=_normal(k[3], 3))

  def loss(p, x, y):
    h = jnp.tanh(x @ p["w1"] + p.get("b1", 0.0))
    return jnp.sum((h @ p["w2"] + p.get("b2", 0.0) - y) ** 2)

  return loss, params, (_normal(k[4], 6, 5), _normal(k[2], 6, 3))


def transformer():
  vocab, d, heads, t = 11, 8, 2, 6
  k = iter(jax.random.split(jax.random.key(1), 16))
  params = {
    "emb": _normal(next(k), vocab, d),
    "wq": _normal(next(k), d, heads, d // heads),
    "wk": _normal(next(k), d, heads, d // heads),
    "wv": _normal(next(k), d, heads, d // heads),
    "wo": _normal(next(k), heads, d // heads, d),
    "ln1": 1 + _normal(next(k), d),
    "ln2": 1 + _normal(next(k), d),
    "w1": _normal(next(k), d, 16),
    "b1": _normal(next(k), 16),
    "w2": _normal(next(k), 16, d),
  }

  def ln(x, s):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * s

  def loss(p, tokens, targets):
    x = p["emb"][tokens]
    h = ln(x, p["ln1"])
    q = jnp.einsum("td,dhk->thk", h, p["wq"])
    kk = jnp.einsum("td,dhk->thk", h, p["wk"])
    v = jnp.einsum("td,dhk->thk", h, p["wv"])
    att = jax.nn.softmax(jnp.einsum("thk,shk->hts", q, kk), axis=-1)
    x = x + jnp.einsum("thk,hkd->td", jnp.einsum("hts,shk->thk", att, v), p["wo"])
    x = x + jax.nn.gelu(ln(x, p["ln2"]) @ p["w1"] + p["b1"]) @ p["w2"]
    logp = jax.nn.log_softmax(x @ p["emb"].T)  # tied output embedding
    return -jnp.mean(jnp.take_along_axis(logp, targets[:, None], axis=1))

  tokens = jax.random.randint(next(k), (4, t), 0, vocab)
  return loss, params, (tokens, jax.random.randint(next(k), (4, t), 0, vocab))


def cnn():
  k = jax.random.split(jax.random.key(2), 4)
  params = {"kernel": _normal(k[0], 3, 3, 1, 4), "w": _normal(k[1], 4 * 6 * 6, 3)}

  def loss(p, x, y):
    h = jax.lax.conv_general_dilated(
      x[None], p["kernel"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jnp.sum((jax.nn.relu(h).reshape(-1) @ p["w"] - y) ** 2)

  return loss, params, (_normal(k[2], 4, 8, 8, 1), _normal(k[3], 4, 3))


def gru():
  k = jax.random.split(jax.random.key(3), 5)
  params = {"wx": _normal(k[0], 3, 12), "wh": _normal(k[1], 4, 12), "out": _normal(k[2], 4, 2)}

  def loss(p, xs, y):
    def cell(h, x):
      r, u, c = jnp.split(x @ p["wx"] + h @ p["wh"], 3)
      u = jax.nn.sigmoid(u)
      return (1 - u) * h + u * jnp.tanh(c * jax.nn.sigmoid(r)), None

    h, _ = jax.lax.scan(cell, jnp.zeros(4), xs)
    return jnp.sum((h @ p["out"] - y) ** 2)

  return loss, params, (_normal(k[3], 4, 7, 3), _normal(k[4], 4, 2))


def shared_unrolled():
  k = jax.random.split(jax.random.key(4), 4)
  params = {"w": _normal(k[0], 5, 5), "u": _normal(k[1], 5, 5)}

  def loss(p, x, y):
    h = x
    for _ in range(3):  # the same weights at every step: one gradient, three uses
      h = jnp.tanh(h @ p["w"] + x @ p["u"].T)
    return jnp.sum((h - y) ** 2)

  return loss, params, (_normal(k[2], 4, 5), _normal(k[3], 4, 5))


def flax_linen():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(nn.LayerNorm()(nn.relu(nn.Dense(16)(x))))

  net = Net()
  k = jax.random.split(jax.random.key(5), 3)
  params = net.init(k[0], jnp.ones(5))
  return (
    lambda p, x, y: jnp.sum((net.apply(p, x) - y) ** 2),
    params,
    (_normal(k[1], 6, 5), _normal(k[2], 6, 3)),
  )


def flax_nnx():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(5, 16, rngs=rngs)
      self.l2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
      return self.l2(jax.nn.relu(self.l1(x)))

  graphdef, state = nnx.split(Net(nnx.Rngs(0)))
  k = jax.random.split(jax.random.key(6), 2)
  return (
    lambda s, x, y: jnp.sum((nnx.merge(graphdef, s)(x) - y) ** 2),
    state,
    (_normal(k[0], 6, 5), _normal(k[1], 6, 3)),
  )


def equinox_mlp():
  k = jax.random.split(jax.random.key(7), 3)
  params, static = eqx.partition(eqx.nn.MLP(5, 3, 16, 2, key=k[0]), eqx.is_array)
  return (
    lambda p, x, y: jnp.sum((eqx.combine(p, static)(x) - y) ** 2),
    params,
    (_normal(k[1], 6, 5), _normal(k[2], 6, 3)),
  )


ZOO = {
  "mlp": lambda: mlp(bias=True),
  "mlp_no_bias": lambda: mlp(bias=False),
  "transformer": transformer,
  "cnn": cnn,
  "gru_scan": gru,
  "shared_unrolled": shared_unrolled,
  "flax_linen": flax_linen,
  "flax_nnx": flax_nnx,
  "equinox": equinox_mlp,
}


def _reference(loss, params, batch, max_norm, reduce="mean"):
  """vmap of jax.grad, clipped and reduced in float64 numpy."""
  per_ex = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, *batch)
  leaves = [np.asarray(g, np.float64) for g in jax.tree.leaves(per_ex)]
  b = leaves[0].shape[0]
  norms = np.sqrt(sum(np.sum(g.reshape(b, -1) ** 2, axis=1) for g in leaves))
  w = np.minimum(1.0, max_norm / np.where(norms > 0, norms, 1.0))
  clipped = [np.tensordot(w, g, axes=1) / (b if reduce == "mean" else 1) for g in leaves]
  return norms, jax.tree.unflatten(jax.tree.structure(per_ex), clipped)


def _assert_tree_close(got, want, rtol=RTOL):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    scale = np.max(np.abs(w)) + 1e-30
    np.testing.assert_allclose(np.asarray(g, np.float64) / scale, w / scale, atol=rtol, rtol=0)


# Eagerly (no jit) once, on the MLP: op-by-op dispatch of a larger model only costs CI time.
@pytest.mark.parametrize("name,jit", [(name, True) for name in sorted(ZOO)] + [("mlp", False)])
def test_zoo_matches_vmap_reference(name, jit):
  loss, params, batch = ZOO[name]()
  want_norms, _ = _reference(loss, params, batch, 1.0)
  max_norm = float(np.median(want_norms))  # half the examples are clipped
  _, want = _reference(loss, params, batch, max_norm)
  norms_fn = gnorm_jax.per_example_grad_norms(loss, batch_argnums=(1, 2))
  clip_fn = gnorm_jax.clipped_grad(loss, max_norm=max_norm, batch_argnums=(1, 2), return_norms=True)
  if jit:
    norms_fn, clip_fn = jax.jit(norms_fn), jax.jit(clip_fn)
  norms = norms_fn(params, *batch)
  grads, norms2 = clip_fn(params, *batch)
  np.testing.assert_allclose(norms, want_norms, rtol=RTOL)
  np.testing.assert_allclose(norms2, want_norms, rtol=RTOL)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  _assert_tree_close(grads, want)


@pytest.mark.parametrize("name", ["mlp", "transformer", "shared_unrolled"])
def test_reduce_sum_and_vmap_method(name):
  loss, params, batch = ZOO[name]()
  _, want = _reference(loss, params, batch, 0.5, reduce="sum")
  for method in ("auto", "vmap"):
    got = jax.jit(
      gnorm_jax.clipped_grad(loss, max_norm=0.5, batch_argnums=(1, 2), reduce="sum", method=method)
    )(params, *batch)
    _assert_tree_close(got, want)


def test_x64():
  with jax.enable_x64(True):
    loss, params, batch = transformer()
    params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    want_norms, want = _reference(loss, params, batch, 0.3)
    grads, norms = jax.jit(
      gnorm_jax.clipped_grad(loss, max_norm=0.3, batch_argnums=(1, 2), return_norms=True)
    )(params, *batch)
    assert norms.dtype == jnp.float64
    np.testing.assert_allclose(norms, want_norms, rtol=1e-12)
    _assert_tree_close(grads, want, rtol=1e-12)


# --------------------------------------------- both ghost and direct, every layout

EINSUMS = [
  ("d,dk->k", (5,), (5, 4)),  # vector activation (T = 1)
  ("td,dk->tk", (6, 5), (5, 4)),  # sequence
  ("td,kd->tk", (6, 5), (4, 5)),  # transposed weight, contracted on its last axis
  ("thk,hkd->td", (6, 2, 3), (2, 3, 4)),  # two contracted axes
  ("td,dhk->thk", (6, 5), (5, 2, 3)),  # two free parameter axes
  ("htk,hkn->htn", (2, 6, 3), (2, 3, 4)),  # a batch (head) axis shared with the weight
  ("tk,hkn->htn", (6, 3), (2, 3, 4)),  # parameter with a free head axis
]


@pytest.mark.parametrize("spec,act_shape,w_shape", EINSUMS)
@pytest.mark.parametrize("plan", ["ghost", "direct"])
@pytest.mark.parametrize("param_side", ["rhs", "lhs"])
def test_every_layout_in_both_plans(monkeypatch, spec, act_shape, w_shape, plan, param_side):
  ins, out = spec.split("->")
  a_spec, w_spec = ins.split(",")
  k = jax.random.split(jax.random.key(8), 3)
  w = _normal(k[0], *w_shape)

  def loss(w, x):
    z = (
      jnp.einsum(f"{a_spec},{w_spec}->{out}", x, w)
      if param_side == "rhs"
      else jnp.einsum(f"{w_spec},{a_spec}->{out}", w, x)
    )
    return jnp.sum(jnp.sin(z))

  x = _normal(k[1], 4, *act_shape)
  forced = []
  planned = _plan.plan_leaf

  def forced_plan(*args):
    route = planned(*args)
    forced.append(route.route)
    return dataclasses.replace(route, route=plan)

  monkeypatch.setattr(_plan, "plan_leaf", forced_plan)
  got_clip, got = jax.jit(gnorm_jax.clipped_grad(loss, max_norm=0.7, return_norms=True))(w, x)
  monkeypatch.undo()
  want_norms, want = _reference(lambda w, x, _: loss(w, x), w, (x, x), 0.7)
  assert forced, "the einsum parameter should have been recognized"
  if plan == "ghost":  # every layout of a dot has a ghost factorization
    assert _plan._ghost_static(analyze(jax.make_jaxpr(loss)(w, x[0]), {0: 0}).uses[0][0], w.ndim)
  np.testing.assert_allclose(got, want_norms, rtol=RTOL)
  _assert_tree_close(got_clip, want)


# ------------------------------------------------------------------ analysis


def _classify(name):
  loss, params, batch = ZOO[name]()
  single = [jax.ShapeDtypeStruct(b.shape[1:], b.dtype) for b in batch]
  closed = jax.make_jaxpr(loss)(params, *single)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  analysis = analyze(closed, {i: i for i in range(len(leaves))})
  paths = [jax.tree_util.keystr(p) for p, _ in leaves]
  return {paths[i] for i in analysis.recognized}, {paths[i] for i in analysis.fallback}


@pytest.mark.parametrize(
  "name,recognized,fallback",
  [
    ("mlp", {"['w1']", "['w2']", "['b1']", "['b2']"}, set()),
    (
      "transformer",  # emb: gather + tied matmul; ln: scales; b1: bias
      {
        "['wq']",
        "['wk']",
        "['wv']",
        "['wo']",
        "['w1']",
        "['w2']",
        "['emb']",
        "['ln1']",
        "['ln2']",
        "['b1']",
      },
      set(),
    ),
    ("cnn", {"['w']", "['kernel']"}, set()),
    ("gru_scan", {"['out']", "['wx']", "['wh']"}, set()),  # scan bodies are looked into
    ("shared_unrolled", {"['w']", "['u']"}, set()),
  ],
)
def test_analysis_recognizes_ruled_uses(name, recognized, fallback):
  assert _classify(name) == (recognized, fallback)


def test_ghost_method_names_unrecognized_leaves():
  def loss(p, x, y):  # a parameter as a floor of the activations: no rule for max
    return jnp.sum((jnp.maximum(x @ p["w"], p["c"]) - y) ** 2)

  params = {"w": jnp.ones((5, 3)), "c": jnp.ones(3)}
  batch = (jnp.ones((4, 5)), jnp.zeros((4, 3)))
  with pytest.raises(ValueError, match=r"\['c'\]: used by max.*method='auto'"):
    gnorm_jax.per_example_grad_norms(loss, batch_argnums=(1, 2), method="ghost")(params, *batch)
  np.testing.assert_allclose(
    gnorm_jax.per_example_grad_norms(loss, batch_argnums=(1, 2))(params, *batch),
    _reference(loss, params, batch, 1.0)[0],
    rtol=RTOL,
  )
  loss, params, batch = mlp(bias=True)
  norms = gnorm_jax.per_example_grad_norms(loss, batch_argnums=(1, 2), method="ghost")(
    params, *batch
  )
  np.testing.assert_allclose(norms, _reference(loss, params, batch, 1.0)[0], rtol=RTOL)


def test_planner_prefers_ghost_for_short_sequences_and_direct_for_long():
  def loss(w, x):
    return jnp.sum(jnp.tanh(x @ w))

  w = jnp.ones((64, 64))
  for t, want in [(4, "ghost"), (200, "direct")]:
    closed = jax.make_jaxpr(loss)(w, jax.ShapeDtypeStruct((t, 64), jnp.float32))
    uses = analyze(closed, {0: 0}).uses[0]
    assert _plan.plan_leaf(uses, w, 8).route == want


# ------------------------------------------------------------------ API details


def test_tuple_argnums_and_pytree_batch():
  loss, params, (x, y) = mlp()
  w1, rest = params["w1"], {k: v for k, v in params.items() if k != "w1"}

  def loss2(w1, rest, batch):
    return loss({"w1": w1, **rest}, *batch)

  fn = gnorm_jax.clipped_grad(loss2, (0, 1), max_norm=0.5, batch_argnums=2, return_norms=True)
  (g_w1, g_rest), norms = jax.jit(fn)(w1, rest, (x, y))
  want_norms, want = _reference(loss, params, (x, y), 0.5)
  np.testing.assert_allclose(norms, want_norms, rtol=RTOL)
  _assert_tree_close({"w1": g_w1, **g_rest}, want)


def test_broadcast_argument_is_not_batched():
  def loss(w, x, scale):
    return scale * jnp.sum((x @ w) ** 2)

  w, x = jnp.ones((3, 2)), jnp.arange(12.0).reshape(4, 3)
  got = gnorm_jax.per_example_grad_norms(loss)(w, x, 2.0)
  want = jax.vmap(lambda xi: gnorm_jax.tree_norm(jax.grad(loss)(w, xi, 2.0)))(x)
  np.testing.assert_allclose(got, want, rtol=RTOL)


def test_zero_gradients_and_zero_threshold_are_nan_free():
  loss, params, (x, y) = mlp()
  x = x.at[0].set(0.0)
  params = {**params, "w2": jnp.zeros_like(params["w2"])}
  y = y.at[0].set(params["b2"])  # example 0 has zero loss and zero gradient

  fn = jax.jit(gnorm_jax.clipped_grad(loss, max_norm=1.0, batch_argnums=(1, 2), return_norms=True))
  grads, norms = fn(params, x, y)
  assert norms[0] == 0.0
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  zero = jax.jit(gnorm_jax.clipped_grad(loss, max_norm=0.0, batch_argnums=(1, 2)))(params, x, y)
  assert all(bool(jnp.all(g == 0)) for g in jax.tree.leaves(zero))


def test_traced_max_norm_matches_concrete_and_its_derivative_is_exact():
  loss, params, batch = mlp()
  norms, _ = _reference(loss, params, batch, 1.0)
  c = float(np.median(norms))  # half of the examples are clipped, none at the kink
  clipped = lambda c: gnorm_jax.clipped_grad(loss, max_norm=c, batch_argnums=(1, 2))(params, *batch)
  _, want = _reference(loss, params, batch, c)
  traced = jax.jit(clipped)(jnp.float32(c))
  _assert_tree_close(traced, want)
  _assert_tree_close(traced, jax.jit(lambda: clipped(c))(), rtol=1e-6)  # float32 rounding apart
  # d/dC (1/B) Σ_i min(1, C/‖g_i‖) g_i = (1/B) Σ_{i: ‖g_i‖ > C} g_i/‖g_i‖.
  per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, *batch)
  weights = (norms > c) / norms / len(norms)
  want_d = jax.tree.map(lambda g: np.tensordot(weights, np.asarray(g, np.float64), 1), per_example)
  _assert_tree_close(jax.jit(jax.jacfwd(clipped))(jnp.float32(c)), want_d)
  _assert_tree_close(jax.jit(jax.jacrev(clipped))(jnp.float32(c)), want_d)
  # Through a norm of the result: d‖G‖/dC = <G, dG/dC>/‖G‖.
  g, dg = jax.tree.leaves(want), jax.tree.leaves(want_d)
  want_total = sum(np.sum(a * b) for a, b in zip(g, dg)) / np.sqrt(sum(np.sum(a**2) for a in g))
  total = lambda c: gnorm_jax.tree_norm(clipped(c))
  np.testing.assert_allclose(jax.jit(jax.grad(total))(jnp.float32(c)), want_total, rtol=RTOL)


@pytest.mark.parametrize("method", ["auto", "vmap"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_safe_drops_non_finite_examples(method, bad):
  """One NaN/inf example is reported in its norm but cannot poison the sum."""
  loss, params, (x, y) = mlp()
  x = x.at[1].set(bad)
  fn = gnorm_jax.clipped_grad(
    loss, max_norm=1.0, batch_argnums=(1, 2), return_norms=True, method=method, reduce="sum"
  )
  grads, norms = jax.jit(fn)(params, x, y)
  assert not np.isfinite(norms[1]) and np.all(np.isfinite(np.delete(np.asarray(norms), 1)))
  keep = np.arange(x.shape[0]) != 1
  want_norms, want = _reference(loss, params, (x[keep], y[keep]), 1.0, reduce="sum")
  np.testing.assert_allclose(np.asarray(norms)[keep], want_norms, rtol=RTOL)
  _assert_tree_close(grads, want)
  unsafe = gnorm_jax.clipped_grad(
    loss, max_norm=1.0, batch_argnums=(1, 2), nan_safe=False, method=method
  )
  assert all(bool(jnp.any(~jnp.isfinite(g))) for g in jax.tree.leaves(unsafe(params, x, y)))


def _three_routes():
  """A loss whose leaves take all three engine routes at B=4: a bias (direct), a dense
  layer over 4 positions (ghost, may cancel) and one on their mean (ghost, one position)."""
  k = jax.random.split(jax.random.key(3), 4)
  params = {
    "w1": jax.random.normal(k[0], (64, 64)) / 8,
    "b1": jnp.zeros(64),
    "w2": jax.random.normal(k[1], (64, 64)) / 8,
  }

  def loss(p, x, y):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return jnp.sum((jnp.mean(h, 0) @ p["w2"] - y) ** 2)

  return loss, params, (jax.random.normal(k[2], (4, 4, 64)), jax.random.normal(k[3], (4, 64)))


@pytest.mark.parametrize("form", ["cpu", "default"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_example_leaves_every_route_finite(bad, form, monkeypatch):
  """A NaN/inf example on the direct, ghost and one-position ghost routes, in the CPU form
  (rows zeroed only when some norm is not finite) and the GPU/TPU form (always zeroed)."""
  loss, params, (x, y) = _three_routes()
  plan = gnorm_jax.per_example_plan(loss, batch_argnums=(1, 2), method="engine")(params, x, y)
  assert [leaf.route for leaf in plan.leaves] == ["direct", "ghost", "ghost"]
  monkeypatch.setattr(_numerics, "_FORCE_FORM", form)
  jax.clear_caches()
  x = x.at[2, 1].set(bad)
  fn = gnorm_jax.clipped_grad(
    loss, max_norm=0.5, batch_argnums=(1, 2), reduce="sum", return_norms=True, method="engine"
  )
  grads, norms = jax.jit(fn)(params, x, y)
  jax.clear_caches()
  keep = np.arange(4) != 2
  want_norms, want = _reference(loss, params, (x[keep], y[keep]), 0.5, reduce="sum")
  assert not np.isfinite(norms[2])
  np.testing.assert_allclose(np.asarray(norms)[keep], want_norms, rtol=RTOL)
  _assert_tree_close(grads, want)


@pytest.mark.parametrize("form", ["cpu", "default"])
@pytest.mark.parametrize(
  "method, nan_safe, per_layer, microbatch",
  [
    ("engine", True, False, None),
    ("engine", False, False, None),
    ("engine", True, True, None),
    ("engine", True, False, 2),
    ("vmap", True, False, None),
  ],
)
def test_example_whose_norm_overflows_is_clipped_not_dropped(
  method, nan_safe, per_layer, microbatch, form, monkeypatch
):
  """An example whose gradient is finite but whose norm (2.4e39) exceeds float32's largest:
  its norm is reported inf, and it is clipped into the sum like any other example."""
  loss, params, (x, y) = _three_routes()
  y = y.at[1].multiply(4e37)
  per_ex = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, x, y)
  flat = {k: np.asarray(per_ex[k], np.float64).reshape(4, -1) for k in params}
  assert all(np.all(np.isfinite(g)) for g in flat.values())
  total = np.sqrt(sum(np.sum(g**2, 1) for g in flat.values()))
  assert total[1] > 1e39
  max_norm = {"w1": 0.5, "b1": 0.25, "w2": 2.0} if per_layer else 0.5
  monkeypatch.setattr(_numerics, "_FORCE_FORM", form)
  jax.clear_caches()
  fn = gnorm_jax.clipped_grad(
    loss,
    max_norm=max_norm,
    batch_argnums=(1, 2),
    reduce="sum",
    return_norms=True,
    method=method,
    nan_safe=nan_safe,
    microbatch_size=microbatch,
  )
  grads, norms = jax.jit(fn)(params, x, y)
  jax.clear_caches()
  assert np.isinf(norms[1])
  np.testing.assert_allclose(np.delete(np.asarray(norms), 1), np.delete(total, 1), rtol=RTOL)
  for k in params:
    n = np.linalg.norm(flat[k], axis=1) if per_layer else total
    c = max_norm[k] if per_layer else max_norm
    want = np.tensordot(np.minimum(1.0, c / n), flat[k], 1).reshape(params[k].shape)
    np.testing.assert_allclose(grads[k], want, rtol=0, atol=RTOL * np.abs(want).max())


@pytest.mark.parametrize("form", ["cpu", "default"])
@pytest.mark.parametrize("traced", [False, True])
def test_tiny_threshold_mean_keeps_every_example(form, traced, monkeypatch):
  """The mean's division by B joins the clip weights only where wᵢ/B cannot underflow
  (a concrete threshold C with C/B not tiny). Here C/(‖gᵢ‖·B) ~ 1e-43 is subnormal
  in float32: every example must still enter the mean, clipped to norm C."""
  loss, params, (x, y) = _three_routes()
  y = y * 1e12
  c = 1e-30
  assert not _api._folds(c, 4, 3) and _api._folds(1.0, 4, 3)
  monkeypatch.setattr(_numerics, "_FORCE_FORM", form)
  jax.clear_caches()

  def run(max_norm):
    fn = gnorm_jax.clipped_grad(loss, max_norm=max_norm, batch_argnums=(1, 2), method="engine")
    return fn(params, x, y)

  grads = jax.jit(run)(jnp.float32(c)) if traced else jax.jit(lambda: run(c))()
  jax.clear_caches()
  norms, want = _reference(loss, params, (x, y), c)
  assert np.all(c / (norms * 4) < 1e-38)  # weights divided by B would be subnormal
  for k in params:
    scale = np.abs(want[k]).max()
    assert scale > 0
    np.testing.assert_allclose(np.asarray(grads[k], np.float64) / scale, want[k] / scale, atol=RTOL)


@pytest.mark.parametrize("name", ["mlp", "transformer", "cnn"])
def test_mask_rows_are_padding(name):
  loss, params, batch = ZOO[name]()
  mask = jnp.array([True, False, True, False])
  batch = tuple(b[:4] for b in batch)
  batch = (batch[0].at[1].set(jnp.nan if batch[0].dtype.kind == "f" else batch[0][1]),) + batch[1:]
  fn = jax.jit(
    gnorm_jax.clipped_grad(
      loss, max_norm=0.5, batch_argnums=(1, 2), reduce="sum", return_norms=True
    )
  )
  grads, norms = fn(params, *batch, mask=mask)
  keep = np.asarray(mask)
  want_norms, want = _reference(loss, params, tuple(b[keep] for b in batch), 0.5, reduce="sum")
  np.testing.assert_allclose(np.asarray(norms)[keep], want_norms, rtol=RTOL)
  assert np.all(np.asarray(norms)[~keep] == 0)
  _assert_tree_close(grads, want)
  only = gnorm_jax.per_example_grad_norms(loss, batch_argnums=(1, 2))(params, *batch, mask=mask)
  np.testing.assert_allclose(only, norms, rtol=RTOL)
  with pytest.raises(ValueError, match="mask must be a bool array of shape"):
    fn(params, *batch, mask=jnp.ones(3, bool))


def test_has_aux_returns_stacked_aux():
  loss, params, batch = mlp()

  def loss_aux(p, x, y):
    value = loss(p, x, y)
    return value, {"value": value, "x0": x[0]}

  for method in ("auto", "vmap"):
    (grads, norms), aux = jax.jit(
      gnorm_jax.clipped_grad(
        loss_aux, max_norm=0.5, batch_argnums=(1, 2), has_aux=True, return_norms=True, method=method
      )
    )(params, *batch)
    want_norms, want = _reference(loss, params, batch, 0.5)
    np.testing.assert_allclose(norms, want_norms, rtol=RTOL)
    _assert_tree_close(grads, want)
    np.testing.assert_allclose(
      aux["value"], jax.vmap(loss, in_axes=(None, 0, 0))(params, *batch), rtol=1e-5
    )
    np.testing.assert_array_equal(aux["x0"], batch[0][:, 0])
  norms, aux = gnorm_jax.per_example_grad_norms(loss_aux, batch_argnums=(1, 2), has_aux=True)(
    params, *batch
  )
  np.testing.assert_allclose(norms, want_norms, rtol=RTOL)
  with pytest.raises(TypeError, match="pair"):
    gnorm_jax.per_example_grad_norms(loss, batch_argnums=(1, 2), has_aux=True)(params, *batch)


def test_per_layer_thresholds():
  """Each group of leaves is clipped to its own threshold (float64 numpy reference)."""
  loss, params, batch = mlp()
  max_norm = {"w1": 0.3, "b1": 0.1, "w2": 1.0, "b2": 0.05}
  grads, norms = jax.jit(
    gnorm_jax.clipped_grad(
      loss, max_norm=max_norm, batch_argnums=(1, 2), reduce="sum", return_norms=True
    )
  )(params, *batch)
  per_ex = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, *batch)
  for k, c in max_norm.items():
    g = np.asarray(per_ex[k], np.float64).reshape(per_ex[k].shape[0], -1)
    n = np.linalg.norm(g, axis=1)
    w = np.minimum(1.0, c / np.where(n > 0, n, 1.0))
    np.testing.assert_allclose(
      grads[k], np.tensordot(w, g, 1).reshape(params[k].shape), rtol=RTOL, atol=1e-6
    )
  np.testing.assert_allclose(norms, _reference(loss, params, batch, 1.0)[0], rtol=RTOL)
  # A prefix: one threshold for all of a sub-tree.
  nested = {"a": {"w": params["w1"], "b": params["b1"]}, "c": params["w2"]}
  nl = lambda p, x: jnp.sum(jnp.tanh(x @ p["a"]["w"] + p["a"]["b"]) @ p["c"])
  g2 = gnorm_jax.clipped_grad(nl, max_norm={"a": 0.2, "c": 0.7}, reduce="sum")(nested, batch[0])
  per = jax.vmap(jax.grad(nl), in_axes=(None, 0))(nested, batch[0])
  na = np.sqrt(
    sum(np.sum(np.asarray(v, np.float64).reshape(6, -1) ** 2, 1) for v in jax.tree.leaves(per["a"]))
  )
  wa = np.minimum(1.0, 0.2 / na)
  np.testing.assert_allclose(
    g2["a"]["b"], np.tensordot(wa, np.asarray(per["a"]["b"]), 1), rtol=RTOL, atol=1e-6
  )
  with pytest.raises(ValueError, match="prefix"):
    gnorm_jax.clipped_grad(loss, max_norm={"w1": 1.0, "zz": 1.0}, batch_argnums=(1, 2))(
      params, *batch
    )


@pytest.mark.parametrize("microbatch_size", [1, 4, 5, 6, 100])
def test_microbatches_equal_the_whole_batch(microbatch_size):
  loss, params, batch = ZOO["transformer"]()
  mask = jnp.array([True, True, False, True])
  whole = gnorm_jax.clipped_grad(loss, max_norm=0.5, batch_argnums=(1, 2), return_norms=True)
  chunked = gnorm_jax.clipped_grad(
    loss, max_norm=0.5, batch_argnums=(1, 2), return_norms=True, microbatch_size=microbatch_size
  )
  (g1, n1), (g2, n2) = whole(params, *batch, mask=mask), jax.jit(chunked)(params, *batch, mask=mask)
  np.testing.assert_allclose(n2, n1, rtol=RTOL)
  _assert_tree_close(g2, jax.tree.map(np.asarray, g1))


@pytest.mark.parametrize(
  "kwargs,error,match",
  [
    ({"max_norm": -1.0}, ValueError, "max_norm=-1.0"),
    ({"max_norm": math.nan}, ValueError, "max_norm=nan"),
    ({"max_norm": 1.0, "reduce": "max"}, ValueError, "reduce='max'"),
    ({"max_norm": 1.0, "method": "fast"}, ValueError, "method='fast'"),
    ({"max_norm": 1.0, "argnums": 1}, ValueError, "share"),
    ({"max_norm": 1.0, "argnums": "0"}, TypeError, "argnums"),
    ({"max_norm": True}, TypeError, "max_norm"),
    ({"max_norm": {"a": -1.0}}, ValueError, "max_norm"),
    ({"max_norm": None}, ValueError, "max_norm"),
    ({"max_norm": 1.0, "microbatch_size": 0}, ValueError, "microbatch_size=0"),
    ({"max_norm": 1.0, "has_aux": 1}, TypeError, "has_aux"),
  ],
)
def test_construction_errors(kwargs, error, match):
  with pytest.raises(error, match=match):
    gnorm_jax.clipped_grad(lambda w, x: jnp.sum(w * x), **kwargs)


def test_call_errors():
  fn = gnorm_jax.per_example_grad_norms(lambda w, x, y: jnp.sum(w * x) * y, batch_argnums=(1, 2))
  with pytest.raises(ValueError, match="same leading batch axis"):
    fn(jnp.ones(3), jnp.ones((4, 3)), jnp.ones(5))
  with pytest.raises(TypeError, match="one real scalar per example"):
    gnorm_jax.per_example_grad_norms(lambda w, x: w * x)(jnp.ones(3), jnp.ones((4, 3)))
  with pytest.raises(TypeError, match="floating point"):
    gnorm_jax.per_example_grad_norms(lambda w, x: jnp.sum(x))(jnp.arange(3), jnp.ones((4, 3)))
  with pytest.raises(TypeError, match="need at least 2"):
    gnorm_jax.per_example_grad_norms(lambda w: jnp.sum(w))(jnp.ones(3))


_TRANSFORMS = [gnorm_jax.per_example_grad_norms, gnorm_jax.clipped_grad, gnorm_jax.per_example_plan]


@pytest.mark.parametrize("make", _TRANSFORMS)
def test_signature_follows_jax_grad(make):
  # (fun, argnums=0, has_aux=False, *, ...): a value in the argnums or has_aux
  # slot that is not one (an older call's threshold) names itself and the signature.
  loss = lambda w, x: jnp.sum(w * x)
  kw = {"max_norm": 1.0} if make is gnorm_jax.clipped_grad else {}
  signature = re.escape(f"The signature is {make.__name__}(fun, argnums=0, has_aux=False, *,")
  with pytest.raises(TypeError, match=rf"got argnums=1\.0\. {signature}"):
    make(loss, 1.0, **kw)
  with pytest.raises(TypeError, match=rf"got has_aux=0\.5\. {signature}"):
    make(loss, 0, 0.5, **kw)
  with pytest.raises(TypeError, match=rf"got batch_argnums=0\.5\. {signature}"):
    make(loss, batch_argnums=0.5, **kw)
  with pytest.raises(TypeError, match="unexpected keyword argument 'loss'"):
    make(loss=loss, **kw)


def test_clipped_grad_old_positional_threshold_is_an_error():
  # clipped_grad(loss, 1.0) was the old order: max_norm is now keyword-only.
  loss = lambda w, x: jnp.sum(w * x)
  with pytest.raises(TypeError, match="max_norm"):
    gnorm_jax.clipped_grad(loss, 1.0)
  with pytest.raises(ValueError, match=r"share \[1\].*The signature is clipped_grad\(fun,"):
    gnorm_jax.clipped_grad(loss, 1, max_norm=1.0)


def test_positional_argnums_and_has_aux_equal_keywords():
  loss, params, batch = mlp()

  def loss_aux(x, p, y):  # the parameters second
    return loss(p, x, y), y[0]

  args = (batch[0], params, batch[1])
  positional = gnorm_jax.clipped_grad(
    loss_aux, 1, True, max_norm=0.5, batch_argnums=(0, 2), return_norms=True
  )(*args)
  keywords = gnorm_jax.clipped_grad(
    loss_aux, argnums=1, has_aux=True, max_norm=0.5, batch_argnums=(0, 2), return_norms=True
  )(*args)
  _assert_tree_close(positional, keywords)
  want_norms, want = _reference(loss, params, batch, 0.5)
  _assert_tree_close(positional[0], (want, want_norms))
  norms, aux = gnorm_jax.per_example_grad_norms(loss_aux, 1, True, batch_argnums=(0, 2))(*args)
  np.testing.assert_allclose(norms, want_norms, rtol=RTOL)
  np.testing.assert_array_equal(aux, batch[1][:, 0])
  plan = gnorm_jax.per_example_plan(loss_aux, 1, True, batch_argnums=(0, 2))(*args)
  assert [l.path for l in plan.leaves] == ["['b1']", "['b2']", "['w1']", "['w2']"]


# ------------------------------------------------- properties: masks and thresholds

_MLP = mlp()


@jax.jit
def _MLP_FN(params, x, y, max_norm, mask):  # noqa: N802 (a jitted constant)
  fn = gnorm_jax.clipped_grad(
    _MLP[0], max_norm=max_norm, batch_argnums=(1, 2), reduce="sum", return_norms=True
  )
  return fn(params, x, y, mask=mask)


@settings(max_examples=15, deadline=None)
@given(
  mask=st.lists(st.booleans(), min_size=6, max_size=6),
  thresholds=st.lists(st.floats(1e-3, 10.0), min_size=4, max_size=4),
  per_layer=st.booleans(),
)
def test_masks_and_thresholds_match_float64_reference(mask, thresholds, per_layer):
  """Any padding mask and any (per-layer) thresholds: the clipped sum of the kept rows."""
  loss, params, batch = _MLP
  keys = ["w1", "b1", "w2", "b2"]
  max_norm = dict(zip(keys, thresholds)) if per_layer else thresholds[0]
  grads, norms = _MLP_FN(params, *batch, max_norm, jnp.asarray(mask))
  per_ex = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, *batch)
  flat = {k: np.asarray(per_ex[k], np.float64).reshape(6, -1) for k in keys}
  keep = np.asarray(mask)
  total = np.sqrt(sum(np.sum(g**2, 1) for g in flat.values()))
  np.testing.assert_allclose(np.asarray(norms), np.where(keep, total, 0), rtol=RTOL)
  for k in keys:
    n = np.linalg.norm(flat[k], axis=1) if per_layer else total
    c = max_norm[k] if per_layer else max_norm
    w = np.where(keep, np.minimum(1.0, c / np.where(n > 0, n, 1.0)), 0.0)
    want = np.tensordot(w, flat[k], 1).reshape(params[k].shape)
    np.testing.assert_allclose(grads[k], want, rtol=RTOL, atol=1e-6 * max(1.0, np.abs(want).max()))


# ------------------------------------------------------------------ nested jit with constants

_C = np.linspace(-1.0, 1.0, 16, dtype=np.float32).reshape(4, 4)


@pytest.mark.parametrize("method", ["auto", "ghost", "vmap"])
def test_nested_jit_closing_over_a_constant(method):
  layer = jax.jit(lambda w, x: jnp.tanh(x @ w) @ _C)
  loss = lambda w, x: jnp.sum(layer(w, x) ** 2)
  w = _normal(jax.random.key(11), 4, 4)
  x = _normal(jax.random.key(12), 5, 3, 4)
  got = gnorm_jax.per_example_grad_norms(loss, method=method)(w, x)
  want = _reference(lambda w, x, _: loss(w, x), w, (x, x), 1.0)[0]
  np.testing.assert_allclose(got, want, rtol=RTOL)


@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_nested_jit_with_an_unused_last_argument(method):
  layer = jax.jit(lambda h, unused: jnp.tanh(h) * _C)
  loss = lambda w, x: jnp.sum(layer(x @ w, x) ** 2)
  w = _normal(jax.random.key(13), 4, 4)
  x = _normal(jax.random.key(14), 5, 4, 4)
  got = gnorm_jax.per_example_grad_norms(loss, method=method)(w, x)
  want = _reference(lambda w, x, _: loss(w, x), w, (x, x), 1.0)[0]
  np.testing.assert_allclose(got, want, rtol=RTOL)


@pytest.mark.parametrize("form", ["cpu", "default"])
@pytest.mark.parametrize("scale", [1.0, 1e20, 1e-20])
def test_long_row_grams_match_vmap(form, scale, monkeypatch):
  """A tied output layer over a 4096-token vocabulary: its logits cotangent's Gram has
  rows of 4096 at 3 positions, which the CPU form forms one example at a time (a loop,
  its only one here). Norms and clipped sums against float64 vmap(grad), at ordinary
  and extreme scales of the input."""
  k = jax.random.split(jax.random.key(5), 4)
  params = {"emb": jax.random.normal(k[0], (4096, 8)), "a": jax.random.normal(k[1], (8, 8))}

  def loss(p, x, y):
    h = jnp.tanh(x @ p["a"]) * scale
    logits = h @ p["emb"].T / scale
    return -jnp.sum(jax.nn.log_softmax(logits)[jnp.arange(3), y])

  x, y = jax.random.normal(k[2], (5, 3, 8)), jax.random.randint(k[3], (5, 3), 0, 4096)
  monkeypatch.setattr(_numerics, "_FORCE_FORM", form)
  jax.clear_caches()
  fn = gnorm_jax.clipped_grad(
    loss, max_norm=1.0, batch_argnums=(1, 2), method="ghost", return_norms=True
  )
  assert ("scan" in str(jax.make_jaxpr(fn)(params, x, y))) == (form == "cpu")
  grads, norms = jax.jit(fn)(params, x, y)
  want_norms, want = _reference(loss, params, (x, y), 1.0)
  np.testing.assert_allclose(np.asarray(norms, np.float64), want_norms, rtol=RTOL)
  _assert_tree_close(grads, want)


@pytest.mark.parametrize("form", ["cpu", "default"])
def test_ghost_sum_of_many_positions_keeps_float32_accuracy(form, monkeypatch):
  """An output layer at 256 positions: its ghost sum adds 65536 products of Gram
  entries of both signs per example (softmax cotangents sum to zero), whose
  rounding must stay near float32's own (within 4e-7 of vmap(grad)'s norms in
  float64), not grow with the number of terms."""
  k = jax.random.split(jax.random.key(21), 3)
  w = jax.random.normal(k[0], (32, 64)) / 4

  def loss(w, x, y):
    logits = x @ w
    return -jnp.sum(jax.nn.log_softmax(logits)[jnp.arange(256), y])

  x = jax.random.normal(k[1], (4, 256, 32))
  y = jax.random.randint(k[2], (4, 256), 0, 64)
  monkeypatch.setattr(_numerics, "_FORCE_FORM", form)
  jax.clear_caches()
  got = jax.jit(gnorm_jax.per_example_grad_norms(loss, batch_argnums=(1, 2), method="ghost"))(
    w, x, y
  )
  want = _reference(loss, w, (x, y), 1.0)[0]
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=4e-7)
