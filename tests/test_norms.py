"""The numerical contract of gnorm_jax.tree_norm and gnorm_jax.leaf_norms.

Every value is checked against a float64 numpy reference computed from the
same (already rounded) leaf values, or against an independent jax expression.
"""

import collections
import math

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
from gnorm_jax import _norms, _numerics

ORDS = [None, 1, math.inf]
LOW_DTYPES = [jnp.float16, jnp.bfloat16]
FLOAT_DTYPES = [jnp.float16, jnp.bfloat16, jnp.float32, jnp.complex64]


# ------------------------------------------------------------------ references


def mixed_tree(dtype=jnp.float32, seed=0):
  """A small nested tree with a scalar, a vector, a matrix, a 3-d array and None."""
  rng = np.random.default_rng(seed)

  def arr(*shape):
    x = rng.normal(size=shape)
    if jnp.issubdtype(dtype, jnp.complexfloating):
      x = x + 1j * rng.normal(size=shape)
    return jnp.asarray(x, dtype)

  return {
    "bias": arr(5),
    "layer": {"w": arr(4, 3), "scale": arr()},
    "conv": [arr(2, 3, 2), None],
  }


def assert_rel(actual, expected, rtol):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=0)


# ------------------------------------------------------- values and dtype policy


@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_tree_norm_matches_numpy_float64(ord, dtype):
  tree = mixed_tree(dtype)
  assert_rel(gnorm_jax.tree_norm(tree, ord), np_norm(tree, ord), rtol=1e-5)


@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_leaf_norms_match_numpy_float64(ord, dtype):
  tree = mixed_tree(dtype)
  norms = gnorm_jax.leaf_norms(tree, ord)
  assert jax.tree.structure(norms) == jax.tree.structure(tree)
  for norm, leaf in zip(jax.tree.leaves(norms), jax.tree.leaves(tree)):
    assert norm.shape == ()
    assert_rel(norm, np_norm(leaf, ord), rtol=1e-5)


def test_ord_2_is_euclidean():
  tree = mixed_tree()
  assert gnorm_jax.tree_norm(tree, 2) == gnorm_jax.tree_norm(tree)
  assert gnorm_jax.leaf_norms(tree, 2) == gnorm_jax.leaf_norms(tree)


@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_result_is_at_least_float32(ord, dtype):
  tree = mixed_tree(dtype)
  assert gnorm_jax.tree_norm(tree, ord).dtype == jnp.float32
  assert all(n.dtype == jnp.float32 for n in jax.tree.leaves(gnorm_jax.leaf_norms(tree, ord)))


@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("dtype", LOW_DTYPES)
def test_low_precision_accumulates_in_float32(ord, dtype):
  # 300² = 9e4 overflows float16 (max 65504): a float16 sum of squares is inf.
  x = jnp.full((10**6,), 300.0, dtype)
  expected = {None: 3e5, 1: 3e8, math.inf: 300.0}[ord]
  assert_rel(gnorm_jax.tree_norm({"g": x}, ord), expected, rtol=1e-5)
  assert_rel(gnorm_jax.leaf_norms({"g": x}, ord)["g"], expected, rtol=1e-5)
  if dtype == jnp.float16 and ord is None:
    assert jnp.isinf(optax.tree.norm({"g": x}))  # a float16 pass overflows


@pytest.mark.parametrize(
  "values, expected",
  [
    ([1e20, 1e20], math.sqrt(2) * 1e20),  # x² overflows float32
    ([1e-30, 1e-30], math.sqrt(2) * 1e-30),  # x² underflows float32
    ([1e-30, -1e-30, 1e-31], math.sqrt(2.01) * 1e-30),
    ([2e38, 2e38], math.sqrt(2) * 2e38),  # the norm itself is still finite
    ([1e20, 1e-30], 1e20),
    ([3e-20, 4e-20], 5e-20),  # the sum of squares, 2.5e-39, is subnormal
    ([3e-10, 4e-10], 5e-10),  # just below the fast path's threshold
    ([3e-9, 4e-9], 5e-9),  # just above it
  ],
)
@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_overflow_and_underflow_safe_in_float32(values, expected, mode):
  norm_fn = gnorm_jax.tree_norm if mode == "eager" else jax.jit(gnorm_jax.tree_norm)
  leaf_fn = gnorm_jax.leaf_norms if mode == "eager" else jax.jit(gnorm_jax.leaf_norms)
  x = jnp.asarray(values, jnp.float32)
  assert_rel(norm_fn(x), expected, rtol=1e-5)
  assert_rel(norm_fn({"a": x[:1], "b": x[1:]}), expected, rtol=1e-5)
  assert_rel(leaf_fn({"x": x})["x"], expected, rtol=1e-5)


def test_norm_beyond_float32_range_is_inf():
  # The true norm 4.2e38 exceeds float32's max 3.4e38: inf is the right answer.
  assert jnp.isinf(gnorm_jax.tree_norm(jnp.asarray([3e38, 3e38], jnp.float32)))


