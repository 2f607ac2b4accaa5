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
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gnorm_jax.norms import _pow2_scale, check_ord, is_number, leaf_norms, tree_norm

__all__ = [
    "ClipByNormState",
    "NormalizeState",
    "clip_by_norm",
    "normalize",
    "normalized_sgd",
]

_PERS = ("global", "leaf")


class ClipByNormState(NamedTuple):
  """State of :func:`clip_by_norm`."""

  # The update's norm before clipping: a scalar (per="global") or a pytree of
  # scalars with the update's structure (per="leaf"); float32, or float64 for
  # float64 updates.
  grad_norm: Any


class NormalizeState(NamedTuple):
  """State of :func:`normalize`."""

  # The update's norm before normalizing: a scalar (per="global") or a pytree
  # of scalars with the update's structure (per="leaf"); float32, or float64
  # for float64 updates.
  grad_norm: Any


def clip_factor(norm: jax.Array, max_norm: jax.Array | float) -> jax.Array:
  """The factor min(1, max_norm/norm): exactly 1 at or below the threshold.

  NaN-free with finite derivatives everywhere, zero included. A threshold of
  0 gives the factor 0 (also at norm 0, so the derivative of the clipped update
  ``factor·g ≡ 0`` is 0 there too); a negative or NaN threshold — possible only
  when traced — acts as 0. A NaN norm gives 1 (the update is left as it is),
  an infinite one 0.
  """
  norm = jnp.asarray(norm)
  max_norm = jnp.asarray(max_norm, norm.dtype)
  max_norm = jnp.where(max_norm > 0, max_norm, 0)
  over = (norm > max_norm) | (max_norm == 0)
  # Only the selected branch may see the real norm: the other one must not
  # produce inf·0 = NaN in the backward pass (e.g. 1/norm² at norm = 1e-30).
  ratio = _ratio(jnp.where(over, max_norm, 1), jnp.where(over & (norm > 0), norm, 1))
  return jnp.where(over, ratio, 1).astype(norm.dtype)


@jax.custom_jvp
def _ratio(num: jax.Array, den: jax.Array) -> jax.Array:
  return num / den


@_ratio.defjvp
def _ratio_jvp(primals, tangents):
  # d(a/b) = (da − (a/b)·db)/b: no b² that underflows to 0 for tiny b.
  (num, den), (dnum, dden) = primals, tangents
  ratio = num / den
  return ratio, (dnum - ratio * dden) / den


def scale_tree(tree: Any, factor: Any) -> Any:
  """Multiplies every leaf by ``factor`` (a scalar, or a pytree prefix of scalars).

  The product is formed in the factor's dtype (at least float32) and cast back
  to the leaf's dtype, so float16 updates are scaled precisely. One elementwise
  op per leaf: XLA fuses it into whatever consumes the update next.
  """

  def scale(leaf, f):
    if leaf is None:
      return None
    return (leaf * f.astype(jnp.promote_types(leaf.dtype, f.dtype))).astype(leaf.dtype)

  if jax.tree_util.treedef_is_leaf(jax.tree.structure(factor)):
    factor = jnp.asarray(factor)
    return jax.tree.map(lambda x: scale(x, factor), tree)
  return jax.tree.map(scale, tree, factor, is_leaf=lambda x: x is None)


def _normalized(tree: Any, norm: jax.Array, scale: jax.Array | float) -> Any:
  """``scale·tree/norm``, or zeros where ``norm`` is 0 (all leaves of ``tree``).

  ``scale/norm`` can overflow for a tiny norm (1e3/1e-37 in float32), so the
  tree is first multiplied by an exact power of two 2^k with norm·2^k in
  [0.5, 1): every factor stays finite and the result is rounded once.
  """
  k = _pow2_scale(norm)
  normal = jnp.ldexp(norm, k)
  nonzero = normal > 0
  factor = jnp.where(nonzero, jnp.asarray(scale, norm.dtype) / jnp.where(nonzero, normal, 1), 0)
  return scale_tree(scale_tree(tree, jnp.ldexp(jnp.ones_like(norm), k)), factor)


def _check_nonnegative(name: str, value: Any, hint: str) -> None:
  if is_number(value) and not value >= 0:  # also catches NaN
    raise ValueError(f"{name} must be >= 0, got {name}={value!r}. {hint}")


def _check_per(per: Any) -> None:
  if per not in _PERS:
    raise ValueError(
        f'per must be "global" (one norm over the whole update) or "leaf" (one'
        f" norm per leaf), got per={per!r}."
    )


def _norm_fn(ord: Any, per: str) -> Callable[[Any], Any]:
  if per == "global":
    return lambda tree: tree_norm(tree, ord)
  return lambda tree: leaf_norms(tree, ord)


def _zeros_like_norm(norm_fn: Callable[[Any], Any], params: Any) -> Any:
  return jax.tree.map(
      lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(norm_fn, params)
  )


