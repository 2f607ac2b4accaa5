"""The norm: one implementation of ‖x‖ for pytrees, used by every other module.

Policy, in one place:

* ``ord=None`` (or 2) is the Euclidean norm of all leaves taken as one vector;
  ``ord=1`` is the sum of absolute values, ``ord=inf`` the largest absolute value.
* Accumulation is in at least float32 (float16/bfloat16 leaves are upcast before
  squaring), float64 for float64 leaves; the result has that accumulation dtype.
* Overflow- and underflow-safe: a one-pass sum of squares is used when it is
  finite and far from the underflow range; otherwise (rarely) a second pass
  rescales every leaf by a power of two of the largest entry, as LAPACK's
  ``nrm2`` does. All groups (leaves for :func:`leaf_norms`) share one branch,
  and under ``vmap`` so do all examples: the batch takes the fast path unless
  one example needs rescuing (a custom batching rule; a plain ``lax.cond``
  would become a select that always pays for both paths).
* Derivatives are NaN-free: at a zero vector the derivative of the Euclidean
  norm is defined as 0 (a subgradient), and second derivatives are finite.
* Inputs containing ``inf`` give ``inf``; inputs containing ``nan`` give ``nan``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from gnorm_jax._checks import check_ord
from gnorm_jax._numerics import (
  accumulation_dtype,
  pow2,
  pow2_exponent,
  pow2_inverse,
  safe_divide,
)

__all__ = ["tree_norm", "leaf_norms"]


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


def _sumsq(leaf: jax.Array, acc: jnp.dtype, scale: jax.Array | None = None) -> jax.Array:
  total = jnp.zeros((), acc)
  for part in _real_parts(leaf, acc):
    if scale is not None:
      part = part * scale
    total = total + jnp.sum(part * part)
  return total


def _amax(leaf: jax.Array, acc: jnp.dtype) -> jax.Array:
  return jnp.max(jnp.abs(leaf), initial=0).astype(acc)


def _group_dtype(leaves: list[jax.Array]) -> jnp.dtype:
  return jnp.result_type(*[accumulation_dtype(x.dtype) for x in leaves])


def _fast_path_ok(sumsq: jax.Array) -> jax.Array:
  """True where a plain sum of squares is accurate: finite, no underflow loss.

  Squares below ``tiny`` may be flushed to zero. Accepting only sums of at
  least ``tiny/eps³`` (a norm of 2.6e-9 in float32) bounds what n such
  squares can hide to n·eps³ relative: below eps for any n < 1/eps² (7e13 in
  float32). Zero is not accepted: it may hide entries whose squares all
  underflowed.
  """
  finfo = jnp.finfo(sumsq.dtype)
  return jnp.isfinite(sumsq) & (sumsq >= finfo.tiny / finfo.eps**3)


def _rescaled_l2(leaves: list[jax.Array]) -> jax.Array:
  """Two-pass Euclidean norm: rescale by a power of two of the largest entry.

  With every entry scaled into [0, 1) and the largest in [0.5, 1), nothing
  overflows and a square that underflows (below ``tiny``) is negligible next to
  the largest one (at least 1/4). Powers of two scale exactly.
  """
  acc = _group_dtype(leaves)
  amax = jnp.max(jnp.stack([_amax(x, acc) for x in leaves]))
  k = pow2_exponent(amax)
  scale = pow2(k, acc)  # not ldexp: see pow2 (compile time with many leaves)
  total = jnp.zeros((), acc)
  for x in leaves:
    # The barrier keeps XLA from sharing one full-size broadcast of ``scale``
    # between leaves of the same shape (a buffer of half the largest leaf, even
    # when this branch never runs); each leaf's scaling fuses into its sum.
    s, x = lax.optimization_barrier((scale, x))
    total = total + _sumsq(x, acc, s)
  return jnp.ldexp(jnp.sqrt(total), -k)


def _group_sumsqs(groups: list[list[jax.Array]]) -> list[jax.Array]:
  return [sum(_sumsq(x, _group_dtype(g)) for x in g) for g in groups]


def _l2_norms_one(groups: list[list[jax.Array]]) -> list[jax.Array]:
  """The Euclidean norm of each group of leaves (a group is one vector).

  One pass computes every group's sum of squares; ONE cond checks them all, so
  the common case costs a single scalar branch however many groups there are.
  Only if some sum overflowed or may have lost underflowed squares does the
  rare branch run, and there only those groups take the rescaled second pass.
  """
  sumsqs = _group_sumsqs(groups)
  oks = [_fast_path_ok(s) for s in sumsqs]

  def fast():
    return [jnp.sqrt(s) for s in sumsqs]

  def rescue():
    return [
        lax.cond(ok, lambda s=s: jnp.sqrt(s), lambda g=g: _rescaled_l2(g))
        for ok, s, g in zip(oks, sumsqs, groups)
    ]

  return lax.cond(jnp.all(jnp.stack(oks)), fast, rescue)


@jax.custom_batching.custom_vmap
def _l2_norms_batchable(groups: list[list[jax.Array]]) -> list[jax.Array]:
  return _l2_norms_one(groups)


@_l2_norms_batchable.def_vmap
def _l2_norms_vmap(axis_size, in_batched, groups):
  """Under vmap, one cond for the whole batch rather than a select per example.

  A batched predicate would turn the cond into a select that always pays for
  the rescaled branch; here every example takes the fast path unless one of
  them needs rescuing, and then each example is handled as when unbatched.
  """
  (batched,) = in_batched
  in_axes = ([[0 if b else None for b in bg] for bg in batched],)

  def each(fn):
    return jax.vmap(fn, in_axes=in_axes, axis_size=axis_size)

  sumsqs = each(_group_sumsqs)(groups)
  ok = jnp.all(jnp.stack([jnp.all(_fast_path_ok(s)) for s in sumsqs]))
  norms = lax.cond(ok, lambda: [jnp.sqrt(s) for s in sumsqs], lambda: each(_l2_norms_one)(groups))
  return norms, [True] * len(norms)


@jax.custom_jvp
def _l2_norms(groups: list[list[jax.Array]]) -> list[jax.Array]:
  """:func:`_l2_norms_one` with a NaN-free derivative and a batch-wide branch."""
  if not groups:
    return []
  return _l2_norms_batchable(groups)


@_l2_norms.defjvp
def _l2_norms_jvp(primals, tangents):
  (groups,), (dgroups,) = primals, tangents
  norms = _l2_norms(groups)
  return norms, [_l2_jvp(n, g, dg) for n, g, dg in zip(norms, groups, dgroups)]


def _l2_jvp(norm: jax.Array, leaves: list[jax.Array], dleaves: list[jax.Array]) -> jax.Array:
  """d‖x‖ = Re<x/‖x‖, dx>, and 0 at x = 0 (the zero subgradient).

  x/‖x‖ is formed as (x·2^k)/(‖x‖·2^k) with ‖x‖·2^k in [0.5, 1): 1/‖x‖ alone
  is subnormal (flushed to 0) for norms above 1/tiny (1e38 in float32), and
  its derivative −1/‖x‖² overflows for norms below 1e-19, which made second
  derivatives −inf there. Both stay NaN-free at 0.
  """
  s, inv = pow2_inverse(norm)
  dnorm = jnp.zeros((), norm.dtype)
  for x, dx in zip(leaves, dleaves):
    dtype = jnp.promote_types(x.dtype, norm.dtype)
    unit = (x.astype(dtype) * s.astype(dtype)) * inv.astype(dtype)
    dnorm = dnorm + jnp.real(jnp.sum(jnp.conj(unit) * dx)).astype(norm.dtype)
  return dnorm


def _other_norm(leaves: list[jax.Array], ord: Any) -> jax.Array:
  """ord 1 (sum of |x|) or inf (max |x|) of ``leaves`` taken as one vector."""
  acc = _group_dtype(leaves)
  if ord == 1:
    return sum(jnp.sum(jnp.abs(x).astype(acc)) for x in leaves)
  return jnp.max(jnp.stack([_amax(x, acc) for x in leaves]))


# Jitted so that eager calls compile once per tree structure and shapes instead
# of dispatching (and compiling the conds) op by op; inlined under an outer jit.
@functools.partial(jax.jit, static_argnames="ord")
def _norms(groups: list[list[jax.Array]], ord: Any) -> list[jax.Array]:
  """One norm per group of leaves; ``ord`` already checked."""
  if ord is None or ord == 2:
    return _l2_norms(groups)
  return [_other_norm(g, ord) for g in groups]


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

  References:
    Blue, "A portable Fortran program to find the Euclidean norm of a vector",
    ACM TOMS 4(1), 1978 (https://doi.org/10.1145/355769.355771); Anderson,
    "Algorithm 978: Safe scaling in the Level 1 BLAS", ACM TOMS 44(1), 2017
    (https://doi.org/10.1145/3061665). No arXiv versions exist.
  """
  check_ord(ord)
  leaves = _checked_leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return _norms([leaves], ord)[0]