def test_leaf_norms_each_leaf_rescued_independently():
  # One leaf on each side of the fast path: the rare branch must only change
  # the leaves that need it and leave the others exact.
  tree = {
    "ordinary": jnp.asarray([3.0, 4.0]),
    "zero": jnp.zeros(3),
    "huge": jnp.asarray([1e20, 1e20]),
    "tiny": jnp.asarray([1e-30, 1e-30]),
    "empty": jnp.zeros((0, 4)),
  }
  for fn in (gnorm_jax.leaf_norms, jax.jit(gnorm_jax.leaf_norms)):
    norms = fn(tree)
    for name, leaf in tree.items():
      assert_rel(norms[name], np_norm(leaf), rtol=1e-5)


def test_many_tiny_entries_match_numpy():
  rng = np.random.default_rng(1)
  x = jnp.asarray(1e-25 * rng.normal(size=(1000,)), jnp.float32)
  assert_rel(gnorm_jax.tree_norm({"x": x, "y": 3 * x}), np_norm({"x": x, "y": 3 * x}), rtol=1e-5)


def test_leaves_needing_different_rescues_in_one_tree():
  # One leaf overflows, one underflows, one is zero: one scale for the whole tree.
  rng = np.random.default_rng(5)
  tree = {
    "huge": jnp.asarray([3e38, -1e30], jnp.float32),
    "tiny": jnp.asarray(1e-30 * rng.normal(size=5), jnp.float32),
    "zero": jnp.zeros(4),
    "ordinary": jnp.asarray([3.0, 4.0]),
  }
  for fn in (gnorm_jax.tree_norm, jax.jit(gnorm_jax.tree_norm)):
    assert_rel(fn(tree), np_norm(tree), rtol=1e-5)
    assert_rel(fn({k: tree[k] for k in ("tiny", "zero")}), np_norm(tree["tiny"]), rtol=1e-5)


def test_many_flushed_squares_outweigh_a_counted_one():
  # "many": every square (1e-40) is flushed to 0 in the one-pass sum, yet together they
  # are 10x the one square that is counted (1e-36): the rescaled pass must keep them.
  tree = {"one": jnp.asarray([1e-18], jnp.float32), "many": jnp.full((100_000,), 1e-20)}
  assert_rel(gnorm_jax.tree_norm(tree), np_norm(tree), rtol=1e-5)
  norms = gnorm_jax.leaf_norms(tree)
  for name, leaf in tree.items():
    assert_rel(norms[name], np_norm(leaf), rtol=1e-5)


def test_leaf_norms_large_leaves_rescued_independently():
  # Leaves of 2^16 entries or more take their own branch in the rare path.
  rng = np.random.default_rng(6)
  big = rng.normal(size=2**16)
  tree = {
    "big_ordinary": jnp.asarray(big, jnp.float32),
    "big_tiny": jnp.asarray(1e-30 * big, jnp.float32),
    "big_zero": jnp.zeros(2**16),
    "small_huge": jnp.asarray([1e20, 1e20]),
  }
  expected = {name: np_norm(leaf) for name, leaf in tree.items()}
  for fn in (gnorm_jax.leaf_norms, jax.jit(gnorm_jax.leaf_norms)):
    norms = fn(tree)
    for name in tree:
      assert_rel(norms[name], expected[name], rtol=1e-5)
  batch = jax.tree.map(lambda x: jnp.stack([x, 1e10 * x]), tree)
  norms = jax.vmap(gnorm_jax.leaf_norms)(batch)
  for name in tree:
    assert_rel(norms[name], [expected[name], 1e10 * expected[name]], rtol=1e-5)


def test_float64_under_x64():
  with jax.enable_x64(True):
    big = jnp.asarray([1e200, 1e200], jnp.float64)
    tiny = jnp.asarray([1e-200, 1e-200], jnp.float64)
    assert gnorm_jax.tree_norm(big).dtype == jnp.float64
    assert_rel(gnorm_jax.tree_norm(big), math.sqrt(2) * 1e200, rtol=1e-14)
    assert_rel(gnorm_jax.tree_norm(tiny), math.sqrt(2) * 1e-200, rtol=1e-14)
    assert_rel(jax.jit(gnorm_jax.leaf_norms)({"t": tiny})["t"], math.sqrt(2) * 1e-200, rtol=1e-14)
    mixed = {"a": jnp.ones(3, jnp.float16), "b": jnp.ones(4, jnp.float64)}
    assert gnorm_jax.tree_norm(mixed).dtype == jnp.float64
    assert_rel(gnorm_jax.tree_norm(mixed), math.sqrt(7), rtol=1e-14)
    c128 = jnp.asarray([3 + 4j, 0], jnp.complex128)
    assert gnorm_jax.tree_norm(c128).dtype == jnp.float64
    assert gnorm_jax.tree_norm(jnp.ones(2, jnp.float32)).dtype == jnp.float32


# ------------------------------------------------------------ tree structure


