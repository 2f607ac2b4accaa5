"""Tests of gnorm_jax._clipping: clip_by_norm, normalize, normalized_sgd."""

import functools
import math

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import np_norm
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import gnorm_jax

ORDS = [None, 1, math.inf]
PERS = ["global", "leaf"]
# Transforms whose first argument is a scalar hyperparameter (τ or scale).
FACTORIES = [gnorm_jax.clip_by_norm, gnorm_jax.normalize]


def make_tree(seed=0, scale=1.0, dtype=jnp.float32):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {
    "w": (scale * jax.random.normal(k1, (4, 3))).astype(dtype),
    "b": (scale * jax.random.normal(k2, (3,))).astype(dtype),
    "nested": {"s": (scale * jax.random.normal(k3, ())).astype(dtype)},
  }


def np_apply(tree, ord, per, factor_fn):
  """float64 numpy reference: each leaf times factor_fn(norm of its group)."""
  leaves, treedef = jax.tree.flatten(tree)
  if per == "global":
    norms = [np_norm(leaves, ord)] * len(leaves)
  else:
    norms = [np_norm([x], ord) for x in leaves]
  out = [np.asarray(x, np.float64) * factor_fn(n) for x, n in zip(leaves, norms)]
  return jax.tree.unflatten(treedef, out), norms


def np_clip(tree, max_norm, ord=None, per="global"):
  return np_apply(tree, ord, per, lambda n: min(1.0, max_norm / n) if n > 0 else 1.0)


def np_normalize(tree, scale, ord=None, per="global"):
  return np_apply(tree, ord, per, lambda n: scale / n if n > 0 else 0.0)


def assert_tree_close(actual, expected, rtol=1e-5, atol=0.0):
  chex.assert_trees_all_equal_structs(actual, expected)
  jax.tree.map(
    lambda a, e: np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=rtol, atol=atol),
    actual,
    expected,
  )


def apply(tx, updates, jit=False):
  def run(u):
    return tx.update(u, tx.init(u))

  return (jax.jit(run) if jit else run)(updates)


@functools.lru_cache(maxsize=None)
def jitted(factory, ord=None, per="global"):
  """``(g, h) -> factory(h, ord=ord, per=per).update(g, ...)`` under jit.

  The hyperparameter h is traced, so each (factory, ord, per) and input shape
  compiles once for the whole module: this keeps the file fast.
  """
  return jax.jit(lambda g, h: apply(factory(h, ord=ord, per=per), g))


# ---------------------------------------------------------------- clip_by_norm


@pytest.mark.parametrize("per", PERS)
@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("max_norm", [0.1, 1.0, 100.0])
def test_clip_matches_float64_reference(max_norm, ord, per):
  g = make_tree(scale=0.7)
  out, state = jitted(gnorm_jax.clip_by_norm, ord, per)(g, max_norm)
  expected, norms = np_clip(g, max_norm, ord, per)
  assert_tree_close(out, expected)
  got_norms = [state.grad_norm] if per == "global" else jax.tree.leaves(state.grad_norm)
  np.testing.assert_allclose(got_norms, norms[: len(got_norms)], rtol=1e-5)


