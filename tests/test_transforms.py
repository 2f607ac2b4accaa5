"""gnorm_jax.grad_norm and gnorm_jax.value_grad_and_norm.

References are closed-form gradients evaluated in numpy float64, or jax.grad /
jax.hessian used independently of gnorm_jax with the norm taken in numpy.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import np_norm
from jax.test_util import check_grads

import gnorm_jax

ORDS = [None, 1, math.inf]
RNG = np.random.default_rng(0)
W = RNG.normal(size=(3, 4))
X = RNG.normal(size=4)
Y = RNG.normal(size=3)


def loss(w, x, y):
  """A tanh layer with a squared error: 0.5‖tanh(Wx) - y‖²."""
  return 0.5 * jnp.sum((jnp.tanh(w @ x) - y) ** 2)


def np_loss_grads(w, x, y):
  """Closed-form (∂L/∂w, ∂L/∂x) of ``loss`` in float64."""
  w, x, y = (np.asarray(a, np.float64) for a in (w, x, y))
  t = np.tanh(w @ x)
  delta = (t - y) * (1 - t**2)
  return np.outer(delta, x), w.T @ delta


def args32():
  return tuple(jnp.asarray(a, jnp.float32) for a in (W, X, Y))


# ------------------------------------------------------------ values


@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize(
  "argnums, picks", [(0, (0,)), (1, (1,)), ((0,), (0,)), ((0, 1), (0, 1)), ((1, 0), (1, 0))]
)
def test_grad_norm_matches_closed_form(argnums, picks, ord):
  gw, gx = np_loss_grads(W, X, Y)
  expected = np_norm([(gw, gx)[i] for i in picks], ord)
  got = gnorm_jax.grad_norm(loss, argnums, ord=ord)(*args32())
  assert got.dtype == jnp.float32 and got.shape == ()
  np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("argnums", [0, (0, 1)])
def test_value_grad_and_norm_matches_value_and_grad(argnums, ord):
  value, grads, norm = gnorm_jax.value_grad_and_norm(loss, argnums, ord=ord)(*args32())
  ref_value, ref_grads = jax.value_and_grad(loss, argnums)(*args32())
  np.testing.assert_array_equal(value, ref_value)
  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_array_equal(g, r)
  np.testing.assert_allclose(norm, np_norm(jax.tree.leaves(ref_grads), ord), rtol=1e-5)


def test_pytree_arguments_and_keyword_arguments():
  params = {"w": jnp.asarray(W, jnp.float32), "b": [jnp.zeros(3), None]}

  def f(p, x, *, y):
    return loss(p["w"], x, y) + jnp.sum(p["b"][0] ** 2)

  gw, _ = np_loss_grads(W, X, Y)
  got = gnorm_jax.grad_norm(f)(params, jnp.asarray(X, jnp.float32), y=jnp.asarray(Y, jnp.float32))
  np.testing.assert_allclose(got, np_norm([gw]), rtol=1e-5)


@pytest.mark.parametrize("argnums", [0, (0, 1)])
def test_has_aux(argnums):
  def f(w, x, y):
    return loss(w, x, y), {"pred": jnp.tanh(w @ x)}

  norm, aux = gnorm_jax.grad_norm(f, argnums, has_aux=True)(*args32())
  (value, aux2), grads, norm2 = gnorm_jax.value_grad_and_norm(f, argnums, True)(*args32())
  (ref_value, ref_aux), ref_grads = jax.value_and_grad(f, argnums, has_aux=True)(*args32())
  np.testing.assert_allclose(aux["pred"], np.tanh(W @ X), rtol=1e-5)
  np.testing.assert_array_equal(aux2["pred"], ref_aux["pred"])
  np.testing.assert_array_equal(value, ref_value)
  assert norm == norm2
  np.testing.assert_allclose(norm, np_norm(jax.tree.leaves(ref_grads)), rtol=1e-5)


def test_wraps_keeps_name_and_doc():
  def my_loss(w):
    """Docs."""
    return jnp.sum(w)

  for transform in (gnorm_jax.grad_norm, gnorm_jax.value_grad_and_norm):
    assert transform(my_loss).__name__ == "my_loss"
    assert transform(my_loss).__doc__ == "Docs."


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_parameters_give_float32_norm(dtype):
  # ∇ of 300·Σw is 300 everywhere; its norm over 10^6 entries is 3e5, beyond
  # float16's range, and is exact in the float32 accumulation.
  f = lambda w: 300.0 * jnp.sum(w.astype(jnp.float32))
  norm = gnorm_jax.grad_norm(f)(jnp.ones(10**6, dtype))
  assert norm.dtype == jnp.float32
  np.testing.assert_allclose(norm, 3e5, rtol=1e-5)


@pytest.mark.parametrize(
  "scale, expected", [(1e20, math.sqrt(2) * 1e20), (1e-30, math.sqrt(2) * 1e-30)]
)
def test_extreme_gradients_stay_accurate(scale, expected):
  # Gradients whose squares overflow or underflow float32.
  f = lambda x: scale * jnp.sum(x)
  np.testing.assert_allclose(gnorm_jax.grad_norm(f)(jnp.ones(2)), expected, rtol=1e-5)


@pytest.mark.parametrize("fill, check", [(math.inf, np.isinf), (math.nan, np.isnan)])
def test_non_finite_gradients(fill, check):
  # ∇(c·Σx) = c: an infinite or NaN gradient entry gives an inf or NaN norm.
  f = lambda x, c: jnp.sum(c * x)
  c = jnp.asarray([1.0, fill])
  for fn in (gnorm_jax.grad_norm(f), jax.jit(gnorm_jax.grad_norm(f))):
    assert check(fn(jnp.ones(2), c))


# ------------------------------------------------------- composition: jit/vmap


@pytest.mark.parametrize("argnums", [0, (0, 1)])
@pytest.mark.parametrize("has_aux", [False, True])
def test_eager_equals_jit(argnums, has_aux):
  f = (lambda *a: (loss(*a), a[0].sum())) if has_aux else loss
  fn = gnorm_jax.grad_norm(f, argnums, has_aux)
  eager, jitted = fn(*args32()), jax.jit(fn)(*args32())
  for e, j in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_allclose(e, j, rtol=1e-5)
  vgn = gnorm_jax.value_grad_and_norm(f, argnums, has_aux)
  for e, j in zip(jax.tree.leaves(vgn(*args32())), jax.tree.leaves(jax.jit(vgn)(*args32()))):
    np.testing.assert_allclose(e, j, rtol=1e-5)


@pytest.mark.parametrize("ord", ORDS)
def test_vmap_per_example_input_gradient_norms(ord):
  # Per-example ‖∂L/∂x_i‖ for a batch: vmap over x and y, w shared.
  batch_x = RNG.normal(size=(6, 4))
  batch_y = RNG.normal(size=(6, 3))
  batch_x[2] *= 1e-3  # a small input: the norms span several magnitudes
  fn = gnorm_jax.grad_norm(loss, argnums=1, ord=ord)
  w = jnp.asarray(W, jnp.float32)
  bx, by = jnp.asarray(batch_x, jnp.float32), jnp.asarray(batch_y, jnp.float32)
  vmapped = jax.vmap(fn, in_axes=(None, 0, 0))(w, bx, by)
  expected = [np_norm([np_loss_grads(W, x, y)[1]], ord) for x, y in zip(batch_x, batch_y)]
  np.testing.assert_allclose(vmapped, expected, rtol=1e-5)
  # An independent jax route: vmap of jax.grad, norm taken in numpy float64.
  per_example = jax.vmap(jax.grad(loss, argnums=1), in_axes=(None, 0, 0))(w, bx, by)
  np.testing.assert_allclose(vmapped, [np_norm([g], ord) for g in per_example], rtol=1e-5)
  np.testing.assert_allclose(
    jax.jit(jax.vmap(fn, in_axes=(None, 0, 0)))(w, bx, by), vmapped, rtol=1e-5
  )
  eager = [fn(w, x, y) for x, y in zip(bx, by)]
  np.testing.assert_allclose(vmapped, eager, rtol=1e-5)


def test_vmap_with_has_aux_and_tuple_argnums():
  f = lambda w, x, y: (loss(w, x, y), jnp.sum(x))
  bx = jnp.asarray(RNG.normal(size=(5, 4)), jnp.float32)
  by = jnp.asarray(RNG.normal(size=(5, 3)), jnp.float32)
  w = jnp.asarray(W, jnp.float32)
  norms, aux = jax.vmap(gnorm_jax.grad_norm(f, (0, 1), True), in_axes=(None, 0, 0))(w, bx, by)
  expected = [np_norm(np_loss_grads(W, x, y)) for x, y in zip(np.asarray(bx), np.asarray(by))]
  np.testing.assert_allclose(norms, expected, rtol=1e-5)
  np.testing.assert_allclose(aux, np.asarray(bx).sum(axis=1), rtol=1e-5)


# --------------------------------------------------------- composition: grad


def np_hvp_over_norm(w, x, y):
  """∇_x ‖∇_x L‖ = H g / ‖g‖ with H the Hessian in x, via jax.hessian in float64."""
  with jax.enable_x64(True):
    args = tuple(jnp.asarray(a, jnp.float64) for a in (w, x, y))
    g = np.asarray(jax.grad(loss, 1)(*args))
    h = np.asarray(jax.hessian(loss, 1)(*args))
  return h @ g / np.linalg.norm(g)


def test_grad_of_grad_norm_matches_formula():
  fn = gnorm_jax.grad_norm(loss, argnums=1)
  got = jax.grad(fn, argnums=1)(*args32())
  np.testing.assert_allclose(got, np_hvp_over_norm(W, X, Y), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(jax.jit(jax.grad(fn, argnums=1))(*args32()), got, rtol=1e-5)


@pytest.mark.parametrize("argnums", [0, 1, (0, 1)])
def test_grad_of_grad_norm_check_grads(argnums):
  with jax.enable_x64(True):
    args = tuple(jnp.asarray(a, jnp.float64) for a in (W, X, Y))
    check_grads(gnorm_jax.grad_norm(loss, argnums), args, order=1, modes=["fwd", "rev"])


@pytest.mark.parametrize("ord", ORDS)
def test_grad_finite_at_stationary_point(ord):
  # f = Σ(x - 1)⁴ + 0.5‖x - 1‖²: ∇f = 0 at x = 1, where ‖∇f‖ has the zero
  # subgradient; gradients must be finite (zero), never NaN.
  f = lambda x: jnp.sum((x - 1) ** 4) + 0.5 * jnp.sum((x - 1) ** 2)
  fn = gnorm_jax.grad_norm(f, ord=ord)
  x = jnp.ones(3)
  assert fn(x) == 0.0
  for g in (jax.grad(fn)(x), jax.jit(jax.grad(fn))(x), jax.hessian(fn)(x)):
    assert np.all(np.isfinite(g))
  if ord is None:
    np.testing.assert_array_equal(jax.grad(fn)(x), np.zeros(3))


def test_grad_of_grad_norm_in_a_training_step():
  # The gradient-norm penalty's objective L + λ‖∇L‖ differentiates end to end.
  lam = 0.1
  obj = lambda w, x, y: loss(w, x, y) + lam * gnorm_jax.grad_norm(loss)(w, x, y)
  with jax.enable_x64(True):
    args = tuple(jnp.asarray(a, jnp.float64) for a in (W, X, Y))
    check_grads(obj, args, order=1, modes=["rev"])


# --------------------------------------------------------------- errors


@pytest.mark.parametrize("transform", [gnorm_jax.grad_norm, gnorm_jax.value_grad_and_norm])
@pytest.mark.parametrize("argnums", ["0", 1.0, (), True, (0, "1"), None])
def test_bad_argnums_raise_type_error_at_construction(transform, argnums):
  with pytest.raises(TypeError, match="argnums must be an int or a non-empty tuple of ints"):
    transform(loss, argnums)


@pytest.mark.parametrize("transform", [gnorm_jax.grad_norm, gnorm_jax.value_grad_and_norm])
def test_wrong_slot_names_the_value_and_the_signature(transform):
  signature = re.escape(
    f"The signature is {transform.__name__}(fun, argnums=0, has_aux=False, *, ord=None)"
  )
  with pytest.raises(TypeError, match=rf"got argnums=2\.0\. {signature}"):
    transform(loss, 2.0)
  with pytest.raises(TypeError, match=rf"got has_aux=2\. {signature}"):
    transform(loss, 0, 2)


@pytest.mark.parametrize("transform", [gnorm_jax.grad_norm, gnorm_jax.value_grad_and_norm])
@pytest.mark.parametrize("argnums, negative", [(-1, [-1]), ((0, -2), [-2]), ([-3, -1], [-3, -1])])
def test_negative_argnums_are_rejected_naming_them(transform, argnums, negative):
  # One policy for every function transformation (the per-example engine
  # failed on them deep inside vmap).
  with pytest.raises(ValueError, match=rf"negative entries {re.escape(str(negative))}"):
    transform(loss, argnums)


@pytest.mark.parametrize("transform", [gnorm_jax.grad_norm, gnorm_jax.value_grad_and_norm])
def test_argnums_beyond_the_arguments_raise_type_error(transform):
  with pytest.raises(TypeError, match="argnums"):
    transform(loss, (0, 5))(*args32())


@pytest.mark.parametrize("transform", [gnorm_jax.grad_norm, gnorm_jax.value_grad_and_norm])
def test_non_callable_and_bad_ord(transform):
  with pytest.raises(TypeError, match="callable"):
    transform(3.0)
  with pytest.raises(ValueError, match="ord must be None"):
    transform(loss, ord=3)


def test_integer_argument_and_non_scalar_output_raise():
  with pytest.raises(TypeError, match="int32"):
    gnorm_jax.grad_norm(lambda x: jnp.sum(x * 1.0))(jnp.ones(2, jnp.int32))
  with pytest.raises(TypeError, match="scalar"):
    gnorm_jax.grad_norm(lambda x: x)(jnp.ones(2))