@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("empty", [{}, [], (), None, {"a": None, "b": [None]}])
def test_empty_tree_has_norm_zero(ord, empty):
  norm = gnorm_jax.tree_norm(empty, ord)
  assert norm.dtype == jnp.float32 and norm == 0.0
  assert jax.jit(lambda t: gnorm_jax.tree_norm(t, ord))(empty) == 0.0
  assert gnorm_jax.leaf_norms(empty, ord) == empty


def test_none_leaves_are_skipped():
  tree = {"a": jnp.asarray([3.0]), "b": None, "c": [None, jnp.asarray([4.0])]}
  assert gnorm_jax.tree_norm(tree) == 5.0
  norms = gnorm_jax.leaf_norms(tree)
  assert norms["b"] is None and norms["c"][0] is None
  assert (norms["a"], norms["c"][1]) == (3.0, 4.0)
  grads = jax.grad(gnorm_jax.tree_norm)(tree)
  assert grads["b"] is None
  np.testing.assert_allclose(grads["a"], [0.6])


def test_python_scalars_and_numpy_leaves():
  assert gnorm_jax.tree_norm([3.0, np.asarray([4.0], np.float32)]) == 5.0


@pytest.mark.parametrize("ord", ORDS)
def test_complex_leaves_use_modulus(ord):
  z = jnp.asarray([3 + 4j, -1j, 0.5], jnp.complex64)
  assert gnorm_jax.tree_norm(z, ord).dtype == jnp.float32
  assert_rel(gnorm_jax.tree_norm(z, ord), np_norm(z, ord), rtol=1e-5)
  assert_rel(gnorm_jax.tree_norm(1e20 * z, ord), 1e20 * np_norm(z, ord), rtol=1e-5)


@pytest.mark.parametrize("fn", [gnorm_jax.tree_norm, gnorm_jax.leaf_norms])
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_])
def test_integer_and_bool_leaves_raise_type_error_naming_the_path(fn, dtype):
  tree = {"params": {"w": jnp.ones(2), "step": jnp.zeros((), dtype)}}
  with pytest.raises(TypeError, match=r"\['params'\]\['step'\].*" + jnp.dtype(dtype).name):
    fn(tree)
  with pytest.raises(TypeError, match=r"\['params'\]\['step'\]"):
    jax.jit(fn)(tree)


def test_python_int_leaf_raises_type_error():
  with pytest.raises(TypeError, match=r"\[1\]"):
    gnorm_jax.tree_norm([1.0, 2])


@pytest.mark.parametrize("fn", [gnorm_jax.tree_norm, gnorm_jax.leaf_norms])
@pytest.mark.parametrize("ord", [0, 3, -1, "fro", "inf", True, 2.5])
def test_bad_ord_raises_value_error(fn, ord):
  with pytest.raises(ValueError, match="ord must be None"):
    fn(jnp.ones(2), ord)


@pytest.mark.parametrize(
  "ord, canonical",
  [
    (2, None),
    (2.0, None),
    (np.float64(2.0), None),
    (1.0, 1),
    (np.int64(1), 1),
    (float("inf"), math.inf),
    (jnp.inf, math.inf),
    (np.inf, math.inf),
    (np.float32(np.inf), math.inf),
  ],
)
def test_equivalent_ord_spellings_give_equal_norms(ord, canonical):
  tree = mixed_tree()
  norm = gnorm_jax.tree_norm(tree, ord)
  np.testing.assert_array_equal(norm, gnorm_jax.tree_norm(tree, canonical))
  assert_rel(norm, np_norm(tree, canonical), rtol=1e-6)
  leaf_norms = gnorm_jax.leaf_norms(tree, ord)
  for got, want, leaf in zip(
    jax.tree.leaves(leaf_norms),
    jax.tree.leaves(gnorm_jax.leaf_norms(tree, canonical)),
    jax.tree.leaves(tree),
  ):
    np.testing.assert_array_equal(got, want)
    assert_rel(got, np_norm(leaf, canonical), rtol=1e-6)


# ------------------------------------------------------------- eager/jit/vmap


@pytest.mark.parametrize("ord", ORDS)
def test_eager_jit_vmap_agree(ord):
  rng = np.random.default_rng(2)
  batch = {
    "w": jnp.asarray(rng.normal(size=(4, 3, 2)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=(4, 5)), jnp.bfloat16),
  }
  # One example in the rare range, so vmap mixes both branches in one batch.
  batch["w"] = batch["w"].at[2].multiply(1e25)
  examples = [jax.tree.map(lambda x, i=i: x[i], batch) for i in range(4)]
  tree_fn = lambda t: gnorm_jax.tree_norm(t, ord)
  leaf_fn = lambda t: gnorm_jax.leaf_norms(t, ord)
  eager = np.asarray([tree_fn(e) for e in examples])
  np.testing.assert_array_equal(np.asarray([jax.jit(tree_fn)(e) for e in examples]), eager)
  np.testing.assert_allclose(jax.vmap(tree_fn)(batch), eager, rtol=1e-5)
  np.testing.assert_allclose(eager, [np_norm(e, ord) for e in examples], rtol=1e-5)
  vmapped = jax.vmap(leaf_fn)(batch)
  for i, e in enumerate(examples):
    for name in e:
      np.testing.assert_allclose(vmapped[name][i], leaf_fn(e)[name], rtol=1e-5)
      np.testing.assert_allclose(jax.jit(leaf_fn)(e)[name], leaf_fn(e)[name], rtol=0)