def _cast_like(new: Any, old: Any) -> Any:
  """Keeps the state's dtypes fixed (updates may differ in dtype from params)."""
  return jax.tree.map(lambda n, o: n.astype(o.dtype), new, old)


def _per_norm(per: str, fn: Callable[..., Any], norm: Any, *args: Any) -> Any:
  """``fn(norm, *args)`` for a scalar norm, or for each leaf norm."""
  if per == "global":
    return fn(norm, *args)
  return jax.tree.map(lambda n: fn(n, *args), norm)


def _act_on_norm(
    norm_fn: Callable[[Any], Any],
    state_cls: type,
    act: Callable[[Any, Any], Any],
) -> optax.GradientTransformation:
  """The transformation ``updates ↦ act(updates, norm_fn(updates))``.

  Its state is ``state_cls(grad_norm=...)``: the norm measured before acting,
  with dtypes fixed at init.
  """

  def init_fn(params):
    return state_cls(grad_norm=_zeros_like_norm(norm_fn, params))

  def update_fn(updates, state, params=None):
    del params
    norm = norm_fn(updates)
    return act(updates, norm), state_cls(grad_norm=_cast_like(norm, state.grad_norm))

  return optax.GradientTransformation(init_fn, update_fn)


def clip_by_norm(
    max_norm: float | jax.Array,
    *,
    ord: int | float | None = None,
    per: str = "global",
) -> optax.GradientTransformation:
  r"""Clips updates to norm at most ``max_norm`` (Pascanu et al. 2013).

  .. math::
    g \mapsto \begin{cases} g & \|g\| \le \tau \\
      \tau\, g / \|g\| & \|g\| > \tau \end{cases}

  With ``per="global"`` the norm is over the whole update tree
  (``optax.clip_by_global_norm``); with ``per="leaf"`` every leaf is clipped by
  its own norm (Keras ``clipnorm``). Updates at or below the threshold pass
  through bit-for-bit unchanged. Zero updates and ``max_norm=0`` give zeros,
  never NaN, and derivatives through the update (meta-gradients) are finite
  there. float16/bfloat16 updates are measured and scaled in float32, so they
  are clipped correctly rather than zeroed by an overflowing norm.

  The state's ``grad_norm`` is the norm measured before clipping (a scalar, or
  a pytree of scalars for ``per="leaf"``): read it with
  ``optax.tree.get(state, "grad_norm")``. NaN or ``inf`` in the update: see the
  module docstring (the output stays non-finite; wrap the chain in
  ``optax.apply_if_finite`` to skip such steps).

  Args:
    max_norm: the threshold τ ≥ 0. A Python number is checked here; a traced
      value (``optax.inject_hyperparams``) is used as it is, a negative or NaN
      one acting as 0.
    ord: None or 2 (Euclidean), 1 or ``inf`` (largest absolute entry). Under
      ``optax.inject_hyperparams`` pass ``static_args=("ord",)`` with a
      numeric ``ord``.
    per: ``"global"`` or ``"leaf"``.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ClipByNormState`.

  Raises:
    ValueError: ``max_norm`` is a negative or NaN Python number, or ``ord`` or
      ``per`` is not an accepted value.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import gnorm_jax
    >>> tx = gnorm_jax.clip_by_norm(1.0)
    >>> g = {"w": jnp.array([3.0, 0.0]), "b": jnp.array(4.0)}
    >>> clipped, state = tx.update(g, tx.init(g))
    >>> float(gnorm_jax.tree_norm(clipped)), float(optax.tree.get(state, "grad_norm"))
    (1.0, 5.0)

  References:
    Pascanu, Mikolov & Bengio, `On the difficulty of training recurrent neural
    networks <https://arxiv.org/abs/1211.5063>`_, 2013.
  """
  _check_nonnegative(
      "max_norm", max_norm, "Pass the largest update norm to allow, e.g. max_norm=1.0."
  )
  check_ord(ord)
  _check_per(per)

  def clip(updates, norm):
    return scale_tree(updates, _per_norm(per, clip_factor, norm, max_norm))

  return _act_on_norm(_norm_fn(ord, per), ClipByNormState, clip)