@pytest.mark.parametrize("max_norm", [0.1, 1.0, 5.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_clip_global_matches_optax(max_norm, seed):
  g = make_tree(seed)
  ours, _ = apply(gnorm_jax.clip_by_norm(max_norm), g)
  theirs, _ = apply(optax.clip_by_global_norm(max_norm), g)
  assert_tree_close(ours, jax.tree.map(np.asarray, theirs), rtol=1e-5)


@pytest.mark.parametrize("per", PERS)
def test_clip_below_threshold_is_bit_for_bit(per):
  g = make_tree()
  g["b"] = g["b"].at[0].set(-0.0)
  # Threshold exactly at the norm: still "at or below".
  norm = (
    gnorm_jax.tree_norm(g) if per == "global" else max(jax.tree.leaves(gnorm_jax.leaf_norms(g)))
  )
  for max_norm in [float(norm), 10.0, math.inf]:
    out, _ = jitted(gnorm_jax.clip_by_norm, None, per)(g, max_norm)
    jax.tree.map(
      lambda a, b: np.testing.assert_array_equal(
        np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32)
      ),
      out,
      g,
    )


def test_clip_leaf_clips_each_leaf_by_its_own_norm():
  g = {"big": jnp.array([30.0, 40.0]), "small": jnp.array([0.3, 0.4])}
  out, state = apply(gnorm_jax.clip_by_norm(1.0, per="leaf"), g)
  np.testing.assert_allclose(out["big"], [0.6, 0.8], rtol=1e-5)
  np.testing.assert_array_equal(out["small"], g["small"])
  np.testing.assert_allclose(optax.tree.get(state, "grad_norm")["big"], 50.0)
  np.testing.assert_allclose(optax.tree.get(state, "grad_norm")["small"], 0.5)


@pytest.mark.parametrize("per", PERS)
def test_clip_zero_input_or_threshold_gives_zeros_and_finite_derivatives(per):
  def f(g, tau):
    return jitted(gnorm_jax.clip_by_norm, None, per)(g, tau)[0]

  jac = jax.jit(jax.jacobian(f, argnums=(0, 1)))
  for g, max_norm in [(jnp.zeros(3), 1.0), (jnp.zeros(3), 0.0), (jnp.array([1.0, -2.0, 3.0]), 0.0)]:
    tau = jnp.float32(max_norm)
    np.testing.assert_array_equal(f(g, tau), jnp.zeros(3) if max_norm == 0 else g)
    jac_g, jac_tau = jac(g, tau)
    assert np.isfinite(jac_g).all() and np.isfinite(jac_tau).all()
    # The clipped update is g near 0 (τ > 0) and identically 0 for τ = 0.
    np.testing.assert_array_equal(jac_g, np.eye(3) if max_norm > 0 else np.zeros((3, 3)))
    check_grads(lambda g: f(g, tau), (g,), order=1, modes=["fwd", "rev"])


@pytest.mark.parametrize("per", PERS)
@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e30])
def test_clip_derivatives_at_extreme_norms_are_finite_and_exact(per, scale):
  # The unselected branch min(1, τ/‖g‖) must not leak inf·0 = NaN backwards.
  g = jnp.array([3.0, -4.0, 0.0], jnp.float32) * jnp.float32(scale)
  for max_norm in [1.0, 0.0, 4.0 * scale]:
    tau = jnp.float32(max_norm)
    jac_g, jac_tau = jax.jit(
      jax.jacobian(lambda g, tau: jitted(gnorm_jax.clip_by_norm, None, per)(g, tau)[0], (0, 1))
    )(g, tau)
    assert np.isfinite(jac_g).all() and np.isfinite(jac_tau).all(), (scale, max_norm)
    # Clipped (0 < τ < ‖g‖): ∂/∂g τg/‖g‖ = τ/‖g‖·(I − uuᵀ) and ∂/∂τ = u, u = g/‖g‖;
    # unclipped: I and 0; τ = 0: the update is identically 0 (∂/∂τ is one-sided there).
    u = np.array([0.6, -0.8, 0.0])
    if max_norm == 0:
      np.testing.assert_array_equal(jac_g, np.zeros((3, 3)))
      continue
    clipped = 5.0 * scale > max_norm
    want_g = max_norm / (5.0 * scale) * (np.eye(3) - np.outer(u, u)) if clipped else np.eye(3)
    atol = 1e-6 * np.abs(want_g).max()
    np.testing.assert_allclose(jac_g, want_g, rtol=1e-5, atol=atol, err_msg=str((scale, max_norm)))
    np.testing.assert_allclose(jac_tau, u if clipped else 0.0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  "norm,max_norm", [(1e-30, 1.0), (2e-30, 1e-30), (3.0, 1.0), (1e30, 2e29), (0.5, 1.0)]
)
def test_clip_factor_derivatives_match_float64(norm, max_norm):
  from gnorm_jax._numerics import clip_factor

  d_norm, d_tau = jax.grad(clip_factor, (0, 1))(jnp.float32(norm), jnp.float32(max_norm))
  over = norm > max_norm
  np.testing.assert_allclose(d_norm, -max_norm / norm**2 if over else 0.0, rtol=1e-5)
  np.testing.assert_allclose(d_tau, 1.0 / norm if over else 0.0, rtol=1e-5)


@pytest.mark.parametrize("g", [jnp.array([3.0, -4.0, 1.0]), jnp.array([0.1, 0.2, -0.1])])
def test_clip_derivatives_match_finite_differences(g):
  f = jax.jit(lambda g, tau: apply(gnorm_jax.clip_by_norm(tau), g)[0])
  check_grads(f, (g, jnp.float32(1.0)), order=2, modes=["rev"], eps=1e-3)


def test_clip_meta_gradient_wrt_max_norm():
  g = jnp.array([3.0, 4.0])
  dtau = jax.jacobian(lambda tau: apply(gnorm_jax.clip_by_norm(tau), g)[0])(1.0)
  np.testing.assert_allclose(dtau, g / 5.0, rtol=1e-5)  # d(τ g/‖g‖)/dτ


@pytest.mark.parametrize(
  "bad", [-1.0, -1e-9, float("nan"), -3, np.float32(-1.0), np.array(math.nan)]
)
def test_clip_rejects_negative_or_nan_max_norm(bad):
  # numpy 0-d arrays are numbers too.
  with pytest.raises(ValueError, match=r"max_norm must be >= 0, got max_norm="):
    gnorm_jax.clip_by_norm(bad)