@pytest.mark.parametrize("scale", [1.0, 1e25, 1e-25])
def test_vmap_with_unbatched_leaves_nested_vmap_and_derivatives(scale):
  # The batching rule takes one branch for the whole batch; unbatched leaves,
  # nested vmaps and derivatives under vmap must all match a loop of examples.
  rng = np.random.default_rng(4)
  batch = jnp.asarray(rng.normal(size=(3, 2, 4)), jnp.float32)
  batch = batch.at[1].multiply(scale)  # a batch mixing the fast and rare paths
  fixed = jnp.asarray(rng.normal(size=5), jnp.float32)
  fn = lambda w, b: gnorm_jax.tree_norm({"w": w, "b": b})
  loop = np.asarray([[fn(w, fixed) for w in ws] for ws in batch])
  expected = [[np_norm({"w": w, "b": fixed}) for w in ws] for ws in np.asarray(batch)]
  np.testing.assert_allclose(loop, expected, rtol=1e-5)
  inner = jax.vmap(fn, in_axes=(0, None))
  np.testing.assert_allclose(jax.vmap(inner, in_axes=(0, None))(batch, fixed), loop, rtol=1e-5)
  np.testing.assert_allclose(
    jax.jit(jax.vmap(inner, in_axes=(0, None)))(batch, fixed), loop, rtol=1e-5
  )
  grad_loop = np.asarray([[jax.grad(fn)(w, fixed) for w in ws] for ws in batch])
  grad_vmap = jax.vmap(jax.vmap(jax.grad(fn), in_axes=(0, None)), in_axes=(0, None))(batch, fixed)
  np.testing.assert_allclose(grad_vmap, grad_loop, rtol=1e-5)
  summed = lambda ws: jnp.sum(jax.vmap(inner, in_axes=(0, None))(ws, fixed))
  np.testing.assert_allclose(jax.grad(summed)(batch), grad_loop, rtol=1e-5)
  hess = jax.vmap(jax.hessian(fn), in_axes=(0, None))(batch[0], fixed)
  np.testing.assert_allclose(
    hess, [jax.hessian(fn)(w, fixed) for w in batch[0]], rtol=1e-5, atol=1e-30
  )


def test_vmap_at_zero_examples_has_zero_gradients():
  batch = jnp.zeros((3, 4)).at[1].set(jnp.asarray([3.0, 0.0, 4.0, 0.0]))
  grads = jax.vmap(jax.grad(gnorm_jax.tree_norm))(batch)
  np.testing.assert_allclose(grads, [[0, 0, 0, 0], [0.6, 0, 0.8, 0], [0, 0, 0, 0]], rtol=1e-7)
  np.testing.assert_array_equal(grads[::2], 0.0)  # exactly zero, never NaN
  np.testing.assert_array_equal(jax.vmap(gnorm_jax.tree_norm)(batch), [0.0, 5.0, 0.0])


# --------------------------------------------------------------- derivatives


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_grad_at_zero_is_exactly_zero(dtype):
  tree = {"a": jnp.zeros((3, 2), dtype), "b": [jnp.zeros(4, dtype)]}
  for fn in (jax.grad(gnorm_jax.tree_norm), jax.jit(jax.grad(gnorm_jax.tree_norm))):
    grads = fn(tree)
    for g in jax.tree.leaves(grads):
      assert g.dtype == dtype
      np.testing.assert_array_equal(np.asarray(g, np.complex128), 0)
  leaf_grads = jax.grad(lambda t: sum(jax.tree.leaves(gnorm_jax.leaf_norms(t))))(tree)
  for g in jax.tree.leaves(leaf_grads):
    np.testing.assert_array_equal(np.asarray(g, np.complex128), 0)


@pytest.mark.parametrize("ord", ORDS)
def test_derivatives_at_zero_are_finite(ord):
  f = lambda x: gnorm_jax.tree_norm(x, ord)
  x = jnp.zeros(3)
  assert np.all(np.isfinite(jax.grad(f)(x)))
  assert np.all(np.isfinite(jax.hessian(f)(x)))
  assert np.all(np.isfinite(jax.jacrev(jax.jacfwd(f))(x)))
  assert np.all(np.isfinite(jax.jvp(f, (x,), (jnp.ones(3),))[1]))


def test_grad_at_zero_check_grads_first_order():
  # Central differences at 0 give 0 in every direction, like our subgradient.
  check_grads(gnorm_jax.tree_norm, (jnp.zeros(3),), order=1, modes=["fwd", "rev"])


