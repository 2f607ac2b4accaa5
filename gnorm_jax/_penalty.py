r"""Gradient-norm penalties: J + λ‖∇J‖² and its gradient; GAN input-gradient penalties.

Two families, both built on :mod:`gnorm_jax._norms`:

* Parameter-gradient penalties (Zhao, Zhang & Hu 2022): the objective
  :math:`P(\theta) = J(\theta) + \lambda\,\phi(\nabla J(\theta))` with
  :math:`\phi = \|\cdot\|^2` (``squared=True``) or :math:`\|\cdot\|`, and
  its gradient :math:`\nabla P = \nabla J + \lambda H v` with
  :math:`v = \nabla\phi(\nabla J)` (:math:`2\nabla J`, or
  :math:`\nabla J/\|\nabla J\|`) and :math:`H` the Hessian of J, computed
  exactly (forward-over-reverse or reverse-over-reverse) or from two gradients.
* GAN penalties on a critic's gradient with respect to its input: WGAN-GP
  (Gulrajani et al. 2017) and R1 (Mescheder et al. 2018).

At a stationary point (∇J = 0) or a vanishing input gradient every value and
derivative is finite: the norm's derivative there is the zero subgradient.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from gnorm_jax._checks import (
  PyTree,
  check_choice,
  check_fun,
  check_grad_args,
  check_number,
  check_ord,
)
from gnorm_jax._norms import leaf_norms, safe_sqrt, sum_of_squares, tree_norm
from gnorm_jax._numerics import pow2_inverse, scale_tree, upcast

__all__ = [
  "penalized",
  "penalized_value_and_grad",
  "gradient_penalty",
  "r1_penalty",
  "interpolate",
]

_METHODS = ("hvp", "double_backprop", "finite_difference")

_WEIGHT_FIX = "Pass the penalty weight λ, e.g. weight=0.1."

# The finite-difference step is at least this many units of the parameters'
# resolution (ε·‖θ‖, leaf by leaf): rounding the probe to θ's dtype then turns
# its direction by at most about 1/16.
_RESOLUTION_STEPS = 8


# --------------------------------------------------------------------------- #
# The penalty φ(g) and helpers.
# --------------------------------------------------------------------------- #


def _squared_l2(tree: Any) -> jax.Array:
  """‖tree‖² as a plain sum of squares: exact, smooth, no sqrt to undo."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.asarray(sum(sum_of_squares(jnp.asarray(x)) for x in leaves))


def _penalty_fn(squared: bool, ord: Any) -> Callable[[Any], jax.Array]:
  """φ: the gradient's norm (Euclidean, 1 or inf), squared or not."""
  if squared and (ord is None or ord == 2):
    return _squared_l2
  if squared:
    return lambda g: jnp.square(tree_norm(g, ord))
  return lambda g: tree_norm(g, ord)


def _axpy(a: Any, x: Any, y: Any) -> Any:
  """y + a·x leaf by leaf, formed in at least float32 and cast to y's dtype."""
  return jax.tree.map(lambda xi, yi: upcast(lambda y, x, a: y + a * x, yi, xi, a), x, y)


def _unit(v: Any) -> tuple[Any, jax.Array]:
  """(v/‖v‖ in v's dtypes, ‖v‖); 0 for v = 0. Never overflows (see pow2_split)."""
  v_norm = tree_norm(v)
  return scale_tree(v, *pow2_inverse(v_norm)), v_norm


def _resolution(theta: Any) -> jax.Array:
  """‖(ε_ℓ·‖θ_ℓ‖)_ℓ‖: how far rounding to θ's dtypes can move a point near θ."""
  norms = leaf_norms(theta)
  return tree_norm(jax.tree.map(lambda n, x: n * jnp.finfo(jnp.asarray(x).dtype).eps, norms, theta))


def _bind(fun: Callable[..., Any], argnums: int | Sequence[int], args, kwargs):
  """``fun`` as a function of ``args[argnums]`` alone, and those arguments.

  With an int ``argnums`` the single argument is that positional argument; with
  a tuple it is the tuple of them (the layout :func:`jax.grad` returns).
  """
  nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
  if max(nums) >= len(args):
    raise TypeError(
      f"argnums={argnums!r} refers to a positional argument that was not"
      f" given: the function was called with {len(args)} positional"
      " argument(s). Pass the differentiated arguments positionally."
    )

  def f(theta):
    full = list(args)
    for i, t in zip(nums, (theta,) if isinstance(argnums, int) else theta):
      full[i] = t
    return fun(*full, **kwargs)

  theta = args[argnums] if isinstance(argnums, int) else tuple(args[i] for i in nums)
  return f, theta