@pytest.mark.parametrize("bad", [-1.0, math.nan])
@pytest.mark.parametrize("jit", [False, True])
def test_injected_negative_or_nan_max_norm_acts_as_zero(bad, jit):
  # optax.inject_hyperparams passes a jax array at init and a tracer in
  # update: both are used as they are, a negative or NaN one acting as 0 (it
  # raised at init). A jax array given directly is treated the same way.
  g = jnp.array([3.0, 4.0])
  for tx in (
    optax.inject_hyperparams(gnorm_jax.clip_by_norm)(max_norm=bad),
    gnorm_jax.clip_by_norm(jnp.array(bad)),
  ):
    update = jax.jit(tx.update) if jit else tx.update
    out, state = update(g, tx.init(g))
    np.testing.assert_array_equal(out, np.zeros(2))
    assert float(getattr(state, "inner_state", state).max_norm) == 0.0


@pytest.mark.parametrize("ord_, expected", [(1, 7.0), (math.inf, 4.0), (2, 5.0), (None, 5.0)])
def test_inject_hyperparams_accepts_numeric_ord(ord_, expected):
  # optax.inject_hyperparams turns ord=1 into a hyperparameter array (it raised
  # "ord must be ..."); under jit it is traced and the norm is selected.
  g = jnp.array([3.0, -4.0])
  kwargs = {} if ord_ is None else {"ord": ord_}
  tx = optax.inject_hyperparams(gnorm_jax.clip_by_norm)(max_norm=1, **kwargs)
  ref = gnorm_jax.clip_by_norm(1.0, ord=ord_)
  for update in (tx.update, jax.jit(tx.update)):
    out, state = update(g, tx.init(g))
    assert float(state.inner_state.grad_norm) == expected
    np.testing.assert_allclose(out, ref.update(g, ref.init(g))[0], rtol=1e-6)
    np.testing.assert_allclose(out, np.asarray(g, np.float64) / expected, rtol=1e-6)


@pytest.mark.parametrize("factory", FACTORIES)
@pytest.mark.parametrize("bad", [True, "1.0", jnp.ones(2), 1 + 2j])
def test_non_number_hyperparameters_raise_type_error(factory, bad):
  with pytest.raises(TypeError, match=r"must be a"):
    factory(bad)


@pytest.mark.parametrize("factory", FACTORIES)
@pytest.mark.parametrize("kwargs, match", [({"per": "block"}, "per"), ({"ord": 3}, "ord")])
def test_rejects_bad_per_and_ord(factory, kwargs, match):
  with pytest.raises(ValueError, match=match):
    factory(1.0, **kwargs)


@pytest.mark.parametrize("per", PERS)
def test_clip_float16_clips_instead_of_zeroing(per):
  # Squares overflow float16 (max 65504): a float16 norm would be inf.
  g = {"w": jnp.full((64,), 300.0, jnp.float16), "b": jnp.full((4,), -200.0, jnp.float16)}
  out, state = apply(gnorm_jax.clip_by_norm(1.0, per=per), g)
  expected, _ = np_clip(g, 1.0, None, per)
  assert all(x.dtype == jnp.float16 for x in jax.tree.leaves(out))
  assert_tree_close(out, expected, rtol=2e-3)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.grad_norm))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_clip_low_precision_matches_reference(dtype):
  g = make_tree(scale=3.0, dtype=dtype)
  out, _ = jitted(gnorm_jax.clip_by_norm)(g, 1.0)
  assert_tree_close(out, np_clip(g, 1.0)[0], rtol=1e-2)


@pytest.mark.parametrize("factory", FACTORIES)
@pytest.mark.parametrize("per", PERS)
@pytest.mark.parametrize("ord", [None, math.inf])
def test_eager_equals_jit(factory, per, ord):
  g = make_tree(scale=0.7)
  eager = apply(factory(0.5, ord=ord, per=per), g)
  jit = jitted(factory, ord, per)(g, 0.5)
  assert_tree_close(eager, jax.tree.map(np.asarray, jit), rtol=1e-5)


@pytest.mark.parametrize("factory", FACTORIES)
def test_ord_2_is_the_euclidean_default(factory):
  g = make_tree(scale=0.7)
  assert_tree_close(apply(factory(0.5, ord=2), g), jax.tree.map(np.asarray, apply(factory(0.5), g)))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_normalized_sgd_eager_equals_jit(momentum):
  tx = gnorm_jax.normalized_sgd(0.1, momentum=momentum)
  params = make_tree()
  s_eager = s_jit = tx.init(params)
  for step in range(2):
    g = make_tree(step + 1)
    u_eager, s_eager = tx.update(g, s_eager, params)
    u_jit, s_jit = jax.jit(tx.update)(g, s_jit, params)
    assert_tree_close((u_eager, s_eager), jax.tree.map(np.asarray, (u_jit, s_jit)), rtol=1e-5)


