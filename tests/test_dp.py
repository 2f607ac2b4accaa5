"""Tests of gnorm_jax._dp: dp_noise, dp_epsilon, dp_noise_multiplier, poisson_batches.

The accounting is checked against dp_accounting called here directly. PLD
calls take about 0.5 s each and a PLD calibration several seconds, so there are
few of them (one calibration, shared through a fixture).
"""

import dataclasses
import inspect
import itertools
import math
import os
import warnings

import chex
import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
from conftest import np_norm, np_values

import gnorm_jax

DELTA = 1e-5


def noisy_update(max_norm, noise_multiplier, batch_size, updates, seed=0, jit=True):
  tx = gnorm_jax.dp_noise(max_norm, noise_multiplier, batch_size=batch_size, seed=seed)
  return (jax.jit(tx.update) if jit else tx.update)(updates, tx.init(updates))


# dp_noise


def test_noise_has_std_sigma_times_max_norm_over_batch_size():
  sigma, c, b = 1.3, 0.7, 10.0
  updates, state = noisy_update(c, sigma, b, jnp.zeros(400_000))
  noise = np.asarray(updates, np.float64)
  np.testing.assert_allclose(noise.std(), sigma * c / b, rtol=0.01)
  assert abs(noise.mean()) < 5 * sigma * c / b / math.sqrt(noise.size)
  np.testing.assert_allclose(float(optax.tree.get(state, "noise_std")), sigma * c, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_zero_noise_multiplier_gives_exactly_sum_over_batch_size(dtype):
  grad_sum = {
    "w": jax.random.normal(jax.random.key(1), (5, 3)).astype(dtype),
    "b": None,
    "s": jnp.asarray(3.0, dtype),
  }
  # Eagerly: under jit XLA may turn x / 7 into x · (1/7), 1 ulp away.
  updates, state = noisy_update(1.0, 0.0, 7, grad_sum, jit=False)
  assert updates["b"] is None
  for name in ["w", "s"]:
    expected = (grad_sum[name].astype(jnp.float32) / 7).astype(dtype)
    assert updates[name].dtype == dtype
    np.testing.assert_array_equal(
      np.asarray(updates[name], np.float32), np.asarray(expected, np.float32)
    )
  assert float(state.noise_std) == 0.0


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_updates_keep_their_dtype_and_get_the_noise(dtype):
  updates, state = noisy_update(1.0, 2.0, 4, {"w": jnp.zeros((300, 300), dtype)})
  assert updates["w"].dtype == dtype and state.noise_std.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(updates["w"], np.float64).std(), 0.5, rtol=0.02)


def test_per_layer_thresholds_give_the_norm_of_the_thresholds_as_sensitivity():
  grads = {
    "layer1": {"w": jnp.zeros((100, 300)), "b": jnp.zeros(300)},
    "layer2": {"w": jnp.zeros((300, 100))},
  }
  updates, state = noisy_update({"layer1": 3.0, "layer2": 4.0}, 1.5, 2.0, grads)
  np.testing.assert_allclose(float(state.noise_std), 1.5 * 5.0, rtol=1e-6)
  for leaf in [updates["layer1"]["w"], updates["layer2"]["w"]]:  # one std for every leaf
    np.testing.assert_allclose(np.asarray(leaf).std(), 1.5 * 5.0 / 2.0, rtol=0.02)
  # A tree of per-leaf thresholds (the full structure) is a prefix too.
  per_leaf = {"layer1": {"w": 1.0, "b": 2.0}, "layer2": {"w": 2.0}}
  _, state = noisy_update(per_leaf, 1.0, 1.0, grads)
  np.testing.assert_allclose(float(state.noise_std), 3.0, rtol=1e-6)


def test_per_layer_thresholds_must_be_a_prefix_of_the_updates():
  with pytest.raises(ValueError, match="prefix of the update tree"):
    noisy_update({"layer1": 1.0, "other": 1.0}, 1.0, 1.0, {"layer1": jnp.zeros(3)})


def test_integer_updates_are_rejected_with_the_leaf_path():
  with pytest.raises(TypeError, match=r"\['n'\].*int32"):
    noisy_update(1.0, 1.0, 1.0, {"n": jnp.zeros(3, jnp.int32)})


def test_key_advances_each_step_and_the_seed_fixes_the_sequence():
  grads = {"a": jnp.zeros(8), "b": jnp.zeros(8)}

  def run(seed):
    tx = gnorm_jax.dp_noise(1.0, 1.0, batch_size=1, seed=seed)
    state = tx.init(grads)
    steps = []
    for _ in range(2):
      updates, state = tx.update(grads, state)
      steps.append(updates)
    return steps

  first, second = run(0)
  assert not np.array_equal(first["a"], second["a"])  # fresh noise each step
  assert not np.array_equal(first["a"], first["b"])  # independent noise per leaf
  chex.assert_trees_all_equal(run(0), [first, second])  # same seed, same noise
  assert not np.array_equal(run(1)[0]["a"], first["a"])


