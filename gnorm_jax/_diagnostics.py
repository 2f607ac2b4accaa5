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

from gnorm_jax._checks import check_number, check_ord, concrete_number, is_traced
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
  """Estimates of the simple gradient noise scale and of its two ingredients."""

  b_simple: jax.Array  # [] float32/float64: trace_cov / grad_sq_norm (B_simple)
  grad_sq_norm: jax.Array  # [] same dtype: unbiased estimate of ‖G‖² (can be < 0)
  trace_cov: jax.Array  # [] same dtype: unbiased estimate of tr(Σ) (can be < 0)


def _check_batch_sizes(small_batch_size: Any, big_batch_size: Any) -> None:
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
  small_sq_norm: jax.Array | float,
  big_sq_norm: jax.Array | float,
  small_batch_size: jax.Array | int,
  big_batch_size: jax.Array | int,
) -> NoiseScale:
  r"""The simple noise scale from gradient norms measured at two batch sizes.

  With :math:`|G_B|^2` the squared norm of a mean gradient over :math:`B`
  examples, :math:`\mathbb{E}|G_B|^2 = \|G\|^2 + \operatorname{tr}(\Sigma)/B`.
  Two batch sizes give the unbiased estimates of McCandlish et al. 2018,
  appendix A:

  .. math::
    \|G\|^2 \approx \frac{B_\text{big}|G_{B_\text{big}}|^2
      - B_\text{small}|G_{B_\text{small}}|^2}{B_\text{big} - B_\text{small}},
    \qquad
    \operatorname{tr}(\Sigma) \approx \frac{|G_{B_\text{small}}|^2
      - |G_{B_\text{big}}|^2}{1/B_\text{small} - 1/B_\text{big}},
    \qquad
    B_\text{simple} = \frac{\operatorname{tr}(\Sigma)}{\|G\|^2}.

  The two estimates are unbiased, their ratio is not, and one step's estimates
  are noisy (either can be negative): average them over steps with
  :func:`noise_scale_tracker` (the ratio of averages, as the paper does).

  Args:
    small_sq_norm: :math:`|G_{B_\text{small}}|^2`, the squared norm of the mean
      gradient over ``small_batch_size`` examples (or the mean of several such).
    big_sq_norm: :math:`|G_{B_\text{big}}|^2`, the squared norm of the mean
      gradient over ``big_batch_size`` examples.
    small_batch_size: :math:`B_\text{small}`, at least 1.
    big_batch_size: :math:`B_\text{big}`, larger than ``small_batch_size``.

  Returns:
    A :class:`NoiseScale` of scalars in at least float32 (float64 for float64
    inputs). ``b_simple`` is 0 when both estimates are 0 and ±inf when only
    ``grad_sq_norm`` is 0; inf or NaN inputs give inf or NaN estimates.

  Raises:
    ValueError: ``small_batch_size < 1`` or ``big_batch_size <=
      small_batch_size`` (given as numbers, concrete 0-d arrays included;
      traced batch sizes are not checked).
    TypeError: a batch size is a bool or not a number.

  Examples:
    >>> import gnorm_jax
    >>> est = gnorm_jax.noise_scale_from_two_batches(
    ...     5.0, 2.0, small_batch_size=32, big_batch_size=128)
    >>> float(est.grad_sq_norm), float(est.trace_cov), float(est.b_simple)
    (1.0, 128.0, 128.0)

  References:
    McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch
    Training", appendix A. https://arxiv.org/abs/1812.06162
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


def _size_factors(b_small: Any, b_big: Any, dtype: Any) -> tuple[jax.Array, jax.Array]:
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
  diff = (b_big - b_small).astype(dtype)
  b_small, b_big = b_small.astype(dtype), b_big.astype(dtype)
  return b_small / diff, b_small * (b_big / diff)


def gradient_noise_scale(
  per_example_sq_norms: jax.Array,
  batch_grad_sq_norm: jax.Array | float,
  batch_size: jax.Array | int,
) -> NoiseScale:
  r"""The simple gradient noise scale from per-example and batch gradient norms.

  :func:`noise_scale_from_two_batches` with :math:`B_\text{small} = 1`: each
  per-example gradient is a "batch" of one, so :math:`|G_{B_\text{small}}|^2`
  is the mean of the per-example squared norms, and
  :math:`B_\text{big}` is the batch whose mean gradient has squared norm
  ``batch_grad_sq_norm``:

  .. math::
    \overline{|g_i|^2} = \tfrac{1}{n}\textstyle\sum_i |g_i|^2,\quad
    \|G\|^2 \approx \frac{B|G_B|^2 - \overline{|g_i|^2}}{B - 1},\quad
    \operatorname{tr}(\Sigma) \approx \frac{B\,(\overline{|g_i|^2} - |G_B|^2)}{B - 1},
    \quad B_\text{simple} = \frac{\operatorname{tr}(\Sigma)}{\|G\|^2}.

  The per-example norms come for free from
  :func:`gnorm_jax.per_example_grad_norms` (square them); they may be those of
  the whole batch or of any subset of it. The batch gradient must be the *mean*
  of the per-example gradients, as for a loss averaged over the batch. With
  clipped per-example gradients the estimates are those of the clipped ones.

  Args:
    per_example_sq_norms: ``[n]`` squared norms :math:`|g_i|^2` of per-example
      gradients, ``n >= 1``.
    batch_grad_sq_norm: :math:`|G_B|^2`, the squared norm of the mean gradient
      over the batch of ``batch_size`` examples.
    batch_size: :math:`B`, at least 2.

  Returns:
    A :class:`NoiseScale` (``b_simple``, ``grad_sq_norm``, ``trace_cov``), with
    the same conventions as :func:`noise_scale_from_two_batches`.

  Raises:
    ValueError: ``per_example_sq_norms`` is not a non-empty 1-D array, or
      ``batch_size`` (a number) is below 2.
    TypeError: ``batch_size`` is not a number (e.g. a bool).

  Examples:
    >>> import jax.numpy as jnp
    >>> import gnorm_jax
    >>> g = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])  # per-example
    >>> est = gnorm_jax.gradient_noise_scale(
    ...     jnp.sum(g ** 2, axis=1), jnp.sum(g.mean(0) ** 2), batch_size=4)
    >>> round(float(est.grad_sq_norm), 4), round(float(est.trace_cov), 4)
    (1.0, 1.0)

  References:
    McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch
    Training", appendix A. https://arxiv.org/abs/1812.06162
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
  """State of :func:`noise_scale_tracker`: moving averages, not yet debiased."""

  # Scalars, float32 (float64 under x64), zero-initialized:
  grad_sq_norm: jax.Array  # EMA of the ‖G‖² estimates
  trace_cov: jax.Array  # EMA of the tr(Σ) estimates
  weight: jax.Array  # EMA of 1, i.e. 1 - decay^t; divides out the zero init
  num_skipped: jax.Array  # [] int32: estimates skipped because they were inf or NaN


