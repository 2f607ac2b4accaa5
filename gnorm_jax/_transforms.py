"""Function transformations: f ↦ ‖∇f‖, and f ↦ (f, ∇f, ‖∇f‖) in one pass."""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax

from gnorm_jax._checks import check_fun, check_grad_args, check_ord
from gnorm_jax._norms import tree_norm

__all__ = ["grad_norm", "value_grad_and_norm"]


def value_grad_and_norm(
  fun: Callable[..., Any],
  argnums: int | Sequence[int] = 0,
  has_aux: bool = False,
  *,
  ord: int | float | None = None,
) -> Callable[..., tuple[Any, Any, jax.Array]]:
  """Returns a function computing ``(value, grads, ‖grads‖)`` in one pass.

  A thin layer over :func:`jax.value_and_grad`: the norm is :func:`tree_norm` of its gradient.

  Args:
    fun: a function returning a real scalar (or ``(scalar, aux)`` with ``has_aux``).
    argnums: which argument(s) to differentiate; with a tuple, one norm over all their gradients.
    has_aux: as in :func:`jax.value_and_grad`.
    ord: None or 2 (Euclidean), 1 or ``inf``.

  Returns:
    A function with ``fun``'s signature returning ``(value, grads, norm)``; with ``has_aux``,
    ``value`` is ``(loss, aux)``.

  Raises:
    TypeError: ``fun`` is not callable, or ``argnums`` or ``has_aux`` has the wrong type.
    ValueError: ``ord`` is not None, 1, 2 or inf, or ``argnums`` has negative entries.

  Examples:
    >>> import jax.numpy as jnp, gnorm_jax
    >>> value, _, norm = gnorm_jax.value_grad_and_norm(lambda w: 0.5 * w @ w)(jnp.array([3.0, 4.0]))
    >>> float(value), float(norm)
    (12.5, 5.0)

  References:
    Pascanu, Mikolov & Bengio 2013, https://arxiv.org/abs/1211.5063.
  """
  check_fun(fun, "value_grad_and_norm")
  check_grad_args(value_grad_and_norm, argnums, has_aux)
  check_ord(ord)
  vg = jax.value_and_grad(fun, argnums=argnums, has_aux=has_aux)

  @functools.wraps(fun)
  def wrapped(*args, **kwargs):
    value, grads = vg(*args, **kwargs)
    return value, grads, tree_norm(grads, ord)

  return wrapped


def grad_norm(
  fun: Callable[..., Any],
  argnums: int | Sequence[int] = 0,
  has_aux: bool = False,
  *,
  ord: int | float | None = None,
) -> Callable[..., Any]:
  """Returns a function computing the gradient norm ‖∇f‖ at its arguments.

  Composes with :func:`jax.jit`, :func:`jax.vmap` (per-example input-gradient norms) and
  :func:`jax.grad` (H∇f/‖∇f‖, and 0 rather than NaN at a stationary point): :doc:`/norms`.

  Args:
    fun: a function returning a real scalar (or ``(scalar, aux)``).
    argnums: which argument(s) to differentiate; with a tuple, one norm over all their gradients.
    has_aux: if True the returned function gives ``(norm, aux)``.
    ord: None or 2 (Euclidean), 1 or ``inf``.

  Returns:
    A function with ``fun``'s signature returning the norm (a scalar, at least float32), or
    ``(norm, aux)``; ``inf`` for an infinite gradient entry, ``nan`` for a NaN one.

  Raises:
    TypeError: as for :func:`value_grad_and_norm`, and at call time as :func:`jax.grad` does.
    ValueError: ``ord`` is not None, 1, 2 or inf, or ``argnums`` has negative entries.

  Examples:
    >>> import jax, jax.numpy as jnp, gnorm_jax
    >>> float(gnorm_jax.grad_norm(lambda x: jnp.sum(jnp.sin(x)))(jnp.zeros(4)))  # ‖cos(0)‖
    2.0

  References:
    Gulrajani et al. 2017, https://arxiv.org/abs/1704.00028.
  """
  check_fun(fun, "grad_norm")
  check_grad_args(grad_norm, argnums, has_aux)
  vgn = value_grad_and_norm(fun, argnums, has_aux, ord=ord)

  @functools.wraps(fun)
  def wrapped(*args, **kwargs):
    value, _, norm = vgn(*args, **kwargs)
    return (norm, value[1]) if has_aux else norm

  return wrapped