def test_chains_with_sgd_under_jit_and_matches_eager():
  params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
  grad_sum = jax.tree.map(lambda p: 2.0 * jnp.ones_like(p), params)
  exact = optax.chain(gnorm_jax.dp_noise(1.0, 0.0, batch_size=4), optax.sgd(0.1))
  updates, _ = jax.jit(exact.update)(grad_sum, exact.init(params), params)
  chex.assert_trees_all_close(updates, jax.tree.map(lambda g: -0.1 * g / 4, grad_sum))

  noisy = optax.chain(gnorm_jax.dp_noise(1.0, 1.0, batch_size=4, seed=0), optax.sgd(0.1))
  state = noisy.init(params)
  eager = noisy.update(grad_sum, state, params)
  jitted = jax.jit(noisy.update)(grad_sum, state, params)
  chex.assert_trees_all_close(eager, jitted, rtol=1e-6)
  assert float(optax.tree.get(jitted[1], "noise_std")) == 1.0


def test_inject_hyperparams_changes_values_without_retrace():
  chex.clear_trace_counter()
  params = {"w": jnp.zeros(1000)}
  tx = optax.inject_hyperparams(gnorm_jax.dp_noise)(
    max_norm=1.0, noise_multiplier=1.0, batch_size=10.0
  )
  state = tx.init(params)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(grads, state):
    return tx.update(grads, state, params)

  for sigma, b in [(1.0, 10.0), (0.0, 5.0)]:
    state.hyperparams["noise_multiplier"] = jnp.asarray(sigma)
    state.hyperparams["batch_size"] = jnp.asarray(b)
    updates, state = step({"w": jnp.full(1000, 2.0)}, state)
    assert float(optax.tree.get(state, "noise_std")) == sigma
  np.testing.assert_array_equal(updates["w"], np.float32(2.0) / np.float32(5.0))


def test_state_is_plain_arrays():
  state = gnorm_jax.dp_noise(1.0, 1.0, batch_size=1).init(jnp.zeros(3))
  assert all(isinstance(np.asarray(x), np.ndarray) for x in state)  # no typed keys


def test_one_dp_sgd_step_end_to_end():
  """poisson_batches → clipped_grad(mask=) → dp_noise with σ = 0 is the clipped mean."""
  loss = lambda w, x: jnp.sum(x * w)  # the gradient of example i is x_i
  x = jax.random.normal(jax.random.key(2), (50, 3)) * 2.0
  idx, mask = next(gnorm_jax.poisson_batches(50, 0.2, max_batch_size=25, seed=1))
  clipped_sum = gnorm_jax.clipped_grad(loss, max_norm=1.0, reduce="sum")
  grad_sum = clipped_sum(jnp.zeros(3), x[idx], mask=mask)
  updates, _ = noisy_update(1.0, 0.0, 0.2 * 50, grad_sum)
  chosen = np.asarray(x)[idx[mask]]
  norms = np.linalg.norm(chosen, axis=1, keepdims=True)
  expected = (chosen * np.minimum(1.0, 1.0 / norms)).sum(0) / 10.0
  np.testing.assert_allclose(updates, expected, rtol=1e-5)


# The accounting


def dp_sgd_event(sigma, q, steps):
  return dp_accounting.SelfComposedDpEvent(
    dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
  )


ACCOUNTANTS = {"pld": dp_accounting.pld.PLDAccountant, "rdp": dp_accounting.rdp.RdpAccountant}


def reference_epsilon(sigma, q, steps, accountant="pld"):
  return ACCOUNTANTS[accountant]().compose(dp_sgd_event(sigma, q, steps)).get_epsilon(DELTA)


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_dp_epsilon_is_dp_accountings_epsilon(accountant):
  eps = gnorm_jax.dp_epsilon(1.1, 0.02, 50, DELTA, accountant=accountant)
  assert isinstance(eps, float)
  assert eps == reference_epsilon(1.1, 0.02, 50, accountant)


def test_dp_noise_multiplier_rdp_is_dp_accountings_calibration():
  sigma = gnorm_jax.dp_noise_multiplier(1.0, 0.02, 50, DELTA, accountant="rdp")
  reference = dp_accounting.calibrate_dp_mechanism(
    dp_accounting.rdp.RdpAccountant, lambda s: dp_sgd_event(s, 0.02, 50), 1.0, DELTA
  )
  np.testing.assert_allclose(sigma, reference, atol=2e-6)
  assert reference_epsilon(sigma, 0.02, 50, "rdp") <= 1.0


@pytest.fixture(scope="module")
def pld_sigma():
  """σ for ε = 1 at q = 0.02, 50 steps, by PLD (the one PLD calibration here, ~4 s)."""
  return gnorm_jax.dp_noise_multiplier(1.0, 0.02, 50, DELTA)


def test_pld_noise_multiplier_round_trip_is_tight(pld_sigma):
  eps = gnorm_jax.dp_epsilon(pld_sigma, 0.02, 50, DELTA)
  assert 1.0 - 1e-3 <= eps <= 1.0  # never over budget, and nearly all of it spent
  assert reference_epsilon(pld_sigma * (1 - 1e-3), 0.02, 50) > 1.0  # the smallest such σ


def test_rdp_is_looser_than_pld(pld_sigma):
  assert reference_epsilon(pld_sigma, 0.02, 50, "rdp") > 1.0
  assert gnorm_jax.dp_noise_multiplier(1.0, 0.02, 50, DELTA, accountant="rdp") > pld_sigma


