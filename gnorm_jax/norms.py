"""The norm: one implementation of ‖x‖ for pytrees, used by every other module.

Policy, in one place:

* ``ord=None`` (or 2) is the Euclidean norm of all leaves taken as one vector;
  ``ord=1`` is the sum of absolute values, ``ord=inf`` the largest absolute value.
* Accumulation is in at least float32 (float16/bfloat16 leaves are upcast before
  squaring), float64 for float64 leaves; the result has that accumulation dtype.
* Overflow- and underflow-safe: a one-pass sum of squares is used when it is
  finite and far from the underflow range; otherwise (rarely) a second pass
  rescales every leaf by a power of two of the largest entry, as LAPACK's
  ``nrm2`` does.
* Derivatives are NaN-free: at a zero vector the derivative of the Euclidean
  norm is defined as 0 (a subgradient), and second derivatives are finite.
* Inputs containing ``inf`` give ``inf``; inputs containing ``nan`` give ``nan``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["tree_norm", "leaf_norms"]

_ORDS = (None, 1, 2, math.inf)


def check_ord(ord: Any) -> None:
  """Raises ValueError unless ``ord`` is one of None, 1, 2 or inf."""
  if isinstance(ord, bool) or not any(
      ord is o or (o is not None and ord == o) for o in _ORDS
  ):
    raise ValueError(
        f"ord must be None (Euclidean), 1, 2 or inf (math.inf / jnp.inf); got"
        f" ord={ord!r}."
    )


def accumulation_dtype(dtype: Any) -> jnp.dtype:
  """The dtype norms of ``dtype`` values accumulate in: at least float32."""
  real = jnp.finfo(dtype).dtype  # complex64 -> float32, bfloat16 -> bfloat16
  return jnp.promote_types(real, jnp.float32)


def _checked_leaves(tree: Any) -> list[jax.Array]:
  """Flattens ``tree`` (None leaves dropped), rejecting integer and bool leaves."""
  leaves_with_paths = jax.tree_util.tree_flatten_with_path(tree)[0]
  leaves = []
  for path, leaf in leaves_with_paths:
    leaf = jnp.asarray(leaf)
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
      raise TypeError(
          f"gnorm_jax norms need floating-point or complex leaves, but the leaf"
          f" at {jax.tree_util.keystr(path) or '<root>'} has dtype"
          f" {leaf.dtype}. Cast it (e.g. `x.astype(jnp.float32)`) or leave it"
          " out of the tree."
      )
    leaves.append(leaf)
  return leaves


def _real_parts(leaf: jax.Array, acc: jnp.dtype) -> list[jax.Array]:
  """A leaf as real arrays in ``acc`` whose squares sum to ‖leaf‖²."""
  if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
    return [jnp.real(leaf).astype(acc), jnp.imag(leaf).astype(acc)]
  return [leaf.astype(acc)]


def _sumsq(leaf: jax.Array, acc: jnp.dtype, scale=None) -> jax.Array:
  total = jnp.zeros((), acc)
  for part in _real_parts(leaf, acc):
    if scale is not None:
      part = part * scale
    total = total + jnp.sum(part * part)
  return total


def _amax(leaf: jax.Array, acc: jnp.dtype) -> jax.Array:
  return jnp.max(jnp.abs(leaf), initial=0).astype(acc)


def _pow2_scale(amax: jax.Array) -> jax.Array:
  """Exponent k with amax·2^k in [0.5, 1), clipped so 2^±k stay normal numbers."""
  finfo = jnp.finfo(amax.dtype)
  _, e = jnp.frexp(amax)
  return jnp.clip(-e, -(finfo.maxexp - 2), -finfo.minexp)


def _fast_path_ok(sumsq: jax.Array) -> jax.Array:
  """True where a plain sum of squares is accurate: finite, no underflow loss.

  Squares below ``tiny`` may be flushed to zero; above this threshold their
  total loss is below n·eps² relative, negligible for any n < 10⁹.
  Zero is not accepted: it may hide entries whose squares underflowed.
  """
  finfo = jnp.finfo(sumsq.dtype)
  return jnp.isfinite(sumsq) & (sumsq >= finfo.tiny / finfo.eps**2)


def _safe_l2(leaves: list[jax.Array], acc: jnp.dtype) -> jax.Array:
  """Two-pass Euclidean norm: rescale by a power of two of the largest entry."""
  amax = jnp.max(jnp.stack([_amax(x, acc) for x in leaves]))
  k = _pow2_scale(amax)
  scale = jnp.ldexp(jnp.ones((), acc), k)
  total = sum(_sumsq(x, acc, scale) for x in leaves)
  return jnp.ldexp(jnp.sqrt(total), -k)


def _l2_primal(leaves: list[jax.Array], acc: jnp.dtype) -> jax.Array:
  total = sum(_sumsq(x, acc) for x in leaves)
  return lax.cond(
      _fast_path_ok(total),
      lambda: jnp.sqrt(total),
      lambda: _safe_l2(leaves, acc),
  )


@jax.custom_jvp
def _l2(leaves: list[jax.Array]) -> jax.Array:
  acc = jnp.result_type(*[accumulation_dtype(x.dtype) for x in leaves])
  return _l2_primal(leaves, acc)


@_l2.defjvp
def _l2_jvp(primals, tangents):
  (leaves,), (dleaves,) = primals, tangents
  norm = _l2(leaves)
  # d‖x‖ = <x/‖x‖, dx>; x/‖x‖ is bounded, so this cannot overflow. At x = 0 the
  # derivative is the zero subgradient; the double-where keeps it NaN-free.
  nonzero = norm > 0
  inv = jnp.where(nonzero, 1 / jnp.where(nonzero, norm, 1), 0)
  dnorm = jnp.zeros((), norm.dtype)
  for x, dx in zip(leaves, dleaves):
    if isinstance(dx, jax.custom_derivatives.SymbolicZero) or (
        getattr(dx, "dtype", None) == jax.dtypes.float0
    ):
      continue
    unit = x.astype(jnp.promote_types(x.dtype, norm.dtype)) * inv.astype(
        jnp.promote_types(x.dtype, norm.dtype)
    )
    dnorm = dnorm + jnp.real(jnp.sum(jnp.conj(unit) * dx)).astype(norm.dtype)
  return norm, dnorm


def _norm_of_leaves(leaves: list[jax.Array], ord: Any) -> jax.Array:
  if not leaves:
    return jnp.zeros((), accumulation_dtype(jnp.float32))
  acc = jnp.result_type(*[accumulation_dtype(x.dtype) for x in leaves])
  if ord is None or ord == 2:
    return _l2(leaves)
  if ord == 1:
    return sum(jnp.sum(jnp.abs(x).astype(acc)) for x in leaves)
  return jnp.max(jnp.stack([_amax(x, acc) for x in leaves]))


def tree_norm(tree: Any, ord: int | float | None = None) -> jax.Array:
  r"""The norm of all leaves of a pytree taken as one vector.

  .. math::
    \|x\|_2 = \Big(\sum_{\text{leaves}} \sum_i |x_i|^2\Big)^{1/2},\quad
    \|x\|_1 = \sum |x_i|,\quad \|x\|_\infty = \max |x_i|.

  Unlike a plain ``sqrt(sum(x**2))`` it neither overflows nor underflows in
  float32 (``[1e20, 1e20]`` gives ``1.414e20``), accumulates float16 and bfloat16
  leaves in float32, and its derivative at zero is 0 rather than NaN.

  Args:
    tree: a pytree of floating-point or complex arrays. None leaves are skipped;
      an empty tree has norm 0.0.
    ord: None or 2 (Euclidean), 1 or ``inf``.

  Returns:
    A scalar array in the accumulation dtype (float32, or float64 for float64
    leaves). ``inf`` if an entry is infinite, ``nan`` if an entry is NaN.

  Raises:
    TypeError: a leaf is an integer or bool array (the message names its path).
    ValueError: ``ord`` is not one of the accepted values.

  Examples:
    >>> import jax.numpy as jnp
    >>> import gnorm_jax
    >>> float(gnorm_jax.tree_norm({"w": jnp.array([3.0, 0.0]), "b": jnp.array(4.0)}))
    5.0
    >>> float(gnorm_jax.tree_norm(jnp.array([1e20, 1e20])))
    1.4142135...e+20
    >>> float(gnorm_jax.tree_norm({"w": jnp.array([3.0, -4.0])}, ord=1))
    7.0
  """
  check_ord(ord)
  return _norm_of_leaves(_checked_leaves(tree), ord)


def leaf_norms(tree: Any, ord: int | float | None = None) -> Any:
  r"""One norm per leaf: a pytree of scalars with the structure of ``tree``.

  Each leaf's norm follows the same policy as :func:`tree_norm` (dtype,
  overflow safety, NaN-free derivatives). None leaves stay None. Useful for
  per-layer logging and per-layer clipping.

  Args:
    tree: a pytree of floating-point or complex arrays.
    ord: None or 2 (Euclidean), 1 or ``inf``.

  Returns:
    A pytree with the structure of ``tree`` whose leaves are scalar norms.

  Examples:
    >>> import jax.numpy as jnp
    >>> import gnorm_jax
    >>> norms = gnorm_jax.leaf_norms({"w": jnp.array([3.0, 4.0]), "b": jnp.zeros(2)})
    >>> {k: float(v) for k, v in norms.items()}
    {'b': 0.0, 'w': 5.0}
  """
  check_ord(ord)
  _checked_leaves(tree)
  return jax.tree.map(lambda x: _norm_of_leaves([jnp.asarray(x)], ord), tree)


def sum_of_squares(x: jax.Array) -> jax.Array:
  """Σ|x|² over all axes of ``x`` in the accumulation dtype (one fast pass).

  For engines that combine squared norms themselves (per-example norms); it
  carries none of tree_norm's overflow protection.
  """
  return _sumsq(x, accumulation_dtype(x.dtype))


def safe_sqrt(x: jax.Array) -> jax.Array:
  """sqrt with a derivative of 0 (not inf/NaN) at 0, for norms from squares."""
  return _safe_sqrt(x)


@jax.custom_jvp
def _safe_sqrt(x):
  return jnp.sqrt(x)


@_safe_sqrt.defjvp
def _safe_sqrt_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  y = jnp.sqrt(x)
  pos = y > 0
  return y, jnp.where(pos, dx / (2 * jnp.where(pos, y, 1)), 0)