@pytest.mark.parametrize("factory", FACTORIES)
@pytest.mark.parametrize("per", PERS)
def test_under_vmap_matches_loop(factory, per):
  batch = jax.tree.map(lambda *xs: jnp.stack(xs), *[make_tree(s, 0.5 * s) for s in range(4)])
  tx = factory(1.0, per=per)
  out, state = jax.jit(jax.vmap(lambda g: tx.update(g, tx.init(g))))(batch)
  single = jax.jit(lambda g: tx.update(g, tx.init(g)))
  for i in range(4):
    oi, si = single(jax.tree.map(lambda x: x[i], batch))
    assert_tree_close(jax.tree.map(lambda x: x[i], out), jax.tree.map(np.asarray, oi))
    assert_tree_close(
      jax.tree.map(lambda x: x[i], state.grad_norm), jax.tree.map(np.asarray, si.grad_norm)
    )


def test_clip_chained_with_adam_matches_optax():
  params = make_tree(0)
  ours = optax.chain(gnorm_jax.clip_by_norm(0.5), optax.adam(1e-2))
  theirs = optax.chain(optax.clip_by_global_norm(0.5), optax.adam(1e-2))
  p1, s1, p2, s2 = params, ours.init(params), params, theirs.init(params)
  for step in range(5):
    g = make_tree(step + 1, scale=step)  # step 0: zero gradients
    u1, s1 = jax.jit(ours.update)(g, s1, p1)
    u2, s2 = jax.jit(theirs.update)(g, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    np.testing.assert_allclose(optax.tree.get(s1, "grad_norm"), gnorm_jax.tree_norm(g), rtol=1e-5)
  assert_tree_close(p1, jax.tree.map(np.asarray, p2), rtol=1e-5, atol=1e-7)


def test_grad_norm_state_readable_with_optax_tree_get():
  g = make_tree()
  tx = optax.chain(gnorm_jax.clip_by_norm(1.0, per="leaf"), optax.sgd(0.1))
  _, state = tx.update(g, tx.init(g), g)
  got = optax.tree.get(state, "grad_norm")
  assert_tree_close(got, jax.tree.map(np.asarray, gnorm_jax.leaf_norms(g)))


def test_state_dtype_is_stable_under_scan():
  params = make_tree()
  tx = gnorm_jax.clip_by_norm(1.0)

  def body(state, g):
    _, state = tx.update(g, state)
    return state, state.grad_norm

  gs = jax.tree.map(lambda x: jnp.stack([x, 2 * x, 0 * x]), params)
  _, norms = jax.lax.scan(body, tx.init(params), gs)
  n = float(gnorm_jax.tree_norm(params))
  np.testing.assert_allclose(norms, [n, 2 * n, 0.0], rtol=1e-5)


@pytest.mark.parametrize(
  "factory, name, values",
  [
    (gnorm_jax.clip_by_norm, "max_norm", [0.5, 2.0, 0.0]),
    (gnorm_jax.normalize, "scale", [0.5, 2.0, -1.0]),
    (gnorm_jax.normalized_sgd, "learning_rate", [0.5, 2.0, 0.0]),
  ],
)
def test_inject_hyperparams_changes_value_without_retrace(factory, name, values):
  chex.clear_trace_counter()
  g = make_tree(scale=3.0)
  tx = optax.inject_hyperparams(factory)(**{name: values[0]})
  state = tx.init(g)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(g, state):
    return tx.update(g, state, g)

  for value in values:
    state.hyperparams[name] = jnp.asarray(value)
    out, state = step(g, state)
    expected = factory(**{name: value}).update(g, factory(**{name: value}).init(g), g)[0]
    assert_tree_close(out, jax.tree.map(np.asarray, expected), rtol=1e-5)


def test_inject_hyperparams_with_static_ord():
  g = make_tree()
  tx = optax.inject_hyperparams(gnorm_jax.clip_by_norm, static_args=("ord",))(0.5, ord=1)
  out, _ = jax.jit(tx.update)(g, tx.init(g))
  assert_tree_close(out, np_clip(g, 0.5, ord=1)[0])


def test_traced_negative_or_nan_max_norm_acts_as_zero():
  g = make_tree()
  for tau in [-1.0, float("nan")]:
    out, _ = jax.jit(lambda g, t: apply(gnorm_jax.clip_by_norm(t), g))(g, tau)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(out))


# ------------------------------------------------------------- extreme inputs