def test_epsilon_is_monotone():
  eps = lambda sigma=1.0, q=0.01, steps=100, delta=DELTA: gnorm_jax.dp_epsilon(
    sigma, q, steps, delta, accountant="rdp"
  )
  assert eps(sigma=0.8) > eps() > eps(sigma=1.5)
  assert eps(q=0.005) < eps() < eps(q=0.02)
  assert eps(steps=10) < eps() < eps(steps=1000)
  assert eps(delta=1e-3) < eps() < eps(delta=1e-7)
  assert gnorm_jax.dp_epsilon(2.0, 0.01, 10, DELTA) < gnorm_jax.dp_epsilon(1.0, 0.01, 10, DELTA)


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_no_noise_has_infinite_epsilon(accountant):
  assert gnorm_jax.dp_epsilon(0.0, 0.01, 10, DELTA, accountant=accountant) == math.inf


# Poisson sampling


def test_poisson_batches_have_fixed_shapes_and_padding():
  batches = gnorm_jax.poisson_batches(500, 0.05, max_batch_size=60, seed=3)
  for indices, mask in itertools.islice(batches, 200):
    assert indices.shape == mask.shape == (60,) and mask.dtype == bool
    size = int(mask.sum())
    assert mask[:size].all() and not mask[size:].any()  # samples first, then padding
    assert (indices[size:] == 0).all()
    taken = indices[:size]
    assert len(np.unique(taken)) == size and (taken >= 0).all() and (taken < 500).all()
  assert (batches.num_batches, batches.num_truncated) == (200, 0)


def test_poisson_batch_sizes_are_binomial_and_inclusion_is_uniform():
  n, q, steps = 1000, 0.05, 2000
  counts, inclusions = [], np.zeros(n)
  for indices, mask in gnorm_jax.poisson_batches(n, q, max_batch_size=120, steps=steps):
    counts.append(mask.sum())
    inclusions[indices[mask]] += 1
  assert len(counts) == steps
  assert abs(np.mean(counts) - q * n) < 5 * math.sqrt(n * q * (1 - q) / steps)
  np.testing.assert_allclose(np.var(counts), n * q * (1 - q), rtol=0.15)
  # Each example is in ~Binomial(steps, q) batches: 100 ± 9.7.
  assert abs(inclusions.mean() - q * steps) < 1.0 and inclusions.std() < 1.2 * 9.75


def test_poisson_batches_are_reproducible_by_seed():
  take = lambda seed: list(
    itertools.islice(gnorm_jax.poisson_batches(100, 0.1, max_batch_size=30, seed=seed), 5)
  )
  chex.assert_trees_all_equal(take(7), take(7))
  assert not all(np.array_equal(a[0], b[0]) for a, b in zip(take(7), take(8)))


def test_truncation_is_counted_and_warned_once():
  batches = gnorm_jax.poisson_batches(100, 0.5, max_batch_size=40, steps=50)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    sizes = [int(mask.sum()) for _, mask in batches]
  assert len(caught) == 1 and "max_batch_size=40" in str(caught[0].message)
  assert batches.num_batches == 50
  assert 40 < batches.num_truncated <= 50  # P(Binomial(100, 0.5) > 40) ≈ 0.97
  assert sizes.count(40) >= batches.num_truncated and max(sizes) == 40


def test_poisson_max_batch_size_is_the_smallest_safe_size():
  n, q, p = 200, 0.1, 1e-6
  m = gnorm_jax.poisson_max_batch_size(n, q, failure_probability=p)
  tail = lambda m: sum(math.comb(n, k) * q**k * (1 - q) ** (n - k) for k in range(m + 1, n + 1))
  assert tail(m) <= p < tail(m - 1)
  assert gnorm_jax.poisson_max_batch_size(n, q, failure_probability=1e-3) < m
  assert gnorm_jax.poisson_max_batch_size(n, 1.0) == n
  assert gnorm_jax.poisson_max_batch_size(10, 1e-12) == 1


# Validation: every error names the argument and the value (ValueError for a number out of
# range, TypeError for a bool or a non-number: the policy of gnorm_jax._checks).

V, T = ValueError, TypeError
NOISE_BAD = [
  (V, "max_norm", dict(max_norm=-1.0)),
  (V, "max_norm", dict(max_norm=math.nan)),
  (V, "max_norm", dict(max_norm=math.inf)),
  (T, "max_norm", dict(max_norm=True)),
  (V, r"max_norm\['b'\]", dict(max_norm={"w": 1.0, "b": -2.0})),
  (V, "max_norm", dict(max_norm={})),
  (V, "noise_multiplier", dict(noise_multiplier=-0.5)),
  (V, "noise_multiplier", dict(noise_multiplier=math.nan)),
  (V, "noise_multiplier", dict(noise_multiplier=math.inf)),
  (T, "noise_multiplier", dict(noise_multiplier=np.bool_(True))),
  (V, "batch_size", dict(batch_size=0)),
  (V, "batch_size", dict(batch_size=-4)),
  (V, "batch_size", dict(batch_size=math.inf)),
  (T, "batch_size", dict(batch_size=True)),
  (V, "seed", dict(seed=1.5)),
  (T, "seed", dict(seed=False)),
]


