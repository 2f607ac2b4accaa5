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
  r"""Returns a function computing ``(value, grads, ‖grads‖)`` in one pass.

  .. math::
    x \mapsto \big(f(x),\ \nabla f(x),\ \|\nabla f(x)\|\big)

  A thin layer over :func:`jax.value_and_grad`: the norm is :func:`gnorm_jax.tree_norm` of the
  gradient it returns (no second backward pass; a NaN-free derivative where ∇f = 0).

  Args:
    fun: a function returning a real scalar (or ``(scalar, aux)`` with ``has_aux``).
    argnums: which positional argument(s) to differentiate; with a tuple the norm is over all of
      those gradients together.
    has_aux: as in :func:`jax.value_and_grad`.
    ord: None or 2 (Euclidean), 1 or ``inf``.

  Returns:
    A function with ``fun``'s signature returning ``(value, grads, norm)``; with ``has_aux``,
    ``value`` is ``(loss, aux)`` as in jax.value_and_grad.

  Raises:
    TypeError: ``fun`` is not callable, ``argnums`` is not an int or a non-empty tuple of ints,
      or ``has_aux`` is not a bool.
    ValueError: ``ord`` is not None, 1, 2 or inf, or ``argnums`` has negative entries (count
      positions from 0).

  Examples:
    >>> import jax.numpy as jnp
    >>> import gnorm_jax
    >>> f = lambda w: 0.5 * jnp.sum(w ** 2)
    >>> value, grads, norm = gnorm_jax.value_grad_and_norm(f)(jnp.array([3.0, 4.0]))
    >>> float(value), float(norm)
    (12.5, 5.0)

  References:
    Pascanu, Mikolov & Bengio, "On the difficulty of training recurrent neural networks", 2013
    (https://arxiv.org/abs/1211.5063): the gradient norm that clipping measures once per step.
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
  r"""Returns a function computing the gradient norm ‖∇f‖ at its arguments.

  .. math::
    x \mapsto \|\nabla f(x)\|, \qquad
    \nabla_x \|\nabla f(x)\| = \frac{H(x)\,\nabla f(x)}{\|\nabla f(x)\|}
    \ (\text{and } 0 \text{ where } \nabla f(x) = 0).

  Composes with :func:`jax.jit`, :func:`jax.vmap` (per-example input-gradient norms) and
  :func:`jax.grad` (0, not NaN, at a stationary point): :doc:`the guide </norms>`.

  Args:
    fun: a function returning a real scalar (or ``(scalar, aux)``).
    argnums: which positional argument(s) to differentiate; with a tuple the norm is over all of
      those gradients together.
    has_aux: if True the returned function gives ``(norm, aux)``.
    ord: None or 2 (Euclidean), 1 or ``inf``.

  Returns:
    A function with ``fun``'s signature returning the norm (a scalar at least float32), or
    ``(norm, aux)``. An infinite gradient entry gives ``inf``, a NaN entry ``nan``.

  Raises:
    TypeError: ``fun`` is not callable, ``argnums`` is not an int or a non-empty tuple of ints,
      or ``has_aux`` is not a bool (at construction); as in :func:`jax.grad`, at call time, for
      argnums beyond the arguments, integer inputs or a non-scalar output.
    ValueError: ``ord`` is not None, 1, 2 or inf, or ``argnums`` has negative entries (count
      positions from 0).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import gnorm_jax
    >>> f = lambda x: jnp.sum(jnp.sin(x))
    >>> float(gnorm_jax.grad_norm(f)(jnp.zeros(4)))  # ‖cos(0)‖ = ‖(1,1,1,1)‖
    2.0
    >>> xs = jnp.arange(6.0).reshape(3, 2)
    >>> jax.vmap(gnorm_jax.grad_norm(lambda x: jnp.sum(x ** 2)))(xs).shape
    (3,)

  References:
    Gulrajani et al., "Improved Training of Wasserstein GANs", 2017
    (https://arxiv.org/abs/1704.00028); Zhao, Zhang & Hu, "Penalizing Gradient Norm for
    Efficiently Improving Generalization in Deep Learning", 2022
    (https://arxiv.org/abs/2202.03599): penalties that differentiate ‖∇f‖.
  """
  check_fun(fun, "grad_norm")
  check_grad_args(grad_norm, argnums, has_aux)
  vgn = value_grad_and_norm(fun, argnums, has_aux, ord=ord)

  @functools.wraps(fun)
  def wrapped(*args, **kwargs):
    value, _, norm = vgn(*args, **kwargs)
    return (norm, value[1]) if has_aux else norm

  return wrapped