class NoiseScaleTracker(NamedTuple):
  """A pair of pure functions, ``init()`` and ``update(estimate, state)``."""

  init: Callable[[], NoiseScaleTrackerState]
  update: Callable[[NoiseScale, NoiseScaleTrackerState], tuple[NoiseScale, NoiseScaleTrackerState]]


def noise_scale_tracker(decay: float | jax.Array = 0.99) -> NoiseScaleTracker:
  r"""Exponential moving averages of the noise-scale estimates, and their ratio.

  One step's :class:`NoiseScale` is noisy; McCandlish et al. average the two
  unbiased estimates separately over steps and take the ratio of the averages
  (not the average of ratios, which is biased and blows up when one step's
  :math:`\|G\|^2` estimate is near 0):

  .. math::
    m_t = \beta m_{t-1} + (1-\beta)\,\|G\|^2_t,\quad
    s_t = \beta s_{t-1} + (1-\beta)\operatorname{tr}(\Sigma)_t,\quad
    w_t = \beta w_{t-1} + (1-\beta),\quad
    B_\text{simple} = \frac{s_t}{m_t}.

  Bias correction: the averages start at 0, so they are divided by
  :math:`w_t = 1-\beta^t` (as in Adam) before they are returned. The ratio needs
  no correction, since the factor cancels. Keeping :math:`w_t` as an average of
  ones (rather than computing :math:`\beta^t`) keeps the correction exact when
  ``decay`` is a traced value that changes between steps.

  Estimates that are inf or NaN (e.g. from a step with a non-finite gradient)
  are skipped: the state is left as it was and ``num_skipped`` counts them. Before
  any finite estimate has been seen the returned estimates are NaN.

  Everything is a pure function of arrays: call ``update`` inside the jitted
  train step and keep the state next to the optimizer state.

  Args:
    decay: :math:`\beta \in [0, 1)`; 0 returns each step's own estimate. A traced
      value is accepted as it is (no retrace when it changes).

  Returns:
    A :class:`NoiseScaleTracker` ``(init, update)``: ``init()`` returns a
    :class:`NoiseScaleTrackerState`; ``update(estimate, state)`` returns the
    smoothed :class:`NoiseScale` (float32, or float64 under x64) and the new state.

  Raises:
    ValueError: ``decay`` (a number) is not in [0, 1).
    TypeError: ``decay`` is not a number (e.g. a bool).

  Examples:
    >>> import jax.numpy as jnp
    >>> import gnorm_jax
    >>> tracker = gnorm_jax.noise_scale_tracker(decay=0.9)
    >>> state = tracker.init()
    >>> for small, big in [(5.0, 2.0), (3.0, 1.5)]:
    ...   est = gnorm_jax.noise_scale_from_two_batches(small, big, 32, 128)
    ...   smoothed, state = tracker.update(est, state)
    >>> float(smoothed.b_simple)  # (0.9·0.1·128 + 0.1·64) / (0.9·0.1·1 + 0.1·1)
    94.31...

  References:
    McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch
    Training", appendix A. https://arxiv.org/abs/1812.06162
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
  tree: Any,
  ord: int | float | None = None,
  *,
  prefix: str = "",
  sep: str = "/",
) -> dict[str, jax.Array]:
  r"""Per-leaf (per-layer) norms as a flat ``{path: norm}`` dict for logging.

  :func:`gnorm_jax.leaf_norms` with each leaf's path as its key:

  .. math::
    \{\text{path}(\ell): \|x_\ell\|\ \text{for each leaf } \ell\}

  Dict keys, attribute names (NamedTuples, dataclasses, equinox modules) and
  sequence indices become path components joined with ``sep``:
  ``{"params": {"dense": {"kernel": x}}}`` gives ``"params/dense/kernel"``.
  Works under jit (the values are scalar arrays); outside it,
  ``jax.device_get`` turns the whole dict into numpy floats in one transfer.

  Args:
    tree: a pytree of floating-point arrays, e.g. gradients or updates.
    ord: None or 2 (Euclidean), 1 or ``inf``.
    prefix: prepended to every path, e.g. ``"grad_norm"``.
    sep: the path separator.

  Returns:
    ``{path: norm}`` with scalar norms in at least float32.

  Raises:
    TypeError: a leaf is an integer or bool array.
    ValueError: ``ord`` is not accepted, or two leaves give the same path
      (keys ``"a/b"`` and ``"a"`` → ``"b"``): choose another ``sep``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import gnorm_jax
    >>> grads = {"params": {"dense": {"kernel": jnp.array([[3.0, 4.0]]),
    ...                               "bias": jnp.zeros(2)}}}
    >>> {k: float(v) for k, v in jax.device_get(gnorm_jax.flat_leaf_norms(grads)).items()}
    {'params/dense/bias': 0.0, 'params/dense/kernel': 5.0}
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
  """State of :func:`record_leaf_norms`: the norms of the last updates it saw."""

  leaf_norms: Any  # pytree like params; leaves [] float32 (float64 for float64 params)
  global_norm: jax.Array  # [] float32 (or float64): norm of all updates as one vector