@pytest.mark.parametrize("error, name, bad", NOISE_BAD, ids=repr)
def test_dp_noise_rejects_bad_hyperparameters(error, name, bad):
  kwargs = dict(max_norm=1.0, noise_multiplier=1.0, batch_size=8) | bad
  with pytest.raises(error, match=rf"{name}.*got {name}"):
    gnorm_jax.dp_noise(**kwargs)


def test_dp_noise_accepts_traced_hyperparameters_unchecked():
  @jax.jit
  def noise_std(sigma, b):
    tx = gnorm_jax.dp_noise(1.0, sigma, batch_size=b)
    return tx.update(jnp.zeros(3), tx.init(jnp.zeros(3)))[1].noise_std

  assert float(noise_std(-1.0, 0.0)) == -1.0  # no check possible, and no error


FIRST_BAD = [
  (V, -1.0),
  (V, math.nan),
  (V, math.inf),
  (T, True),
  (T, "1.0"),
  (T, np.zeros(2)),
]
ACCOUNTING_BAD = (
  [
    (V, "sampling_rate", dict(sampling_rate=0.0)),
    (V, "sampling_rate", dict(sampling_rate=1.5)),
    (V, "sampling_rate", dict(sampling_rate=math.nan)),
    (T, "sampling_rate", dict(sampling_rate=True)),
    (V, "steps", dict(steps=0)),
    (V, "steps", dict(steps=10.5)),
    (T, "steps", dict(steps=True)),
    (V, "delta", dict(delta=0.0)),
    (V, "delta", dict(delta=1.0)),
    (V, "delta", dict(delta=math.nan)),
    (V, "accountant", dict(accountant="moments")),
    (V, "accountant", dict(accountant=None)),
  ]
  + [
    (error, name, {name: value})
    for name in ("noise_multiplier", "epsilon")
    for error, value in FIRST_BAD
  ]
  + [(V, "epsilon", dict(epsilon=0.0))]
)


@pytest.mark.parametrize("error, name, bad", ACCOUNTING_BAD, ids=repr)
def test_accounting_rejects_bad_arguments(error, name, bad):
  args = {"sampling_rate": 0.01, "steps": 10, "delta": DELTA} | bad
  for fn, first in [
    (gnorm_jax.dp_epsilon, "noise_multiplier"),
    (gnorm_jax.dp_noise_multiplier, "epsilon"),
  ]:
    if name in ("noise_multiplier", "epsilon") and name != first:
      continue
    with pytest.raises(error, match=rf"{name}.*got {name}"):
      fn(**({first: 1.0} | args))


def test_accounting_needs_concrete_numbers():
  with pytest.raises(TypeError, match="concrete"):
    jax.jit(lambda s: gnorm_jax.dp_epsilon(s, 0.01, 10, DELTA))(1.0)


SAMPLING_BAD = [
  (V, "num_examples", dict(num_examples=0)),
  (V, "num_examples", dict(num_examples=10.5)),
  (T, "num_examples", dict(num_examples=True)),
  (V, "sampling_rate", dict(sampling_rate=0.0)),
  (V, "sampling_rate", dict(sampling_rate=-0.1)),
  (V, "sampling_rate", dict(sampling_rate=2.0)),
  (V, "max_batch_size", dict(max_batch_size=0)),
  (T, "max_batch_size", dict(max_batch_size=8.5)),
  (T, "max_batch_size", dict(max_batch_size=True)),
  (V, "seed", dict(seed=-1)),
  (V, "seed", dict(seed=0.5)),
  (V, "steps", dict(steps=0)),
  (V, "steps", dict(steps=2.5)),
]


@pytest.mark.parametrize("error, name, bad", SAMPLING_BAD, ids=repr)
def test_poisson_batches_rejects_bad_arguments(error, name, bad):
  kwargs = dict(num_examples=100, sampling_rate=0.1, max_batch_size=8) | bad
  with pytest.raises(error, match=rf"{name}.*{name}="):
    gnorm_jax.poisson_batches(**kwargs)


@pytest.mark.parametrize(
  "error, name, bad",
  [
    (V, "num_examples", dict(num_examples=-5)),
    (V, "sampling_rate", dict(sampling_rate=0.0)),
    (V, "failure_probability", dict(failure_probability=0.0)),
    (V, "failure_probability", dict(failure_probability=1.0)),
    (T, "failure_probability", dict(failure_probability=False)),
  ],
  ids=repr,
)
def test_poisson_max_batch_size_rejects_bad_arguments(error, name, bad):
  kwargs = dict(num_examples=100, sampling_rate=0.1) | bad
  with pytest.raises(error, match=rf"{name}.*got {name}"):
    gnorm_jax.poisson_max_batch_size(**kwargs)


# Issue 18: the tighter valid bound, tiny δ, huge step counts, seeds, dtypes.


def _direct_epsilon(accountant, sigma, q, steps, delta):
  event = dp_accounting.SelfComposedDpEvent(
    dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
  )
  make = {"pld": dp_accounting.pld.PLDAccountant, "rdp": dp_accounting.rdp.RdpAccountant}
  return make[accountant]().compose(event).get_epsilon(delta)


