"""Tests of gnorm_jax._diagnostics against float64 numpy references."""

from __future__ import annotations

import math
from typing import NamedTuple

import chex
import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from jax.test_util import check_grads

import gnorm_jax

# ---------------------------------------------------------------------------
# numpy float64 references (McCandlish et al. 2018, appendix A)


def ref_two_batches(small, big, b_small, b_big):
  small, big = np.float64(small), np.float64(big)
  grad_sq = (b_big * big - b_small * small) / (b_big - b_small)
  trace_cov = (small - big) / (1 / b_small - 1 / b_big)
  return trace_cov / grad_sq, grad_sq, trace_cov


def per_example_grads(rng, n, d, signal=1.0):
  """[n, d] per-example gradients around a common mean."""
  mean = signal * rng.standard_normal(d)
  return mean + rng.standard_normal((n, d)) * rng.uniform(0.5, 2.0, d)


# ---------------------------------------------------------------------------
# noise_scale_from_two_batches / gradient_noise_scale


@pytest.mark.parametrize("b_small,b_big", [(1, 2), (1, 64), (8, 32), (32, 1024)])
@pytest.mark.parametrize("jit", [False, True])
def test_two_batches_matches_reference(b_small, b_big, jit):
  rng = np.random.default_rng(b_small * 1000 + b_big)
  small, big = rng.uniform(2.0, 5.0), rng.uniform(0.5, 1.5)
  fn = gnorm_jax.noise_scale_from_two_batches
  if jit:
    fn = jax.jit(fn)
  est = fn(jnp.float32(small), jnp.float32(big), b_small, b_big)
  want = ref_two_batches(np.float32(small), np.float32(big), b_small, b_big)
  np.testing.assert_allclose([est.b_simple, est.grad_sq_norm, est.trace_cov], want, rtol=1e-5)
  assert est.b_simple.dtype == jnp.float32


@pytest.mark.parametrize("n,d", [(2, 3), (7, 5), (32, 16)])
@pytest.mark.parametrize("jit", [False, True])
def test_gradient_noise_scale_from_model_gradients(n, d, jit):
  """Per-example gradients from vmap(grad) of a regression loss; batch gradient from grad."""
  rng = np.random.default_rng(n * d)
  w = jnp.asarray(rng.standard_normal(d), jnp.float32)
  x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
  y = jnp.asarray(rng.standard_normal(n), jnp.float32)

  def loss(w, x, y):
    return 0.5 * (jnp.tanh(x @ w) - y) ** 2

  per_ex = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(w, x, y)
  batch = jax.grad(lambda w: jnp.mean(jax.vmap(loss, (None, 0, 0))(w, x, y)))(w)
  per_ex64, batch64 = np.asarray(per_ex, np.float64), np.asarray(batch, np.float64)

  fn = jax.jit(gnorm_jax.gradient_noise_scale) if jit else gnorm_jax.gradient_noise_scale
  est = fn(jnp.sum(per_ex**2, axis=1), jnp.sum(batch**2), n)
  want = ref_two_batches(np.mean(np.sum(per_ex64**2, axis=1)), np.sum(batch64**2), 1, n)
  np.testing.assert_allclose([est.b_simple, est.grad_sq_norm, est.trace_cov], want, rtol=2e-4)


def test_gradient_noise_scale_is_two_batches_with_small_batch_size_one():
  sq = jnp.array([1.0, 4.0, 2.5, 0.5])
  a = gnorm_jax.gradient_noise_scale(sq, 0.7, 4)
  b = gnorm_jax.noise_scale_from_two_batches(jnp.mean(sq), 0.7, 1, 4)
  chex.assert_trees_all_close(a, b)


@pytest.mark.parametrize("b_small,b_big", [(1, 8), (4, 16)])
def test_estimates_are_unbiased(b_small, b_big):
  """Averaged over many draws, the estimates converge to the true ‖G‖² and tr(Σ)."""
  rng = np.random.default_rng(b_big)
  d, trials = 6, 20000
  mean = rng.standard_normal(d)
  sigma = rng.uniform(0.5, 2.0, d)
  true_g2, true_tr = np.sum(mean**2), np.sum(sigma**2)
  g = mean + sigma * rng.standard_normal((trials, b_big, d))
  small = np.sum(g[:, :b_small].mean(1) ** 2, axis=1)
  big = np.sum(g.mean(1) ** 2, axis=1)
  est = jax.vmap(lambda s, b: gnorm_jax.noise_scale_from_two_batches(s, b, b_small, b_big))(
    jnp.asarray(small, jnp.float32), jnp.asarray(big, jnp.float32)
  )
  for values, truth in [(est.grad_sq_norm, true_g2), (est.trace_cov, true_tr)]:
    values = np.asarray(values, np.float64)
    stderr = values.std() / math.sqrt(trials)
    assert abs(values.mean() - truth) < 5 * stderr + 1e-4 * truth


