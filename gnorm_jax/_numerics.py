"""Small numerical helpers shared by the modules: dtypes, safe division, exact rescaling.

* :func:`accumulation_dtype` and :func:`upcast`: arithmetic on float16/bfloat16
  values happens in at least float32 and is rounded back once.
* :func:`safe_divide`: a quotient with a chosen value where the denominator is
  0, NaN-free in values and derivatives (the "double where").
* :func:`binary_exponent`, :func:`pow2_exponent` and :func:`pow2`: exponents
  and exact powers of two from the exponent bits (a few ops each).
* :func:`pow2_split` and :func:`scale_tree`: dividing by a norm through an
  exact power of two, so that neither ``1/norm`` nor ``x/norm`` overflows or
  underflows on the way (1/1.4e38 is subnormal in float32, and flushed to 0).
* :func:`clip_factor` and :func:`clip_scales`: the clipping factor
  min(1, τ/‖g‖), whole or split the same way.
* :func:`by_platform`: one form of a computation on CPU, another on GPU/TPU;
  :func:`rare_path`: the CPU form's guard of a rare path.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

# "cpu" or "default" traces that form of :func:`by_platform` on any backend (for
# tests; set it before tracing, or clear JAX's caches: jitted functions keep
# their trace). The environment variable sets it at import.
_FORCE_FORM: str | None = os.environ.get("GNORM_JAX_PLATFORM_FORM") or None


def by_platform(cpu: Callable[..., Any], default: Callable[..., Any], *args: Any) -> Any:
  """``cpu(*args)`` where the computation is lowered for CPU, ``default(*args)`` elsewhere.

  Both forms compute the same thing. On CPU a ``lax.cond`` costs nothing and
  lets the rare path be skipped; on GPU a conditional copies its predicate to
  the host and waits for it (XLA's ``ConditionalThunk``), and on TPU it
  serializes the program, so the GPU/TPU forms hold no conditional or loop.
  The choice is made when lowering (``lax.platform_dependent``): the compiled
  program holds only the chosen form.
  """
  if _FORCE_FORM == "cpu":
    return cpu(*args)
  if _FORCE_FORM == "default":
    return default(*args)
  return lax.platform_dependent(*args, cpu=cpu, default=default)


# True traces only the common branch of :func:`rare_path` (for tests that
# measure what the common path of a compiled program costs).
_COMMON_ONLY = False


def rare_path(needed: jax.Array, rare: Callable[[], Any], common: Callable[[], Any]) -> Any:
  """``rare()`` where ``needed`` (a scalar bool), else ``common()``: one ``lax.cond``
  (CPU forms only), whose branches compute the same values."""
  if _COMMON_ONLY:
    return common()
  return lax.cond(needed, rare, common)


def pairwise(op: Callable[[Any, Any], Any], xs: list) -> Any:
  """``op`` folded over ``xs`` (not empty) as a balanced tree. For elementwise ops
  on per-example columns: XLA fuses the whole fold into one kernel where a
  stack and a reduction would be two or more, and a sum's rounding error grows
  with log2(len(xs)), as a reduction's does, not with len(xs)."""
  while len(xs) > 1:
    xs = [op(xs[i], xs[i + 1]) if i + 1 < len(xs) else xs[i] for i in range(0, len(xs), 2)]
  return xs[0]


def accumulation_dtype(dtype: Any) -> jnp.dtype:
  """The dtype norms of ``dtype`` values accumulate in: at least float32."""
  real = jnp.finfo(dtype).dtype  # complex64 -> float32, bfloat16 -> bfloat16
  return jnp.promote_types(real, jnp.float32)


def upcast(fn: Callable[..., jax.Array], x: Any, *args: Any) -> jax.Array:
  """``fn(x, *args)`` computed in at least float32, rounded once to ``x``'s dtype.

  The computing dtype is the promotion of ``x``, float32 and ``args`` (Python
  scalars do not widen it), so float64 stays float64.
  """
  x = jnp.asarray(x)
  acc = jnp.result_type(x, jnp.float32, *args)
  return fn(x.astype(acc), *(jnp.asarray(a).astype(acc) for a in args)).astype(x.dtype)


def safe_divide(num: Any, den: Any, at_zero: Any = 0) -> jax.Array:
  """``num/den`` where ``den != 0``, else ``at_zero``; NaN-free derivatives too.

  The inner ``where`` keeps the unselected quotient finite, so its derivative
  (multiplied by a zero cotangent) cannot produce NaN. A NaN ``den`` gives NaN.
  """
  num, den = jnp.asarray(num), jnp.asarray(den)
  nonzero = den != 0
  return jnp.where(nonzero, num / jnp.where(nonzero, den, 1), at_zero)


def binary_exponent(x: jax.Array) -> jax.Array:
  """The exponent E of a normal x = ±1.f·2^E, read from its exponent bits.

  A few integer ops where ``jnp.frexp`` takes about 25 (it handles
  subnormals), which adds up where one is formed per leaf. Zero and
  subnormal numbers give −bias (−127 in float32; XLA on CPU flushes
  subnormals to zero anyway), ``inf`` and NaN give bias + 1.
  """
  finfo = jnp.finfo(x.dtype)
  bits = lax.bitcast_convert_type(x, _int_type(x.dtype))
  biased = (bits >> finfo.nmant) & ((1 << finfo.nexp) - 1)
  return (biased - (finfo.maxexp - 1)).astype(jnp.int32)


def _int_type(dtype: Any) -> Any:
  return {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[jnp.dtype(dtype).itemsize]


def pow2_exponent(amax: jax.Array) -> jax.Array:
  """Exponent k with amax·2^k in [0.5, 1), clipped so 2^±k stay normal numbers.

  k = 0 for a zero, infinite or NaN ``amax``.
  """
  finfo = jnp.finfo(amax.dtype)
  e = jnp.where(jnp.isfinite(amax) & (amax != 0), binary_exponent(amax) + 1, 0)
  return jnp.clip(-e, -(finfo.maxexp - 2), -finfo.minexp)


def pow2(k: jax.Array, dtype: Any) -> jax.Array:
  """2^k in ``dtype``, exactly, for k from :func:`pow2_exponent` (2^±k normal).

  Built from the exponent bits of 2^-k, then inverted (exact for powers of
  two): XLA counts a division as expensive and computes it once, while it
  copies cheap bit operations — and everything they depend on, e.g. a
  maximum over every leaf — into each consumer. With one consumer per leaf
  that made compile time grow quadratically in the number of leaves.
  """
  return 1 / _from_exponent_bits(-jnp.asarray(k), dtype)


def _from_exponent_bits(j: jax.Array, dtype: Any) -> jax.Array:
  """2^j in ``dtype`` (j integer, 2^j a normal number), written as its exponent bits."""
  finfo = jnp.finfo(dtype)
  biased = j.astype(_int_type(dtype)) + (finfo.maxexp - 1)
  return lax.bitcast_convert_type(biased << finfo.nmant, finfo.dtype)


def ldexp(x: jax.Array, k: Any) -> jax.Array:
  """``x·2^k`` (``k`` integer) as four multiplications by powers of two built from
  their exponent bits: exact wherever the result is a normal number.

  ``jnp.ldexp`` splits ``x`` with ``frexp`` and raises 2 to a float power: a
  few dozen operations, which XLA will not copy into each consumer, so each
  use becomes a kernel of its own. These are a few integer operations that
  fuse into whatever uses them. inf, NaN and 0 stay as they are; a result
  beyond the dtype's range is inf or 0, as with ``jnp.ldexp``.
  """
  x = jnp.asarray(x)
  finfo = jnp.finfo(x.dtype)
  k = jnp.asarray(k).astype(jnp.int32)
  lo, hi = finfo.minexp, finfo.maxexp - 1

  def power(j):  # 2^j for j clipped to [lo, hi]
    return _from_exponent_bits(jnp.clip(j, lo, hi), x.dtype)

  k = jnp.clip(k, 3 * lo, 3 * hi)  # beyond: 0 or inf for every finite x
  # k/4 rounded toward 0 by a shift, not a division (XLA copies shifts into
  # each consumer): every factor moves x the same way, so none underflows first.
  a = jnp.sign(k) * (jnp.abs(k) >> 2)
  return x * power(a) * power(a) * power(a) * power(k - 3 * a)


def pow2_split(norm: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(s, m)``: ``s`` an exact power of two and ``m = norm·s``, in [0.5, 1) when possible.

  Then ``x/norm = (x·s)/m``: for ``|x| <= norm`` the product ``x·s`` is at
  most 1 and ``1/m`` at most 2, so neither step overflows or underflows where
  ``x/norm`` itself is representable. ``s`` carries no derivative (it is
  piecewise constant); ``m`` is differentiable in ``norm``. A zero, infinite
  or NaN norm gives ``s = 1``.
  """
  norm = jnp.asarray(norm)
  s = lax.stop_gradient(pow2(pow2_exponent(lax.stop_gradient(norm)), norm.dtype))
  return s, norm * s


def pow2_inverse(norm: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(s, inv)`` with ``x/norm = (x·s)·inv``; ``inv = 0`` for a zero or NaN norm.

  :func:`pow2_split` with the division done: ``inv = 1/(norm·s)`` is at most
  2. A zero norm gives 0 (the direction of a zero vector is taken as 0), a
  NaN norm too, so the finite entries of a vector with a NaN entry stay
  finite; an infinite norm gives ``inv = 0``.
  """
  s, m = pow2_split(norm)
  return s, safe_divide(1, jnp.where(m > 0, m, 0))


def scale_tree(tree: Any, *factors: Any) -> Any:
  """Multiplies every leaf by each of ``factors`` in turn, in at least float32.

  Each factor is a scalar or a pytree prefix of ``tree`` (e.g. one scalar per
  leaf). The products are formed in the factors' dtype (at least float32) and
  rounded to the leaf's dtype once, so float16 leaves are scaled precisely
  even when an intermediate product would underflow float16. None leaves stay
  None; Python-number leaves become arrays. One fused elementwise op per leaf.
  """

  def scale(leaf, *fs):
    if leaf is None:
      return None

    def product(x, *fs):
      for f in fs:
        x = x * f
      return x

    return upcast(product, leaf, *fs)

  full = [broadcast_prefix(f, tree) for f in factors]
  return jax.tree.map(scale, tree, *full, is_leaf=lambda x: x is None)


def broadcast_prefix(factor: Any, tree: Any) -> Any:
  """``factor`` (a scalar, or a pytree prefix of ``tree``) with one entry per leaf of ``tree``.

  Raises:
    ValueError: ``factor`` is a pytree but not a prefix of ``tree``.
  """
  is_none = lambda x: x is None
  if not jax.tree.leaves(factor) or jax.tree.leaves(factor)[0] is not factor:
    # None in ``factor`` is an empty subtree: it matches only None (no leaves) in ``tree``.
    return jax.tree.map(
      lambda f, sub: jax.tree.map(lambda _: f, sub, is_leaf=is_none), factor, tree
    )
  return jax.tree.map(lambda _: factor, tree, is_leaf=is_none)


def _clip_parts(norm: Any, max_norm: Any, r: Any = None):
  """(over, s, ratio): clip iff ``over``; then the factor is s·ratio = max_norm/(norm·r).

  ``r`` (an exact power of two, default 1) lets a norm beyond the largest
  float be given as ``norm·r`` with ``norm`` finite.
  """
  norm = jnp.asarray(norm)
  max_norm = jnp.asarray(max_norm, norm.dtype)
  max_norm = jnp.where(max_norm > 0, max_norm, 0)
  r = jnp.ones((), norm.dtype) if r is None else lax.stop_gradient(jnp.asarray(r, norm.dtype))
  over = (norm * r > max_norm) | (max_norm == 0)
  s, m = pow2_split(norm)
  s = jnp.where(over, s, 1)
  # Only the selected branch may see the real norm: the other one must not
  # produce inf·0 = NaN in the backward pass (e.g. 1/m² for a tiny m).
  ratio = _ratio(jnp.where(over, max_norm, 1), jnp.where(over & (norm > 0), m, 1))
  return over, jnp.where(over, 1 / r, 1), s, jnp.where(over, ratio, 1)


def clip_factor(norm: jax.Array, max_norm: jax.Array | float) -> jax.Array:
  """The factor min(1, max_norm/norm): exactly 1 at or below the threshold.

  NaN-free with finite derivatives everywhere, zero included. A threshold of
  0 gives the factor 0 (also at norm 0, so the derivative of the clipped update
  ``factor·g ≡ 0`` is 0 there too); a negative or NaN threshold — possible only
  when traced — acts as 0. A NaN norm gives 1 (the update is left as it is),
  an infinite one 0. The factor itself underflows for ``max_norm/norm`` below
  the smallest normal number (1e38 clipped to 1 in float32): apply
  :func:`clip_scales` to an update instead.
  """
  norm = jnp.asarray(norm)
  _, _, s, ratio = _clip_parts(norm, max_norm)
  return (ratio * s).astype(norm.dtype)


def clip_scales(
  norm: jax.Array, max_norm: jax.Array | float, r: Any = None
) -> tuple[jax.Array, ...]:
  """``(s, f)`` with ``s·f = clip_factor(norm, max_norm)``, for ``scale_tree(g, s, f)``.

  With ``r`` the norm is ``norm·r`` (:func:`gnorm_jax._norms.tree_norm_split`)
  and the factors are ``(1/r, s, f)``, applied in that order: ``g/r`` is at
  most ``norm``, so a finite update whose norm overflows is clipped like any
  other (``s/r`` as one factor could be subnormal).

  ``s`` is an exact power of two and ``f`` lies in [0, 2·max_norm], so ``(g·s)·f``
  neither overflows nor flushes to zero where the clipped update is
  representable. Both are exactly 1 at or below the threshold, so such
  updates pass bit-for-bit.
  """
  norm = jnp.asarray(norm)
  _, u, s, ratio = _clip_parts(norm, max_norm, r)
  return (s, ratio.astype(norm.dtype)) if r is None else (u, s, ratio.astype(norm.dtype))


@jax.custom_jvp
def _ratio(num: jax.Array, den: jax.Array) -> jax.Array:
  return num / den


@_ratio.defjvp
def _ratio_jvp(primals, tangents):
  # d(a/b) = (da − (a/b)·db)/b: no b² that underflows to 0 for tiny b.
  (num, den), (dnum, dden) = primals, tangents
  ratio = num / den
  return ratio, (dnum - ratio * dden) / den