@pytest.mark.parametrize("delta", [1e-14, 1e-15])
def test_epsilon_is_the_smaller_of_the_two_valid_bounds(delta):
  # PLD alone over-reported ε at δ <= 1e-14 and gave inf from 1e-15; RDP is
  # a valid bound there too, and the default takes the smaller.
  pld = _direct_epsilon("pld", 1.0, 0.01, 100, delta)
  rdp = _direct_epsilon("rdp", 1.0, 0.01, 100, delta)
  eps = gnorm_jax.dp_epsilon(1.0, 0.01, 100, delta)
  assert eps == min(pld, rdp) and math.isfinite(eps)
  assert gnorm_jax.dp_epsilon(1.0, 0.01, 100, delta, accountant="rdp") == rdp


def test_noise_multiplier_at_tiny_delta_takes_rdp():
  # PLD at δ = 1e-300 asks for thousands of times the noise RDP proves enough.
  sigma = gnorm_jax.dp_noise_multiplier(2.0, 0.01, 100, 1e-300)
  rdp_sigma = gnorm_jax.dp_noise_multiplier(2.0, 0.01, 100, 1e-300, accountant="rdp")
  assert sigma == rdp_sigma < 100
  assert _direct_epsilon("rdp", sigma, 0.01, 100, 1e-300) <= 2.0


def test_huge_step_counts_use_rdp_instead_of_exhausting_memory():
  # PLD needed > 8 GiB at 1e9 steps; RDP answers at once.
  eps = gnorm_jax.dp_epsilon(1.0, 0.01, 10**9, 1e-5)
  assert eps == _direct_epsilon("rdp", 1.0, 0.01, 10**9, 1e-5)
  with pytest.raises(ValueError, match=r"accountant='pld' would need .*Use accountant='rdp'"):
    gnorm_jax.dp_epsilon(1.0, 0.01, 10**9, 1e-5, accountant="pld")


def test_seed_may_be_a_key_and_bad_seeds_are_named():
  g = jnp.zeros(3)
  by_key = gnorm_jax.dp_noise(1.0, 1.0, batch_size=1, seed=jax.random.key(7))
  by_int = gnorm_jax.dp_noise(1.0, 1.0, batch_size=1, seed=7, rng="threefry2x32")
  np.testing.assert_array_equal(
    by_key.update(g, by_key.init(g))[0], by_int.update(g, by_int.init(g))[0]
  )
  with pytest.raises(ValueError, match=r"seed must be an integer in .* got seed=1844674407"):
    gnorm_jax.dp_noise(1.0, 1.0, batch_size=1, seed=2**64)
  with pytest.raises(TypeError, match=r"seed must be one PRNG key"):
    gnorm_jax.dp_noise(1.0, 1.0, batch_size=1, seed=jax.random.split(jax.random.key(0)))


def test_python_float_leaves_get_noise():
  tx = gnorm_jax.dp_noise(1.0, 0.0, batch_size=2)
  out, _ = tx.update({"a": 3.0}, tx.init({"a": 3.0}))
  assert float(out["a"]) == 1.5


def test_noise_scale_is_float64_under_x64():
  with jax.enable_x64(True):
    tx = gnorm_jax.dp_noise(1e300, 1e5, batch_size=1.0)
    g = jnp.zeros(1000, jnp.float64)
    out, state = tx.update(g, tx.init(g))
    assert state.noise_std.dtype == jnp.float64 == tx.init(g).noise_std.dtype
    np.testing.assert_allclose(float(state.noise_std), 1e305, rtol=1e-15)
    assert 0.5 < float(jnp.std(out / 1e305)) < 2  # σ·C = 1e305 (it overflowed float32)


def test_poisson_batches_size_error_has_no_optax_advice():
  with pytest.raises(TypeError, match=r"max_batch_size must be a Python int") as info:
    gnorm_jax.poisson_batches(10, 0.1, max_batch_size=2.0)
  assert "inject_hyperparams" not in str(info.value)


def test_default_seed_is_drawn_from_the_os_not_fixed():
  """With no seed, two transformations draw different noise (nobody can regenerate it);
  an explicit seed reproduces its noise."""
  grads = jnp.zeros(1000)
  draw = lambda tx: np.asarray(tx.update(grads, tx.init(grads))[0])
  a, b = (draw(gnorm_jax.dp_noise(1.0, 1.0, batch_size=1)) for _ in range(2))
  assert not np.array_equal(a, b)
  assert abs(np.std(a) - 1.0) < 0.1 and abs(np.std(b) - 1.0) < 0.1  # still N(0, σ²C²)
  c, d = (draw(gnorm_jax.dp_noise(1.0, 1.0, batch_size=1, seed=3)) for _ in range(2))
  np.testing.assert_array_equal(c, d)


# Noise generators (rng=): the right distribution, reproducible by seed, named errors.

PRNGS = ["threefry2x32", "threefry4x32", "philox4x32", "rbg", "unsafe_rbg"]
# The documented choice of rng="auto" by backend.
AUTO = {"tpu": "rbg"}.get(jax.default_backend(), "threefry2x32")