def test_gradient_noise_scale_unbiased_from_per_example_norms():
  rng = np.random.default_rng(7)
  d, b, trials = 5, 8, 20000
  mean = rng.standard_normal(d)
  sigma = rng.uniform(0.5, 2.0, d)
  g = mean + sigma * rng.standard_normal((trials, b, d))
  est = jax.vmap(lambda sq, big: gnorm_jax.gradient_noise_scale(sq, big, b))(
    jnp.asarray(np.sum(g**2, -1), jnp.float32),
    jnp.asarray(np.sum(g.mean(1) ** 2, -1), jnp.float32),
  )
  for values, truth in [
    (est.grad_sq_norm, np.sum(mean**2)),
    (est.trace_cov, np.sum(sigma**2)),
  ]:
    values = np.asarray(values, np.float64)
    assert abs(values.mean() - truth) < 5 * values.std() / math.sqrt(trials)


def test_float64_inputs_give_float64():
  with jax.enable_x64(True):
    small = jnp.asarray(1.2345678901234, jnp.float64)
    big = jnp.asarray(0.3333333333333, jnp.float64)
    est = gnorm_jax.noise_scale_from_two_batches(small, big, 3, 17)
    assert est.b_simple.dtype == jnp.float64
    np.testing.assert_allclose(
      [est.b_simple, est.grad_sq_norm, est.trace_cov],
      ref_two_batches(1.2345678901234, 0.3333333333333, 3, 17),
      rtol=1e-13,
    )


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
  sq = jnp.array([1.0, 3.0, 2.0], dtype)
  est = gnorm_jax.gradient_noise_scale(sq, jnp.asarray(1.0, dtype), 3)
  assert est.b_simple.dtype == jnp.float32
  np.testing.assert_allclose(
    [est.b_simple, est.grad_sq_norm, est.trace_cov],
    ref_two_batches(2.0, 1.0, 1, 3),
    rtol=1e-5,
  )


def test_traced_batch_size_does_not_retrace():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def fn(sq, big, batch_size):
    return gnorm_jax.gradient_noise_scale(sq, big, batch_size)

  sq = jnp.array([2.0, 3.0, 1.0, 2.0])
  for batch_size in (4, 8, 100):
    est = fn(sq, 1.0, batch_size)
    np.testing.assert_allclose(est.b_simple, ref_two_batches(2.0, 1.0, 1, batch_size)[0], rtol=1e-5)


def test_zero_gradients_give_zero_not_nan():
  est = gnorm_jax.gradient_noise_scale(jnp.zeros(4), 0.0, 4)
  assert float(est.b_simple) == 0.0
  assert float(est.grad_sq_norm) == 0.0 and float(est.trace_cov) == 0.0


@pytest.mark.parametrize(
  "small,big,b_simple",
  [
    # ‖G‖² estimate exactly 0 with noise: infinite noise scale.
    (4.0, 1.0, math.inf),
    # Estimated ‖G‖² negative (too few steps averaged): negative b_simple.
    (10.0, 1.0, None),
  ],
)
def test_degenerate_signal(small, big, b_simple):
  est = gnorm_jax.noise_scale_from_two_batches(small, big, 1, 4)
  if b_simple is not None:
    assert float(est.grad_sq_norm) == 0.0 and float(est.b_simple) == b_simple
  else:
    assert float(est.grad_sq_norm) < 0 and float(est.b_simple) < 0
    np.testing.assert_allclose(est.b_simple, ref_two_batches(small, big, 1, 4)[0], rtol=1e-5)