@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("per", PERS)
@pytest.mark.parametrize(
  "values, max_norm", [([1e38, 1e38], 1.0), ([2e38, -1e38, 1.0], 1e-3), ([1e-30, 2e-30], 1e-31)]
)
def test_clip_extreme_norms_match_float64(values, max_norm, per, ord):
  # Regression: min(1, τ/‖g‖) = 1/1.4e38 is subnormal in float32 and was
  # flushed to 0, so [1e38, 1e38] clipped to 1 became [0, 0].
  g = {"a": jnp.asarray(values, jnp.float32)}
  out, _ = apply(gnorm_jax.clip_by_norm(max_norm, ord=ord, per=per), g)
  # Entries whose clipped value is subnormal (1·1e-3/2.2e38) may be flushed to 0.
  tiny = np.finfo(np.float32).tiny
  assert_tree_close(out, np_clip(g, max_norm, ord, per)[0], rtol=1e-5, atol=tiny)


def test_clip_meta_gradient_at_huge_norm_is_finite_and_exact():
  g = jnp.asarray([1e38, 1e38], jnp.float32)
  dtau = jax.jacobian(lambda tau: apply(gnorm_jax.clip_by_norm(tau), g)[0])(1.0)
  np.testing.assert_allclose(dtau, [np.sqrt(0.5)] * 2, rtol=1e-5)  # d(τ g/‖g‖)/dτ


@pytest.mark.parametrize("per", PERS)
def test_normalize_float16_keeps_small_entries(per):
  # Regression: the power-of-two pre-scaling was rounded to float16 before the
  # second factor, so 1e-4·2^-15 underflowed and [3e4, 1e-4] became [3e4, 0].
  g = jnp.asarray([30000.0, 1e-4], jnp.float16)
  out, _ = apply(gnorm_jax.normalize(3e4, per=per), g)
  expected = np.asarray(g, np.float64) * 3e4 / np_norm(g)
  assert out.dtype == jnp.float16
  np.testing.assert_allclose(np.asarray(out, np.float64), expected, rtol=1e-3)


@pytest.mark.parametrize("factory", FACTORIES)
def test_leaf_clipping_of_an_empty_tree(factory):
  # Regression: per="leaf" crashed on {} (its factor tree was taken for a scalar).
  out, state = apply(factory(1.0, per="leaf"), {})
  assert out == {} and state.grad_norm == {}


@pytest.mark.parametrize("per", PERS)
@pytest.mark.parametrize(
  "tx",
  [
    lambda per: gnorm_jax.clip_by_norm(1.0, per=per),
    lambda per: gnorm_jax.normalize(2.0, per=per),
    lambda per: gnorm_jax.normalized_sgd(0.1, momentum=0.9, per=per),
  ],
)
def test_python_float_leaves(tx, per):
  # Regression: Python-float leaves raised AttributeError ('float' has no dtype).
  g = {"a": 3.0, "b": [4.0, None]}
  out, _ = tx(per).update(g, tx(per).init(g), g)
  ref = tx(per).update(jax.tree.map(jnp.float32, g), tx(per).init(g), g)[0]
  chex.assert_trees_all_close(out, ref)
  assert out["b"][1] is None


# ----------------------------------------------------------- threshold trees


def test_leaf_clipping_with_a_tree_of_thresholds_matches_float64():
  g = make_tree(scale=3.0)
  thresholds = {"w": 0.5, "b": jnp.float32(2.0), "nested": {"s": 0.1}}
  out, _ = jax.jit(lambda g, t: apply(gnorm_jax.clip_by_norm(t, per="leaf"), g))(g, thresholds)
  leaves, treedef = jax.tree.flatten(g)
  taus = jax.tree.leaves(thresholds)
  expected = [np_clip([x], float(t))[0][0] for x, t in zip(leaves, taus)]
  assert_tree_close(out, jax.tree.unflatten(treedef, expected))


def test_leaf_clipping_with_a_prefix_tree_of_thresholds():
  g = make_tree(scale=3.0)
  out, _ = apply(gnorm_jax.clip_by_norm({"w": 0.5, "b": 1.0, "nested": 0.2}, per="leaf"), g)
  full = {"w": 0.5, "b": 1.0, "nested": {"s": 0.2}}
  expected, _ = apply(gnorm_jax.clip_by_norm(full, per="leaf"), g)
  chex.assert_trees_all_equal(out, expected)


# ----------------------------------------------------------- the state's max_norm