def x64_points():
  rng = np.random.default_rng(3)
  return {
    "vector": lambda: (jnp.asarray(rng.normal(size=5)),),
    "tree": lambda: (
      {"w": jnp.asarray(rng.normal(size=(3, 2))), "b": jnp.asarray(rng.normal(size=2))},
    ),
    "complex": lambda: (jnp.asarray(rng.normal(size=3) + 1j * rng.normal(size=3)),),
    "large": lambda: (jnp.asarray(1e150 * rng.normal(size=4)),),
  }


@pytest.mark.parametrize(
  "fn, point",
  [("tree_norm", p) for p in x64_points()] + [("leaf_norms", "tree"), ("leaf_norms", "large")],
)
def test_check_grads_orders_1_and_2(point, fn):
  norm = getattr(gnorm_jax, fn)
  with jax.enable_x64(True):
    args = x64_points()[point]()
    check_grads(
      norm, args, order=2, modes=["fwd", "rev"], eps=1e-4 * float(gnorm_jax.tree_norm(args))
    )


def test_check_grads_float32():
  x = jnp.asarray([1.0, 2.0, -3.0], jnp.float32)
  check_grads(
    gnorm_jax.tree_norm, (x,), order=2, modes=["fwd", "rev"], eps=1e-2, atol=1e-2, rtol=1e-2
  )


@pytest.mark.parametrize("values", [[1e20, -1e20, 3e19], [1e-30, 2e-30, -1e-31], [3.0, 4.0, 0.0]])
def test_grad_is_unit_vector_in_extreme_ranges(values):
  x = jnp.asarray(values, jnp.float32)
  unit = np.asarray(values) / np.linalg.norm(values)
  np.testing.assert_allclose(jax.grad(gnorm_jax.tree_norm)(x), unit, rtol=1e-5)
  np.testing.assert_allclose(jax.grad(lambda x: gnorm_jax.leaf_norms([x])[0])(x), unit, rtol=1e-5)


def test_hessian_matches_formula():
  # ∇²‖x‖ = (I - u uᵀ)/‖x‖ with u = x/‖x‖.
  x = np.asarray([1.0, -2.0, 2.0])
  u = x / 3.0
  expected = (np.eye(3) - np.outer(u, u)) / 3.0
  np.testing.assert_allclose(
    jax.hessian(gnorm_jax.tree_norm)(jnp.asarray(x, jnp.float32)), expected, atol=1e-6
  )


@pytest.mark.parametrize(
  "values",
  [[1e38, 1e38], [3e38, -1e37, 0.0], [1e-30, 1e-30], [2e-37, -5e-38, 3e-37], [1e19, 0.5]],
)
def test_grad_and_hessian_at_extreme_norms_match_float64(values):
  # Regression: 1/‖x‖ is subnormal (flushed to 0) for ‖x‖ >= 1e38, which made
  # the gradient 0 there; −1/‖x‖² overflowed for ‖x‖ <= 1e-19, which made the
  # Hessian −inf. ∇‖x‖ = u and ∇²‖x‖ = (I − uuᵀ)/‖x‖ with u = x/‖x‖.
  x = jnp.asarray(values, jnp.float32)
  x64 = np.asarray(x, np.float64)
  norm = np_norm(x64)
  unit = x64 / norm
  hessian = (np.eye(len(x64)) - np.outer(unit, unit)) / norm
  np.testing.assert_allclose(jax.grad(gnorm_jax.tree_norm)(x), unit, rtol=1e-5, atol=1e-7)
  got = np.asarray(jax.hessian(gnorm_jax.tree_norm)(x), np.float64)
  assert np.all(np.isfinite(got))
  # Each entry (δᵢⱼ − uᵢuⱼ)/‖x‖ is formed in float32, so an entry where 1 − uᵢ² cancels
  # carries an absolute error of a few float32 ulps of 1/‖x‖ (how many depends on the
  # CPU's fused multiply-adds); entries below float32's smallest normal may be flushed.
  eps = np.finfo(np.float32).eps
  atol = max(4 * eps / norm, 2 * np.finfo(np.float32).tiny)
  np.testing.assert_allclose(got, hessian, rtol=1e-4, atol=atol)


def test_complex_grad_matches_naive_expression():
  z = jnp.asarray([3 + 4j, -1 + 2j], jnp.complex64)
  naive = lambda z: jnp.sqrt(jnp.sum(jnp.abs(z) ** 2))
  np.testing.assert_allclose(jax.grad(gnorm_jax.tree_norm)(z), jax.grad(naive)(z), rtol=1e-5)


@pytest.mark.parametrize("ord", [1, math.inf])
def test_grad_ord_1_and_inf(ord):
  x = jnp.asarray([1.0, -3.0, 2.0])
  expected = {1: [1.0, -1.0, 1.0], math.inf: [0.0, -1.0, 0.0]}[ord]
  np.testing.assert_array_equal(jax.grad(lambda x: gnorm_jax.tree_norm(x, ord))(x), expected)


