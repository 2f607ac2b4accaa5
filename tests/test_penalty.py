"""Tests of gnorm_jax._penalty: penalized objectives and GAN input-gradient penalties."""

from __future__ import annotations

import functools
import math
import re

import chex
import equinox as eqx
import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import gnorm_jax

METHODS = ("hvp", "double_backprop", "finite_difference")
EXACT = ("hvp", "double_backprop")


# --------------------------------------------------------------------------- #
# A test objective with a closed-form gradient and Hessian (float64 numpy):
# J(θ) = Σ log cosh(θ) + ½ θᵀAθ + bᵀθ,  ∇J = tanh θ + Aθ + b,  H = diag(sech² θ) + A.
# --------------------------------------------------------------------------- #


def _problem(n=5, seed=0):
  rng = np.random.default_rng(seed)
  m = rng.normal(size=(n, n))
  a = (m + m.T) / 4
  b = rng.normal(size=n)
  theta = rng.normal(size=n)
  return a, b, theta


def _j(a, b):
  a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return lambda t: jnp.sum(jnp.log(jnp.cosh(t))) + 0.5 * t @ a32 @ t + b32 @ t


def _np_grad_hess(a, b, t):
  return np.tanh(t) + a @ t + b, np.diag(1 / np.cosh(t) ** 2) + a


def _np_dphi(g, squared, ord):
  """∇φ(g) in float64 (the subgradient 0 at g = 0; sign for ord=1; max entry for inf)."""
  if ord in (None, 2):
    n = np.linalg.norm(g)
    return 2 * g if squared else (g / n if n > 0 else 0 * g)
  if ord == 1:
    d = np.sign(g)
    return 2 * np.abs(g).sum() * d if squared else d
  d = np.zeros_like(g)
  i = np.argmax(np.abs(g))
  d[i] = np.sign(g[i])
  return 2 * np.abs(g).max() * d if squared else d


def _np_phi(g, squared, ord):
  n = np.linalg.norm(g, ord=None if ord is None else ord)
  return n**2 if squared else n


def _np_reference(a, b, t, weight, squared, ord):
  g, h = _np_grad_hess(a, b, t)
  return np.log(np.cosh(t)).sum() + 0.5 * t @ a @ t + b @ t + weight * _np_phi(
    g, squared, ord
  ), g + weight * h @ _np_dphi(g, squared, ord)


def _relerr(x, y):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)


def _leaves_close(x, y, rtol, atol=0.0):
  for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


def _all_finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------- #
# penalized / penalized_value_and_grad: values and gradients vs float64 numpy.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("ord", [None, 1, math.inf])
@pytest.mark.parametrize("squared", [True, False])
def test_penalized_value_matches_numpy(squared, ord):
  a, b, t = _problem()
  p = gnorm_jax.penalized(_j(a, b), weight=0.3, squared=squared, ord=ord)
  want, _ = _np_reference(a, b, t, 0.3, squared, ord)
  np.testing.assert_allclose(float(p(jnp.asarray(t, jnp.float32))), want, rtol=1e-5)


