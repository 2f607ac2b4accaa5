"""Bad and edge inputs of the per-example API (issue 18): errors that name the
argument, and values and derivatives checked against vmap of jax.grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gnorm_jax

LOSS = lambda w, x: jnp.sum(jnp.tanh(x @ w))  # noqa: E731
W = jnp.array([0.1, 0.2, -0.3])
X = jnp.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0], [2.0, 0.0, 1.0], [0.0, 1.0, -1.0]])


def _per_example_grads(loss, w, x):
  return jax.vmap(jax.grad(loss), (None, 0))(w, x)


def _reference_clipped_sum(loss, w, x, max_norm):
  """Σᵢ min(1, C/‖gᵢ‖)·gᵢ from vmap of jax.grad, in float64 numpy."""
  g = np.asarray(_per_example_grads(loss, w, x), np.float64)
  norms = np.linalg.norm(g, axis=1)
  return np.sum(g * np.minimum(1, max_norm / np.maximum(norms, 1e-300))[:, None], axis=0)


@pytest.mark.parametrize(
  "kwargs",
  [
    {"microbatch_size": np.int64(2)},
    {"nan_safe": np.bool_(True)},
    {"keep_scan_factors": np.bool_(True)},
  ],
)
def test_numpy_ints_and_bools_are_accepted(kwargs):
  got = gnorm_jax.clipped_grad(LOSS, max_norm=1.0, reduce="sum", **kwargs)(W, X)
  np.testing.assert_allclose(got, _reference_clipped_sum(LOSS, W, X, 1.0), rtol=1e-5)


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    (
      {"microbatch_size": 2.0},
      TypeError,
      r"microbatch_size must be a Python int or None, got"
      r" microbatch_size=2.0",
    ),
    ({"microbatch_size": 0}, ValueError, r"microbatch_size must be an int >= 1"),
    (
      {"return_norms": "yes"},
      TypeError,
      r"return_norms must be True or False, got"
      r" return_norms='yes'",
    ),
    ({"nan_safe": 1}, TypeError, r"nan_safe must be True or False"),
    ({"keep_scan_factors": "yes"}, TypeError, r"keep_scan_factors must be True or False"),
  ],
)
def test_bad_settings_are_named(kwargs, error, match):
  with pytest.raises(error, match=match):
    gnorm_jax.clipped_grad(LOSS, max_norm=1.0, **kwargs)


@pytest.mark.parametrize(
  "make",
  [
    lambda: gnorm_jax.per_example_grad_norms(LOSS),
    lambda: gnorm_jax.clipped_grad(LOSS, max_norm=1.0),
  ],
)
def test_a_batch_passed_by_keyword_is_named(make):
  with pytest.raises(
    TypeError,
    match=r"got the keyword argument\(s\) x\. Pass them"
    r" positionally",
  ):
    make()(W, x=X)


def test_mask_that_is_not_an_array_is_named():
  with pytest.raises(TypeError, match=r"mask must be a bool array of shape \(4,\).*got mask='all'"):
    gnorm_jax.clipped_grad(LOSS, max_norm=1.0)(W, X, mask="all")
  with pytest.raises(ValueError, match=r"mask must be .* shape \(4,\).*got shape \(3,\)"):
    gnorm_jax.clipped_grad(LOSS, max_norm=1.0)(W, X, mask=jnp.ones(3, bool))


def test_empty_batch_is_an_error_not_nan():
  for fn in (gnorm_jax.clipped_grad(LOSS, max_norm=1.0), gnorm_jax.per_example_grad_norms(LOSS)):
    with pytest.raises(ValueError, match=r"the batch is empty"):
      fn(W, X[:0])


def test_batch_size_mismatch_message_is_readable():
  loss = lambda w, x, y: jnp.sum(x @ w) * y  # noqa: E731
  with pytest.raises(ValueError, match=r"got leading sizes argument 1: 4; argument 2: 3\.") as e:
    gnorm_jax.per_example_grad_norms(loss, batch_argnums=(1, 2))(W, X, jnp.ones(3))
  assert "{" not in str(e.value)


def test_messages_name_fun_not_loss():
  with pytest.raises(TypeError, match=r"^fun must return one real scalar per example"):
    gnorm_jax.per_example_grad_norms(lambda w, x: x * w)(W, X)
  with pytest.raises(TypeError, match=r"with has_aux=True fun must return a pair"):
    gnorm_jax.per_example_grad_norms(LOSS, has_aux=True)(W, X)


def test_a_root_parameter_without_rule_is_named():
  loss = lambda w, x: jnp.sum(x**w)  # noqa: E731  (no rule for pow)
  with pytest.raises(ValueError, match=r"these have none: \(the parameters themselves\)"):
    gnorm_jax.per_example_grad_norms(loss, method="ghost")(W, X)


def test_huge_norms_are_clipped_not_dropped():
  # The weight C/‖gᵢ‖ is subnormal for ‖gᵢ‖ > 8.5e37·C and was flushed to 0.
  loss = lambda w, x: jnp.sum(x * w)  # noqa: E731
  x = jnp.array([[3e38, 0.0], [0.0, 2e38], [0.5, 0.0]])
  for c in (1.0, 1e-3):
    got = gnorm_jax.clipped_grad(loss, max_norm=c, reduce="sum")(jnp.zeros(2), x)
    np.testing.assert_allclose(got, _reference_clipped_sum(loss, jnp.zeros(2), x, c), rtol=1e-6)
  tree_loss = lambda p, x: jnp.sum(x * p["a"])  # noqa: E731
  got = gnorm_jax.clipped_grad(tree_loss, max_norm={"a": 1.0}, reduce="sum")({"a": jnp.zeros(2)}, x)
  np.testing.assert_allclose(
    got["a"], _reference_clipped_sum(loss, jnp.zeros(2), x, 1.0), rtol=1e-6
  )


@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_grad_through_norms_at_zero_per_example_gradients_is_finite(method):
  # A zero-initialised head: every per-example gradient is 0, and the ghost
  # route's sqrt had an infinite derivative there (NaN).
  loss = lambda w, x: jnp.sum(x @ w) ** 2  # noqa: E731
  x = jnp.ones((4, 3))

  def ref(w):
    return jnp.sum(jax.vmap(gnorm_jax.tree_norm)(_per_example_grads(loss, w, x)))

  got = jax.grad(lambda w: jnp.sum(gnorm_jax.per_example_grad_norms(loss, method=method)(w, x)))
  np.testing.assert_array_equal(got(jnp.zeros(3)), jax.grad(ref)(jnp.zeros(3)))
  np.testing.assert_array_equal(got(jnp.zeros(3)), np.zeros(3))
  clipped = jax.grad(
    lambda w: jnp.sum(gnorm_jax.clipped_grad(loss, max_norm=1.0, method=method)(w, x))
  )(jnp.zeros(3))
  ref_clipped = jax.grad(lambda w: jnp.sum(jnp.mean(_per_example_grads(loss, w, x), 0)))
  np.testing.assert_allclose(clipped, ref_clipped(jnp.zeros(3)), rtol=1e-6)


@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_grad_through_masked_call_ignores_nan_padding(method):
  x = X.at[3].set(jnp.array([jnp.nan, jnp.inf, 1.0]))
  mask = jnp.array([True, True, True, False])

  def got(w):
    fn = gnorm_jax.clipped_grad(LOSS, max_norm=100.0, method=method, reduce="sum")
    norms = gnorm_jax.per_example_grad_norms(LOSS, method=method)(w, x, mask=mask)
    return jnp.sum(fn(w, x, mask=mask) ** 2) + jnp.sum(norms)

  def ref(w):
    g = _per_example_grads(LOSS, w, X[:3])
    return jnp.sum(jnp.sum(g, 0) ** 2) + jnp.sum(jax.vmap(gnorm_jax.tree_norm)(g))

  np.testing.assert_allclose(got(W), ref(W), rtol=1e-5)
  np.testing.assert_allclose(jax.grad(got)(W), jax.grad(ref)(W), rtol=1e-4)


def test_leaf_norms_combine_exactly_across_the_float32_range():
  # The engine's combination of per-leaf norms m·2^e (no conditional): each
  # example's norm, and its leaf norms, scaled by 2^-k, against float64.
  from gnorm_jax._per_example import _run

  rng = np.random.default_rng(0)
  m = rng.uniform(0.5, 3.0, (6, 5)).astype(np.float32)
  e = np.array(
    [
      [0, 0, 0, 0, 0],  # ordinary
      [-140, -150, -130, -200, -145],  # the norm itself subnormal or below
      [60, 70, 66, 64, 65],  # squares overflow float32
      [200, -200, 0, 150, 199],  # beyond float32's largest: scaled by 2^-k
      [0, 0, 0, 0, 0],
      [0, 0, 0, 0, 0],
    ],
    np.int32,
  )
  m[4] = 0.0  # an all-zero example
  m[5, 2] = np.inf  # an infinite leaf norm
  # column j of m and e holds leaf [3, 0, 1, 2, 4][j]'s norms
  columns = {leaf: (m[:, j], e[:, j]) for j, leaf in enumerate([3, 0, 1, 2, 4])}
  leaf_norms, norms, k = _run._scaled_norms(columns, 6, jnp.float32)
  k = np.asarray(k)
  # float64 reference in the scale 2^-k (all finite there), columns in leaf order
  scaled = np.ldexp(m.astype(np.float64), e - k[:, None])[:, [1, 2, 3, 0, 4]]
  np.testing.assert_array_equal(k[[0, 1, 2, 4, 5]], 0)
  assert 90 <= k[3] <= 100  # its largest leaf norm, about 2^200, brought to about 2^100
  want = np.sqrt(np.sum(scaled**2, axis=1))
  np.testing.assert_allclose(np.asarray(norms)[[0, 2, 3]], want[[0, 2, 3]], rtol=1e-6)
  tiny = float(np.finfo(np.float32).tiny)  # below it in the scaled units: 0
  np.testing.assert_allclose(
    np.asarray(leaf_norms)[[0, 2, 3]], scaled[[0, 2, 3]], rtol=1e-7, atol=tiny
  )
  # a norm below float32's smallest normal: 0 or subnormal (CPUs flush subnormals)
  assert want[1] < tiny and abs(float(norms[1]) - want[1]) < tiny
  assert float(norms[4]) == 0.0 and np.isinf(float(norms[5]))
  # derivative at an all-zero example: 0, not NaN
  d = jax.grad(
    lambda x: _run._scaled_norms(
      {j: (x[:, j], jnp.zeros((1,), jnp.int32)) for j in range(2)}, 1, jnp.float32
    )[1][0]
  )
  np.testing.assert_array_equal(d(jnp.zeros((1, 2))), np.zeros((1, 2)))
  # NaN stays NaN
  nan = _run._scaled_norms({0: (jnp.array([jnp.nan]), jnp.zeros((1,), jnp.int32))}, 1, jnp.float32)
  assert np.isnan(float(nan[1][0]))