@pytest.mark.parametrize("jit", [False, True])
def test_clip_state_records_the_threshold_it_applied(jit):
  # Every clipping state records its threshold as max_norm (ClipByNormState lacked it).
  g = make_tree(scale=3.0)
  _, state = apply(gnorm_jax.clip_by_norm(0.5), g, jit)
  assert state.max_norm.shape == () and state.max_norm.dtype == jnp.float32
  assert float(state.max_norm) == 0.5 and float(state.grad_norm) > 0.5  # clipped
  assert float(optax.tree.get(gnorm_jax.clip_by_norm(0.5).init(g), "max_norm")) == 0.5
  _, state = apply(gnorm_jax.clip_by_norm(0.5, per="leaf"), g, jit)
  chex.assert_trees_all_equal(state.max_norm, jax.tree.map(lambda _: jnp.float32(0.5), g))
  thresholds = {"w": 0.5, "b": 2.0, "nested": 0.1}  # a prefix tree: one per subtree
  _, state = apply(gnorm_jax.clip_by_norm(thresholds, per="leaf"), g, jit)
  want = {"w": 0.5, "b": 2.0, "nested": {"s": 0.1}}
  chex.assert_trees_all_equal(state.max_norm, jax.tree.map(jnp.float32, want))
  chex.assert_trees_all_equal_structs(state.max_norm, state.grad_norm)


def test_clip_state_max_norm_follows_injected_threshold():
  g = make_tree(scale=3.0)
  tx = optax.inject_hyperparams(gnorm_jax.clip_by_norm)(max_norm=2.0)
  update = jax.jit(tx.update)
  state = tx.init(g)
  for tau, recorded in [(2.0, 2.0), (0.25, 0.25), (-1.0, 0.0)]:  # a traced τ < 0 acts as 0
    state.hyperparams["max_norm"] = jnp.float32(tau)
    out, state = update(g, state)
    assert float(state.inner_state.max_norm) == recorded
    np.testing.assert_allclose(gnorm_jax.tree_norm(out), recorded, rtol=1e-6)


def test_threshold_tree_errors_are_clear():
  with pytest.raises(ValueError, match="needs per='leaf'"):
    gnorm_jax.clip_by_norm({"w": 1.0})
  with pytest.raises(ValueError, match=r"max_norm\['w'\] must be >= 0, got max_norm\['w'\]=-1.0"):
    gnorm_jax.clip_by_norm({"w": -1.0}, per="leaf")
  with pytest.raises(TypeError, match=r"max_norm\['w'\] must be a real number"):
    gnorm_jax.clip_by_norm({"w": "1.0"}, per="leaf")
  tx = gnorm_jax.clip_by_norm({"w": 1.0, "other": 2.0}, per="leaf")
  g = make_tree()
  with pytest.raises(ValueError, match="pytree prefix of the updates"):
    tx.update(g, tx.init(g))


# ------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("factory", FACTORIES)
@pytest.mark.parametrize("per", PERS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_updates_stay_non_finite(factory, per, bad):
  g = make_tree()
  g["w"] = g["w"].at[1, 2].set(bad)
  out, state = jitted(factory, None, per)(g, 1.0)
  assert not np.isfinite(np.asarray(out["w"])).all()
  assert np.isfinite(np.asarray(out["b"])).all() and np.isfinite(out["nested"]["s"])
  w_norm = state.grad_norm if per == "global" else state.grad_norm["w"]
  assert np.isnan(w_norm) if math.isnan(bad) else np.isposinf(w_norm)
  if math.isinf(bad):  # finite entries of the offending group are scaled to 0
    finite = np.isfinite(np.asarray(g["w"]))
    np.testing.assert_array_equal(np.asarray(out["w"])[finite], 0.0)


@pytest.mark.parametrize("factory", FACTORIES)
def test_apply_if_finite_skips_non_finite_steps(factory):
  params = make_tree()
  tx = optax.apply_if_finite(optax.chain(factory(1.0), optax.adam(0.1)), max_consecutive_errors=3)
  state = tx.init(params)
  bad = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params)
  updates, state = jax.jit(tx.update)(bad, state, params)
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
  assert int(state.notfinite_count) == 1
  updates, state = jax.jit(tx.update)(params, state, params)
  assert int(state.notfinite_count) == 0
  assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(updates))


# -------------------------------------------------------------------- normalize


@pytest.mark.parametrize("per", PERS)
@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("scale", [0.01, -2.0])
def test_normalize_matches_float64_reference(scale, ord, per):
  g = make_tree(scale=0.3)
  out, state = jitted(gnorm_jax.normalize, ord, per)(g, scale)
  expected, norms = np_normalize(g, scale, ord, per)
  assert_tree_close(out, expected)
  got = (
    [gnorm_jax.tree_norm(out, ord)]
    if per == "global"
    else jax.tree.leaves(gnorm_jax.leaf_norms(out, ord))
  )
  np.testing.assert_allclose(got, abs(scale), rtol=1e-5)


def test_normalize_matches_optax_without_eps():
  g = make_tree()
  ours, _ = apply(gnorm_jax.normalize(-0.5), g)
  theirs, _ = apply(optax.normalize_by_update_norm(scale_factor=-0.5, eps=0.0), g)
  assert_tree_close(ours, jax.tree.map(np.asarray, theirs), rtol=1e-5)


