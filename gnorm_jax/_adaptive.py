"""Optax transformations that clip by a threshold learnt from the norm history.

Four ways a large-model trainer protects itself from gradient spikes, all built
on :func:`gnorm_jax.tree_norm` (the global Euclidean norm of the update tree):

* :func:`autoclip`: clip to a quantile of the last ``history`` norms
  (Seetharaman et al. 2020).
* :func:`zclip`: clip norms whose z-score against an EMA mean and variance is
  too large (Kumar et al. 2025).
* :func:`quantile_clip`: clip to a streaming estimate of a quantile of the
  norm, O(1) state (Andrew et al. 2021).
* :func:`skip_spikes`: wrap any optimizer and skip (zero update, unchanged
  inner state) steps whose norm is an outlier of the last ``history`` norms.

Shared conventions. States are NamedTuples of fixed-size arrays; ``grad_norm``
is the norm measured at the last step, before clipping, and ``max_norm`` the
threshold that step was held to (the update's norm is ``min(grad_norm,
max_norm)``, so ``grad_norm > max_norm`` says the step was clipped). Counters
are int32 and saturate instead of wrapping. Hyperparameters share names: a
ring buffer's length is ``history``, a quantile is a fraction in (0, 1]
(``quantile``), an EMA's weight on the old value is ``decay`` (as in
``optax.ema``), the z-score above which a norm is an outlier is
``z_threshold``, and the number of finite norms recorded before a rule acts is
``warmup_steps``.

Non-finite norms (inf or NaN anywhere in the gradient) are never recorded in a
history or a running statistic, so one bad batch does not poison the
thresholds of the steps after it. The three clippers pass such an update on
non-finite (like ``optax.clip_by_global_norm``); :func:`skip_spikes` skips it.
A finite update whose norm exceeds the largest float (``[3e38, 3e38]`` in
float32) has ``grad_norm`` inf and is not recorded either, but it is clipped
to a finite threshold as any other (the norm is measured as m·2^k) and passes
an infinite one unchanged.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from gnorm_jax._checks import PyTree, check_number, check_size
from gnorm_jax._norms import tree_norm, tree_norm_split
from gnorm_jax._numerics import clip_scales, pow2_split, safe_divide, scale_tree

__all__ = ["autoclip", "zclip", "quantile_clip", "skip_spikes"]


# The largest adaptation rate of quantile_clip: e^η, the most one step can
# change the threshold by, stays a finite float32.
_MAX_ADAPTATION_RATE = math.log(float(jnp.finfo(jnp.float32).max))


# --------------------------------------------------------------------------
# Shared helpers.


def _norm_dtype(params: PyTree) -> jnp.dtype:
  """The dtype tree_norm returns for ``params`` (float32, or float64)."""
  return jax.eval_shape(tree_norm, params).dtype


def _count_if(counter: jax.Array, cond: jax.Array) -> jax.Array:
  return jnp.where(cond, optax.safe_increment(counter), counter)


def _record(history: jax.Array, num_recorded: jax.Array, norm: jax.Array):
  """Writes a finite ``norm`` into the ring buffer; non-finite values are dropped."""
  finite = jnp.isfinite(norm)
  slot = num_recorded % history.shape[0]
  history = jnp.where(finite, history.at[slot].set(norm), history)
  return history, _count_if(num_recorded, finite)


def _filled(history: jax.Array, num_recorded: jax.Array) -> jax.Array:
  """How many entries of the ring buffer hold recorded norms."""
  return jnp.minimum(num_recorded, history.shape[0])


def _quantile(history: jax.Array, num_recorded: jax.Array, q: ArrayLike) -> jax.Array:
  """numpy.quantile(filled entries, q) with linear interpolation; inf if none.

  Unfilled slots hold +inf, so after sorting the filled entries come first. A
  traced ``q`` outside [0, 1] is clipped into it (never an out-of-range read).
  """
  n = _filled(history, num_recorded)
  ordered = jnp.sort(history)
  fraction = jnp.clip(jnp.asarray(q, history.dtype), 0, 1)
  pos = fraction * (jnp.maximum(n, 1) - 1).astype(history.dtype)
  lo = jnp.floor(pos).astype(n.dtype)
  hi = jnp.minimum(lo + 1, jnp.maximum(n, 1) - 1)  # never reads an unfilled slot
  value = ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo])
  return jnp.where(n > 0, value, jnp.inf)


def _mean_std(history: jax.Array, num_recorded: jax.Array):
  """Mean and population standard deviation of the filled entries (two-pass).

  Overflow-safe: the sum is taken of the entries scaled by an exact power of
  two of the largest (so 128 norms of 1e37 do not sum to inf), and the
  standard deviation is ‖x − mean‖/√n with :func:`tree_norm`, whose squares
  never overflow (a plain (x − mean)² is inf for x = 1e20 in float32).
  """
  n = _filled(history, num_recorded)
  filled = jnp.arange(history.shape[0]) < n
  denom = jnp.maximum(n, 1).astype(history.dtype)
  values = jnp.where(filled, history, 0)
  s, _ = pow2_split(jnp.max(values))
  mean = jnp.sum(values * s) / denom / s
  std = tree_norm(jnp.where(filled, history - mean, 0)).astype(history.dtype) / jnp.sqrt(denom)
  return mean, std


def _measure(updates: PyTree, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(norm, m, r) in ``dtype``: the global norm, and as m·r (see ``tree_norm_split``).

  A finite update whose norm exceeds the largest float has norm inf but a
  finite m: it is clipped, not zeroed (and, like any non-finite norm, not
  recorded in a history or statistic).
  """
  m, r = tree_norm_split(updates)
  m, r = m.astype(dtype), r.astype(dtype)
  return m * r, m, r