@pytest.mark.parametrize(
  "small,big,expect",
  [
    (math.nan, 1.0, "nan"),
    (1.0, math.nan, "nan"),
    (math.inf, 1.0, "inf"),
  ],
)
def test_non_finite_inputs_propagate(small, big, expect):
  est = gnorm_jax.noise_scale_from_two_batches(small, big, 1, 4)
  if expect == "nan":
    assert all(np.isnan(v) for v in est)
  else:
    # inf small: tr(Σ) = +inf, ‖G‖² = -inf; their ratio is undefined (nan).
    assert float(est.trace_cov) == math.inf and float(est.grad_sq_norm) == -math.inf
    assert np.isnan(est.b_simple)


def test_derivatives():
  def f(small, big):
    est = gnorm_jax.noise_scale_from_two_batches(small, big, 2, 16)
    return est.b_simple + est.grad_sq_norm + est.trace_cov

  check_grads(f, (jnp.float32(3.0), jnp.float32(1.0)), order=2, modes=["rev"], eps=1e-2)
  # At zero the ratio is defined as 0; its derivatives are finite there.
  grads = jax.grad(f, argnums=(0, 1))(jnp.float32(0.0), jnp.float32(0.0))
  assert all(np.isfinite(g) for g in grads)
  # ... and 0: only the linear ‖G‖² = (16·big − 2·small)/14 and
  # tr(Σ) = (small − big)/(1/2 − 1/16) contribute.
  np.testing.assert_allclose(grads, [1 / 0.4375 - 2 / 14, -1 / 0.4375 + 16 / 14], rtol=1e-6)


@pytest.mark.parametrize(
  "small,big,error,match",
  [
    (0, 4, ValueError, "small_batch_size must be a finite number >= 1"),
    (jnp.array(0), 4, ValueError, "small_batch_size must be"),
    (2, np.int32(2), ValueError, "big_batch_size must be larger"),
    (2, math.inf, ValueError, "big_batch_size must be a finite number"),
    (4, 4, ValueError, "big_batch_size must be larger"),
    (8, 2, ValueError, "big_batch_size must be larger"),
    (True, 4, TypeError, "small_batch_size must be a number"),
    (2, "8", TypeError, "big_batch_size must be a real number"),
  ],
)
def test_two_batches_validation(small, big, error, match):
  with pytest.raises(error, match=match):
    gnorm_jax.noise_scale_from_two_batches(1.0, 0.5, small_batch_size=small, big_batch_size=big)


def test_two_batches_old_argument_names_are_gone():
  # b_small/b_big became small_batch_size/big_batch_size, as gradient_noise_scale's batch_size.
  with pytest.raises(TypeError, match="unexpected keyword argument 'b_small'"):
    gnorm_jax.noise_scale_from_two_batches(1.0, 0.5, b_small=2, b_big=8)


@pytest.mark.parametrize(
  "sq,batch_size,match",
  [
    (jnp.ones(4), 1, "batch_size must be a finite number >= 2"),
    (jnp.ones(4), 0, "batch_size must be a finite number >= 2"),
    (jnp.ones(4), jnp.array(1), "batch_size must be a finite number >= 2"),
    (jnp.ones((2, 2)), 4, "non-empty 1-D"),
    (jnp.ones(()), 4, "non-empty 1-D"),
    (jnp.ones((0,)), 4, "non-empty 1-D"),
  ],
)
def test_gradient_noise_scale_validation(sq, batch_size, match):
  with pytest.raises(ValueError, match=match):
    gnorm_jax.gradient_noise_scale(sq, 1.0, batch_size)


@settings(max_examples=30, deadline=None)
@given(
  seed=st.integers(0, 2**31 - 1),
  scale=st.floats(1e-3, 1e3),
  n=st.integers(2, 16),
)
def test_b_simple_is_scale_invariant(seed, scale, n):
  """Scaling every gradient by c scales both estimates by c² and leaves B_simple."""
  g = per_example_grads(np.random.default_rng(seed), n, 4)
  sq, big = np.sum(g**2, 1), np.sum(g.mean(0) ** 2)
  a = gnorm_jax.gradient_noise_scale(jnp.asarray(sq, jnp.float32), big, n)
  b = gnorm_jax.gradient_noise_scale(jnp.asarray(sq * scale**2, jnp.float32), big * scale**2, n)
  np.testing.assert_allclose(b.b_simple, a.b_simple, rtol=2e-3, atol=1e-6)
  np.testing.assert_allclose(
    b.grad_sq_norm, a.grad_sq_norm * scale**2, rtol=2e-3, atol=1e-6 * scale**2
  )


# ---------------------------------------------------------------------------
# noise_scale_tracker