def _split(out: Any, has_aux: bool) -> tuple[Any, Any]:
  return out if has_aux else (out, None)


def _join(value: Any, aux: Any, has_aux: bool) -> Any:
  return (value, aux) if has_aux else value


# --------------------------------------------------------------------------- #
# Parameter-gradient penalties.
# --------------------------------------------------------------------------- #


def penalized(
  fun: Callable[..., Any],
  argnums: int | Sequence[int] = 0,
  has_aux: bool = False,
  *,
  weight: ArrayLike,
  squared: bool = True,
  ord: int | float | None = None,
) -> Callable[..., Any]:
  """Returns the gradient-norm-penalized objective P = J + λ‖∇J‖² of J = ``fun``.

  ``jax.grad`` of P is exact double backprop; :func:`penalized_value_and_grad` gives the same
  gradient faster. P and its first and second derivatives are NaN-free at a stationary point:
  :ref:`the guide <penalty-numerics>`.

  Args:
    fun: a function returning a real scalar J (or ``(J, aux)`` with ``has_aux``).
    argnums: the positional argument(s) θ; with a tuple, one norm over all their gradients.
    has_aux: ``fun`` returns ``(J, aux)``; the result then returns ``(P, aux)``.
    weight: λ ≥ 0, keyword-only: a finite number (checked here) or a traced value.
    squared: penalize ‖∇J‖² (default, classic double backprop) or ‖∇J‖ (Zhao et al. 2022).
    ord: the norm of ∇J: None or 2 (Euclidean), 1 or ``inf``.

  Returns:
    A function with ``fun``'s signature returning P (or ``(P, aux)``).

  Raises:
    ValueError: ``weight`` is a negative or non-finite number, ``ord`` is not accepted, or
      ``argnums`` has negative entries.
    TypeError: ``fun`` is not callable, ``argnums`` is malformed (a float there: pass ``weight=``
      by keyword), ``has_aux`` is not a bool or ``weight`` is not a number.

  Examples:
    >>> import jax, jax.numpy as jnp, gnorm_jax
    >>> P = gnorm_jax.penalized(lambda w: 0.5 * w @ w, weight=0.1)  # ∇J = w, H = I
    >>> float(P(jnp.array([3.0, 4.0]))), jax.grad(P)(jnp.array([3.0, 4.0]))  # w + 0.2·H·w
    (15.0, Array([3.6, 4.8], dtype=float32))

  References:
    Drucker & LeCun 1992; Zhao, Zhang & Hu 2022, https://arxiv.org/abs/2202.03599.
  """
  check_fun(fun, "penalized")
  check_grad_args(penalized, argnums, has_aux)
  check_number("weight", weight, low=0, finite=True, fix=_WEIGHT_FIX)
  check_choice("squared", squared, (True, False), "Pass a bool: penalize ‖∇J‖² or ‖∇J‖.")
  check_ord(ord)
  vg = jax.value_and_grad(fun, argnums=argnums, has_aux=has_aux)
  penalty = _penalty_fn(squared, ord)

  @functools.wraps(fun)
  def wrapped(*args, **kwargs):
    out, grads = vg(*args, **kwargs)
    value, aux = _split(out, has_aux)
    return _join(value + weight * penalty(grads), aux, has_aux)

  return wrapped


def _hvp_method(f, theta, *, weight, penalty, has_aux, radius):
  """∇J + λ‖v‖·H·(v/‖v‖), the product forward-over-reverse (jax.linearize of ∇J).

  H is applied to the unit vector and ‖v‖ multiplied in afterwards in at
  least float32: H·v itself can overflow a float16 θ (H·v = 1.1e5 at
  θ = 30 for J = Σθ³/3) where the result ∇J + λ·H·v does not.
  """
  del radius
  vg = jax.value_and_grad(f, has_aux=has_aux)
  # linearize runs J's forward and backward pass once and returns H·(·) as a
  # linear map, so the primal is not recomputed for the product.
  grads, hvp, out = jax.linearize(lambda t: vg(t)[::-1], theta, has_aux=True)
  pen, v = jax.value_and_grad(penalty)(grads)
  u, v_norm = _unit(v)
  return out, pen, _axpy(weight * v_norm, hvp(u), grads)