def _clip(updates: PyTree, m: jax.Array, r: jax.Array, max_norm: jax.Array) -> PyTree:
  # An infinite threshold (empty history, warm-up) is capped at finfo.max for
  # an update with an infinite entry (m = inf), which is then handled as
  # clip_by_norm handles one: finite entries scaled to 0, infinite ones NaN
  # (not passed through as is). A finite update whose norm m·r overflows
  # passes an infinite threshold unchanged.
  max_norm = jnp.where(jnp.isfinite(m), max_norm, jnp.minimum(max_norm, jnp.finfo(m.dtype).max))
  return scale_tree(updates, *clip_scales(m, max_norm, r))


def _upper_bound(mean: jax.Array, z: jax.Array, std: jax.Array) -> jax.Array:
  """mean + z·std, the largest norm that is not an outlier; inf for z = inf (even at std = 0)."""
  return mean + jnp.where(jnp.isinf(z), jnp.inf, z * std)


def _empty_history(size: int, dtype: jnp.dtype) -> jax.Array:
  return jnp.full((size,), jnp.inf, dtype)


def _zero_count() -> jax.Array:
  # A function, not a module constant: creating an array at import time would
  # initialize the backend before a user's jax.distributed.initialize().
  return jnp.zeros((), jnp.int32)


# --------------------------------------------------------------------------
# AutoClip.


class AutoClipState(NamedTuple):
  """State of :func:`autoclip`.

  Scalars are 0-d arrays; "float" is the norm's dtype (float32, or float64 for float64 updates).

  Attributes:
    count: steps taken; int32 scalar.
    grad_norm: the global norm at the last step, before clipping; float scalar.
    max_norm: the threshold of the last step (inf before any); float scalar.
    history: the ring buffer of finite norms, inf where empty; float, shape ``(history,)``.
    num_recorded: finite norms recorded so far; int32 scalar.
    num_clipped: steps with ``grad_norm > max_norm``; int32 scalar.
  """

  # The field name of optax's states; it shadows tuple.count, which mypy reports.
  count: jax.Array  # type: ignore[assignment]
  grad_norm: jax.Array
  max_norm: jax.Array
  history: jax.Array
  num_recorded: jax.Array
  num_clipped: jax.Array