def ref_tracker(estimates, decays):
  """float64 EMAs with bias correction; non-finite estimates skipped."""
  m = s = w = 0.0
  out = []
  for (g2, tr), beta in zip(estimates, decays):
    if np.isfinite(g2) and np.isfinite(tr):
      m, s, w = beta * m + (1 - beta) * g2, beta * s + (1 - beta) * tr, beta * w + (1 - beta)
    out.append((s / m, m / w, s / w) if w > 0 else (np.nan,) * 3)
  return out


def random_estimates(rng, steps):
  return [(float(rng.uniform(-0.5, 2.0)), float(rng.uniform(1.0, 50.0))) for _ in range(steps)]


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("jit", [False, True])
def test_tracker_matches_reference(decay, jit):
  rng = np.random.default_rng(int(decay * 1000))
  estimates = random_estimates(rng, 12)
  estimates[3] = (math.nan, 1.0)  # skipped
  estimates[7] = (1.0, math.inf)  # skipped
  tracker = gnorm_jax.noise_scale_tracker(decay)
  update = jax.jit(tracker.update) if jit else tracker.update
  state = tracker.init()
  want = ref_tracker(estimates, [decay] * len(estimates))
  for (g2, tr), ref in zip(estimates, want):
    est = gnorm_jax.NoiseScale(jnp.float32(tr / g2), jnp.float32(g2), jnp.float32(tr))
    smoothed, state = update(est, state)
    np.testing.assert_allclose(smoothed, ref, rtol=1e-4)
  assert int(state.num_skipped) == 2


def test_tracker_ratio_of_averages_not_average_of_ratios():
  tracker = gnorm_jax.noise_scale_tracker(0.5)
  state = tracker.init()
  for g2, tr in [(1.0, 10.0), (0.01, 10.0)]:  # per-step ratios 10 and 1000
    est = gnorm_jax.NoiseScale(jnp.float32(tr / g2), jnp.float32(g2), jnp.float32(tr))
    smoothed, state = tracker.update(est, state)
  # (0.25·10 + 0.5·10) / (0.25·1 + 0.5·0.01), not an average of 10 and 1000.
  np.testing.assert_allclose(smoothed.b_simple, 7.5 / 0.255, rtol=1e-5)


def test_tracker_under_scan_with_traced_decay_does_not_retrace():
  rng = np.random.default_rng(0)
  estimates = np.asarray(random_estimates(rng, 20), np.float32)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(decay, g2s, trs):
    tracker = gnorm_jax.noise_scale_tracker(decay)

    def step(state, x):
      g2, tr = x
      smoothed, state = tracker.update(gnorm_jax.NoiseScale(tr / g2, g2, tr), state)
      return state, smoothed

    return jax.lax.scan(step, tracker.init(), (g2s, trs))[1]

  for decay in (0.8, 0.95):
    smoothed = run(jnp.float32(decay), estimates[:, 0], estimates[:, 1])
    want = ref_tracker(estimates.astype(np.float64), [np.float32(decay)] * 20)
    np.testing.assert_allclose(np.stack(smoothed, 1), want, rtol=1e-4)


def test_tracker_state_can_be_donated():
  tracker = gnorm_jax.noise_scale_tracker(0.5)
  update = jax.jit(tracker.update, donate_argnums=1)
  est = gnorm_jax.NoiseScale(jnp.float32(2.0), jnp.float32(1.0), jnp.float32(2.0))
  state = tracker.init()
  for _ in range(2):
    smoothed, state = update(est, state)
  np.testing.assert_allclose(smoothed, [2.0, 1.0, 2.0], rtol=1e-5)


def test_tracker_before_any_finite_estimate_is_nan():
  tracker = gnorm_jax.noise_scale_tracker()
  nan = jnp.float32(math.nan)
  smoothed, state = tracker.update(gnorm_jax.NoiseScale(nan, nan, nan), tracker.init())
  assert all(np.isnan(v) for v in smoothed)
  assert int(state.num_skipped) == 1 and float(state.weight) == 0.0


