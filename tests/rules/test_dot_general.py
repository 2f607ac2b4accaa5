"""The dot_general rule: dense layers, einsums and DenseGeneral of flax (linen, nnx), equinox and
haiku, and its regressions.

The zoo's models are checked against ``jax.vmap(jax.grad(loss))`` (per_example_harness); the
regressions (overflow, underflow, cancellation, complex parameters, a plain Python argument) and
the property tests of the Gram route use float64 numpy formulas where float32 cannot serve as the
reference.
"""

import functools

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from per_example_harness import METHODS, RTOL, _assert_norms, _run, check, zoo_tests
from per_example_models import (
  HEADS,
  B,
  D,
  EqxSequence,
  T,
  eqx_model,
  haiku,
  linen,
  nnx_model,
  normal,
  sequence,
)

import gnorm_jax

RULES = {"dot_general", "bias"}


class _LinenDenseGeneral(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.DenseGeneral((HEADS, D // HEADS))(x)  # [T, H, K]: two free kernel axes
    return nn.DenseGeneral(D, axis=(-2, -1))(jnp.tanh(h))  # two contracted kernel axes


MODELS = {
  "linen_dense": lambda: sequence(linen(nn.Dense(D)), 0),
  "linen_dense_no_bias": lambda: sequence(linen(nn.Dense(D, use_bias=False)), 1),
  "linen_dense_general": lambda: sequence(linen(_LinenDenseGeneral()), 2),
  "linen_einsum": lambda: sequence(
    linen(nn.Einsum((D, HEADS, D // HEADS), "td,dhk->thk")), 3, out_shape=(T, HEADS, D // HEADS)
  ),
  "nnx_linear": lambda: sequence(nnx_model(lambda r: nnx.Linear(D, D, rngs=r)), 11),
  "eqx_linear": lambda: sequence(eqx_model(lambda k: EqxSequence(eqx.nn.Linear(D, D, key=k))), 16),
  "haiku_linear": lambda: sequence(haiku(lambda x: hk.Linear(D)(x)), 20),
}

test_zoo_matches_vmap_of_grad, test_zoo_plan_materializes_nothing = zoo_tests(MODELS, RULES)


# ------------------------------------------------------------------ regressions from the issue

_OVERFLOW_X = [[1.0, 2.0], [3.0, 4.0]]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scale", [1e20, 1e-25], ids=["overflow", "underflow"])
def test_huge_and_tiny_gradients_keep_their_norms(scale, method):
  """1e20: squared entries overflow float32 (clipping gave zeros); 1e-25: they underflow (0)."""
  loss = lambda w, x: scale * jnp.sum(x @ w)
  w, x = jnp.ones((2, 2)), jnp.array(_OVERFLOW_X)
  # Example i's gradient is s·xᵢ⊗(1, 1), of norm s·√2·‖xᵢ‖.
  s, x64 = np.float64(np.float32(scale)), np.array(_OVERFLOW_X)
  want_norms = s * np.sqrt(2.0) * np.linalg.norm(x64, axis=1)
  want_sum = np.tensordot(np.minimum(1.0, 1.0 / want_norms), s * x64, axes=1)[:, None] * [1, 1]
  norms, mean, norms2, total = _run(loss, w, (x,), (1,), method, 1.0, jit=False)
  vmap_norms, vmap_mean, _, vmap_total = _run(loss, w, (x,), (1,), "vmap", 1.0, jit=False)
  for got in (norms, norms2):
    assert np.all(np.asarray(got) > 0), got
    _assert_norms(got, want_norms, method)
    np.testing.assert_allclose(got, vmap_norms, rtol=RTOL)
  for got, want, vmap in ((mean, want_sum / 2, vmap_mean), (total, want_sum, vmap_total)):
    assert np.all(np.asarray(got) != 0), got
    np.testing.assert_allclose(got, want, rtol=RTOL)
    np.testing.assert_allclose(got, vmap, rtol=RTOL)


def test_relu_rnn_with_exploding_gradients():
  """A Python loop (not scan) reuses w at 10 steps: gradients near 1e22 square to inf in f32."""
  k = jax.random.split(jax.random.key(30), 4)
  params = {
    "w": 32.0 * jnp.eye(4) + jax.random.uniform(k[0], (4, 4)),
    "u": jax.random.uniform(k[1], (3, 4)),
    "b": jax.random.uniform(k[2], (4,)),
  }
  xs = jax.random.uniform(k[3], (B, 10, 3)) * 100.0 ** jnp.arange(B)[:, None, None]

  def loss(p, xs):
    h = jnp.zeros(4)
    for t in range(xs.shape[0]):
      h = jax.nn.relu(h @ p["w"] + xs[t] @ p["u"] + p["b"])
    return jnp.sum(h)

  check(loss, params, xs)


def _cancelling(form):
  """A 16×16 weight at two positions whose gradients nearly cancel: x₁ = x₀ + 1e-4·noise."""
  k = jax.random.split(jax.random.key(31), 4)
  w = normal(k[0], 16, 16)
  x0, c = normal(k[1], 12, 16), normal(k[2], 12, 16)
  x1 = x0 + 1e-4 * jax.random.normal(k[3], (12, 16))
  if form == "two_uses":  # two dot_generals of the same leaf
    loss = lambda w, x0, x1, c: jnp.sum((x0 @ w) * c) - jnp.sum((x1 @ w) * c)
    return loss, w, (x0, x1, c), (x0, x1, c)
  # one dot_general over a sequence of two positions with opposite cotangents
  loss = lambda w, x, cc: jnp.sum((x @ w) * cc)
  return loss, w, (jnp.stack([x0, x1], 1), jnp.stack([c, -c], 1)), (x0, x1, c)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("form", ["two_uses", "two_positions"])
def test_cancelling_uses_are_exact(form, method):
  loss, w, batch, inputs = _cancelling(form)
  x0, x1, c = (np.asarray(a, np.float64) for a in inputs)
  # Example i's gradient is (x₀ᵢ − x₁ᵢ) ⊗ cᵢ, computed here without cancellation.
  want_norms = np.linalg.norm(x0 - x1, axis=1) * np.linalg.norm(c, axis=1)
  max_norm = float(np.median(want_norms))
  wts = np.minimum(1.0, max_norm / want_norms)
  want_sum = np.tensordot(wts, (x0 - x1)[:, :, None] * c[:, None, :], axes=1)
  # float32 rounds each term x⊗c before the two positions cancel: that bounds any method.
  terms = np.tensordot(wts, (np.abs(x0) + np.abs(x1))[:, :, None] * np.abs(c)[:, None, :], 1)
  batch_argnums = tuple(range(1, len(batch) + 1))
  for m in (method, "vmap"):  # vmap: float32 per-example gradients do meet RTOL here
    norms, mean, norms2, total = _run(loss, w, batch, batch_argnums, m, max_norm)
    _assert_norms(norms, want_norms, f"{m} per_example_grad_norms")
    _assert_norms(norms2, want_norms, f"{m} clipped_grad norms")
    for got, div in ((mean, 12), (total, 1)):
      np.testing.assert_allclose(
        got, want_sum / div, rtol=RTOL, atol=RTOL * np.max(terms) / div, err_msg=m
      )


@pytest.mark.parametrize("method", METHODS)
def test_complex_parameters(method):
  k = jax.random.split(jax.random.key(32), 4)
  w = (normal(k[0], 4, 3) + 1j * normal(k[1], 4, 3)).astype(jnp.complex64)
  x = (normal(k[2], B, T, 4) + 1j * normal(k[3], B, T, 4)).astype(jnp.complex64)
  loss = lambda w, x: jnp.sum(jnp.abs(x @ w) ** 2)
  check(loss, w, x, methods=(method,))  # against vmap(grad)
  got = _run(loss, w, (x,), (1,), method, 1.0)
  want = _run(loss, w, (x,), (1,), "vmap", 1.0)
  assert [g.dtype for g in got] == [jnp.float32, jnp.complex64, jnp.float32, jnp.complex64]
  for g, v in zip(got, want):
    np.testing.assert_allclose(g, v, rtol=RTOL, atol=RTOL * np.max(np.abs(v)))


@pytest.mark.parametrize("method", METHODS)
def test_plain_python_argument(method):
  """`train` is neither batched nor a parameter: the loss branches on it in Python."""
  k = jax.random.split(jax.random.key(33), 2)
  w, x = normal(k[0], D, D), normal(k[1], B, T, D)

  def loss(w, x, train):
    h = jnp.tanh(x @ w)
    if train:
      h = 0.5 * h
    return jnp.sum(h**2)

  check(loss, w, x, True, batch_argnums=(1,), methods=(method,), jit=False)


# ------------------------------------------------------------------ properties
# Dense layer z = x·W + b over T positions, loss Σₜ zₜ·cₜ: example i's gradient is (XᵢᵀCᵢ, Σₜ cᵢₜ),
# exact in float64 numpy from the float32 inputs.


def _dense_norms(x, c):
  x, c = np.asarray(x, np.float64), np.asarray(c, np.float64)
  gw = np.einsum("btd,bte->bde", x, c)
  return np.sqrt(np.sum(gw**2, axis=(1, 2)) + np.sum(np.sum(c, axis=1) ** 2, axis=1))


def _dense_loss(p, x, c):
  return jnp.sum((x @ p["w"] + p["b"]) * c)


@functools.cache
def _dense_norms_fn(method):  # one function per method: jit's cache serves every example
  return jax.jit(gnorm_jax.per_example_grad_norms(_dense_loss, batch_argnums=(1, 2), method=method))


def _check_dense(x, c, method):
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": jnp.zeros(4)}
  norms = _dense_norms_fn(method)(params, jnp.asarray(x), jnp.asarray(c))
  _assert_norms(norms, _dense_norms(x, c), method)


_exponents = st.lists(st.tuples(st.integers(-30, 30), st.integers(-30, 30)), min_size=3, max_size=3)


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=25, deadline=None)
@given(t=st.integers(1, 4), exponents=_exponents, seed=st.integers(0, 2**16))
def test_dense_at_positions_any_scale(method, t, exponents, seed):
  """Example i's gradient is about 10^kᵢ, split between its inputs and its cotangents."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(3, t, 3))
  c = rng.normal(size=(3, t, 4))
  for i, (k, a) in enumerate(exponents):
    a = min(max(a, k - 30), k + 30)  # both factors within 10^±30
    x[i] *= 10.0**a
    c[i] *= 10.0 ** (k - a)
  _check_dense(x.astype(np.float32), c.astype(np.float32), method)


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=25, deadline=None)
@given(
  pairs=st.integers(1, 3),
  delta=st.integers(1, 3),
  k=st.integers(-30, 30),
  seed=st.integers(0, 2**16),
)
def test_dense_at_cancelling_positions(method, pairs, delta, k, seed):
  """Positions in pairs x, x + 10^-δ·noise with cotangents c, −c: the gradient nearly cancels."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(3, pairs, 3)).astype(np.float32)
  x1 = (x + 10.0**-delta * rng.normal(size=x.shape)).astype(np.float32)
  c = (10.0**k * rng.normal(size=(3, pairs, 4))).astype(np.float32)
  _check_dense(np.concatenate([x, x1], 1), np.concatenate([c, -c], 1), method)