def autoclip(quantile: ArrayLike = 0.1, *, history: int = 1000) -> optax.GradientTransformation:
  """AutoClip: clip the global norm to a quantile of its own recent history.

  Clips to the ``quantile`` of the last ``history`` finite norms: :ref:`the guide <autoclip-rule>`.

  Args:
    quantile: q ∈ (0, 1], as in :func:`numpy.quantile` (the paper's 10th percentile: 0.1).
    history: the buffer's length, a Python int ≥ 1; static, as it fixes the state's shape.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`AutoClipState`.

  Raises:
    ValueError: ``quantile`` outside (0, 1] or ``history`` < 1.
    TypeError: ``history`` is not an int, or ``quantile`` is not a number.

  Examples:
    >>> import jax.numpy as jnp, gnorm_jax
    >>> tx = gnorm_jax.autoclip(0.5, history=3)
    >>> state = tx.init(jnp.zeros(2))
    >>> for g in ([3.0, 4.0], [0.0, 1.0], [0.0, 9.0]):  # norms 5, 1, 9
    ...   updates, state = tx.update(jnp.array(g), state)
    >>> float(state.max_norm), updates  # the median of (5, 1, 9)
    (5.0, Array([0., 5.], dtype=float32))

  References:
    Seetharaman et al. 2020, https://arxiv.org/abs/2007.14469.
  """
  check_number(
    "quantile",
    quantile,
    low=0,
    high=1,
    low_open=True,
    fix="It is a fraction: 0.1 clips to the 10th percentile.",
  )
  size = check_size("history", history)

  def init_fn(params):
    dtype = _norm_dtype(params)
    return AutoClipState(
      count=_zero_count(),
      grad_norm=jnp.zeros((), dtype),
      max_norm=jnp.full((), jnp.inf, dtype),
      history=_empty_history(size, dtype),
      num_recorded=_zero_count(),
      num_clipped=_zero_count(),
    )

  def update_fn(updates, state, params=None):
    del params
    norm, m, r = _measure(updates, state.grad_norm.dtype)
    buffer, num_recorded = _record(state.history, state.num_recorded, norm)
    max_norm = _quantile(buffer, num_recorded, quantile)
    new_state = AutoClipState(
      count=optax.safe_increment(state.count),
      grad_norm=norm,
      max_norm=max_norm,
      history=buffer,
      num_recorded=num_recorded,
      num_clipped=_count_if(state.num_clipped, norm > max_norm),
    )
    return _clip(updates, m, r, max_norm), new_state

  return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------
# ZClip.


class ZClipState(NamedTuple):
  """State of :func:`zclip`.

  Scalars are 0-d arrays; "float" is the norm's dtype (float32, or float64 for float64 updates).

  Attributes:
    count: steps taken; int32 scalar.
    grad_norm: the global norm at the last step, before clipping; float scalar.
    max_norm: the threshold the last step was held to (see :func:`zclip`); float scalar.
    mean: the EMA mean of the (clipped) norms; during warm-up their plain mean; float scalar.
    var: the EMA variance; during warm-up the population variance; float scalar.
    num_recorded: finite norms seen (warm-up ends at ``warmup_steps``); int32 scalar.
    num_clipped: steps with ``grad_norm > max_norm``; int32 scalar.
  """

  # The field name of optax's states; it shadows tuple.count, which mypy reports.
  count: jax.Array  # type: ignore[assignment]
  grad_norm: jax.Array
  max_norm: jax.Array
  mean: jax.Array
  var: jax.Array
  num_recorded: jax.Array
  num_clipped: jax.Array