@settings(max_examples=25, deadline=None)
@given(
  value=st.tuples(st.floats(0.01, 100.0), st.floats(0.0, 1000.0)),
  decay=st.floats(0.0, 0.999),
  steps=st.integers(1, 8),
)
def test_tracker_of_constant_estimates_is_that_constant(value, decay, steps):
  """Bias correction is exact: a constant sequence averages to itself at every step."""
  g2, tr = value
  tracker = gnorm_jax.noise_scale_tracker(decay)
  state = tracker.init()
  est = gnorm_jax.NoiseScale(jnp.float32(tr / g2), jnp.float32(g2), jnp.float32(tr))
  for _ in range(steps):
    smoothed, state = tracker.update(est, state)
    np.testing.assert_allclose(smoothed, [tr / g2, g2, tr], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5, jnp.array(1.0), np.float32(-0.5), math.nan])
def test_tracker_validation(decay):
  with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
    gnorm_jax.noise_scale_tracker(decay)


@pytest.mark.parametrize("decay", [True, "0.9", jnp.ones(2)])
def test_tracker_rejects_non_numbers(decay):
  with pytest.raises(TypeError, match="decay must be a"):
    gnorm_jax.noise_scale_tracker(decay)


# ---------------------------------------------------------------------------
# flat_leaf_norms


class Pair(NamedTuple):
  first: jax.Array
  second: jax.Array


class Linear(eqx.Module):
  weight: jax.Array
  bias: jax.Array


def nested_tree():
  rng = np.random.default_rng(3)
  r = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return {
    "params": {"dense": {"kernel": r(3, 4), "bias": r(4)}},
    "blocks": [r(2), Pair(r(2, 2), r(5))],
    "eqx": Linear(r(2, 3), r(2)),
  }


EXPECTED_PATHS = {
  "params/dense/kernel": ("params", "dense", "kernel"),
  "params/dense/bias": ("params", "dense", "bias"),
  "blocks/0": ("blocks", 0),
  "blocks/1/first": ("blocks", 1, "first"),
  "blocks/1/second": ("blocks", 1, "second"),
  "eqx/weight": ("eqx", "weight"),
  "eqx/bias": ("eqx", "bias"),
}


def get_by(tree, keys):
  for k in keys:
    tree = getattr(tree, k) if isinstance(k, str) and not isinstance(tree, dict) else tree[k]
  return tree


@pytest.mark.parametrize("prefix,sep", [("", "/"), ("grad_norm", "/"), ("g", ".")])
def test_flat_leaf_norms_prefix_and_separator(prefix, sep):
  tree = {"a": {"b": jnp.ones(4)}, "c": jnp.zeros(2)}
  flat = gnorm_jax.flat_leaf_norms(tree, prefix=prefix, sep=sep)
  head = prefix + sep if prefix else ""
  assert {k: float(v) for k, v in flat.items()} == {f"{head}a{sep}b": 2.0, f"{head}c": 0.0}


def test_flat_leaf_norms_single_leaf_and_empty():
  flat = gnorm_jax.flat_leaf_norms(jnp.array([3.0, 4.0]), prefix="loss")
  assert {k: float(v) for k, v in flat.items()} == {"loss": 5.0}
  assert gnorm_jax.flat_leaf_norms({}) == {}


def test_flat_leaf_norms_path_collision_raises():
  tree = {"a/b": jnp.ones(1), "a": {"b": jnp.ones(1)}}
  with pytest.raises(ValueError, match="same flat path 'a/b'"):
    gnorm_jax.flat_leaf_norms(tree)
  assert len(gnorm_jax.flat_leaf_norms(tree, sep=".")) == 2


def test_flat_dict_is_not_public():
  # A generic pytree utility, not about gradient norms (issue 13): flat_leaf_norms is the API.
  assert not hasattr(gnorm_jax, "flat_dict") and "flat_dict" not in gnorm_jax.__all__


@pytest.mark.parametrize("ord", [None, 1, 2, math.inf])
@pytest.mark.parametrize("jit", [False, True])
def test_flat_leaf_norms_matches_numpy(ord, jit):
  tree = nested_tree()
  fn = gnorm_jax.flat_leaf_norms
  if jit:
    fn = jax.jit(fn, static_argnums=1)
  flat = jax.device_get(fn(tree, ord))
  assert set(flat) == set(EXPECTED_PATHS)
  for path, keys in EXPECTED_PATHS.items():
    leaf = np.asarray(get_by(tree, keys), np.float64).ravel()
    np.testing.assert_allclose(flat[path], np.linalg.norm(leaf, ord=ord), rtol=1e-5)
    assert isinstance(float(flat[path]), float)