@pytest.mark.parametrize("ord", [None, 1, math.inf])
@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("method", EXACT)
def test_exact_methods_match_numpy(method, squared, ord):
  a, b, t = _problem()
  want_value, want_grad = _np_reference(a, b, t, 0.3, squared, ord)
  value, grad = jax.jit(
    gnorm_jax.penalized_value_and_grad(
      _j(a, b), weight=0.3, method=method, squared=squared, ord=ord
    )
  )(jnp.asarray(t, jnp.float32))
  np.testing.assert_allclose(float(value), want_value, rtol=1e-5)
  np.testing.assert_allclose(grad, want_grad, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("squared", [True, False])
def test_grad_of_penalized_is_double_backprop(squared):
  a, b, t = _problem(seed=1)
  _, want = _np_reference(a, b, t, 0.2, squared, None)
  p = gnorm_jax.penalized(_j(a, b), weight=0.2, squared=squared)
  got = jax.grad(p)(jnp.asarray(t, jnp.float32))
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("squared", [True, False])
def test_penalized_check_grads(squared):
  """Reverse and forward derivatives of P (order 2 = third derivatives of J)."""
  a, b, t = _problem(seed=2)
  with jax.enable_x64(True):
    j = lambda th: jnp.sum(jnp.log(jnp.cosh(th))) + 0.5 * th @ a @ th + b @ th
    p = jax.jit(gnorm_jax.penalized(j, weight=0.3, squared=squared))
    check_grads(p, (jnp.asarray(t),), order=2, modes=["fwd", "rev"])


@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("method", EXACT)
def test_exact_gradients_match_central_differences_of_the_value(method, squared):
  """∇P from each exact method against (P(θ + εe) − P(θ − εe))/2ε in float64."""
  a, b, t = _problem(seed=8)
  with jax.enable_x64(True):
    j = lambda th: jnp.sum(jnp.log(jnp.cosh(th))) + 0.5 * th @ a @ th + b @ th
    vg = jax.jit(gnorm_jax.penalized_value_and_grad(j, weight=0.3, method=method, squared=squared))
    eps = 1e-6
    steps = jnp.asarray(np.concatenate([eps * np.eye(5), -eps * np.eye(5)]))
    values = jax.vmap(lambda s: vg(jnp.asarray(t) + s)[0])(steps)
    numeric = (np.asarray(values[:5]) - np.asarray(values[5:])) / (2 * eps)
    _, grad = vg(jnp.asarray(t))
  np.testing.assert_allclose(np.asarray(grad), numeric, rtol=1e-5, atol=1e-8)


def test_squared_penalty_check_grads_at_a_stationary_point():
  """P = J + λ‖∇J‖² is smooth at ∇J = 0: derivatives up to order 2 check out there."""
  a, _, _ = _problem(seed=9)
  with jax.enable_x64(True):
    j = lambda th: jnp.sum(jnp.cosh(th)) + 0.5 * th @ a @ th  # ∇J(0) = 0
    p = jax.jit(gnorm_jax.penalized(j, weight=0.3))
    check_grads(p, (jnp.zeros(5),), order=2, modes=["fwd", "rev"])


@pytest.mark.parametrize("method", METHODS)
def test_value_is_exact_in_every_method(method):
  a, b, t = _problem(seed=3)
  want, _ = _np_reference(a, b, t, 0.5, True, None)
  value, _ = gnorm_jax.penalized_value_and_grad(_j(a, b), weight=0.5, method=method)(
    jnp.asarray(t, jnp.float32)
  )
  np.testing.assert_allclose(float(value), want, rtol=1e-5)


# --------------------------------------------------------------------------- #
# The finite-difference method (Zhao et al. 2022).
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("squared", [True, False])
def test_finite_difference_is_exact_for_a_quadratic(squared):
  """∇J is linear, so ∇J(θ + r·u) − ∇J(θ) = r·H·u for every r."""
  a, b, t = _problem(seed=4)
  j = lambda th: 0.5 * th @ jnp.asarray(a, jnp.float32) @ th + jnp.asarray(b, jnp.float32) @ th
  g = a @ t + b
  want = g + 0.3 * a @ _np_dphi(g, squared, None)
  for radius in (1e-2, 1.0):
    _, got = gnorm_jax.penalized_value_and_grad(
      j, weight=0.3, method="finite_difference", squared=squared, radius=radius
    )(jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_finite_difference_matches_the_paper_formula():
  """Unsquared: (1 − α)·∇J(θ) + α·∇J(θ + r·∇J/‖∇J‖), α = λ/r (Zhao et al. Alg. 1)."""
  a, b, t = _problem(seed=5)
  j = _j(a, b)
  theta = jnp.asarray(t, jnp.float32)
  lam, r = 0.05, 0.1
  g0 = jax.grad(j)(theta)
  g1 = jax.grad(j)(theta + r * g0 / jnp.linalg.norm(g0))
  alpha = lam / r
  want = (1 - alpha) * g0 + alpha * g1
  _, got = gnorm_jax.penalized_value_and_grad(
    j, weight=lam, method="finite_difference", squared=False, radius=r
  )(theta)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("squared", [True, False])
def test_finite_difference_converges_linearly_in_radius(squared):
  a, b, t = _problem(seed=6)
  _, exact = _np_reference(a, b, t, 0.3, squared, None)
  errors = []
  with jax.enable_x64(True):
    j = lambda th: jnp.sum(jnp.log(jnp.cosh(th))) + 0.5 * th @ a @ th + b @ th
    for radius in (1e-1, 1e-2, 1e-3):
      _, got = gnorm_jax.penalized_value_and_grad(
        j, weight=0.3, method="finite_difference", squared=squared, radius=radius
      )(jnp.asarray(t))
      errors.append(np.linalg.norm(np.asarray(got) - exact))
  # error ≈ C·r: each tenfold smaller radius gives about a tenfold smaller error.
  assert 5 < errors[0] / errors[1] < 20 and 5 < errors[1] / errors[2] < 20, errors


# --------------------------------------------------------------------------- #
# Stationary points: no NaN anywhere, for squared and unsquared penalties.
# --------------------------------------------------------------------------- #


def _stationary():
  """J with ∇J = 0 and a non-zero Hessian at θ = 0, on a pytree."""
  j = lambda p: jnp.sum(jnp.cosh(p["w"])) + jnp.sum(p["b"] ** 2) * 3
  return j, {"w": jnp.zeros((3, 2)), "b": jnp.zeros(4)}


@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_stationary_point_is_nan_free(method, squared):
  j, theta = _stationary()
  value, grad = jax.jit(
    gnorm_jax.penalized_value_and_grad(j, weight=0.3, method=method, squared=squared)
  )(theta)
  assert float(value) == 6.0  # Σ cosh 0 = 6, penalty 0
  assert _all_finite(grad)
  _leaves_close(grad, jax.tree.map(jnp.zeros_like, theta), rtol=0, atol=0)


@pytest.mark.parametrize("squared", [True, False])
def test_second_order_at_stationary_point_is_finite(squared):
  j, theta = _stationary()
  p = gnorm_jax.penalized(j, weight=0.3, squared=squared)
  assert _all_finite(jax.jit(jax.hessian(p))(theta))
  # derivatives of the gradient of P: jvp of its hvp gradient and of grad(P).
  ones = jax.tree.map(jnp.ones_like, theta)
  for method in EXACT:
    vg = gnorm_jax.penalized_value_and_grad(j, weight=0.3, method=method, squared=squared)
    _, tangent = jax.jit(lambda t: jax.jvp(lambda t: vg(t)[1], (t,), (ones,)))(theta)
    assert _all_finite(tangent)


def test_squared_hessian_at_stationary_point_is_exact():
  """P = J + λ‖∇J‖² is smooth: at ∇J = 0 its Hessian is H + 2λH²."""
  a, _, _ = _problem(seed=7)
  a32 = jnp.asarray(a, jnp.float32)
  j = lambda t: 0.5 * t @ a32 @ t
  got = jax.jit(jax.hessian(gnorm_jax.penalized(j, weight=0.3)))(jnp.zeros(5))
  np.testing.assert_allclose(got, a + 0.6 * a @ a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_gradients_propagate(method):
  j = lambda t: jnp.sum(jnp.sqrt(t))  # ∇J = inf at t = 0
  vg = gnorm_jax.penalized_value_and_grad(j, weight=0.1, method=method)
  value, grad = vg(jnp.array([0.0, 1.0]))
  assert not np.isfinite(float(value))
  assert not bool(jnp.all(jnp.isfinite(grad)))
  nan_value = gnorm_jax.penalized(lambda t: jnp.sum(t * jnp.nan), weight=0.1)(jnp.ones(2))
  assert np.isnan(float(nan_value))


# --------------------------------------------------------------------------- #
# Neural-network objectives, pytrees, argnums, aux, jit, vmap.
# --------------------------------------------------------------------------- #


def _mlp_problem(seed=0):
  k = jax.random.split(jax.random.key(seed), 5)
  params = {
    "l1": {"w": jax.random.normal(k[0], (6, 8)) / 2.5, "b": jnp.zeros(8)},
    "l2": {"w": jax.random.normal(k[1], (8, 3)) / 3.0, "b": 0.1 * jnp.ones(3)},
  }
  x = jax.random.normal(k[2], (16, 6))
  y = jax.random.randint(k[3], (16,), 0, 3)

  def loss(p, x, y):
    h = jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"])
    logits = h @ p["l2"]["w"] + p["l2"]["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return loss, params, x, y


@functools.cache
def _dense_grad_and_hessian():
  loss, params, x, y = _mlp_problem()
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  f = lambda v: loss(unravel(v), x, y)
  g = np.asarray(jax.jit(jax.grad(f))(flat), np.float64)
  return g, np.asarray(jax.jit(jax.hessian(f))(flat), np.float64), unravel


@pytest.mark.parametrize("squared", [True, False])
def test_hvp_matches_explicit_hessian_on_mlp(squared):
  """Independent reference: the dense Hessian from jax.hessian on the raveled tree."""
  loss, params, x, y = _mlp_problem()
  g, h, unravel = _dense_grad_and_hessian()
  v = 2 * g if squared else g / np.linalg.norm(g)
  want = unravel(jnp.asarray(g + 0.2 * h @ v, jnp.float32))
  for method in EXACT:
    _, got = jax.jit(
      gnorm_jax.penalized_value_and_grad(loss, weight=0.2, method=method, squared=squared)
    )(params, x, y)
    _leaves_close(got, want, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("squared", [True, False])
def test_methods_agree_on_mlp(squared):
  loss, params, x, y = _mlp_problem(seed=1)
  out = {
    m: jax.jit(
      gnorm_jax.penalized_value_and_grad(loss, weight=0.1, method=m, squared=squared, radius=1e-3)
    )(params, x, y)
    for m in METHODS
  }
  for m in METHODS:
    assert float(out[m][0]) == pytest.approx(float(out["double_backprop"][0]), rel=1e-6)
  _leaves_close(out["hvp"][1], out["double_backprop"][1], rtol=1e-4, atol=1e-6)
  flat = lambda t: jax.flatten_util.ravel_pytree(t)[0]
  assert _relerr(flat(out["finite_difference"][1]), flat(out["double_backprop"][1])) < 1e-2


@pytest.mark.parametrize("method", METHODS)
def test_eager_equals_jit(method):
  loss, params, x, y = _mlp_problem(seed=2)
  vg = gnorm_jax.penalized_value_and_grad(loss, weight=0.1, method=method)
  eager, jitted = vg(params, x, y), jax.jit(vg)(params, x, y)
  # Eager and jit round differently (fusion, summation order). A finite difference
  # (g(θ + r·v) − g(θ))/r magnifies that rounding by ‖g‖/(r‖Hv‖), so its tolerance is wider.
  rtol = 2e-4 if method == "finite_difference" else 2e-5
  _leaves_close(eager, jitted, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_vmap_over_batches_equals_loop(method):
  loss, params, x, y = _mlp_problem(seed=3)
  xs, ys = x[:12].reshape(3, 4, 6), y[:12].reshape(3, 4)
  vg = jax.jit(gnorm_jax.penalized_value_and_grad(loss, weight=0.1, method=method))
  values, grads = jax.jit(jax.vmap(vg, in_axes=(None, 0, 0)))(params, xs, ys)
  for i in range(3):
    value_i, grad_i = vg(params, xs[i], ys[i])
    np.testing.assert_allclose(values[i], value_i, rtol=1e-5)
    _leaves_close(jax.tree.map(lambda g: g[i], grads), grad_i, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_argnums_tuple_has_aux_and_kwargs(method):
  """Norm over both arguments together; aux passed through; kwargs not differentiated."""

  def j(w, b, *, scale):
    value = scale * (jnp.sum(jnp.sin(w)) + jnp.sum(b**3) / 3)
    return value, {"w_mean": jnp.mean(w)}

  w, b = jnp.array([0.3, -1.0]), jnp.array([2.0])
  (value, aux), (gw, gb) = gnorm_jax.penalized_value_and_grad(
    j, weight=0.1, method=method, argnums=(0, 1), has_aux=True, radius=1e-3
  )(w, b, scale=2.0)
  wn, bn = np.asarray(w, np.float64), np.asarray(b, np.float64)
  g = 2 * np.concatenate([np.cos(wn), bn**2])
  h = 2 * np.diag(np.concatenate([-np.sin(wn), 2 * bn]))
  want = g + 0.1 * h @ (2 * g)
  np.testing.assert_allclose(
    value, 2 * (np.sin(wn).sum() + bn[0] ** 3 / 3) + 0.1 * g @ g, rtol=1e-5
  )
  assert float(aux["w_mean"]) == pytest.approx(float(jnp.mean(w)))
  tol = 1e-5 if method in EXACT else 2e-2
  np.testing.assert_allclose(np.concatenate([gw, gb]), want, rtol=tol, atol=tol)
  # penalized itself with has_aux composes with jax.grad(has_aux=True)
  p = gnorm_jax.penalized(j, weight=0.1, argnums=(0, 1), has_aux=True)
  (gw2, gb2), aux2 = jax.grad(p, argnums=(0, 1), has_aux=True)(w, b, scale=2.0)
  np.testing.assert_allclose(np.concatenate([gw2, gb2]), want, rtol=1e-5, atol=1e-5)


@functools.cache
def _float32_reference_grad(seed):
  loss, params, x, y = _mlp_problem(seed=seed)
  return jax.jit(gnorm_jax.penalized_value_and_grad(loss, weight=0.1, method="double_backprop"))(
    params, x, y
  )[1]


@pytest.mark.parametrize("method", METHODS)
def test_low_precision_params_keep_their_dtype(method):
  loss, params, x, y = _mlp_problem(seed=4)
  params16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  _, grads = jax.jit(
    gnorm_jax.penalized_value_and_grad(loss, weight=0.1, method=method, radius=0.05)
  )(params16, x.astype(jnp.bfloat16), y)
  assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))
  assert _all_finite(grads)
  # close to the float32 result, to bfloat16 accuracy
  want = _float32_reference_grad(4)
  flat = lambda t: np.asarray(jax.flatten_util.ravel_pytree(t)[0], np.float64)
  tol = 0.05 if method in EXACT else 0.25  # the probe θ + r·u is rounded to bfloat16
  assert _relerr(flat(grads), flat(want)) < tol


@pytest.mark.parametrize("method", METHODS)
def test_traced_hyperparameters_do_not_retrace(method):
  loss, params, x, y = _mlp_problem(seed=5)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(weight, radius):
    return gnorm_jax.penalized_value_and_grad(loss, weight=weight, method=method, radius=radius)(
      params, x, y
    )

  chex.clear_trace_counter()
  values = [float(step(jnp.float32(w), jnp.float32(r))[0]) for w, r in [(0.1, 0.01), (0.5, 0.02)]]
  assert values[1] > values[0]


def test_weight_zero_is_plain_value_and_grad():
  loss, params, x, y = _mlp_problem(seed=6)
  want = jax.value_and_grad(loss)(params, x, y)
  for method in METHODS:
    got = jax.jit(gnorm_jax.penalized_value_and_grad(loss, weight=0.0, method=method))(params, x, y)
    _leaves_close(got, want, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- #
# Invariants (hypothesis).
# --------------------------------------------------------------------------- #

_vec = st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=4, max_size=4)


def _j_hyp(t):
  return jnp.sum(jnp.sin(t) * t) + 0.25 * jnp.sum(t**2) ** 2


@functools.partial(jax.jit, static_argnames=("method", "squared"))
def _hyp_value_and_grad(theta, weight, *, method, squared):
  vg = gnorm_jax.penalized_value_and_grad(_j_hyp, weight=weight, method=method, squared=squared)
  return vg(theta)


@settings(max_examples=20, deadline=None)
@given(theta=_vec, weight=st.floats(0, 2), squared=st.booleans())
def test_hypothesis_exact_methods_agree_and_penalty_is_nonnegative(theta, weight, squared):
  theta, weight = jnp.asarray(theta, jnp.float32), jnp.float32(weight)
  v_h, g_h = _hyp_value_and_grad(theta, weight, method="hvp", squared=squared)
  v_d, g_d = _hyp_value_and_grad(theta, weight, method="double_backprop", squared=squared)
  j = float(_j_hyp(theta))
  assert float(v_h) == pytest.approx(float(v_d), rel=1e-6, abs=1e-6)
  assert float(v_h) >= j - 1e-6 * abs(j)
  np.testing.assert_allclose(g_h, g_d, rtol=1e-4, atol=1e-3)


@jax.jit
def _scaled_penalized(theta, scale):
  j = lambda t: jnp.sum(jnp.cos(t)) + 0.1 * jnp.sum(t**3)
  p = gnorm_jax.penalized(j, weight=0.7, squared=False)
  pc = gnorm_jax.penalized(lambda t: scale * j(t), weight=0.7, squared=False)
  return p(theta), pc(theta)


@settings(max_examples=20, deadline=None)
@given(theta=_vec, scale=st.floats(0.1, 10))
def test_hypothesis_unsquared_penalty_is_scale_equivariant(theta, scale):
  """‖∇(cJ)‖ = c‖∇J‖, so P_{λ}(cJ) = c·P_{λ}(J) for the unsquared penalty."""
  p, pc = _scaled_penalized(jnp.asarray(theta, jnp.float32), jnp.float32(scale))
  np.testing.assert_allclose(float(pc), scale * float(p), rtol=1e-4, atol=1e-4)


@jax.jit
def _linear_critic_penalties(w, x, target):
  critic = lambda x: x @ w
  return gnorm_jax.gradient_penalty(critic, x, target=target), gnorm_jax.r1_penalty(critic, x)


@settings(max_examples=20, deadline=None)
@given(w=_vec, target=st.floats(0, 3), shift=st.floats(-5, 5))
def test_hypothesis_linear_critic_penalties(w, target, shift):
  """A linear critic x ↦ x·w has ∇ₓᵢ = w at every x: GP = (‖w‖ − t)², R1 = ‖w‖²."""
  x = shift + jnp.arange(12.0, dtype=jnp.float32).reshape(3, 4)
  gp, r1 = _linear_critic_penalties(jnp.asarray(w, jnp.float32), x, jnp.float32(target))
  norm = np.linalg.norm(np.asarray(w, np.float64))
  np.testing.assert_allclose(float(gp), (norm - target) ** 2, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(r1), norm**2, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- #
# Construction-time validation.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(method="newton"), "method must be one of"),
    (dict(weight=-1.0), "weight must be a finite number >= 0"),
    (dict(weight=math.inf), "weight must be a finite number >= 0"),
    (dict(radius=0.0), "radius must be a finite number > 0"),
    (dict(radius=-0.1), "radius must be a finite number > 0"),
    (dict(ord=3), "ord must be"),
  ],
)
def test_penalized_value_and_grad_rejects_bad_hyperparameters(kwargs, match):
  weight = kwargs.pop("weight", 0.1)
  with pytest.raises(ValueError, match=match):
    gnorm_jax.penalized_value_and_grad(jnp.sum, weight=weight, **kwargs)


@pytest.mark.parametrize(
  "weight, error, match",
  [
    ("0.1", TypeError, "weight must be a real number"),
    (True, TypeError, "weight must be a number, not a bool"),
    (jnp.ones(2), TypeError, r"weight must be a scalar"),
    (np.float32(-1.0), ValueError, "weight must be a finite number >= 0"),
    (jnp.array(-1.0), ValueError, "weight must be a finite number >= 0"),
    (jnp.array(math.nan), ValueError, "weight must be a finite number >= 0"),
  ],
)
@pytest.mark.parametrize("make", [gnorm_jax.penalized, gnorm_jax.penalized_value_and_grad])
def test_penalty_weight_follows_the_number_policy(make, weight, error, match):
  # weight="0.1" used to fail with "Only integer scalar arrays can be converted
  # to a scalar index"; numpy scalars and concrete arrays went unchecked.
  with pytest.raises(error, match=match):
    make(jnp.sum, weight=weight)


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    (dict(radius=jnp.array(0.0)), ValueError, "radius must be a finite number > 0"),
    (dict(radius=math.inf), ValueError, "radius must be a finite number > 0"),
    (dict(method=3), ValueError, "method must be one of"),
    (dict(argnums=-1), ValueError, r"negative entries \[-1\]"),
    (dict(argnums=(0, -2)), ValueError, r"negative entries \[-2\]"),
    (dict(argnums=True), TypeError, "argnums must be an int"),
    (dict(squared="no"), ValueError, r"squared must be one of \(True, False\)"),
  ],
)
def test_penalized_value_and_grad_argument_checks(kwargs, error, match):
  with pytest.raises(error, match=match):
    gnorm_jax.penalized_value_and_grad(jnp.sum, weight=0.1, **kwargs)


def test_gan_penalty_target_follows_the_number_policy():
  critic = lambda x: x @ jnp.ones(2)
  with pytest.raises(ValueError, match="target must be a finite number >= 0"):
    gnorm_jax.gradient_penalty(critic, jnp.ones((2, 2)), target=jnp.array(-1.0))
  with pytest.raises(TypeError, match="target must be a number, not a bool"):
    gnorm_jax.gradient_penalty(critic, jnp.ones((2, 2)), target=True)


def _np_cubic_penalized_grad(w, weight):
  """J = Σw³/3: ∇J = w², H = diag(2w), ∇(J + λ‖∇J‖²) = w² + 4λw³ (float64)."""
  w = np.asarray(w, np.float64)
  return w**2 + 4 * weight * w**3


@pytest.mark.parametrize(
  "dtype, theta, weight", [(jnp.bfloat16, 300.0, 0.1), (jnp.float16, 100.0, 0.01)]
)
def test_finite_difference_step_is_not_rounded_away(dtype, theta, weight):
  # Regression: θ + 0.01·v/‖v‖ = θ in bfloat16 at θ = 300 (its spacing there
  # is 2), so the probe gradient equalled ∇J and the penalty vanished from ∇P:
  # 90112 against the exact 1.089e7. The step is now at least 8·ε·‖θ‖.
  J = lambda w: jnp.sum(w.astype(jnp.float32) ** 3) / 3
  w = jnp.asarray([theta], dtype)
  _, grad = gnorm_jax.penalized_value_and_grad(J, weight=weight, method="finite_difference")(w)
  assert grad.dtype == dtype
  # The O(r) error of the wider step: r/(2θ), 1.6% for bfloat16, 0.4% for float16.
  np.testing.assert_allclose(
    np.asarray(grad, np.float64), _np_cubic_penalized_grad(w, weight), rtol=0.03
  )


def test_finite_difference_step_floor_leaves_float32_unchanged():
  # In float32 at ordinary scales 8·ε·‖θ‖ is far below the radius: the step is
  # exactly the radius, as in Zhao et al.
  J = lambda w: jnp.sum(w**3) / 3
  w = jnp.asarray([1.0, 2.0])
  _, grad = gnorm_jax.penalized_value_and_grad(
    J, weight=0.1, method="finite_difference", radius=1e-3
  )(w)
  # ((w + r u)² − w²)/r·‖v‖ = 2w·v_u + r·u²·‖v‖ exactly, for u = v/‖v‖, v = 2w².
  v = 2 * np.array([1.0, 4.0])
  u = v / np.linalg.norm(v)
  expected = np.array([1.0, 4.0]) + 0.1 * np.linalg.norm(v) * (
    2 * np.array([1.0, 2.0]) * u + 1e-3 * u**2
  )
  np.testing.assert_allclose(grad, expected, rtol=1e-4)


def test_hvp_method_float16_does_not_overflow():
  # Regression: H·v = 2w·2w² = 1.08e5 overflows float16 at w = 30 although
  # ∇P = w² + 4λw³ = 11700 does not; the product now runs on v/‖v‖.
  J = lambda w: jnp.sum(w.astype(jnp.float32) ** 3) / 3
  w = jnp.asarray([10.0, 30.0], jnp.float16)
  expected = _np_cubic_penalized_grad(w, 0.1)
  for method in EXACT:
    _, grad = gnorm_jax.penalized_value_and_grad(J, weight=0.1, method=method)(w)
    assert grad.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(grad, np.float64), expected, rtol=2e-3)


def test_penalized_rejects_bad_arguments():
  with pytest.raises(ValueError, match="weight"):
    gnorm_jax.penalized(jnp.sum, weight=-0.5)
  with pytest.raises(TypeError, match="callable"):
    gnorm_jax.penalized(3.0, weight=0.1)
  with pytest.raises(TypeError, match="argnums"):
    gnorm_jax.penalized_value_and_grad(jnp.sum, weight=0.1, argnums="0")
  with pytest.raises(TypeError, match="positional argument"):
    gnorm_jax.penalized_value_and_grad(lambda a, b: jnp.sum(a * b), 1, weight=0.1)(jnp.ones(2))


@pytest.mark.parametrize("make", [gnorm_jax.penalized, gnorm_jax.penalized_value_and_grad])
def test_signature_follows_jax_grad(make):
  # (fun, argnums=0, has_aux=False, *, weight, ...): the old positional weight
  # is missing, or lands in argnums and is named with the signature.
  signature = re.escape(f"The signature is {make.__name__}(fun, argnums=0, has_aux=False, *,")
  with pytest.raises(TypeError, match="keyword-only argument: 'weight'"):
    make(jnp.sum, 0.1)
  with pytest.raises(TypeError, match=rf"got argnums=0\.1\. {signature}"):
    make(jnp.sum, 0.1, weight=0.1)
  with pytest.raises(TypeError, match=rf"got has_aux=0\.1\. {signature}"):
    make(jnp.sum, 0, 0.1, weight=0.1)
  j = lambda a, b: (jnp.sum(a * b**3), a)
  a, b = jnp.array([1.0, 2.0]), jnp.array([0.5, -1.0])
  positional = make(j, 1, True, weight=0.1)(a, b)
  keywords = make(j, argnums=1, has_aux=True, weight=0.1)(a, b)
  for got, want in zip(jax.tree.leaves(positional), jax.tree.leaves(keywords)):
    np.testing.assert_array_equal(got, want)


def test_gan_penalties_take_fun():
  critic = lambda x: x @ jnp.array([3.0, 4.0])  # ‖∇ₓᵢ‖ = 5
  x = jnp.ones((2, 2))
  assert float(gnorm_jax.gradient_penalty(fun=critic, x=x)) == 16.0
  assert float(gnorm_jax.r1_penalty(fun=critic, x=x)) == 25.0
  for penalty in (gnorm_jax.gradient_penalty, gnorm_jax.r1_penalty):
    with pytest.raises(TypeError, match="unexpected keyword argument 'critic'"):
      penalty(critic=critic, x=x)


# --------------------------------------------------------------------------- #
# GAN penalties.
# --------------------------------------------------------------------------- #


def _np_critic_setup(seed=0, batch=6, d=4):
  k = jax.random.split(jax.random.key(seed), 3)
  params = {
    "w1": jax.random.normal(k[0], (d, 8)) / 2,
    "b1": 0.1 * jnp.ones(8),
    "w2": jax.random.normal(k[1], (8,)) / 3,
  }
  critic_of = lambda p: lambda x: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
  x = jax.random.normal(k[2], (batch, d))
  return critic_of, params, x


def _per_example_input_grad_norms(critic, x):
  """Independent reference: vmap of jax.grad on one example at a time, float64 norms."""
  grads = jax.jit(jax.vmap(jax.grad(lambda xi: critic(xi[None])[0])))(x)
  return np.linalg.norm(np.asarray(grads, np.float64).reshape(x.shape[0], -1), axis=1)


@jax.jit
def _gp_with_target(params, x, target):
  critic_of, _, _ = _np_critic_setup()
  return gnorm_jax.gradient_penalty(critic_of(params), x, target=target)


@pytest.mark.parametrize("target", [1.0, 0.0, 2.5])
def test_gradient_penalty_matches_vmap_reference(target):
  critic_of, params, x = _np_critic_setup()
  norms = _per_example_input_grad_norms(critic_of(params), x)
  want = np.mean((norms - target) ** 2)
  got = _gp_with_target(params, x, target)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_r1_penalty_matches_vmap_reference():
  critic_of, params, x = _np_critic_setup(seed=1)
  norms = _per_example_input_grad_norms(critic_of(params), x)
  got = jax.jit(lambda x: gnorm_jax.r1_penalty(critic_of(params), x))(x)
  np.testing.assert_allclose(float(got), np.mean(norms**2), rtol=1e-5)


@pytest.mark.parametrize("penalty", ["gp", "r1"])
def test_gan_penalties_eager_equals_jit_equals_vmap(penalty):
  """vmap over a stack of batches (e.g. several critics' minibatches) = a loop."""
  critic_of, params, x = _np_critic_setup(seed=4, batch=12)
  fn = gnorm_jax.gradient_penalty if penalty == "gp" else gnorm_jax.r1_penalty
  f = lambda x: fn(critic_of(params), x)
  stacked = x.reshape(3, 4, -1)
  eager = np.array([float(f(b)) for b in stacked])
  np.testing.assert_allclose([float(jax.jit(f)(b)) for b in stacked], eager, rtol=1e-5)
  np.testing.assert_allclose(jax.jit(jax.vmap(f))(stacked), eager, rtol=1e-5)


@pytest.mark.parametrize("penalty", ["gp", "r1"])
def test_gan_penalty_parameter_gradients(penalty):
  """d/dparams against the vmap-of-grad formulation, and check_grads."""
  critic_of, params, x = _np_critic_setup(seed=2)

  def ours(p):
    if penalty == "gp":
      return gnorm_jax.gradient_penalty(critic_of(p), x)
    return gnorm_jax.r1_penalty(critic_of(p), x)

  def reference(p):
    g = jax.vmap(jax.grad(lambda xi: critic_of(p)(xi[None])[0]))(x)
    sq = jnp.sum(g**2, axis=1)
    return jnp.mean((jnp.sqrt(sq) - 1) ** 2) if penalty == "gp" else jnp.mean(sq)

  _leaves_close(
    jax.jit(jax.grad(ours))(params), jax.jit(jax.grad(reference))(params), rtol=1e-4, atol=1e-6
  )
  check_grads(jax.jit(ours), (params,), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("penalty", ["gp", "r1"])
def test_gan_penalties_nan_free_at_vanishing_input_gradients(penalty):
  """A critic whose input gradient is exactly 0 for some examples (dead ReLU)."""

  def critic_of(p):
    return lambda x: jax.nn.relu(x @ p["w"] + p["b"]) * p["v"]

  params = {"w": jnp.array([1.0, 0.0]), "b": jnp.array(0.0), "v": jnp.array(2.0)}
  x = jnp.array([[-1.0, 3.0], [-2.0, 0.0], [1.0, 1.0]])  # examples 0, 1 dead
  fn = gnorm_jax.gradient_penalty if penalty == "gp" else gnorm_jax.r1_penalty
  value, grads = jax.value_and_grad(lambda p: fn(critic_of(p), x))(params)
  want = (2 * (0 - 1) ** 2 + (2 - 1) ** 2) / 3 if penalty == "gp" else 4 / 3
  np.testing.assert_allclose(float(value), want, rtol=1e-5)
  assert _all_finite(grads)
  zero_critic = lambda p: lambda x: x @ p
  g0 = jax.grad(lambda p: fn(zero_critic(p), x))(jnp.zeros(2))  # every ∇ₓ = 0
  assert _all_finite(g0) and float(jnp.sum(jnp.abs(g0))) == 0.0


def test_r1_check_grads_at_vanishing_input_gradients():
  """R1 is a sum of squares: smooth in the critic's parameters even where ∇ₓ = 0."""
  with jax.enable_x64(True):
    x = jnp.array([[1.0, -2.0], [0.5, 3.0], [-1.0, 0.0]], jnp.float64)
    critic_of = lambda p: lambda x: jnp.tanh(x @ p["w"]) * p["v"]
    r1 = lambda p: gnorm_jax.r1_penalty(critic_of(p), x)
    zero = {"w": jnp.zeros(2), "v": jnp.zeros(())}  # every ∇ₓ critic = 0
    check_grads(jax.jit(r1), (zero,), order=2, modes=["fwd", "rev"])


def test_gan_penalties_with_nan_inputs_give_nan():
  critic = lambda x: jnp.sum(x**2, axis=1)
  x = jnp.array([[jnp.nan, 1.0], [1.0, 2.0]])
  assert np.isnan(float(gnorm_jax.gradient_penalty(critic, x)))
  assert np.isnan(float(gnorm_jax.r1_penalty(critic, x)))


def test_gan_penalties_on_pytree_inputs_and_image_shapes():
  """Norms are over every non-batch axis and every leaf of x."""
  k = jax.random.split(jax.random.key(3), 3)
  x = {"img": jax.random.normal(k[0], (5, 4, 4, 2)), "cond": jax.random.normal(k[1], (5, 3))}
  w = jax.random.normal(k[2], (4 * 4 * 2,))

  def critic(x):
    img = x["img"].reshape(x["img"].shape[0], -1)
    return jnp.tanh(img @ w) + jnp.sum(x["cond"] ** 2, axis=1)

  def one(img, cond):
    return critic({"img": img[None], "cond": cond[None]})[0]

  gi, gc = jax.jit(jax.vmap(jax.grad(one, argnums=(0, 1))))(x["img"], x["cond"])
  sq = np.sum(np.asarray(gi, np.float64).reshape(5, -1) ** 2, 1) + np.sum(np.asarray(gc) ** 2, 1)
  np.testing.assert_allclose(float(gnorm_jax.r1_penalty(critic, x)), sq.mean(), rtol=1e-5)
  np.testing.assert_allclose(
    float(gnorm_jax.gradient_penalty(critic, x)), np.mean((np.sqrt(sq) - 1) ** 2), rtol=1e-5
  )


def test_gan_penalties_with_flax_linen_critic():
  class Critic(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(4, (3, 3))(x)
      x = nn.LayerNorm()(nn.gelu(x))
      return nn.Dense(1)(x.reshape(x.shape[0], -1))  # [B, 1] is accepted

  x = jax.random.normal(jax.random.key(4), (3, 5, 5, 1))
  model = Critic()
  params = jax.jit(model.init)(jax.random.key(5), x)
  critic = lambda x: model.apply(params, x)
  norms = _per_example_input_grad_norms(lambda x: critic(x)[:, 0], x)
  gp = jax.jit(lambda x: gnorm_jax.gradient_penalty(critic, x))(x)
  np.testing.assert_allclose(float(gp), np.mean((norms - 1) ** 2), rtol=1e-4)
  r1 = lambda p: gnorm_jax.r1_penalty(lambda x: model.apply(p, x), x)
  assert _all_finite(jax.jit(jax.grad(r1))(params))


def test_gan_penalties_with_flax_nnx_critic():
  model = nnx.Sequential(
    nnx.Linear(3, 8, rngs=nnx.Rngs(0)), nnx.tanh, nnx.Linear(8, 1, rngs=nnx.Rngs(1))
  )
  x = jax.random.normal(jax.random.key(6), (4, 3))
  graphdef, state = nnx.split(model)

  def gp(state):
    critic = lambda x: nnx.merge(graphdef, state)(x)[:, 0]
    return gnorm_jax.gradient_penalty(critic, x)

  norms = _per_example_input_grad_norms(lambda x: model(x)[:, 0], x)
  np.testing.assert_allclose(float(gp(state)), np.mean((norms - 1) ** 2), rtol=1e-5)
  assert _all_finite(jax.grad(gp)(state))


def test_gan_penalties_with_equinox_critic():
  """An equinox MLP maps ONE example to a score: jax.vmap makes it a batch critic."""
  mlp = eqx.nn.MLP(3, "scalar", 8, 2, key=jax.random.key(7))
  x = jax.random.normal(jax.random.key(8), (5, 3))

  @eqx.filter_jit
  @eqx.filter_value_and_grad
  def r1(model):
    return gnorm_jax.r1_penalty(jax.vmap(model), x)

  value, grads = r1(mlp)
  norms = _per_example_input_grad_norms(jax.vmap(mlp), x)
  np.testing.assert_allclose(float(value), np.mean(norms**2), rtol=1e-5)
  assert _all_finite(eqx.filter(grads, eqx.is_inexact_array))


def test_gan_penalty_rejects_bad_critic_and_inputs():
  x = jnp.ones((4, 2))
  with pytest.raises(ValueError, match="one|scores"):
    gnorm_jax.gradient_penalty(lambda x: x, x)  # [B, 2] scores
  with pytest.raises(ValueError, match="scores"):
    gnorm_jax.r1_penalty(jnp.sum, x)  # a scalar: examples coupled into one score
  with pytest.raises(ValueError, match="target"):
    gnorm_jax.gradient_penalty(lambda x: x[:, 0], x, target=-1.0)
  with pytest.raises(ValueError, match="batch"):
    gnorm_jax.r1_penalty(lambda x: x, jnp.ones(()))
  with pytest.raises(TypeError, match="callable"):
    gnorm_jax.r1_penalty(None, x)


# --------------------------------------------------------------------------- #
# interpolate.
# --------------------------------------------------------------------------- #


def test_interpolate_uses_one_uniform_weight_per_example():
  k1, k2, k3 = jax.random.split(jax.random.key(9), 3)
  real = {"a": jax.random.normal(k1, (2000, 3, 2)), "b": jax.random.normal(k2, (2000, 4))}
  fake = jax.tree.map(lambda r: r + 1.0, real)  # real − fake = −1 everywhere
  mixed = jax.jit(gnorm_jax.interpolate)(k3, real, fake)
  # x̂ = ε·real + (1−ε)·fake  ⇒  ε = fake − x̂ entrywise; the same for every entry and leaf.
  eps_a = np.asarray(fake["a"] - mixed["a"]).reshape(2000, -1)
  eps_b = np.asarray(fake["b"] - mixed["b"])
  np.testing.assert_allclose(eps_a, np.broadcast_to(eps_a[:, :1], eps_a.shape), atol=1e-5)
  np.testing.assert_allclose(eps_b, np.broadcast_to(eps_a[:, :1], eps_b.shape), atol=1e-5)
  eps = eps_a[:, 0]
  assert eps.min() >= -1e-6 and eps.max() <= 1 + 1e-6
  # U[0, 1]: mean 1/2, variance 1/12 (standard errors 0.0065 and 0.0019 at n = 2000).
  assert abs(eps.mean() - 0.5) < 0.03 and abs(eps.var() - 1 / 12) < 0.01


def test_interpolate_endpoints_dtype_and_errors():
  real, fake = jnp.ones((3, 2), jnp.bfloat16), jnp.zeros((3, 2), jnp.bfloat16)
  mixed = gnorm_jax.interpolate(jax.random.key(0), real, fake)
  assert mixed.dtype == jnp.bfloat16 and mixed.shape == (3, 2)
  same = gnorm_jax.interpolate(jax.random.key(1), real, real)
  np.testing.assert_array_equal(np.asarray(same, np.float32), np.ones((3, 2)))
  with pytest.raises(ValueError, match="same structure and shapes"):
    gnorm_jax.interpolate(jax.random.key(0), jnp.ones((3, 2)), jnp.ones((4, 2)))


# Issue 18: stationary points with ord 1/inf, empty batches, overflowing means,
# integer images.


@pytest.mark.parametrize("ord_", [1, math.inf])
@pytest.mark.parametrize("method", ["hvp", "double_backprop", "finite_difference"])
def test_unsquared_ord_penalty_has_zero_gradient_at_a_stationary_point(ord_, method):
  # The finite-difference penalty with ord=1 returned 7e-4: jnp.abs has
  # derivative 1 at 0. The zero subgradient makes every method agree on 0.
  J = lambda w: jnp.sum(w**2) + jnp.sum(w**3)
  value, grad = gnorm_jax.penalized_value_and_grad(
    J, weight=0.1, method=method, ord=ord_, squared=False
  )(jnp.zeros(3))
  assert float(value) == 0.0
  np.testing.assert_array_equal(grad, np.zeros(3))


@pytest.mark.parametrize("penalty", [gnorm_jax.gradient_penalty, gnorm_jax.r1_penalty])
def test_empty_batch_is_named_not_nan(penalty):
  with pytest.raises(ValueError, match=r"x is an empty batch"):
    penalty(lambda x: x @ jnp.ones(2), jnp.ones((0, 2)))


def test_means_do_not_overflow_where_the_sum_would():
  # B·‖∇‖² above float32's max: the mean of the squares is 2e38, finite.
  x = jnp.ones((4, 2))
  r1 = gnorm_jax.r1_penalty(lambda x: x @ jnp.array([1e19, 1e19]), x)
  np.testing.assert_allclose(r1, 2 * 1e19**2, rtol=1e-6)
  gp = gnorm_jax.gradient_penalty(lambda x: x @ jnp.array([1e19, 0.0]), x, target=0.0)
  np.testing.assert_allclose(gp, np.float64(1e19) ** 2, rtol=1e-6)
  odd = gnorm_jax.r1_penalty(lambda x: x @ jnp.array([1.0, 2.0]), jnp.ones((3, 2)))
  assert float(odd) == 5.0


def test_interpolate_keeps_integer_images_as_floats():
  real = jnp.zeros((4, 3), jnp.uint8)
  fake = jnp.full((4, 3), 255, jnp.uint8)
  key = jax.random.key(0)
  eps = np.asarray(jax.random.uniform(key, (4,), jnp.float32), np.float64)
  got = gnorm_jax.interpolate(key, real, fake)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, np.broadcast_to(((1 - eps) * 255)[:, None], (4, 3)), rtol=1e-6)