def zclip(
  *,
  decay: ArrayLike = 0.97,
  z_threshold: ArrayLike = 2.5,
  warmup_steps: ArrayLike = 25,
  max_norm: ArrayLike | None = None,
) -> optax.GradientTransformation:
  """ZClip: clip norms that are outliers (z-score) of an EMA of past norms.

  After ``warmup_steps`` finite norms, a norm whose z-score exceeds ``z_threshold`` is clipped by
  the reciprocal rule, and the EMA is updated with the clipped norm: :ref:`the guide <zclip-rule>`.

  Args:
    decay: α ∈ (0, 1), the EMA weight of the old value; 0.97 in the paper (its ``alpha``).
    z_threshold: the z-score threshold, ≥ 0; 2.5 in the paper.
    warmup_steps: finite norms collected before clipping starts, ≥ 1 (the paper uses 25).
    max_norm: optional fixed cap ≥ 0 on the norm at every step (None: none).

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ZClipState`.

  Raises:
    ValueError: a hyperparameter outside the ranges above.
    TypeError: a hyperparameter is not a number (e.g. a bool).

  Examples:
    >>> import jax.numpy as jnp, gnorm_jax
    >>> tx = gnorm_jax.zclip(warmup_steps=2)
    >>> state = tx.init(jnp.zeros(1))
    >>> for g in (1.0, 3.0):  # warm-up: mean 2, std 1
    ...   _, state = tx.update(jnp.array([g]), state)
    >>> tx.update(jnp.array([7.0]), state)[0]  # z = 5: clipped to 2 + 2.5**2 / 5 * 1
    Array([3.25], dtype=float32)

  References:
    Kumar et al. 2025, https://arxiv.org/abs/2504.02507.
  """
  check_number(
    "decay",
    decay,
    low=0,
    high=1,
    low_open=True,
    high_open=True,
    fix="It is the EMA weight of the old value, e.g. 0.97.",
  )
  check_number("z_threshold", z_threshold, low=0, fix="The paper uses 2.5.")
  check_number("warmup_steps", warmup_steps, low=1, integer=True, fix="The paper uses 25.")
  check_number(
    "max_norm",
    max_norm,
    low=0,
    allow_none=True,
    fix="It is an optional fixed cap on the norm; None for none.",
  )
  cap = jnp.inf if max_norm is None else max_norm

  def init_fn(params):
    dtype = _norm_dtype(params)
    # One buffer per field (jnp.array copies): a state donated to a jitted
    # step must not hold the same buffer twice.
    return ZClipState(
      count=_zero_count(),
      grad_norm=jnp.zeros((), dtype),
      max_norm=jnp.array(cap, dtype),
      mean=jnp.zeros((), dtype),
      var=jnp.zeros((), dtype),
      num_recorded=_zero_count(),
      num_clipped=_zero_count(),
    )

  def update_fn(updates, state, params=None):
    del params
    dtype = state.grad_norm.dtype
    norm, m, r = _measure(updates, dtype)
    finite = jnp.isfinite(norm)
    warm = state.num_recorded < warmup_steps
    mean, var = state.mean, state.var
    a, zt, cap_t = (jnp.asarray(x, dtype) for x in (decay, z_threshold, cap))

    # Warm-up: running mean and population variance (Welford), numerically
    # stable where sums of squares are not. Welford's delta·(norm − new mean)
    # is written as the square (delta·√(n−1)/n)², which overflows only where
    # the variance itself does (a norm of 3e19 overflowed the product).
    n = (state.num_recorded + 1).astype(dtype)
    delta = norm - mean
    warm_mean = mean + delta / n
    warm_var = var * ((n - 1) / n) + jnp.square(delta * (jnp.sqrt(n - 1) / n))

    # After warm-up: z-score and the reciprocal rule; z = inf where std = 0
    # and the norm is above the mean (0 at or below it).
    std = jnp.sqrt(var)
    excess = norm - mean
    z = safe_divide(excess, std, jnp.where(excess > 0, jnp.inf, 0).astype(dtype))
    spike = ~warm & (z > zt)
    clipped = mean + zt**2 / jnp.where(spike, z, 1) * std
    g_star = jnp.where(spike, clipped, norm)
    ema_mean = a * mean + (1 - a) * g_star
    ema_var = a * var + jnp.square(jnp.sqrt(1 - a) * (g_star - ema_mean))

    keep = ~finite
    new_mean = jnp.where(keep, mean, jnp.where(warm, warm_mean, ema_mean))
    # A variance beyond the largest float saturates there: inf would make every
    # later z-score 0 and switch clipping off for good.
    new_var = jnp.minimum(
      jnp.where(keep, var, jnp.where(warm, warm_var, ema_var)), jnp.finfo(dtype).max
    )
    limit = jnp.minimum(jnp.where(spike, clipped, jnp.inf), cap_t)
    reported = jnp.where(
      warm, cap_t, jnp.minimum(jnp.where(spike, clipped, _upper_bound(mean, zt, std)), cap_t)
    )
    new_state = ZClipState(
      count=optax.safe_increment(state.count),
      grad_norm=norm,
      max_norm=reported,
      mean=new_mean,
      var=new_var,
      num_recorded=_count_if(state.num_recorded, finite),
      num_clipped=_count_if(state.num_clipped, norm > limit),
    )
    return _clip(updates, m, r, limit), new_state

  return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------
# Quantile clipping.


class QuantileClipState(NamedTuple):
  """State of :func:`quantile_clip`.

  Scalars are 0-d arrays; "float" is the norm's dtype (float32, or float64 for float64 updates).

  Attributes:
    count: steps taken; int32 scalar.
    grad_norm: the global norm at the last step, before clipping; float scalar.
    max_norm: the threshold :math:`C` the last step was clipped to; float scalar.
    next_max_norm: the threshold :math:`C` the next step will use; float scalar.
    num_clipped: steps with ``grad_norm > max_norm``; int32 scalar.
  """

  # The field name of optax's states; it shadows tuple.count, which mypy reports.
  count: jax.Array  # type: ignore[assignment]
  grad_norm: jax.Array
  max_norm: jax.Array
  next_max_norm: jax.Array
  num_clipped: jax.Array


def _clamp_threshold(c: jax.Array) -> jax.Array:
  """C within [tiny, max] of its dtype: never 0 (a geometric update cannot leave 0)."""
  finfo = jnp.finfo(c.dtype)
  return jnp.clip(c, finfo.tiny, finfo.max)