def _finite_difference_method(f, theta, *, weight, penalty, has_aux, radius):
  """Zhao et al. 2022: H·v ≈ ‖v‖·(∇J(θ + r·v/‖v‖) − ∇J(θ))/r, v = ∇φ(∇J).

  The step r is at least 8·ε·‖θ‖ (ε the resolution of θ's dtype, leaf by
  leaf): a smaller probe offset would be rounded away (θ + 0.01 = θ for a
  bfloat16 θ = 300), silently dropping the penalty from the gradient.
  """
  out, grads = jax.value_and_grad(f, has_aux=has_aux)(theta)
  pen, v = jax.value_and_grad(penalty)(grads)
  u, v_norm = _unit(v)
  radius = jnp.maximum(jnp.asarray(radius, v_norm.dtype), _RESOLUTION_STEPS * _resolution(theta))
  # u = 0 at a stationary point: then the probe is θ itself and the
  # correction is 0·0.
  probe = _axpy(radius, u, theta)
  probe_grads = jax.grad(f, has_aux=has_aux)(probe)
  if has_aux:
    probe_grads = probe_grads[0]
  diff = jax.tree.map(jnp.subtract, probe_grads, grads)
  return out, pen, _axpy(weight * v_norm / radius, diff, grads)


def penalized_value_and_grad(
  fun: Callable[..., Any],
  argnums: int | Sequence[int] = 0,
  has_aux: bool = False,
  *,
  weight: ArrayLike,
  method: str = "hvp",
  squared: bool = True,
  ord: int | float | None = None,
  radius: ArrayLike = 0.01,
) -> Callable[..., tuple[Any, Any]]:
  """Returns a function giving the penalized objective of :func:`penalized` and its gradient.

  The value is exact; the gradient is exact for ``"hvp"`` (about 3 backward passes) and
  ``"double_backprop"`` (the reference), within λ‖v‖·O(r) for ``"finite_difference"`` (two
  gradients, Zhao et al. 2022): :ref:`the guide <penalty-methods>`.

  Args:
    fun: a function returning a real scalar J (or ``(J, aux)``).
    argnums: the positional argument(s) θ, as in :func:`jax.value_and_grad`.
    has_aux: ``fun`` returns ``(J, aux)``; the value is then ``(P, aux)``.
    weight: λ ≥ 0, keyword-only: a number, or a traced value (no retracing).
    method: ``"hvp"``, ``"double_backprop"`` or ``"finite_difference"``.
    squared: penalize ‖∇J‖² (default) or ‖∇J‖ (as in Zhao et al. 2022).
    ord: the norm of ∇J: None or 2 (Euclidean), 1 or ``inf``.
    radius: r > 0, the ``"finite_difference"`` step (may be traced), raised to the parameters'
      resolution where it is below it.

  Returns:
    A function with ``fun``'s signature returning ``(P, ∇P)`` (``((P, aux), ∇P)`` with
    ``has_aux``); ∇P has θ's structure and dtypes.

  Raises:
    ValueError: unknown ``method``; negative or non-finite ``weight``; ``radius`` not a finite
      number > 0; ``ord`` not accepted; negative ``argnums``.
    TypeError: as for :func:`penalized`, or ``radius`` is not a number.

  Examples:
    >>> import jax.numpy as jnp, gnorm_jax
    >>> J = lambda w: jnp.sum(w ** 3) / 3  # ∇J = w², H = diag(2w)
    >>> value, grad = gnorm_jax.penalized_value_and_grad(J, weight=0.1)(jnp.array([1.0, 2.0]))
    >>> float(value), grad  # 3 + 0.1·(1 + 16), w² + 0.1·diag(2w)·2w²
    (4.7, Array([1.4, 7.2], dtype=float32))

  References:
    Zhao, Zhang & Hu 2022, https://arxiv.org/abs/2202.03599.
  """
  check_fun(fun, "penalized_value_and_grad")
  check_grad_args(penalized_value_and_grad, argnums, has_aux)
  check_choice("method", method, _METHODS)
  check_number("weight", weight, low=0, finite=True, fix=_WEIGHT_FIX)
  check_number(
    "radius",
    radius,
    low=0,
    low_open=True,
    finite=True,
    fix="Pass a small step in parameter space, e.g. 0.01.",
  )
  check_choice("squared", squared, (True, False), "Pass a bool: penalize ‖∇J‖² or ‖∇J‖.")
  check_ord(ord)

  if method == "double_backprop":
    p = penalized(fun, argnums, has_aux, weight=weight, squared=squared, ord=ord)
    return functools.wraps(fun)(jax.value_and_grad(p, argnums=argnums, has_aux=has_aux))

  core = _hvp_method if method == "hvp" else _finite_difference_method
  penalty = _penalty_fn(squared, ord)

  @functools.wraps(fun)
  def wrapped(*args, **kwargs):
    f, theta = _bind(fun, argnums, args, kwargs)
    out, pen, grads = core(f, theta, weight=weight, penalty=penalty, has_aux=has_aux, radius=radius)
    value, aux = _split(out, has_aux)
    return _join(value + weight * pen, aux, has_aux), grads

  return wrapped