# ------------------------------------------------------------------- inf / NaN


@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize(
  "values, expected",
  [
    ([math.inf, 1.0], math.inf),
    ([-math.inf, 1.0], math.inf),
    ([math.nan, 1.0], math.nan),
    ([1.0, math.nan], math.nan),
    ([math.inf, math.nan], math.nan),
  ],
)
def test_non_finite_inputs(ord, values, expected):
  tree = {"bad": jnp.asarray(values), "ok": jnp.asarray([3.0, 4.0])}
  for fn in (gnorm_jax.tree_norm, jax.jit(gnorm_jax.tree_norm, static_argnums=1)):
    np.testing.assert_equal(float(fn(tree, ord)), expected)
  norms = gnorm_jax.leaf_norms(tree, ord)
  np.testing.assert_equal(float(norms["bad"]), expected)
  np.testing.assert_allclose(norms["ok"], np_norm(tree["ok"], ord))


def test_grad_at_non_finite_input_is_nan_there():
  grads = jax.grad(gnorm_jax.tree_norm)(
    {"bad": jnp.asarray([math.inf, math.nan]), "ok": jnp.ones(2)}
  )
  assert np.all(np.isnan(grads["bad"]))
  assert not np.any(np.isnan(grads["ok"]))


# ------------------------------------------------------- compile-time structure


def _primitives(jaxpr):
  """The primitive of every equation in ``jaxpr`` and in the jaxprs nested in it."""
  for eqn in jaxpr.eqns:
    yield eqn.primitive.name
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
        if hasattr(sub, "eqns"):
          yield from _primitives(sub)


def _ops_per_leaf(fn):
  """(equations, reductions) that each further leaf adds, from 20 to 220 small leaves."""

  def count(n):
    tree = {f"p{i:03d}": jnp.ones((16, 1 + i % 4)) for i in range(n)}
    return collections.Counter(_primitives(jax.make_jaxpr(fn)(tree).jaxpr))

  small, large = count(20), count(220)
  growth = {name: (large[name] - small[name]) / 200 for name in large}
  reductions = sum(v for name, v in growth.items() if name.startswith("reduce"))
  return sum(growth.values()), reductions


@pytest.fixture(params=["cpu", "default"])
def form(request, monkeypatch):
  """Traces one form of the norm core (the CPU one, or the GPU/TPU one) on this backend."""
  monkeypatch.setattr(_numerics, "_FORCE_FORM", request.param)
  jax.clear_caches()
  yield request.param
  jax.clear_caches()


@pytest.mark.parametrize(
  "fn, max_ops",
  [
    pytest.param(gnorm_jax.tree_norm, 12, id="tree_norm"),
    pytest.param(jax.grad(gnorm_jax.tree_norm), 16, id="grad"),
    pytest.param(
      lambda t: jax.vmap(gnorm_jax.tree_norm)(jax.tree.map(lambda x: x[None], t)), 16, id="vmap"
    ),
    pytest.param(gnorm_jax.leaf_norms, 60, id="leaf_norms"),
  ],
)
def test_per_leaf_work_is_a_few_ops_and_one_reduction_per_pass(fn, max_ops, form):
  # Compile time grows with the work per leaf: with a max |x| pass before
  # rescaling and a cond per leaf, 1000 small leaves compiled 10x slower than
  # optax. Per leaf: one sum of squares per pass and a few scalar ops. The
  # CPU form has two passes (the one pass, and the rare rescaled one); the
  # GPU/TPU form reads up to _CONCAT_LEAVES leaves (concatenated, or stacked
  # where they share a shape) by one variadic reduction for three sums.
  ops, reductions = _ops_per_leaf(fn)
  assert ops <= max_ops, f"{ops} equations per leaf"
  if form == "cpu":
    assert reductions == 2, f"{reductions} reductions per leaf"
  else:
    assert 0 < reductions <= 1 / _norms._CONCAT_LEAVES, f"{reductions} reductions per leaf"