def quantile_clip(
  quantile: ArrayLike = 0.9,
  *,
  adaptation_rate: ArrayLike = 0.2,
  initial_max_norm: ArrayLike = 1.0,
) -> optax.GradientTransformation:
  """Clip to a streaming estimate of a quantile of the global norm.

  The step is clipped to the threshold C, which then tracks the ``quantile`` of the norm by the
  geometric update of Andrew et al. (O(1) state): :ref:`the guide <quantile-clip-rule>`.

  Args:
    quantile: γ ∈ (0, 1], the fraction of norms to keep below the threshold.
    adaptation_rate: η ∈ [0, 88.7], the rate at which C moves (0 keeps it); 0.2 in the paper.
    initial_max_norm: C₁ > 0, finite (a geometric update cannot leave 0).

  Returns:
    An ``optax.GradientTransformation`` with state :class:`QuantileClipState`.

  Raises:
    ValueError: a hyperparameter outside the ranges above.
    TypeError: a hyperparameter is not a number (e.g. a bool).

  Examples:
    >>> import jax.numpy as jnp, gnorm_jax
    >>> tx = gnorm_jax.quantile_clip(0.5, adaptation_rate=0.5, initial_max_norm=1.0)
    >>> updates, state = tx.update(jnp.array([3.0, 4.0]), tx.init(jnp.zeros(2)))  # 5 > C = 1
    >>> updates, float(state.next_max_norm)  # clipped to 1; C grows by e^0.25
    (Array([0.6, 0.8], dtype=float32), 1.2840...)

  References:
    Andrew et al. 2021, https://arxiv.org/abs/1905.03871.
  """
  check_number(
    "quantile",
    quantile,
    low=0,
    high=1,
    low_open=True,
    fix="It is a fraction: 0.9 tracks the 90th percentile of the norm.",
  )
  check_number(
    "adaptation_rate",
    adaptation_rate,
    low=0,
    high=_MAX_ADAPTATION_RATE,
    fix="It is the adaptation rate η of the threshold; the paper uses 0.2. One step"
    " changes the threshold by up to e^η.",
  )
  check_number(
    "initial_max_norm",
    initial_max_norm,
    low=0,
    low_open=True,
    finite=True,
    fix="The geometric update cannot move a threshold of 0; start from e.g. 1.0.",
  )

  def init_fn(params):
    dtype = _norm_dtype(params)
    # One buffer per field (jnp.array copies), so the state can be donated.
    return QuantileClipState(
      count=_zero_count(),
      grad_norm=jnp.zeros((), dtype),
      max_norm=_clamp_threshold(jnp.array(initial_max_norm, dtype)),
      next_max_norm=_clamp_threshold(jnp.array(initial_max_norm, dtype)),
      num_clipped=_zero_count(),
    )

  def update_fn(updates, state, params=None):
    del params
    dtype = state.grad_norm.dtype
    norm, m, r = _measure(updates, dtype)
    c = state.next_max_norm
    below = (norm <= c).astype(dtype)
    step = jnp.exp(-jnp.asarray(adaptation_rate, dtype) * (below - jnp.asarray(quantile, dtype)))
    new_state = QuantileClipState(
      count=optax.safe_increment(state.count),
      grad_norm=norm,
      max_norm=c,
      next_max_norm=_clamp_threshold(jnp.where(jnp.isfinite(norm), c * step, c)),
      num_clipped=_count_if(state.num_clipped, norm > c),
    )
    return _clip(updates, m, r, c), new_state

  return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------
# Skipping spikes.


class SkipSpikesState(NamedTuple):
  """State of :func:`skip_spikes`.

  Scalars are 0-d arrays; "float" is the norm's dtype (float32, or float64 for float64 updates).

  Attributes:
    count: steps taken, skipped ones included; int32 scalar.
    grad_norm: the global norm of the last incoming update; float scalar.
    max_norm: the skip threshold :math:`m_t + z s_t` of the last step (inf before
      ``warmup_steps`` norms); float scalar.
    history: the finite norms of the last steps (a skipped spike at the threshold it
      exceeded), inf where empty; float, shape ``(history,)``.
    num_recorded: finite norms recorded so far; int32 scalar.
    num_skipped: steps skipped (spikes and non-finite norms); int32 scalar.
    inner_state: the wrapped transformation's state, left as it was on skipped steps.
  """

  # The field name of optax's states; it shadows tuple.count, which mypy reports.
  count: jax.Array  # type: ignore[assignment]
  grad_norm: jax.Array
  max_norm: jax.Array
  history: jax.Array
  num_recorded: jax.Array
  num_skipped: jax.Array
  inner_state: optax.OptState