def test_flat_leaf_norms_prefix_and_errors():
  flat = gnorm_jax.flat_leaf_norms({"w": jnp.array([3.0, 4.0])}, prefix="grad_norm")
  assert list(flat) == ["grad_norm/w"] and float(flat["grad_norm/w"]) == 5.0
  with pytest.raises(ValueError, match="ord must be"):
    gnorm_jax.flat_leaf_norms({"w": jnp.ones(2)}, ord=3)
  with pytest.raises(TypeError, match="dtype int32"):
    gnorm_jax.flat_leaf_norms({"w": jnp.ones(2, jnp.int32)})


# ---------------------------------------------------------------------------
# record_leaf_norms


def ref_leaf_norms(tree, ord):
  return jax.tree.map(lambda x: np.linalg.norm(np.asarray(x, np.float64).ravel(), ord=ord), tree)


def ref_global(tree, ord):
  flat = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])
  return np.linalg.norm(flat, ord=ord)


@pytest.mark.parametrize("ord", [None, 1, math.inf])
@pytest.mark.parametrize("jit", [False, True])
def test_record_leaf_norms_records_and_passes_updates(ord, jit):
  params = nested_tree()
  grads = jax.tree.map(lambda x: 2.0 * x - 1.0, params)
  tx = gnorm_jax.record_leaf_norms(ord)
  state = tx.init(params)
  chex.assert_trees_all_equal(state.leaf_norms, jax.tree.map(jnp.zeros_like, state.leaf_norms))
  update = jax.jit(tx.update) if jit else tx.update
  updates, state = update(grads, state, params)
  chex.assert_trees_all_equal(updates, grads)
  if not jit:
    assert all(a is b for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)))
  chex.assert_trees_all_close(
    jax.tree.map(np.float64, state.leaf_norms), ref_leaf_norms(grads, ord), rtol=1e-5
  )
  np.testing.assert_allclose(state.global_norm, ref_global(grads, ord), rtol=1e-5)


def test_record_leaf_norms_position_in_chain():
  """First in a chain it sees gradients; last, the updates the optimizer applies."""
  params = {"w": jnp.ones(3), "b": jnp.zeros(())}
  grads = {"w": jnp.array([3.0, 0.0, 4.0]), "b": jnp.array(-2.0)}
  opt = optax.chain(
    gnorm_jax.record_leaf_norms(),
    optax.clip_by_global_norm(1.0),
    optax.sgd(0.1),
    gnorm_jax.record_leaf_norms(),
  )
  state = opt.init(params)
  updates, state = jax.jit(opt.update)(grads, state, params)
  first, last = state[0], state[3]
  np.testing.assert_allclose(first.global_norm, math.sqrt(29.0), rtol=1e-5)
  np.testing.assert_allclose([first.leaf_norms["w"], first.leaf_norms["b"]], [5.0, 2.0], rtol=1e-5)
  np.testing.assert_allclose(last.global_norm, 0.1, rtol=1e-5)  # clipped to 1, lr 0.1
  np.testing.assert_allclose(last.global_norm, ref_global(updates, None), rtol=1e-5)
  assert float(optax.tree.get(opt.init(params)[0], "global_norm")) == 0.0


def test_record_leaf_norms_dtypes_and_none_leaves():
  params = {"h": jnp.ones(4, jnp.bfloat16), "skip": None, "w": jnp.ones(2)}
  tx = gnorm_jax.record_leaf_norms()
  state = tx.init(params)
  assert state.leaf_norms["skip"] is None
  assert state.leaf_norms["h"].dtype == jnp.float32
  grads = {"h": jnp.full(4, 3.0, jnp.bfloat16), "skip": None, "w": jnp.array([3.0, 4.0])}
  updates, state = tx.update(grads, state)
  assert updates["h"].dtype == jnp.bfloat16
  np.testing.assert_allclose(state.leaf_norms["h"], 6.0)
  np.testing.assert_allclose(state.global_norm, math.sqrt(36.0 + 25.0), rtol=1e-5)


def test_record_leaf_norms_non_finite():
  tx = gnorm_jax.record_leaf_norms()
  params = {"a": jnp.ones(2), "b": jnp.ones(2)}
  grads = {"a": jnp.array([math.inf, 1.0]), "b": jnp.array([math.nan, 1.0])}
  updates, state = tx.update(grads, tx.init(params))
  assert float(state.leaf_norms["a"]) == math.inf
  assert np.isnan(state.leaf_norms["b"]) and np.isnan(state.global_norm)
  chex.assert_trees_all_equal(updates, grads)