@pytest.mark.parametrize("scale", [1.0, 1e30, 1e-30, 0.0])
def test_many_leaves_read_together_keep_every_norm_exact(form, scale):
  # The GPU/TPU form concatenates a group's leaves and stacks single leaves of one
  # size (different shapes included), up to _CONCAT_LEAVES per reduction: 70 leaves
  # (three concatenations, stacks of 40 and 30) of mixed dtypes, at every scale, and
  # under vmap (how the per-example engine calls it), against float64.
  rng = np.random.default_rng(5)
  shapes = [(6,), (2, 3), (3, 2), (1, 6), (6, 1)]
  leaves = []
  for i in range(70):
    dtype = [jnp.float32, jnp.complex64, jnp.bfloat16, jnp.float16][i % 4 if i < 40 else 0]
    x = rng.normal(size=shapes[i % 5]) * (scale if dtype != jnp.float16 else min(scale, 1e4))
    if dtype == jnp.complex64:
      x = x + 1j * x[::-1]
    leaves.append(jnp.asarray(x, dtype))
  leaves[3] = jnp.full((3, 2), 65504.0, jnp.float16)  # float16's largest: squares overflow it
  tree = {f"p{i:02d}": x for i, x in enumerate(leaves)}
  assert_rel(gnorm_jax.tree_norm(tree), np_norm(tree), rtol=1e-5)
  for got, leaf in zip(jax.tree.leaves(gnorm_jax.leaf_norms(tree)), leaves):
    assert_rel(got, np_norm(leaf), rtol=1e-5)
  batched = jax.tree.map(lambda x: jnp.stack([x, x / 2, jnp.zeros_like(x)]), tree)
  norms = jax.jit(jax.vmap(gnorm_jax.tree_norm))(batched)
  assert_rel(norms, [np_norm(tree), np_norm(tree) / 2, 0.0], rtol=1e-5)
  rows = jax.tree.leaves(batched)
  m, r = jax.jit(jax.vmap(_norms.stacked_group_norms))([rows[:35], rows[35:]])
  for g, part in enumerate([leaves[:35], leaves[35:]]):
    assert_rel(m[:, g] * r[:, g], [np_norm(part), np_norm(part) / 2, 0.0], rtol=1e-5)


def test_gpu_form_reads_a_group_with_few_reductions():
  # The point of reading leaves together: the GPU/TPU form of tree_norm over 70 leaves
  # has 3 reductions in its jaxpr (70 leaves, 32 per concatenation), leaf_norms 3
  # (stacks of 32, 32 and 6 leaves of one size), where the CPU form has one per leaf.
  tree = {f"p{i:02d}": jnp.ones((2, 3) if i % 2 else (6,)) for i in range(70)}

  def reductions(fn, force):
    _numerics._FORCE_FORM = force
    try:
      return collections.Counter(_primitives(jax.make_jaxpr(fn)(tree).jaxpr))["reduce"]
    finally:
      _numerics._FORCE_FORM = None
      jax.clear_caches()

  assert reductions(gnorm_jax.tree_norm, "default") == 3
  assert reductions(gnorm_jax.leaf_norms, "default") == 3


# ----------------------------------------------------------------- properties