def leaf_norms(tree: Any, ord: int | float | None = None) -> Any:
  r"""One norm per leaf: a pytree of scalars with the structure of ``tree``.

  .. math::
    \text{leaf\_norms}(x)_\ell = \|x_\ell\|\ \text{for every leaf } x_\ell,
    \qquad \|x\|_2 = \Big(\sum_\ell \text{leaf\_norms}(x)_\ell^2\Big)^{1/2}.

  Each leaf's norm follows the same policy as :func:`tree_norm` (dtype,
  overflow safety, NaN-free derivatives). None leaves stay None. Useful for
  per-layer logging and per-layer clipping.

  Args:
    tree: a pytree of floating-point or complex arrays.
    ord: None or 2 (Euclidean), 1 or ``inf``.

  Returns:
    A pytree with the structure of ``tree`` whose leaves are scalar norms in
    the leaf's accumulation dtype (``inf``/``nan`` as in :func:`tree_norm`).
    All leaves share one fast pass and one branch; only leaves whose sum of
    squares overflowed or underflowed take the rescaled second pass.

  Raises:
    TypeError: a leaf is an integer or bool array (the message names its path).
    ValueError: ``ord`` is not one of the accepted values.

  Examples:
    >>> import jax.numpy as jnp
    >>> import gnorm_jax
    >>> norms = gnorm_jax.leaf_norms({"w": jnp.array([3.0, 4.0]), "b": jnp.zeros(2)})
    >>> {k: float(v) for k, v in norms.items()}
    {'b': 0.0, 'w': 5.0}
  """
  check_ord(ord)
  leaves = _checked_leaves(tree)
  return jax.tree.structure(tree).unflatten(_norms([[x] for x in leaves], ord))


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
  return y, safe_divide(dx, 2 * y)
