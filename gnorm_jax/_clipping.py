"""Optax transformations that act on the norm: clipping and normalization.

Every transform measures the update's norm with :func:`gnorm_jax.tree_norm`
(``per="global"``) or :func:`gnorm_jax.leaf_norms` (``per="leaf"``), turns it
into a scalar factor, and multiplies the update by it — one elementwise
multiply per leaf, which XLA fuses into the optimizer that follows.

Non-finite updates: an update containing NaN has a NaN norm, one containing
``inf`` (and no NaN) an infinite norm. The transforms never turn such an update
into a finite one — the output is non-finite exactly when the input is (NaN
entries stay NaN; with an infinite norm, finite entries are scaled to 0 and
infinite ones become NaN) — so ``optax.apply_if_finite`` around the whole chain
skips these steps. The ``grad_norm`` in the state records the NaN or ``inf``.

Like every clipping state of gnorm_jax, :class:`ClipByNormState` keeps the
norm before clipping as ``grad_norm`` and the threshold it applied as
``max_norm``; ``grad_norm > max_norm`` says the step was clipped.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from gnorm_jax._checks import (
  PyTree,
  canonical_ord,
  check_choice,
  check_number,
  check_threshold_tree,
  is_traced,
  is_tree,
)
from gnorm_jax._norms import leaf_norms_split, tree_norm_split
from gnorm_jax._numerics import broadcast_prefix, clip_scales, pow2_inverse, scale_tree

__all__ = [
  "ClipByNormState",
  "NormalizeState",
  "clip_by_norm",
  "normalize",
  "normalized_sgd",
]

_PERS = ("global", "leaf")


class ClipByNormState(NamedTuple):
  """State of :func:`clip_by_norm`.

  Attributes:
    grad_norm: the update's norm before clipping: a scalar (``per="global"``) or a pytree of
      scalars with the update's structure (``per="leaf"``); float32, or float64 for float64
      updates.
    max_norm: the threshold applied at the last step (before any: the one the next step
      applies), with ``grad_norm``'s structure and dtypes; with ``per="leaf"`` each leaf's own,
      from a threshold tree. A traced negative or NaN ``max_norm`` acts as, and is recorded
      as, 0.
  """

  grad_norm: PyTree
  max_norm: PyTree


class NormalizeState(NamedTuple):
  """State of :func:`normalize`.

  Attributes:
    grad_norm: the update's norm before normalizing: a scalar (``per="global"``) or a pytree
      of scalars with the update's structure (``per="leaf"``); float32, or float64 for float64
      updates.
  """

  grad_norm: PyTree


def _normalized(tree: Any, m: jax.Array, r: jax.Array, scale: jax.Array | float) -> Any:
  """``scale·tree/norm`` for the norm m·r, or zeros where it is 0 (all leaves of ``tree``).

  ``scale/norm`` can overflow for a tiny norm (1e3/1e-37 in float32), and
  ``tree·2^k`` underflow float16, so the tree is multiplied, in at least
  float32, by 1/r (``tree/r`` is at most m: finite even where the norm
  overflows), by an exact power of two 2^k with m·2^k in [0.5, 1) and then by
  scale/(m·2^k): every factor stays finite and the result is rounded once.
  """
  s, inv = pow2_inverse(m)
  return scale_tree(tree, 1 / r, s, jnp.asarray(scale, m.dtype) * inv)


def _check_per(per: Any) -> None:
  check_choice(
    "per",
    per,
    _PERS,
    'Use "global" (one norm over the whole update) or "leaf" (one norm per leaf).',
  )


def _norm_fn(ord: Any, per: str) -> Callable[[Any], tuple[Any, Any]]:
  """The update's norm(s) as ``(m, r)``, norm = m·r (see ``tree_norm_split``).

  A traced ``ord`` (``optax.inject_hyperparams`` without ``static_args``)
  computes the three norms and selects one: 1, ``inf``, else Euclidean.
  """
  split = tree_norm_split if per == "global" else leaf_norms_split
  if not is_traced(ord):
    return lambda tree: split(tree, ord)

  def select(tree):
    l2, l1, linf = (split(tree, o) for o in (None, 1, math.inf))
    pick = lambda a, b, c: jnp.where(ord == 1, b, jnp.where(ord == math.inf, c, a))
    return jax.tree.map(pick, l2, l1, linf)

  return select


def _product(m: Any, r: Any) -> Any:
  return jax.tree.map(lambda a, b: a * b, m, r)


def _zeros_like_norm(norm_fn: Callable[[Any], Any], params: Any) -> Any:
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(norm_fn, params)[0])


def _cast_like(new: Any, old: Any) -> Any:
  """Keeps the state's dtypes fixed (updates may differ in dtype from params)."""
  return jax.tree.map(lambda n, o: n.astype(o.dtype), new, old)