def test_normalize_zero_stays_zero_with_finite_derivatives():
  g = {"zero": jnp.zeros(3), "x": jnp.array([3.0, 4.0])}
  out, _ = apply(gnorm_jax.normalize(per="leaf"), g)
  np.testing.assert_array_equal(out["zero"], 0.0)
  np.testing.assert_allclose(out["x"], [0.6, 0.8], rtol=1e-5)
  zeros = jax.tree.map(jnp.zeros_like, g)
  out, state = apply(gnorm_jax.normalize(), zeros)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(out))
  assert float(state.grad_norm) == 0.0
  jac = jax.jit(jax.jacobian(lambda g: apply(gnorm_jax.normalize(), g)[0]))(zeros)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(jac))


def test_normalize_derivatives_match_finite_differences():
  f = jax.jit(lambda g, s: apply(gnorm_jax.normalize(s), g)[0])
  check_grads(f, (jnp.array([3.0, -4.0, 1.0]), jnp.float32(2.0)), order=2, modes=["rev"], eps=1e-3)


@pytest.mark.parametrize(
  "value, scale, dtype",
  [
    (1e-37, 1e3, jnp.float32),
    (3e37, 1e-3, jnp.float32),
    (1e-4, 1e3, jnp.float16),
    (3e4, 1e-3, jnp.float16),
    (1e-37, 1e3, jnp.bfloat16),
  ],
)
def test_normalize_extreme_norms_have_norm_scale(value, scale, dtype):
  # scale/norm over- or underflows here; the power-of-two pre-scaling avoids it.
  g = jnp.array([value, -value, value], dtype)
  out, _ = jitted(gnorm_jax.normalize)(g, scale)
  assert out.dtype == dtype
  rtol = 1e-6 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(
    np.asarray(out, np.float64), scale * np.array([1, -1, 1]) / np.sqrt(3), rtol=rtol
  )


@pytest.mark.parametrize("bad", [math.inf, math.nan, jnp.array(math.inf), np.float32(math.nan)])
def test_normalize_rejects_non_finite_scale(bad):
  with pytest.raises(ValueError, match="scale="):
    gnorm_jax.normalize(bad)


# --------------------------------------------------------------- normalized_sgd


@pytest.mark.parametrize("per", PERS)
@pytest.mark.parametrize("ord", ORDS)
def test_normalized_sgd_steps_have_length_learning_rate(ord, per):
  lr = 0.05
  tx = gnorm_jax.normalized_sgd(lr, ord=ord, per=per)
  params = make_tree()
  state = tx.init(params)
  for step in range(3):
    g = make_tree(step + 10, scale=10.0**step)
    updates, state = jax.jit(tx.update)(g, state, params)
    lengths = (
      [gnorm_jax.tree_norm(updates, ord)]
      if per == "global"
      else jax.tree.leaves(gnorm_jax.leaf_norms(updates, ord))
    )
    np.testing.assert_allclose(lengths, lr, rtol=1e-5)
    # Descent: the step points against the gradient.
    pairs = zip(jax.tree.leaves(updates), jax.tree.leaves(g))
    assert float(sum(jnp.vdot(u, x) for u, x in pairs)) < 0


def np_normalized_sgd(grads, lr, beta, nesterov):
  """Cutkosky & Mehta 2020 in float64: m = βm + (1-β)g, step -lr·d/‖d‖."""
  m, steps = np.zeros_like(grads[0], np.float64), []
  for g in grads:
    m = beta * m + (1 - beta) * g
    d = beta * m + (1 - beta) * g if nesterov else m
    steps.append(-lr * d / np.linalg.norm(d))
  return steps


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_normalized_sgd_matches_reference(momentum, nesterov):
  grads = [np.asarray(jax.random.normal(jax.random.key(i), (5,))) for i in range(6)]
  tx = gnorm_jax.normalized_sgd(0.1, momentum=momentum, nesterov=nesterov)
  state = tx.init(jnp.zeros(5))
  expected = np_normalized_sgd(grads, 0.1, momentum, nesterov)
  for g, e in zip(grads, expected):
    u, state = jax.jit(tx.update)(jnp.asarray(g), state)
    np.testing.assert_allclose(u, e, rtol=1e-5, atol=1e-7)