def noise_of(tx, grads, steps=1):
  """The noise of each of ``steps`` updates of ``tx`` (jitted, batch_size=BATCH or grads 0)."""
  state, update, draws = tx.init(grads), jax.jit(tx.update), []
  for _ in range(steps):
    noisy, state = update(grads, state)
    draws.append(np_values(noisy) - np_values(grads) / BATCH)
  return draws if steps > 1 else draws[0]


SIGMA, C, BATCH = 1.3, 0.7, 10.0
STD = SIGMA * C / BATCH  # of the noise in the update


def assert_gaussian(noise, std):
  """Mean within 5 standard errors of 0, std within 1 %, and a KS test against N(0, std²)."""
  # numpy float64: scipy >= 1.18 dispatches a JAX array to JAX's own special functions.
  noise = np.asarray(noise, np.float64).ravel()
  n = noise.size
  assert abs(noise.mean()) < 5 * std / math.sqrt(n)
  np.testing.assert_allclose(noise.std(), std, rtol=0.01)  # 1/sqrt(2n) = 0.16 % at n = 2e5
  assert scipy.stats.kstest(noise / std, "norm").pvalue > 1e-4


@pytest.mark.parametrize("rng", ["auto", *PRNGS, "secure"])
def test_each_generator_draws_noise_of_std_sigma_c_over_b(rng):
  grads = {"w": jnp.zeros((400, 400)), "b": jnp.full(40_000, 5.0)}
  seed = None if rng == "secure" else 0
  tx = gnorm_jax.dp_noise(C, SIGMA, batch_size=BATCH, seed=seed, rng=rng)
  assert_gaussian(noise_of(tx, grads), STD)


@pytest.mark.parametrize("rng", ["auto", *PRNGS])
def test_each_prng_reproduces_its_noise_by_seed(rng):
  grads = {"a": jnp.zeros(64), "b": jnp.zeros(64)}
  run = lambda seed: noise_of(
    gnorm_jax.dp_noise(1.0, 1.0, batch_size=1, seed=seed, rng=rng), grads, 2
  )
  first, second = run(5)
  assert not np.array_equal(first, second)  # fresh noise each step
  assert not np.array_equal(first[:64], first[64:])  # independent noise per leaf
  chex.assert_trees_all_equal(run(5), [first, second])
  assert not np.array_equal(run(6)[0], first)
  key = gnorm_jax.dp_noise(1.0, 1.0, batch_size=1, seed=5, rng=rng).init(grads).key
  impl = AUTO if rng == "auto" else rng
  assert (
    key.dtype == jnp.uint32 and key.shape == jax.random.key_data(jax.random.key(0, impl=impl)).shape
  )


def test_auto_is_the_documented_generator_of_the_backend():
  grads = jnp.zeros(1000)
  auto = noise_of(gnorm_jax.dp_noise(1.0, 1.0, batch_size=1, seed=3), grads)
  named = noise_of(gnorm_jax.dp_noise(1.0, 1.0, batch_size=1, seed=3, rng=AUTO), grads)
  np.testing.assert_array_equal(auto, named)


def test_default_seed_fills_the_whole_key_from_the_os():
  keys = {
    tuple(np.asarray(gnorm_jax.dp_noise(1.0, 1.0, batch_size=1, rng=rng).init(0.0).key))
    for rng in ["threefry4x32"] * 8
  }
  assert len(keys) == 8
  assert any(word >= 2**31 for key in keys for word in key[2:])  # 128 bits, not a 63-bit seed


def test_a_key_seed_keeps_its_own_implementation():
  grads = jnp.zeros(1000)
  key = jax.random.key(7, impl="rbg")
  by_key = gnorm_jax.dp_noise(1.0, 1.0, batch_size=1, seed=key)
  assert by_key.init(grads).key.shape == (4,)
  by_int = gnorm_jax.dp_noise(1.0, 1.0, batch_size=1, seed=7, rng="rbg")
  np.testing.assert_array_equal(noise_of(by_key, grads), noise_of(by_int, grads))
  with pytest.raises(ValueError, match=r"implementation 'rbg' .* got rng='threefry2x32'\. Pass"):
    gnorm_jax.dp_noise(1.0, 1.0, batch_size=1, seed=key, rng="threefry2x32")


@pytest.mark.parametrize("rng", ["philox", "philox2x32", "Threefry2x32", "os", None, 1])
def test_unknown_generators_are_named_with_the_choices(rng):
  choices = (
    r"\('auto', 'threefry2x32', 'threefry4x32', 'philox4x32', 'rbg', 'unsafe_rbg', 'secure'\)"
  )
  with pytest.raises(ValueError, match=rf"rng must be one of {choices}, got rng={rng!r}\. 'auto'"):
    gnorm_jax.dp_noise(1.0, 1.0, batch_size=1, rng=rng)


# rng="secure": noise from the operating system's cryptographic source.


def test_secure_noise_is_gaussian_and_fresh_at_every_draw():
  grads = jnp.zeros(100_000)
  tx = gnorm_jax.dp_noise(C, SIGMA, batch_size=BATCH, rng="secure")
  first, second = noise_of(tx, grads, steps=2)
  for noise in (first, second):
    assert_gaussian(noise, STD)
  assert not np.array_equal(first, second)
  again = noise_of(gnorm_jax.dp_noise(C, SIGMA, batch_size=BATCH, rng="secure"), grads)
  assert not np.array_equal(first, again)  # no seed: nothing to reproduce it with