def _per_leaf_thresholds(max_norm: Any, norms: Any) -> Any:
  """``max_norm`` (one number, or a pytree prefix of the update) as one per leaf norm."""
  if not is_tree(max_norm):
    return jax.tree.map(lambda _: max_norm, norms)
  try:
    return broadcast_prefix(max_norm, norms)
  except ValueError:
    raise ValueError(
      "max_norm must be one number or a pytree prefix of the updates (one threshold per"
      f" leaf or subtree); its structure {jax.tree.structure(max_norm)} does not match the"
      f" updates' {jax.tree.structure(norms)}."
    ) from None


def _act_on_norm(
  norm_fn: Callable[[Any], Any],
  state_cls: type,
  act: Callable[[Any, Any, Any], Any],
  thresholds: Callable[[Any], Any] | None = None,
) -> optax.GradientTransformation:
  """The transformation ``updates ↦ act(updates, *norm_fn(updates))``.

  ``norm_fn`` gives the norm as ``(m, r)`` (norm = m·r). The state is
  ``state_cls(grad_norm=...)``, the norm measured before acting, and with
  ``thresholds`` also ``max_norm=thresholds(norm)``; dtypes are fixed at init.
  """

  def state(norm):
    fields = {} if thresholds is None else {"max_norm": thresholds(norm)}
    return state_cls(grad_norm=norm, **fields)

  def init_fn(params):
    return state(_zeros_like_norm(norm_fn, params))

  def update_fn(updates, old, params=None):
    del params
    m, r = norm_fn(updates)
    return act(updates, m, r), _cast_like(state(_product(m, r)), old)

  return optax.GradientTransformation(init_fn, update_fn)


def clip_by_norm(
  max_norm: ArrayLike | PyTree,
  *,
  ord: ArrayLike | None = None,
  per: str = "global",
) -> optax.GradientTransformation:
  """Clips updates to norm at most ``max_norm`` (Pascanu et al. 2013).

  One norm over the whole update tree with ``per="global"`` (``optax.clip_by_global_norm``), one
  per leaf with ``per="leaf"`` (Keras ``clipnorm``): :ref:`the guide <clipping-edges>`.

  Args:
    max_norm: the threshold τ ≥ 0: a number (checked here), or a jax array or traced value (a
      negative or NaN one acts as 0); with ``per="leaf"`` also a pytree prefix of the updates.
    ord: None or 2 (Euclidean), 1 or ``inf``, or a 0-d array of these.
    per: ``"global"`` or ``"leaf"``.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ClipByNormState`.

  Raises:
    ValueError: a negative or NaN ``max_norm``, a bad threshold tree, or an unknown ``ord``/``per``.
    TypeError: ``max_norm`` (or a leaf of its tree) is None or not a number.

  Examples:
    >>> import jax.numpy as jnp, optax, gnorm_jax
    >>> tx = gnorm_jax.clip_by_norm(1.0)
    >>> clipped, state = tx.update(jnp.array([3.0, 4.0]), tx.init(jnp.zeros(2)))
    >>> clipped, float(optax.tree.get(state, "grad_norm"))
    (Array([0.6, 0.8], dtype=float32), 5.0)

  References:
    Pascanu, Mikolov & Bengio 2013, https://arxiv.org/abs/1211.5063.
  """
  ord = canonical_ord(ord)
  _check_per(per)
  check_threshold_tree(
    "max_norm",
    max_norm,
    allow_tree=per == "leaf",
    check_arrays=False,
    fix="Pass the largest update norm to allow, e.g. max_norm=1.0.",
  )

  def thresholds(norm):
    """The threshold of each norm, as clipping applies it (a traced τ < 0 or NaN acts as 0)."""
    tau = max_norm if per == "global" else _per_leaf_thresholds(max_norm, norm)
    return jax.tree.map(lambda n, t: jnp.where(t > 0, t, 0).astype(n.dtype), norm, tau)

  def clip(updates, m, r):
    tau = thresholds(m)
    if per == "global":
      return scale_tree(updates, *clip_scales(m, tau, r))
    parts = jax.tree.map(clip_scales, m, tau, r)
    return scale_tree(updates, *(jax.tree.map(lambda _, p: p[i], m, parts) for i in range(3)))

  return _act_on_norm(_norm_fn(ord, per), ClipByNormState, clip, thresholds)