# --------------------------------------------------------------------------- #
# GAN penalties on the critic's input gradient.
# --------------------------------------------------------------------------- #


def _input_grads(critic: Callable[[Any], jax.Array], x: Any) -> Any:
  """∇ₓᵢ critic(x)ᵢ for every example i, from ONE gradient of the batch sum.

  ∂(Σⱼ critic(x)ⱼ)/∂xᵢ = ∂critic(x)ᵢ/∂xᵢ because score j does not depend on
  example i ≠ j; this is the requirement on the critic.
  """

  def total(x):
    scores = critic(x)
    batch = jax.tree.leaves(x)[0].shape[0]
    if jnp.ndim(scores) == 0 or jnp.shape(scores)[0] != batch or jnp.size(scores) != batch:
      raise ValueError(
        f"fun (the critic) must map a batch of {batch} examples to {batch} scores (shape"
        f" [{batch}] or [{batch}, 1]), got shape {jnp.shape(scores)}. For a"
        " model of one example, pass `jax.vmap(model)`."
      )
    return jnp.sum(scores)

  return jax.grad(total)(x)


def _per_example_sq_norms(grads: Any) -> jax.Array:
  """‖gᵢ‖² over all leaves and non-batch axes: shape [B], at least float32."""
  return jnp.asarray(sum(jax.vmap(sum_of_squares)(g) for g in jax.tree.leaves(grads)))


def _check_batch(x: Any, name: str) -> None:
  leaves = jax.tree.leaves(x)
  if not leaves or any(jnp.ndim(l) == 0 for l in leaves):
    raise ValueError(
      f"{name} needs a leading batch axis: an array [B, ...] (or a pytree of"
      f" them), got {x!r}. For one example, pass `x[None]`."
    )
  sizes = {jnp.shape(l)[0] for l in leaves}
  if len(sizes) != 1:
    raise ValueError(
      f"every leaf of {name} needs the same leading batch size, got sizes {sorted(sizes)}."
    )
  if sizes == {0}:
    raise ValueError(
      f"{name} is an empty batch (leading axis of size 0): the mean over its examples is"
      " undefined. Pass at least one example, or skip the call."
    )


def _mean(values: jax.Array) -> jax.Array:
  """The mean over axis 0, without overflow where the sum exceeds the largest float.

  Summed scaled by 2^-⌈log2 B⌉ (exact), then divided by B·2^-⌈log2 B⌉ in
  (0.5, 1]: the same single rounding as sum/B, but the sum of B values at
  most the largest float cannot overflow.
  """
  batch = values.shape[0]
  scale = 2.0 ** -math.ceil(math.log2(batch))
  return jnp.sum(values * jnp.asarray(scale, values.dtype), axis=0) / jnp.asarray(
    batch * scale, values.dtype
  )


def gradient_penalty(
  fun: Callable[[Any], jax.Array], x: PyTree, *, target: ArrayLike = 1.0
) -> jax.Array:
  """WGAN-GP: the mean over examples of (‖∇ₓᵢ critic‖ − target)².

  One reverse pass of Σᵢ D(x)ᵢ gives all B input gradients, exact if score i depends on example
  i alone (no batch norm in training mode): :ref:`the guide <gan-input-gradients>`.

  Args:
    fun: the critic D, mapping x to scores [B] (or [B, 1]); close over its parameters.
    x: the points, shape [B, ...] (usually :func:`interpolate` of real and fake), or a pytree.
    target: t ≥ 0, the norm the gradient is pulled towards (1 in WGAN-GP; 0: zero-centred).

  Returns:
    A scalar, at least float32. Multiply by λ (10 in the paper) yourself.

  Raises:
    ValueError: the critic's output is not one score per example, x has no batch axis, or
      ``target`` is a negative or non-finite number.
    TypeError: ``target`` is not a number.

  Examples:
    >>> import jax.numpy as jnp, gnorm_jax
    >>> critic = lambda x: x @ jnp.array([3.0, 4.0])  # ‖∇ₓᵢ‖ = 5 for every i
    >>> float(gnorm_jax.gradient_penalty(critic, jnp.ones((8, 2))))  # (5 - 1)²
    16.0

  References:
    Gulrajani et al. 2017, https://arxiv.org/abs/1704.00028.
  """
  check_fun(fun, "gradient_penalty")
  check_number("target", target, low=0, finite=True, fix="Pass the target norm, 1.0 in WGAN-GP.")
  _check_batch(x, "x")
  norms = safe_sqrt(_per_example_sq_norms(_input_grads(fun, x)))
  return _mean(jnp.square(norms - jnp.asarray(target, norms.dtype)))