def test_secure_noise_takes_every_bit_from_os_urandom(monkeypatch):
  requests, real_urandom = [], os.urandom

  def urandom(n):
    requests.append(n)
    return real_urandom(n)

  monkeypatch.setattr(gnorm_jax._dp.os, "urandom", urandom)
  tx = gnorm_jax.dp_noise(1.0, 1.0, batch_size=1, rng="secure")
  grads = {"w": jnp.zeros((3, 5)), "b": jnp.zeros(7)}
  noise_of(tx, grads)
  assert requests == [32 * 22]  # four 64-bit uniforms per sample, 22 samples
  assert tx.init(grads).key.shape == (0,)


def test_secure_noise_works_in_a_jitted_chain_and_with_inject_hyperparams():
  params = {"w": jnp.ones((50, 40)), "b": jnp.zeros(40)}
  grad_sum = jax.tree.map(lambda p: 2.0 * jnp.ones_like(p), params)
  tx = optax.chain(gnorm_jax.dp_noise(1.0, 1.0, batch_size=4, rng="secure"), optax.sgd(0.1))
  step, state, seen = jax.jit(tx.update), tx.init(params), []
  for _ in range(3):
    updates, state = step(grad_sum, state, params)
    seen.append(np.asarray(updates["w"]))
  assert len({a.tobytes() for a in seen}) == 3  # the callback runs at every step

  def body(carry, _):
    updates, state = tx.update(grad_sum, carry, params)
    return state, updates["b"]

  _, in_scan = jax.jit(lambda s: jax.lax.scan(body, s, None, length=3))(tx.init(params))
  assert len({np.asarray(a).tobytes() for a in in_scan}) == 3  # and at every step of a scan
  injected = optax.inject_hyperparams(gnorm_jax.dp_noise)(
    max_norm=1.0, noise_multiplier=1.0, batch_size=4.0, rng="secure"
  )
  state = injected.init(params)
  state.hyperparams["noise_multiplier"] = jnp.asarray(0.0)
  updates, _ = jax.jit(injected.update)(grad_sum, state, params)
  chex.assert_trees_all_close(updates, jax.tree.map(lambda g: g / 4, grad_sum))  # σ = 0: exact


def test_secure_noise_is_float64_under_x64():
  with jax.enable_x64(True):
    tx = gnorm_jax.dp_noise(1.0, 1.0, batch_size=1, rng="secure")
    g = jnp.zeros(20_000, jnp.float64)
    out, _ = jax.jit(tx.update)(g, tx.init(g))
    assert out.dtype == jnp.float64 and len(np.unique(np.asarray(out))) == out.size
    np.testing.assert_allclose(np.std(np.asarray(out)), 1.0, rtol=0.03)


def test_secure_noise_takes_no_seed():
  with pytest.raises(ValueError, match=r"rng='secure' .* takes no seed, got seed=0\. Leave"):
    gnorm_jax.dp_noise(1.0, 1.0, batch_size=1, seed=0, rng="secure")


# The DP contract carried by the objects: clipped_grad's ClippedGradFn in dp_noise.


def linear_loss(w, x):
  """A loss whose gradient at example x is x."""
  return jnp.sum(x * w)


def test_clipped_grad_returns_a_function_carrying_its_threshold():
  fn = gnorm_jax.clipped_grad(linear_loss, max_norm=1.0, reduce="sum")
  assert isinstance(fn, gnorm_jax.ClippedGradFn)
  assert (fn.max_norm, fn.reduce, fn.has_aux, fn.return_norms) == (1.0, "sum", False, False)
  assert fn.__name__ == "linear_loss" and fn.__doc__ == linear_loss.__doc__
  assert inspect.signature(fn) == inspect.signature(linear_loss)
  x = jnp.array([[3.0, 4.0], [0.3, 0.4]])
  expected = [0.9, 1.2]  # 0.2·(3, 4) + (0.3, 0.4)
  np.testing.assert_allclose(fn(jnp.zeros(2), x), expected, rtol=1e-6)
  np.testing.assert_allclose(jax.jit(fn)(jnp.zeros(2), x), expected, rtol=1e-6)
  np.testing.assert_allclose(jax.grad(lambda w: fn(w, x) @ w)(jnp.zeros(2)), expected, rtol=1e-6)
  assert fn == fn and fn != gnorm_jax.clipped_grad(linear_loss, max_norm=1.0, reduce="sum")
  with pytest.raises(dataclasses.FrozenInstanceError):
    fn.max_norm = 2.0


THRESHOLDS = {"embed": 0.1, "blocks": [{"w": 3.0, "b": 1e-3}, {"w": 7.25, "b": 2.0**-20}]}