def test_normalized_sgd_with_traced_momentum_and_schedule():
  schedule = optax.linear_schedule(0.1, 0.0, 10)
  tx = optax.inject_hyperparams(gnorm_jax.normalized_sgd)(learning_rate=schedule, momentum=0.9)
  params = jnp.array([1.0, 2.0])
  state = tx.init(params)
  u, state = jax.jit(tx.update)(params, state)
  np.testing.assert_allclose(jnp.linalg.norm(u), 0.1, rtol=1e-5)
  np.testing.assert_allclose(
    optax.tree.get(state, "grad_norm"), np.linalg.norm([1.0, 2.0]), rtol=1e-5
  )


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"learning_rate": -0.1}, "learning_rate=-0.1"),
    ({"learning_rate": math.nan}, "learning_rate=nan"),
    ({"learning_rate": 0.1, "momentum": 1.0}, "momentum=1.0"),
    ({"learning_rate": 0.1, "momentum": -0.5}, "momentum=-0.5"),
    ({"learning_rate": jnp.array(-0.1)}, "learning_rate must be a finite number >= 0"),
    ({"learning_rate": math.inf}, "learning_rate must be a finite number >= 0"),
    ({"learning_rate": 0.1, "momentum": jnp.array(1.0)}, r"momentum must be in \[0, 1\)"),
  ],
)
def test_normalized_sgd_rejects_bad_hyperparameters(kwargs, match):
  with pytest.raises(ValueError, match=match):
    gnorm_jax.normalized_sgd(**kwargs)


@pytest.mark.parametrize(
  "kwargs", [{"learning_rate": 0.1, "momentum": True}, {"learning_rate": True}]
)
def test_normalized_sgd_rejects_bools(kwargs):
  # momentum=True used to run with β = 1.
  with pytest.raises(TypeError, match="must be a number, not a bool"):
    gnorm_jax.normalized_sgd(**kwargs)


# ------------------------------------------------------------------- hypothesis

# Two shapes and traced thresholds: each property compiles once per (shape, ord).
finite_vectors = st.sampled_from([(6,), (2, 3)]).flatmap(
  lambda shape: hnp.arrays(
    np.float32, shape, elements=st.floats(-1e6, 1e6, width=32, allow_subnormal=False)
  )
)


@jax.jit
def _clip_all_ords(g, max_norm):
  return [apply(gnorm_jax.clip_by_norm(max_norm, ord=o), g)[0] for o in ORDS]


@settings(max_examples=40, deadline=None)
@given(g=finite_vectors, max_norm=st.floats(1e-3, 1e3))
def test_clip_properties(g, max_norm):
  for i, (ord, out) in enumerate(zip(ORDS, _clip_all_ords(g, max_norm))):
    n_in, n_out = np_norm([g], ord), np_norm([out], ord)
    # Bounded.
    assert n_out <= max_norm * (1 + 1e-6)
    # Direction preserved: out = c·g with c = min(1, τ/‖g‖) (or g = 0).
    if n_in > 0:
      c = min(1.0, max_norm / n_in)
      np.testing.assert_allclose(out, c * np.asarray(g, np.float64), rtol=1e-5, atol=1e-30)
    # Idempotent (up to one rounding of the norm).
    np.testing.assert_allclose(_clip_all_ords(out, max_norm)[i], out, rtol=1e-5)


@jax.jit
def _normalize(g, scale):
  return apply(gnorm_jax.normalize(scale), g)[0]


@settings(max_examples=40, deadline=None)
@given(g=finite_vectors, scale=st.floats(1e-3, 1e3))
def test_normalize_properties(g, scale):
  out = np.asarray(_normalize(g, scale), np.float64)
  if np.any(g != 0):
    np.testing.assert_allclose(np.linalg.norm(out), scale, rtol=1e-5)
    g64 = np.asarray(g, np.float64)
    np.testing.assert_allclose(out, scale * g64 / np.linalg.norm(g64), rtol=1e-5, atol=1e-30)
  else:
    np.testing.assert_array_equal(out, 0.0)


# Issue 18: finite updates whose norm overflows float32.


@pytest.mark.parametrize("ord_", [None, 1])
@pytest.mark.parametrize("per", ["global", "leaf"])
def test_finite_update_with_overflowing_norm_is_clipped_not_zeroed(ord_, per):
  g = jnp.array([3e38, 3e38], jnp.float32)  # ‖g‖ = 4.2e38 > float32's max
  g64 = np.asarray(g, np.float64)
  norm64 = np.linalg.norm(g64, ord=2 if ord_ is None else ord_)
  tx = gnorm_jax.clip_by_norm(1.0, ord=ord_, per=per)
  out, state = tx.update(g, tx.init(g))
  np.testing.assert_allclose(out, g64 / norm64, rtol=1e-6)
  assert np.isinf(jax.tree.leaves(optax.tree.get(state, "grad_norm"))[0])
  tx = gnorm_jax.normalize(2.0, ord=ord_, per=per)
  np.testing.assert_allclose(tx.update(g, tx.init(g))[0], 2 * g64 / norm64, rtol=1e-6)