def skip_spikes(
  inner: optax.GradientTransformation,
  *,
  history: int = 128,
  z_threshold: ArrayLike = 6.0,
  warmup_steps: ArrayLike = 20,
) -> optax.GradientTransformationExtraArgs:
  """Skip optimizer steps whose gradient norm is a spike; otherwise run ``inner``.

  After ``warmup_steps`` norms, a step whose norm is above the mean plus ``z_threshold``
  standard deviations of the last ``history`` finite norms, or not finite, is skipped: zero
  updates, ``inner``'s state left untouched. :ref:`The guide <skip-spikes-rule>` has the
  rule, what is recorded and the cost.

  Args:
    inner: the transformation to protect, e.g. ``optax.adamw(3e-4)``; extra arguments
      (``params``, ``value``, ...) are passed on to it.
    history: how many recent norms the statistics use, a Python int ≥ 1 (static: the state's
      shape).
    z_threshold: z ≥ 0, the z-score above which a norm is a spike (as in :func:`zclip`).
    warmup_steps: ≥ 1: no spike is detected before this many finite norms are recorded.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`SkipSpikesState`.

  Raises:
    ValueError: a hyperparameter outside the ranges above.
    TypeError: ``inner`` is not an ``optax.GradientTransformation``, ``history`` is not an int,
      or another hyperparameter is not a number.

  Examples:
    >>> import jax.numpy as jnp, optax, gnorm_jax
    >>> tx = gnorm_jax.skip_spikes(optax.sgd(1.0), history=4, z_threshold=3.0, warmup_steps=2)
    >>> state = tx.init(jnp.zeros(1))
    >>> for g in (1.0, 1.2, 0.8, 50.0):  # 50 > 1.0 + 3 * 0.163: skipped
    ...   updates, state = tx.update(jnp.array([g]), state)
    >>> updates, int(state.num_skipped)
    (Array([0.], dtype=float32), 1)

  References:
    Chowdhery et al. 2022 (PaLM, section 5.1), https://arxiv.org/abs/2204.02311.
  """
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(
      "skip_spikes wraps an optimizer: inner must be an optax.GradientTransformation, got"
      f" inner={inner!r} ({type(inner).__name__}). Pass e.g. skip_spikes(optax.adamw(3e-4))"
      " (a built transformation: optax.adamw(3e-4), not optax.adamw); the other"
      " arguments are keyword-only."
    )
  size = check_size("history", history)
  check_number("z_threshold", z_threshold, low=0, fix="6.0 skips only extreme spikes.")
  check_number(
    "warmup_steps",
    warmup_steps,
    low=1,
    integer=True,
    fix="It is the number of norms recorded before spikes are detected.",
  )
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    dtype = _norm_dtype(params)
    return SkipSpikesState(
      count=_zero_count(),
      grad_norm=jnp.zeros((), dtype),
      max_norm=jnp.full((), jnp.inf, dtype),
      history=_empty_history(size, dtype),
      num_recorded=_zero_count(),
      num_skipped=_zero_count(),
      inner_state=inner.init(params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    dtype = state.grad_norm.dtype
    norm, m, _ = _measure(updates, dtype)
    mean, std = _mean_std(state.history, state.num_recorded)
    threshold = jnp.where(
      state.num_recorded >= warmup_steps,
      _upper_bound(mean, jnp.asarray(z_threshold, dtype), std),
      jnp.inf,
    )
    # A finite update whose norm overflows is a spike only against a finite threshold.
    skip = ~jnp.isfinite(m) | (norm > threshold)
    new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
    new_updates = jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), new_updates)
    inner_state = jax.tree.map(
      lambda old, new: jnp.where(skip, old, new), state.inner_state, new_inner
    )
    # A skipped spike enters the window at the threshold (winsorized), so one
    # spike cannot raise the bar; non-finite norms are dropped by _record.
    recorded = jnp.where(jnp.isfinite(norm), jnp.minimum(norm, threshold), norm)
    history, num_recorded = _record(state.history, state.num_recorded, recorded)
    new_state = SkipSpikesState(
      count=optax.safe_increment(state.count),
      grad_norm=norm,
      max_norm=threshold,
      history=history,
      num_recorded=num_recorded,
      num_skipped=_count_if(state.num_skipped, skip),
      inner_state=inner_state,
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