def test_sensitivity_of_a_threshold_tree_is_the_float64_norm():
  loss = lambda p, x: sum(jnp.sum(x * leaf) for leaf in jax.tree.leaves(p))
  fn = gnorm_jax.clipped_grad(loss, max_norm=THRESHOLDS, reduce="sum")
  expected = np_norm(THRESHOLDS)  # sqrt(sum C_l²) in float64
  assert isinstance(fn.sensitivity(), float)
  np.testing.assert_allclose(fn.sensitivity(), expected, rtol=1e-15)
  assert fn.sensitivity() == fn.sensitivity(batch_size=7)  # the sum's is the same for any B
  mean = gnorm_jax.clipped_grad(loss, max_norm=THRESHOLDS)
  np.testing.assert_allclose(mean.sensitivity(batch_size=64), expected / 64, rtol=1e-15)
  one = gnorm_jax.clipped_grad(loss, max_norm=np.float32(0.5), reduce="sum")
  assert one.sensitivity() == 0.5
  traced = jax.jit(
    lambda c: gnorm_jax.clipped_grad(loss, max_norm={"a": c, "b": 4.0}, reduce="sum").sensitivity()
  )
  np.testing.assert_allclose(traced(3.0), 5.0, rtol=1e-6)


@pytest.mark.parametrize(
  "error, match, batch_size",
  [
    (ValueError, r"depends on it: got batch_size=None\. Pass the leading size", None),
    (ValueError, r"batch_size must be a finite number > 0, got batch_size=0\. Pass", 0),
    (TypeError, r"batch_size must be a number, not a bool, got batch_size=True", True),
  ],
)
def test_the_sensitivity_of_a_mean_needs_its_batch_size(error, match, batch_size):
  fn = gnorm_jax.clipped_grad(linear_loss, max_norm=1.0)
  with pytest.raises(error, match=match):
    fn.sensitivity(batch_size=batch_size)


@pytest.mark.parametrize("max_norm", [1.5, THRESHOLDS], ids=["one", "tree"])
def test_object_form_gives_the_same_noise_as_the_explicit_form(max_norm):
  params = jax.tree.map(lambda _: jnp.zeros((20, 5)), THRESHOLDS)
  loss = lambda p, x: sum(jnp.sum(x * leaf) for leaf in jax.tree.leaves(p))
  fn = gnorm_jax.clipped_grad(loss, max_norm=max_norm, reduce="sum")
  grad_sum = fn(params, jnp.ones((4, 20, 5)))
  by_object = gnorm_jax.dp_noise(fn, 1.1, batch_size=8, seed=0)
  explicit = gnorm_jax.dp_noise(max_norm, 1.1, batch_size=8, seed=0)
  chex.assert_trees_all_equal(
    by_object.update(grad_sum, by_object.init(params)),
    explicit.update(grad_sum, explicit.init(params)),
  )
  np.testing.assert_allclose(
    float(by_object.update(grad_sum, by_object.init(params))[1].noise_std),
    1.1 * fn.sensitivity(),
    rtol=1e-6,
  )
  injected = optax.inject_hyperparams(gnorm_jax.dp_noise, static_args=("max_norm",))(
    max_norm=fn, noise_multiplier=1.1, batch_size=8.0, seed=0
  )
  updates, _ = jax.jit(injected.update)(grad_sum, injected.init(params))
  expected = explicit.update(grad_sum, explicit.init(params))[0]  # eagerly: 1 ulp of the sum
  chex.assert_trees_all_close(updates, expected, rtol=1e-6, atol=1e-6)


def test_dp_noise_refuses_a_mean_and_functions_without_a_threshold():
  mean = gnorm_jax.clipped_grad(linear_loss, max_norm=1.0)
  with pytest.raises(
    ValueError, match=r"reduce='mean'.* Build it with clipped_grad\(\.\.\., reduce='sum'\)"
  ):
    gnorm_jax.dp_noise(mean, 1.0, batch_size=8)
  clipped_sum = gnorm_jax.clipped_grad(linear_loss, max_norm=1.0, reduce="sum")
  for fn in [jax.jit(clipped_sum), linear_loss]:
    with pytest.raises(
      TypeError, match=r"carries no clipping threshold, got max_norm=.* Pass the ClippedGradFn"
    ):
      gnorm_jax.dp_noise(fn, 1.0, batch_size=8)
  with pytest.raises(ValueError, match=r"max_norm must be a finite number >= 0, got max_norm=inf"):
    gnorm_jax.dp_noise(
      gnorm_jax.clipped_grad(linear_loss, max_norm=math.inf, reduce="sum"), 1.0, batch_size=8
    )


def test_one_dp_sgd_step_with_the_noise_read_from_the_clipping():
  x = jax.random.normal(jax.random.key(2), (50, 3)) * 2.0
  idx, mask = next(gnorm_jax.poisson_batches(50, 0.2, max_batch_size=25, seed=1))
  clipped_sum = gnorm_jax.clipped_grad(linear_loss, max_norm=0.5, reduce="sum")
  tx = optax.chain(gnorm_jax.dp_noise(clipped_sum, 0.0, batch_size=10), optax.sgd(1.0))
  w = jnp.zeros(3)
  updates, _ = jax.jit(tx.update)(jax.jit(clipped_sum)(w, x[idx], mask=mask), tx.init(w), w)
  chosen = np.asarray(x)[idx[mask]]
  scale = np.minimum(1.0, 0.5 / np.linalg.norm(chosen, axis=1, keepdims=True))
  np.testing.assert_allclose(updates, -(chosen * scale).sum(0) / 10, rtol=1e-5)
