"""Training diagnostics: the gradient noise scale and per-layer norm logging.

Two things people watch while training:

* the simple gradient noise scale :math:`B_\\text{simple} = \\operatorname{tr}(\\Sigma)/\\|G\\|^2`
  of McCandlish et al. 2018, which predicts the largest useful batch size, with
  an exponential-moving-average tracker that can run every step under jit;
* per-layer (per-leaf) norms as a flat ``{"params/dense/kernel": norm}`` dict
  for TensorBoard, W&B or CLU, and an Optax transformation that records them in
  its state without changing the updates.

No callbacks: every value is returned (or kept in an Optax state) so that it
can be fetched with ``jax.device_get`` outside the jitted step.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from gnorm_jax._checks import PyTree, check_number, check_ord, concrete_number, is_traced
from gnorm_jax._norms import leaf_norms, tree_norm
from gnorm_jax._numerics import pow2_split, safe_divide

__all__ = [
  "NoiseScale",
  "gradient_noise_scale",
  "noise_scale_from_two_batches",
  "NoiseScaleTrackerState",
  "NoiseScaleTracker",
  "noise_scale_tracker",
  "flat_leaf_norms",
  "RecordLeafNormsState",
  "record_leaf_norms",
]


# ---------------------------------------------------------------------------
# Gradient noise scale (McCandlish et al. 2018, appendix A).


class NoiseScale(NamedTuple):
  r"""Estimates of the simple gradient noise scale and of its two ingredients.

  Scalars (0-d arrays) of one dtype, float32 or float64.

  Attributes:
    b_simple: :math:`B_\text{simple}` = ``trace_cov / grad_sq_norm``.
    grad_sq_norm: an unbiased estimate of :math:`\|G\|^2` (one step's can be < 0).
    trace_cov: an unbiased estimate of :math:`\operatorname{tr}(\Sigma)` (one step's can
      be < 0).
  """

  b_simple: jax.Array
  grad_sq_norm: jax.Array
  trace_cov: jax.Array


def _check_batch_sizes(small_batch_size: ArrayLike, big_batch_size: ArrayLike) -> None:
  """Validates batch sizes given as numbers; traced ones pass as they are."""
  names = ("small_batch_size", "big_batch_size")
  for value, name in zip((small_batch_size, big_batch_size), names):
    check_number(name, value, low=1, finite=True, fix="It is a number of examples.")
  small = concrete_number(names[0], small_batch_size)
  big = concrete_number(names[1], big_batch_size)
  if small is not None and big is not None and big <= small:
    raise ValueError(
      f"{names[1]} must be larger than {names[0]}: the estimates divide by"
      f" {names[1]} - {names[0]}; got {names[0]}={small_batch_size!r},"
      f" {names[1]}={big_batch_size!r}. Measure the big-batch gradient on more examples"
      " than the small one."
    )


def _safe_ratio(num: jax.Array, den: jax.Array) -> jax.Array:
  """num/den, with 0/0 = 0 and x/0 = ±inf; NaN only from NaN inputs."""
  # Constants, not sign(num)·inf: a zero cotangent times inf would be NaN.
  at_zero = jnp.where(num > 0, jnp.inf, jnp.where(num < 0, -jnp.inf, 0)).astype(num.dtype)
  return safe_divide(num, den, jnp.where(jnp.isnan(num), num, at_zero))


def noise_scale_from_two_batches(
  small_sq_norm: ArrayLike,
  big_sq_norm: ArrayLike,
  small_batch_size: ArrayLike,
  big_batch_size: ArrayLike,
) -> NoiseScale:
  """The simple noise scale from gradient norms measured at two batch sizes.

  B_simple = tr(Σ)/‖G‖², from unbiased estimates (McCandlish et al. 2018, appendix A); average
  them over steps with :func:`noise_scale_tracker`: :ref:`the guide <noise-scale-estimators>`.

  Args:
    small_sq_norm: ‖mean gradient‖² over ``small_batch_size`` examples (or a mean of several).
    big_sq_norm: the same over ``big_batch_size`` examples.
    small_batch_size: B_small, at least 1.
    big_batch_size: B_big, larger than ``small_batch_size``.

  Returns:
    A :class:`NoiseScale` of scalars in at least float32 (float64 for float64 inputs).
    ``b_simple`` is 0 when both estimates are 0 and ±inf when only ``grad_sq_norm`` is 0; inf or
    NaN inputs give inf or NaN estimates.

  Raises:
    ValueError: ``small_batch_size < 1`` or ``big_batch_size <= small_batch_size`` (numbers or
      concrete 0-d arrays; traced batch sizes are not checked).
    TypeError: a batch size is a bool or not a number.

  Examples:
    >>> import gnorm_jax
    >>> est = gnorm_jax.noise_scale_from_two_batches(5.0, 2.0, 32, 128)
    >>> float(est.grad_sq_norm), float(est.trace_cov), float(est.b_simple)
    (1.0, 128.0, 128.0)
  """
  _check_batch_sizes(small_batch_size, big_batch_size)
  small = jnp.asarray(small_sq_norm)
  big = jnp.asarray(big_sq_norm)
  dtype = jnp.result_type(small, big, jnp.float32)
  small, big = small.astype(dtype), big.astype(dtype)
  c, k = _size_factors(small_batch_size, big_batch_size, dtype)
  # With d = small - big: ‖G‖² = big - d·c and tr(Σ) = d·k. B_simple is their
  # ratio taken after scaling d and big by a power of two (it cancels), so it
  # stays finite where tr(Σ) alone overflows (norms near the largest float).
  d = small - big
  grad_sq = big - d * c
  trace_cov = d * k
  scale, _ = pow2_split(jnp.maximum(jnp.maximum(jnp.abs(small), jnp.abs(big)), jnp.abs(d)))
  b_simple = _safe_ratio((d * scale) * k, big * scale - (d * scale) * c)
  return NoiseScale(b_simple, grad_sq, trace_cov)


def _size_factors(
  b_small: ArrayLike, b_big: ArrayLike, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
  """c = B_small/(B_big − B_small) and k = B_small·B_big/(B_big − B_small) in ``dtype``.

  From Python numbers they are computed in float64 (the difference of the
  sizes exactly) and rounded once: float32 sizes past 2**24 are not even
  distinct (2**25 and 2**25 + 1). Traced sizes are subtracted in their own
  dtype (exact for ints) before the conversion.
  """
  small = concrete_number("small_batch_size", b_small)
  big = concrete_number("big_batch_size", b_big)
  if small is not None and big is not None:
    diff = big - small  # exact for ints
    return jnp.asarray(small / diff, dtype), jnp.asarray(small * (big / diff), dtype)
  b_small, b_big = jnp.asarray(b_small), jnp.asarray(b_big)
  gap = (b_big - b_small).astype(dtype)
  b_small, b_big = b_small.astype(dtype), b_big.astype(dtype)
  return b_small / gap, b_small * (b_big / gap)


def gradient_noise_scale(
  per_example_sq_norms: ArrayLike,
  batch_grad_sq_norm: ArrayLike,
  batch_size: ArrayLike,
) -> NoiseScale:
  """The simple gradient noise scale from per-example and batch gradient norms.

  :func:`noise_scale_from_two_batches` with B_small = 1: the small-batch squared norm is the mean
  of the per-example ones. The batch gradient must be the *mean* of the per-example gradients:
  :ref:`the guide <noise-scale-estimators>`.

  Args:
    per_example_sq_norms: ``[n]`` squared per-example gradient norms (``n >= 1``), as
      :func:`per_example_grad_norms` gives them squared, of the batch or any subset of it.
    batch_grad_sq_norm: the squared norm of the mean gradient over the ``batch_size`` examples.
    batch_size: B, at least 2.

  Returns:
    A :class:`NoiseScale`, as :func:`noise_scale_from_two_batches` returns.

  Raises:
    ValueError: ``per_example_sq_norms`` is not a non-empty 1-D array, or ``batch_size`` (a
      number) is below 2.
    TypeError: ``batch_size`` is not a number (e.g. a bool).

  Examples:
    >>> import jax.numpy as jnp, gnorm_jax
    >>> g = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])  # per-example
    >>> est = gnorm_jax.gradient_noise_scale(jnp.sum(g**2, 1), jnp.sum(g.mean(0)**2), 4)
    >>> round(float(est.grad_sq_norm), 4), round(float(est.trace_cov), 4)
    (1.0, 1.0)

  References:
    McCandlish et al. 2018, https://arxiv.org/abs/1812.06162.
  """
  sq = jnp.asarray(per_example_sq_norms)
  if sq.ndim != 1 or sq.shape[0] == 0:
    raise ValueError(
      "per_example_sq_norms must be a non-empty 1-D array [n] of squared"
      f" per-example gradient norms, got shape {sq.shape}. Flatten it"
      " (e.g. `x.reshape(-1)`) if it has a microbatch axis."
    )
  check_number(
    "batch_size", batch_size, low=2, finite=True, fix="The estimates divide by batch_size - 1."
  )
  b = concrete_number("batch_size", batch_size)
  if b is not None and sq.shape[0] > b:
    raise ValueError(
      f"per_example_sq_norms has {sq.shape[0]} entries, more than batch_size={batch_size!r}:"
      " they are the squared norms of examples of that batch (all of them or a subset)."
      " Pass the size of the batch whose mean gradient gave batch_grad_sq_norm."
    )
  if not is_traced(sq) and bool(jnp.any(sq < 0)):
    raise ValueError(
      "per_example_sq_norms must be squared norms (>= 0), got negative entries at"
      f" {np.flatnonzero(np.asarray(sq) < 0).tolist()}. Square the norms"
      " (per_example_grad_norms(...) ** 2)."
    )
  check_number(
    "batch_grad_sq_norm",
    batch_grad_sq_norm,
    low=0,
    fix="It is the squared norm of the batch's mean gradient.",
  )
  small = jnp.mean(sq.astype(jnp.promote_types(sq.dtype, jnp.float32)))
  return noise_scale_from_two_batches(small, batch_grad_sq_norm, 1, batch_size)


class NoiseScaleTrackerState(NamedTuple):
  r"""State of :func:`noise_scale_tracker`: moving averages, not yet debiased.

  Scalars (0-d arrays), zero-initialized; the averages are float32 (float64 under x64).

  Attributes:
    grad_sq_norm: the EMA of the :math:`\|G\|^2` estimates.
    trace_cov: the EMA of the :math:`\operatorname{tr}(\Sigma)` estimates.
    weight: the EMA of 1, i.e. :math:`1 - \beta^t`; divides out the zero start.
    num_skipped: estimates skipped because they were inf or NaN; int32.
  """

  grad_sq_norm: jax.Array
  trace_cov: jax.Array
  weight: jax.Array
  num_skipped: jax.Array


class NoiseScaleTracker(NamedTuple):
  """A pair of pure functions, ``init()`` and ``update(estimate, state)``.

  Attributes:
    init: ``init()`` returns the first :class:`NoiseScaleTrackerState`.
    update: ``update(estimate, state)`` takes one step's :class:`NoiseScale` and returns the
      smoothed :class:`NoiseScale` and the new state.
  """

  init: Callable[[], NoiseScaleTrackerState]
  update: Callable[[NoiseScale, NoiseScaleTrackerState], tuple[NoiseScale, NoiseScaleTrackerState]]


def noise_scale_tracker(decay: ArrayLike = 0.99) -> NoiseScaleTracker:
  """Exponential moving averages of the noise-scale estimates, and their ratio.

  Averages ‖G‖² and tr(Σ) separately and returns the ratio of the averages, bias-corrected as in
  Adam; inf or NaN estimates are skipped and counted in ``num_skipped``. Call ``update`` inside
  the jitted step. Why these averages: :ref:`the guide <noise-scale-tracker>`.

  Args:
    decay: β ∈ [0, 1); 0 returns each step's own estimate. A traced value is accepted as it is
      (no retrace when it changes).

  Returns:
    A :class:`NoiseScaleTracker` ``(init, update)``: ``init()`` gives a
    :class:`NoiseScaleTrackerState`, ``update(estimate, state)`` the smoothed :class:`NoiseScale`
    (float32, or float64 under x64; NaN before any finite estimate) and the new state.

  Raises:
    ValueError: ``decay`` (a number) is not in [0, 1).
    TypeError: ``decay`` is not a number (e.g. a bool).

  Examples:
    >>> import gnorm_jax
    >>> tracker = gnorm_jax.noise_scale_tracker(decay=0.9)
    >>> state = tracker.init()
    >>> for small, big in [(5.0, 2.0), (3.0, 1.5)]:
    ...   est = gnorm_jax.noise_scale_from_two_batches(small, big, 32, 128)
    ...   smoothed, state = tracker.update(est, state)
    >>> float(smoothed.b_simple)  # (0.9·0.1·128 + 0.1·64) / (0.9·0.1·1 + 0.1·1)
    94.31...

  References:
    McCandlish et al. 2018, https://arxiv.org/abs/1812.06162.
  """
  check_number(
    "decay", decay, low=0, high=1, high_open=True, fix="E.g. 0.99 averages over ~100 steps."
  )

  def init() -> NoiseScaleTrackerState:
    # Distinct buffers, so the state can be donated to a jitted step.
    zero = lambda: jnp.zeros((), _tracker_dtype())
    return NoiseScaleTrackerState(zero(), zero(), zero(), jnp.zeros((), jnp.int32))

  def update(
    estimate: NoiseScale, state: NoiseScaleTrackerState
  ) -> tuple[NoiseScale, NoiseScaleTrackerState]:
    dtype = state.grad_sq_norm.dtype
    beta = jnp.asarray(decay).astype(dtype)
    grad_sq = jnp.asarray(estimate.grad_sq_norm).astype(dtype)
    trace_cov = jnp.asarray(estimate.trace_cov).astype(dtype)
    finite = jnp.isfinite(grad_sq) & jnp.isfinite(trace_cov)

    def ema(old, new):
      return jnp.where(finite, beta * old + (1 - beta) * new, old)

    state = NoiseScaleTrackerState(
      grad_sq_norm=ema(state.grad_sq_norm, grad_sq),
      trace_cov=ema(state.trace_cov, trace_cov),
      weight=ema(state.weight, jnp.ones((), dtype)),
      num_skipped=state.num_skipped + jnp.where(finite, 0, 1).astype(jnp.int32),
    )
    seen = state.weight > 0
    inv_weight = safe_divide(1, state.weight, jnp.nan)
    smoothed = NoiseScale(
      b_simple=jnp.where(seen, _safe_ratio(state.trace_cov, state.grad_sq_norm), jnp.nan),
      grad_sq_norm=state.grad_sq_norm * inv_weight,
      trace_cov=state.trace_cov * inv_weight,
    )
    return smoothed, state

  return NoiseScaleTracker(init, update)


# ---------------------------------------------------------------------------
# Per-layer logging.


def _tracker_dtype() -> Any:
  """float32, or float64 under x64 (estimates of 1e300 then stay finite)."""
  return jnp.result_type(float)


def _flat_dict(tree: Any, *, prefix: str = "", sep: str = "/") -> dict[str, Any]:
  """A pytree as a flat ``{path: leaf}`` dict, paths joined with ``sep`` after ``prefix``.

  Dict keys, attribute names and sequence indices are the path components; a
  single leaf gives ``{prefix: leaf}``.

  Raises:
    ValueError: two leaves give the same path (keys ``"a/b"`` and ``"a"`` →
      ``"b"``).
  """
  out: dict[str, Any] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = jax.tree_util.keystr(path, simple=True, separator=sep)
    key = sep.join(k for k in (prefix, key) if k)
    if key in out:
      raise ValueError(
        f"Two leaves of the tree have the same flat path {key!r} with"
        f" sep={sep!r}; pass a separator that does not occur in the keys."
      )
    out[key] = leaf
  return out


def flat_leaf_norms(
  tree: PyTree,
  ord: int | float | None = None,
  *,
  prefix: str = "",
  sep: str = "/",
) -> dict[str, jax.Array]:
  """Per-leaf (per-layer) norms as a flat ``{path: norm}`` dict for logging.

  :func:`leaf_norms` keyed by each leaf's path: dict keys, attribute names (NamedTuples,
  dataclasses, equinox modules) and sequence indices joined with ``sep``. Works under jit;
  outside it, ``jax.device_get`` fetches the whole dict in one transfer.

  Args:
    tree: a pytree of floating-point arrays, e.g. gradients or updates.
    ord: None or 2 (Euclidean), 1 or ``inf``.
    prefix: prepended to every path, e.g. ``"grad_norm"``.
    sep: the path separator.

  Returns:
    ``{path: norm}`` with scalar norms in at least float32.

  Raises:
    TypeError: a leaf is an integer or bool array.
    ValueError: ``ord`` is not accepted, or two leaves give the same path (keys ``"a/b"`` and
      ``"a"`` → ``"b"``): choose another ``sep``.

  Examples:
    >>> import jax, jax.numpy as jnp, gnorm_jax
    >>> grads = {"dense": {"kernel": jnp.array([[3.0, 4.0]]), "bias": jnp.zeros(2)}}
    >>> {k: float(v) for k, v in jax.device_get(gnorm_jax.flat_leaf_norms(grads)).items()}
    {'dense/bias': 0.0, 'dense/kernel': 5.0}
  """
  for name, value in (("prefix", prefix), ("sep", sep)):
    if not isinstance(value, str):
      raise TypeError(
        f"{name} must be a str, got {name}={value!r} ({type(value).__name__}). Pass e.g."
        f" prefix='grad_norm', sep='/'."
      )
  if not sep:
    raise ValueError("sep must be a non-empty str, got sep=''. Pass e.g. sep='/'.")
  return _flat_dict(leaf_norms(tree, ord), prefix=prefix, sep=sep)


class RecordLeafNormsState(NamedTuple):
  """State of :func:`record_leaf_norms`: the norms of the last updates it saw.

  Attributes:
    leaf_norms: one norm per leaf, a pytree with the params' structure; scalars, float32
      (float64 for float64 params).
    global_norm: the norm of all updates as one vector; a float32 (or float64) scalar.
  """

  leaf_norms: PyTree
  global_norm: jax.Array


def record_leaf_norms(ord: int | float | None = None) -> optax.GradientTransformation:
  """An Optax transformation that records per-leaf norms and passes updates on.

  The updates are returned unchanged (the same arrays); the state keeps their per-leaf norms and
  global norm from the last step (zeros before the first). First in an ``optax.chain`` it
  records the gradient norms; last, the norms of the applied updates:
  :ref:`the guide <per-layer-norms>`.

  Args:
    ord: None or 2 (Euclidean), 1 or ``inf``.

  Returns:
    An ``optax.GradientTransformation`` with :class:`RecordLeafNormsState`.

  Raises:
    ValueError: ``ord`` is not accepted.

  Examples:
    >>> import jax.numpy as jnp, optax, gnorm_jax
    >>> opt = optax.chain(gnorm_jax.record_leaf_norms(), optax.sgd(0.1))
    >>> params = {"w": jnp.ones(2), "b": jnp.zeros(())}
    >>> grads = {"w": jnp.array([3.0, 4.0]), "b": jnp.array(1.0)}
    >>> _, state = opt.update(grads, opt.init(params), params)
    >>> optax.tree.get(state, "leaf_norms")
    {'b': Array(1., dtype=float32), 'w': Array(5., dtype=float32)}
  """
  check_ord(ord)

  def init_fn(params):
    shapes = jax.eval_shape(lambda p: leaf_norms(p, ord), params)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    total = jax.eval_shape(lambda p: tree_norm(p, ord), params)
    return RecordLeafNormsState(zeros, jnp.zeros(total.shape, total.dtype))

  def update_fn(updates, state, params=None):
    del params
    norms = jax.tree.map(
      lambda n, old: n.astype(old.dtype), leaf_norms(updates, ord), state.leaf_norms
    )
    total = tree_norm(norms, ord).astype(state.global_norm.dtype)
    return updates, RecordLeafNormsState(norms, total)

  return optax.GradientTransformation(init_fn, update_fn)