@st.composite
def random_trees(draw, dtypes=tuple(FLOAT_DTYPES)):
  """Nested pytrees of mixed shapes and dtypes, spanning extreme magnitudes."""
  n_leaves = draw(st.integers(0, 5))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  leaves = []
  for _ in range(n_leaves):
    dtype = draw(st.sampled_from(dtypes))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    # float16 spans 1e-4..1e4; the others 1e-30..1e30, reaching both rare paths.
    limit = 4 if dtype == jnp.float16 else 30
    scale = 10.0 ** draw(st.integers(-limit, limit))
    x = scale * rng.normal(size=shape)
    if jnp.issubdtype(dtype, jnp.complexfloating):
      x = x + 1j * scale * rng.normal(size=shape)
    leaves.append(jnp.asarray(x, dtype))
  return {"a": leaves[: n_leaves // 2], "b": {"c": tuple(leaves[n_leaves // 2 :]), "d": None}}


@settings(max_examples=20, deadline=None)
@given(random_trees(), st.sampled_from(ORDS))
def test_property_agrees_with_numpy_float64(tree, ord):
  assert_rel(gnorm_jax.tree_norm(tree, ord), np_norm(tree, ord), rtol=2e-6)
  for norm, leaf in zip(jax.tree.leaves(gnorm_jax.leaf_norms(tree, ord)), jax.tree.leaves(tree)):
    assert_rel(norm, np_norm(leaf, ord), rtol=2e-6)


@settings(max_examples=20, deadline=None)
@given(
  random_trees(dtypes=(jnp.float32, jnp.complex64)),
  st.floats(1e-4, 1e4),
  st.sampled_from([1.0, -1.0]),
  st.sampled_from(ORDS),
)
def test_property_homogeneity(tree, c, sign, ord):
  scaled = jax.tree.map(lambda x: (sign * c) * x, tree)
  lhs = gnorm_jax.tree_norm(scaled, ord)
  rhs = c * np.float64(gnorm_jax.tree_norm(tree, ord))
  assert_rel(lhs, rhs, rtol=2e-6)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(-30, 30), st.integers(-30, 30), st.sampled_from(ORDS))
def test_property_triangle_inequality(seed, ex, ey, ord):
  x, y = mixed_tree(seed=seed), mixed_tree(seed=seed + 1)
  x = jax.tree.map(lambda a: a * 10.0**ex, x)
  y = jax.tree.map(lambda a: a * 10.0**ey, y)
  both = jax.tree.map(jnp.add, x, y)
  lhs = float(gnorm_jax.tree_norm(both, ord))
  rhs = float(gnorm_jax.tree_norm(x, ord)) + float(gnorm_jax.tree_norm(y, ord))
  assert lhs <= rhs * (1 + 1e-6)


# ---------------------------------------------------------- shared helpers


def test_sum_of_squares_and_safe_sqrt():
  x = jnp.full((1000,), 300.0, jnp.float16)
  s = gnorm_jax._norms.sum_of_squares(x)
  assert s.dtype == jnp.float32
  assert_rel(s, 9e7, rtol=1e-5)
  assert_rel(gnorm_jax._norms.sum_of_squares(jnp.asarray([3 + 4j], jnp.complex64)), 25.0, rtol=0)
  assert jax.grad(gnorm_jax._norms.safe_sqrt)(0.0) == 0.0
  assert_rel(jax.grad(gnorm_jax._norms.safe_sqrt)(4.0), 0.25, rtol=1e-7)


@pytest.mark.parametrize(
  "dtype, expected",
  [
    (jnp.float16, jnp.float32),
    (jnp.bfloat16, jnp.float32),
    (jnp.float32, jnp.float32),
    (jnp.complex64, jnp.float32),
  ],
)
def test_accumulation_dtype(dtype, expected):
  assert gnorm_jax._norms.accumulation_dtype(dtype) == expected


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_ldexp_is_exact_wherever_the_result_is_normal(dtype):
  """_numerics.ldexp (powers of two from exponent bits) against numpy's ldexp
  in float64, rounded once: every exponent the dtype can reach and beyond,
  mantissas across the range, 0, inf and NaN; a result below the smallest
  normal number may be flushed, nothing else may differ."""
  finfo = jnp.finfo(dtype)
  rng = np.random.default_rng(0)
  n = 4000
  exps = rng.integers(finfo.minexp, finfo.maxexp, n)
  x = rng.uniform(1, 2, n) * np.exp2(exps) * rng.choice([-1, 1], n)
  x = np.concatenate([x, [0.0, -0.0, np.inf, -np.inf, np.nan, float(finfo.max), 1.0]])
  span = 3 * (finfo.maxexp - finfo.minexp)
  k = rng.integers(-span, span, x.size).astype(np.int32)
  k[:500] = rng.integers(-4, 5, 500)  # small moves, where an intermediate could underflow
  xs = jnp.asarray(x, dtype)
  got = np.asarray(jax.jit(_numerics.ldexp)(xs, k), np.float64)
  with np.errstate(over="ignore"):  # results beyond the dtype's largest round to inf, as wanted
    want = np.asarray(jnp.asarray(np.ldexp(np.asarray(xs, np.float64), k), dtype), np.float64)
  flushed = (np.abs(want) < float(finfo.tiny)) & (want != 0)
  tiny = float(finfo.tiny)
  same = (got == want) | (np.isnan(got) & np.isnan(want)) | (flushed & (np.abs(got) < tiny))
  assert same.all(), (x[~same][:5], k[~same][:5], got[~same][:5], want[~same][:5])
  # the derivative in x is 2^k
  grad = jax.grad(lambda v: _numerics.ldexp(v, 5))(jnp.asarray(3.0, dtype))
  assert float(grad) == 32.0


# Issue 18: overflow-safe split norms; zero subgradients of ord 1 and inf.


@pytest.mark.parametrize("ord_", [None, 1, math.inf])
@pytest.mark.parametrize("values", [[3e38, 3e38], [3e38, -3e38, 1.0], [1.0, 2.0]])
def test_split_norm_is_finite_where_the_norm_overflows(ord_, values):
  x = jnp.asarray(values, jnp.float32)
  m, r = gnorm_jax._norms.tree_norm_split(x, ord_)
  assert np.isfinite(m)
  expected = np.linalg.norm(np.asarray(x, np.float64), ord=2 if ord_ is None else ord_)
  np.testing.assert_allclose(np.float64(m) * np.float64(r), expected, rtol=1e-6)
  with np.errstate(over="ignore"):  # the float32 norm overflows to inf where expected does
    np.testing.assert_allclose(gnorm_jax.tree_norm(x, ord_), np.float32(expected), rtol=1e-6)
  ms, rs = gnorm_jax._norms.leaf_norms_split({"a": x}, ord_)
  np.testing.assert_allclose(np.float64(ms["a"]) * np.float64(rs["a"]), expected, rtol=1e-6)


@pytest.mark.parametrize("ord_", [1, math.inf])
def test_ord_1_and_inf_derivatives_are_zero_at_zero(ord_):
  # jnp.abs has derivative 1 at 0 (and max splits ties): the zero subgradient
  # is the norm core's policy for every ord.
  np.testing.assert_array_equal(
    jax.grad(lambda g: gnorm_jax.tree_norm(g, ord_))(jnp.zeros(3)), np.zeros(3)
  )
  x = jnp.array([0.0, -2.0, 1.0])
  expected = np.sign(np.asarray(x)) if ord_ == 1 else np.array([0.0, -1.0, 0.0])
  np.testing.assert_array_equal(jax.grad(lambda g: gnorm_jax.tree_norm(g, ord_))(x), expected)