def normalize(
  scale: ArrayLike = 1.0,
  *,
  ord: ArrayLike | None = None,
  per: str = "global",
) -> optax.GradientTransformation:
  """Normalizes updates to norm ``|scale|`` (normalized gradient descent).

  ``per="global"`` gives the whole update tree norm ``|scale|``, ``per="leaf"`` every leaf; a
  zero update stays zero (no ``eps``): :ref:`the guide <normalized-updates>`.

  Args:
    scale: the norm of the output, its sign the direction; a finite number, or a traced value.
    ord: None or 2 (Euclidean), 1 or ``inf``.
    per: ``"global"`` or ``"leaf"``.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`NormalizeState` (the norm before).

  Raises:
    ValueError: ``scale`` is a non-finite number, or ``ord`` or ``per`` is not accepted.
    TypeError: ``scale`` is not a number.

  Examples:
    >>> import jax.numpy as jnp, gnorm_jax
    >>> tx = gnorm_jax.normalize(2.0)
    >>> out, state = tx.update(jnp.array([3.0, 4.0]), tx.init(jnp.zeros(2)))
    >>> [round(u, 6) for u in out.tolist()], float(state.grad_norm)
    ([1.2, 1.6], 5.0)

  References:
    Hazan, Levy & Shalev-Shwartz 2015, https://arxiv.org/abs/1507.02030.
  """
  check_number(
    "scale", scale, finite=True, fix="It is the norm of the normalized update, e.g. scale=1.0."
  )
  ord = canonical_ord(ord)
  _check_per(per)

  def normalized(updates, m, r):
    if per == "global":
      return _normalized(updates, m, r, scale)
    return jax.tree.map(lambda g, m, r: _normalized(g, m, r, scale), updates, m, r)

  return _act_on_norm(_norm_fn(ord, per), NormalizeState, normalized)


def normalized_sgd(
  learning_rate: optax.ScalarOrSchedule,
  *,
  momentum: ArrayLike = 0.0,
  nesterov: bool = False,
  ord: ArrayLike | None = None,
  per: str = "global",
) -> optax.GradientTransformation:
  """Normalized SGD, with momentum as in Cutkosky & Mehta (2020).

  ``optax.chain(optax.trace(momentum, nesterov), normalize(ord=ord, per=per),
  optax.scale_by_learning_rate(learning_rate))``: with ``momentum=0`` every step has length
  exactly ``learning_rate``. :ref:`The guide <normalized-updates>` relates it to the paper.

  Args:
    learning_rate: the step length η ≥ 0 (finite), or an optax schedule.
    momentum: β in [0, 1); a number is checked here, a traced value used as it is.
    nesterov: normalize ``g_t + β m_t`` instead, as ``optax.sgd`` does.
    ord: None or 2 (Euclidean), 1 or ``inf``.
    per: ``"global"`` or ``"leaf"``.

  Returns:
    An ``optax.GradientTransformation``; its :class:`NormalizeState` records the norm of the
    normalized buffer as ``grad_norm``.

  Raises:
    ValueError: ``learning_rate`` is a negative or non-finite number, ``momentum`` a number
      outside [0, 1), or ``ord`` or ``per`` is not accepted.
    TypeError: ``learning_rate`` or ``momentum`` is not a number (``True`` is not 1.0).

  Examples:
    >>> import jax.numpy as jnp, gnorm_jax
    >>> tx, params = gnorm_jax.normalized_sgd(0.1), jnp.array([30.0, 40.0])
    >>> updates, _ = tx.update(2 * params, tx.init(params))  # gradient of ‖θ‖²: a step of 0.1
    >>> [round(u, 6) for u in updates.tolist()]
    [-0.06, -0.08]

  References:
    Cutkosky & Mehta 2020, https://arxiv.org/abs/2002.03305.
  """
  if not callable(learning_rate):
    check_number(
      "learning_rate",
      learning_rate,
      low=0,
      finite=True,
      fix="It is the length of every step, e.g. learning_rate=0.01 (the sign of descent is"
      " applied for you), or an optax schedule.",
    )
  check_number(
    "momentum",
    momentum,
    low=0,
    high=1,
    high_open=True,
    fix="E.g. momentum=0.9, or 0.0 for plain normalized gradient descent.",
  )
  parts = [
    normalize(ord=ord, per=per),
    optax.scale_by_learning_rate(learning_rate),
  ]
  # Only a scalar (not an array) 0 drops the trace: optax.inject_hyperparams
  # passes a concrete array at init and a traced one in update, and the
  # chain's structure must be the same in both.
  if not (isinstance(momentum, numbers.Real) and momentum == 0):
    parts.insert(0, optax.trace(decay=momentum, nesterov=nesterov))
  return optax.chain(*parts)