def test_record_leaf_norms_in_a_jitted_training_loop():
  """The state has fixed shapes and dtypes, so a scan over steps works."""
  params = {"w": jnp.ones(3)}
  opt = optax.chain(gnorm_jax.record_leaf_norms(), optax.sgd(0.5))

  def step(carry, _):
    params, state = carry
    grads = jax.grad(lambda p: 0.5 * jnp.sum(p["w"] ** 2))(params)
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    return (params, state), optax.tree.get(state, "global_norm")

  _, norms = jax.jit(lambda c: jax.lax.scan(step, c, None, length=4))((params, opt.init(params)))
  np.testing.assert_allclose(norms, math.sqrt(3.0) * 0.5 ** np.arange(4), rtol=1e-5)


def test_record_leaf_norms_validation():
  with pytest.raises(ValueError, match="ord must be"):
    gnorm_jax.record_leaf_norms(ord=0)


# Issue 18: overflow, float32 batch sizes, bad norms, x64 state, logging names.


def _np_noise_scale(small, big, b_small, b_big):
  small, big = np.float64(small), np.float64(big)
  grad_sq = (b_big * big - b_small * small) / (b_big - b_small)
  trace_cov = (small - big) / (1 / b_small - 1 / b_big)
  return trace_cov / grad_sq, grad_sq, trace_cov


@pytest.mark.parametrize(
  "args", [(3e38, 2e38, 32, 128), (1.0, 0.5, 2**25, 2**25 + 1), (5.0, 2.0, 32, 128)]
)
def test_noise_scale_matches_float64(args):
  # 3e38: B·|G|² overflowed float32 (b_simple NaN, want 25.6); 2**25 and
  # 2**25 + 1 are the same float32 (a division by 0).
  got = gnorm_jax.noise_scale_from_two_batches(*args)
  b_simple, grad_sq, trace_cov = _np_noise_scale(*args)
  np.testing.assert_allclose(got.b_simple, b_simple, rtol=1e-5)
  np.testing.assert_allclose(got.grad_sq_norm, grad_sq, rtol=1e-5)
  if trace_cov < np.finfo(np.float32).max:
    np.testing.assert_allclose(got.trace_cov, trace_cov, rtol=1e-5)
  else:
    assert np.isinf(got.trace_cov)
  traced = jax.jit(gnorm_jax.noise_scale_from_two_batches)(*args)
  np.testing.assert_allclose(traced.b_simple, b_simple, rtol=1e-5)


def test_gradient_noise_scale_rejects_negative_norms_and_too_many():
  with pytest.raises(ValueError, match=r"per_example_sq_norms must be squared norms \(>= 0\)"):
    gnorm_jax.gradient_noise_scale(jnp.array([-1.0, 2.0]), 1.0, batch_size=2)
  with pytest.raises(ValueError, match=r"has 3 entries, more than batch_size=2"):
    gnorm_jax.gradient_noise_scale(jnp.array([1.0, 2.0, 3.0]), 1.0, batch_size=2)
  with pytest.raises(ValueError, match=r"batch_grad_sq_norm must be >= 0"):
    gnorm_jax.gradient_noise_scale(jnp.array([1.0, 2.0]), -1.0, batch_size=2)


def test_tracker_state_is_float64_under_x64():
  with jax.enable_x64(True):
    tracker = gnorm_jax.noise_scale_tracker(0.5)
    state = tracker.init()
    est = gnorm_jax.noise_scale_from_two_batches(jnp.float64(3e300), jnp.float64(1e300), 1, 2)
    smoothed, state = tracker.update(est, state)
    assert state.grad_sq_norm.dtype == jnp.float64
    np.testing.assert_allclose(smoothed.grad_sq_norm, -1e300, rtol=1e-12)
    np.testing.assert_allclose(smoothed.trace_cov, 4e300, rtol=1e-12)


@pytest.mark.parametrize("kwargs, name", [({"prefix": 1}, "prefix"), ({"sep": None}, "sep")])
def test_flat_leaf_norms_names_a_bad_prefix_or_sep(kwargs, name):
  with pytest.raises(TypeError, match=rf"{name} must be a str, got {name}="):
    gnorm_jax.flat_leaf_norms({"a": jnp.ones(2)}, **kwargs)