def normalize(
    scale: float | jax.Array = 1.0,
    *,
    ord: int | float | None = None,
    per: str = "global",
) -> optax.GradientTransformation:
  r"""Normalizes updates to norm ``|scale|`` (normalized gradient descent).

  .. math::
    g \mapsto s\, \frac{g}{\|g\|}, \qquad 0 \mapsto 0

  With ``per="global"`` the whole update tree gets norm ``|scale|`` (Hazan et
  al. 2015); with ``per="leaf"`` every leaf does (block-normalized gradients,
  Yu et al. 2017). The output norm is ``|scale|`` up to rounding — no ``eps``
  is added to the norm as ``optax.normalize_by_update_norm`` does — and a
  zero update (or, with ``per="leaf"``, a zero leaf) stays zero. A negative
  ``scale`` flips the direction, as ``scale_factor=-1`` does in optax.

  The state's ``grad_norm`` is the norm measured before normalizing. NaN or
  ``inf`` in the update: see the module docstring.

  Args:
    scale: the norm of the output (its sign sets the direction). A Python
      number must be finite; a traced value is used as it is.
    ord: None or 2 (Euclidean), 1 or ``inf``.
    per: ``"global"`` or ``"leaf"``.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`NormalizeState`.

  Raises:
    ValueError: ``scale`` is a non-finite Python number, or ``ord`` or ``per``
      is not an accepted value.

  Examples:
    >>> import jax.numpy as jnp
    >>> import gnorm_jax
    >>> tx = gnorm_jax.normalize(2.0)
    >>> g = jnp.array([3.0, 4.0])
    >>> out, state = tx.update(g, tx.init(g))
    >>> [round(u, 6) for u in out.tolist()], float(state.grad_norm)
    ([1.2, 1.6], 5.0)

  References:
    Hazan, Levy & Shalev-Shwartz, `Beyond convexity: stochastic quasi-convex
    optimization <https://arxiv.org/abs/1507.02030>`_, 2015. Yu et al.,
    `Block-normalized gradient method <https://arxiv.org/abs/1707.04822>`_,
    2017.
  """
  if is_number(scale) and not math.isfinite(scale):
    raise ValueError(
        f"scale must be a finite number, got scale={scale!r}. It is the norm of"
        " the normalized update, e.g. scale=1.0."
    )
  check_ord(ord)
  _check_per(per)

  def normalized(updates, norm):
    if per == "global":
      return _normalized(updates, norm, scale)
    return jax.tree.map(lambda g, n: _normalized(g, n, scale), updates, norm)

  return _act_on_norm(_norm_fn(ord, per), NormalizeState, normalized)


def normalized_sgd(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float | jax.Array = 0.0,
    nesterov: bool = False,
    ord: int | float | None = None,
    per: str = "global",
) -> optax.GradientTransformation:
  r"""Normalized SGD, with momentum as in Cutkosky & Mehta (2020).

  .. math::
    m_t = \beta\, m_{t-1} + g_t, \qquad
    \theta_{t+1} = \theta_t - \eta_t\, \frac{m_t}{\|m_t\|}

  The direction equals Cutkosky & Mehta's ``m_t = β m_{t-1} + (1-β) g_t``
  (the two buffers differ by the factor ``1-β``, which normalization removes).
  With ``momentum=0`` this is normalized gradient descent (Hazan et al. 2015):
  every step has length exactly ``learning_rate`` (in the ``ord`` norm; per
  leaf with ``per="leaf"``). A zero buffer gives a zero step. ``nesterov``
  normalizes ``g_t + β m_t`` instead, as ``optax.sgd`` does.

  It is ``optax.chain(optax.trace(momentum, nesterov), normalize(ord=ord,
  per=per), optax.scale_by_learning_rate(learning_rate))``; the state's
  ``grad_norm`` is the norm of the buffer that was normalized.

  Args:
    learning_rate: the step length η ≥ 0, or an optax schedule.
    momentum: β in [0, 1). A Python number is checked here; a traced value is
      used as it is.
    nesterov: use Nesterov momentum.
    ord: None or 2 (Euclidean), 1 or ``inf``.
    per: ``"global"`` or ``"leaf"``.

  Returns:
    An ``optax.GradientTransformation``.

  Raises:
    ValueError: ``learning_rate`` is a negative or NaN Python number,
      ``momentum`` is a Python number outside [0, 1), or ``ord`` or ``per`` is
      not an accepted value.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import gnorm_jax
    >>> tx = gnorm_jax.normalized_sgd(0.1)
    >>> params = jnp.array([30.0, 40.0])
    >>> updates, _ = tx.update(2 * params, tx.init(params))  # gradient of ‖θ‖²
    >>> [round(u, 6) for u in updates.tolist()]  # a step of length 0.1
    [-0.06, -0.08]

  References:
    Cutkosky & Mehta, `Momentum improves normalized SGD
    <https://arxiv.org/abs/2002.03305>`_, 2020. Hazan, Levy & Shalev-Shwartz,
    `Beyond convexity: stochastic quasi-convex optimization
    <https://arxiv.org/abs/1507.02030>`_, 2015.
  """
  _check_nonnegative(
      "learning_rate",
      learning_rate,
      "It is the length of every step, e.g. learning_rate=0.01 (the sign of"
      " descent is applied for you).",
  )
  if is_number(momentum) and not 0 <= momentum < 1:
    raise ValueError(
        f"momentum must be in [0, 1), got momentum={momentum!r}, e.g."
        " momentum=0.9, or 0.0 for plain normalized gradient descent."
    )
  parts = [
      normalize(ord=ord, per=per),
      optax.scale_by_learning_rate(learning_rate),
  ]
  if not (is_number(momentum) and momentum == 0):
    parts.insert(0, optax.trace(decay=momentum, nesterov=nesterov))
  return optax.chain(*parts)