def r1_penalty(fun: Callable[[Any], jax.Array], x: PyTree) -> jax.Array:
  """R1: the mean over examples of ‖∇ₓᵢ critic‖², at real data x.

  Mescheder et al. add (γ/2)·R1 to the discriminator loss: scale it yourself. One reverse pass
  gives every input gradient, as in :func:`gradient_penalty`; the squares are summed directly,
  so it is smooth everywhere, zero gradients included.

  Args:
    fun: the critic (discriminator) D, mapping x to scores of shape [B] (or [B, 1]).
    x: real samples, shape [B, ...], or a pytree of such arrays.

  Returns:
    A scalar, at least float32.

  Raises:
    ValueError: the critic's output is not one score per example, or x has no batch axis.

  Examples:
    >>> import jax.numpy as jnp, gnorm_jax
    >>> critic = lambda x: jnp.sum(x ** 2, axis=1)  # ∇ₓᵢ = 2xᵢ
    >>> float(gnorm_jax.r1_penalty(critic, jnp.array([[1.0, 0.0], [0.0, 2.0]])))
    10.0

  References:
    Mescheder, Geiger & Nowozin 2018, https://arxiv.org/abs/1801.04406.
  """
  check_fun(fun, "r1_penalty")
  _check_batch(x, "x")
  return _mean(_per_example_sq_norms(_input_grads(fun, x)))


def interpolate(key: jax.Array, real: PyTree, fake: PyTree) -> PyTree:
  """Random points on the segments between real and fake examples (WGAN-GP).

  x̂ᵢ = εᵢ·realᵢ + (1 − εᵢ)·fakeᵢ with one εᵢ ~ U[0, 1] per example, shared by every entry (and
  leaf) of that example. Gradients flow to both ``real`` and ``fake``; stop them yourself if
  needed. Dtypes: :ref:`the guide <gan-input-gradients>`.

  Args:
    key: a PRNG key.
    real: real examples, shape [B, ...], or a pytree of such arrays.
    fake: generated examples with the same structure, shapes and dtypes.

  Returns:
    The interpolates, with ``real``'s structure, shapes and dtypes (float32 for integer leaves).

  Raises:
    ValueError: ``real`` and ``fake`` differ in structure or shape, or have no batch axis.

  Examples:
    >>> import jax, jax.numpy as jnp, gnorm_jax
    >>> x = gnorm_jax.interpolate(jax.random.key(0), jnp.ones((4, 3)), jnp.zeros((4, 3)))
    >>> x.shape, bool(jnp.all(x == x[:, :1]))  # one weight per example
    ((4, 3), True)

  References:
    Gulrajani et al. 2017, https://arxiv.org/abs/1704.00028.
  """
  _check_batch(real, "real")
  # PyTreeDef comes from jaxlib's C extension, which has no type stubs.
  if jax.tree.structure(real) != jax.tree.structure(fake) or any(  # type: ignore[operator]
    jnp.shape(r) != jnp.shape(f) for r, f in zip(jax.tree.leaves(real), jax.tree.leaves(fake))
  ):
    raise ValueError(
      "real and fake must have the same structure and shapes, got"
      f" {jax.tree.map(jnp.shape, real)} and {jax.tree.map(jnp.shape, fake)}."
    )
  batch = jnp.shape(jax.tree.leaves(real)[0])[0]
  eps = jax.random.uniform(key, (batch,), jnp.float32)

  def mix(r, f):
    e = eps.reshape((batch,) + (1,) * (jnp.ndim(r) - 1))
    r, f = jnp.asarray(r), jnp.asarray(f)
    if not jnp.issubdtype(r.dtype, jnp.inexact):
      r, f = r.astype(jnp.float32), f.astype(jnp.float32)
    return upcast(lambda r, f, e: e * r + (1 - e) * f, r, f, e)

  return jax.tree.map(mix, real, fake)