def record_leaf_norms(ord: int | float | None = None) -> optax.GradientTransformation:
  r"""An Optax transformation that records per-leaf norms and passes updates on.

  The updates are returned unchanged (the same arrays); the state keeps

  .. math::
    \text{leaf\_norms} = \{\|u_\ell\|\}_\ell,\qquad
    \text{global\_norm} = \|u\| = \big\|(\|u_\ell\|)_\ell\big\|

  of the updates :math:`u` it received in the last step (zeros before the
  first). What it measures depends on where it sits in an ``optax.chain``:
  first, it records the gradient norms; last, the norms of the updates the
  optimizer applies. Read the values with ``state.leaf_norms`` on its own state, or
  ``optax.tree.get(opt_state, "leaf_norms")`` when there is one in the chain.
  (To log the per-layer norms of a tree directly, :func:`flat_leaf_norms` gives
  a flat ``{path: norm}`` dict.) The field is not called ``grad_norm``
  so it never clashes with a clipping transformation's ``grad_norm``.

  Args:
    ord: None or 2 (Euclidean), 1 or ``inf``.

  Returns:
    An ``optax.GradientTransformation`` with :class:`RecordLeafNormsState`.

  Raises:
    ValueError: ``ord`` is not accepted.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import gnorm_jax
    >>> params = {"w": jnp.ones(2), "b": jnp.zeros(())}
    >>> opt = optax.chain(gnorm_jax.record_leaf_norms(), optax.sgd(0.1))
    >>> state = opt.init(params)
    >>> grads = {"w": jnp.array([3.0, 4.0]), "b": jnp.array(1.0)}
    >>> updates, state = opt.update(grads, state, params)
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
