"""The norm: one implementation of ‖x‖ for pytrees, used by every other module.

Policy, in one place:

* ``ord=None`` (or 2) is the Euclidean norm of all leaves taken as one vector;
  ``ord=1`` is the sum of absolute values, ``ord=inf`` the largest absolute value.
* Accumulation is in at least float32 (float16/bfloat16 leaves are upcast before
  squaring), float64 for float64 leaves; the result has that accumulation dtype.
* Overflow- and underflow-safe: a one-pass sum of squares is used when it is
  finite and far from the underflow range; otherwise the entries are summed
  rescaled by a power of two, as LAPACK's ``nrm2`` does. Two forms, chosen
  when lowering (:func:`~gnorm_jax._numerics.by_platform`):

  - CPU: the rescaled pass runs only when needed, behind one ``lax.cond`` for
    all groups (leaves for :func:`leaf_norms`), and under ``vmap`` for all
    examples (a custom batching rule; a plain ``lax.cond`` would become a
    select that always pays for both paths). A CPU conditional costs nothing.
  - GPU and TPU: no conditional (each would copy its predicate to the host
    and wait). The same read of each leaf also forms its sum of squares scaled
    down and scaled up by fixed powers of two (Blue's accumulators, without
    the masks), in one variadic reduction (one kernel per leaf), and the
    result selects the one that is accurate.
* Derivatives are NaN-free: at a zero vector the derivative of every norm
  (Euclidean, 1, inf) is defined as 0 (a subgradient; for ord 1 and inf each
  zero entry contributes 0), and second derivatives are finite.
* Inputs containing ``inf`` give ``inf``; inputs containing ``nan`` give ``nan``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from gnorm_jax._checks import check_ord
from gnorm_jax._numerics import (
  accumulation_dtype,
  binary_exponent,
  by_platform,
  pairwise,
  pow2,
  pow2_inverse,
  rare_path,
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
  parts = _real_parts(leaf, acc)
  if scale is not None:
    parts = [part * scale for part in parts]
  return functools.reduce(jnp.add, [jnp.sum(part * part) for part in parts])


def _abs(x: jax.Array) -> jax.Array:
  """|x|, with the derivative 0 at x = 0 for real x (the zero subgradient; jnp.abs has 1)."""
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    return jnp.abs(x)
  return x * jnp.sign(x)


def _amax(leaf: jax.Array, acc: jnp.dtype) -> jax.Array:
  return jnp.max(_abs(leaf), initial=0).astype(acc)


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


# Compile time with many leaves: XLA compiles one kernel per distinct fused
# computation, so per leaf there is one reduction per pass (the sum of squares;
# the rescaled sum; the derivative's dot product) whose scalar inputs are that
# leaf's or its group's own scalars — never a slice of a vector of all leaves,
# which would make every leaf's kernel distinct — and no second reduction (a
# max |x| before rescaling made 1000 small leaves compile 10x slower).


def _total(sums: list[jax.Array]) -> jax.Array:
  """Σ over a list of (possibly batched) sums: elementwise adds in a balanced tree,
  which XLA fuses into their reader (a stack and a reduction would be kernels of
  their own)."""
  return pairwise(jnp.add, sums)


def _sumsqs(groups: list[list[jax.Array]]) -> tuple[list[list[jax.Array]], list[jax.Array]]:
  """Every leaf's sum of squares in its group's accumulation dtype, and every group's."""
  dtypes = [_group_dtype(g) for g in groups]
  sums = [[_sumsq(x, dtype) for x in g] for g, dtype in zip(groups, dtypes)]
  return sums, [_total(s) for s in sums]


def _all_fast(totals: list[jax.Array]) -> jax.Array:
  """Whether every group's one-pass sum is accurate (vector ops per dtype, not per group)."""
  by_dtype: dict[Any, list[jax.Array]] = {}
  for t in totals:
    by_dtype.setdefault(t.dtype, []).append(t)
  return jnp.all(jnp.stack([jnp.all(_fast_path_ok(jnp.stack(t))) for t in by_dtype.values()]))


def _scale_exponents(size: int, dtype: Any) -> tuple[int, int]:
  """``(a, b)``: Σ(x·2^-a)² cannot overflow for ``size`` finite entries, and
  Σ(x·2^b)² neither overflows nor loses a square when Σx² < tiny/eps³.

  a = ⌈(maxexp + 1 + log2 n)/2⌉ (see :func:`_rescue_exponent`). For b: every
  |x| < 2^((minexp − 3·nmant)/2), so Σ(x·2^b)² < 2^(2b + minexp − 3·nmant),
  finite for b = nmant − minexp/2 (2^115 in float32), which also makes the
  square of the smallest subnormal normal.
  """
  finfo = jnp.finfo(dtype)
  a = math.ceil((finfo.maxexp + 1 + math.log2(max(size, 1))) / 2)
  return a, finfo.nmant - finfo.minexp // 2


def _rescue_exponent(sumsq: jax.Array, group_size: int) -> jax.Array:
  """k such that Σ(x·2^k)² over a leaf neither overflows nor loses underflowed squares.

  Read off the leaf's one-pass sum of squares s (elementwise over the sums
  ``sumsq`` of a group of ``group_size`` entries), so that the rescue reads
  the entries only once more, without a max |x| pass:

  * s finite and positive: 2^2k·s in [1, 4) (in [2^-nmant, 4) if s is
    subnormal). The squares in s, and those flushed from it (below tiny,
    tiny·2^2k ≤ 4), scale to at most 4: no overflow, and what still
    underflows is below tiny relative to the sum.
  * s = 0: every |x| is below 2^(minexp/2); k = nmant − minexp/2 makes even
    the smallest subnormal's square normal without overflow.
  * s = inf (or NaN): the group's n squares summed to at least 2^(maxexp−1),
    so its largest |x| is at least 2^(maxexp/2−1)/√n; k = −⌈(maxexp + 1 +
    log2 n)/2⌉ keeps the n scaled squares' sum below 2^(maxexp−1) and the
    largest square normal (for n < 2^40).

  A smaller k (more scaling down) stays safe for the leaf; the group takes
  the smallest over its leaves, whose scaled sum is then not small, so what
  underflows elsewhere in the group is negligible next to it.
  """
  half = -(binary_exponent(sumsq) >> 1)  # s = 1.f·2^E: 2^2k·s in [1, 4); k = 64 if subnormal
  down, up = _scale_exponents(group_size, sumsq.dtype)
  return jnp.where(jnp.isfinite(sumsq), jnp.where(sumsq > 0, half, up), -down)


def _rescued(leaves: list[jax.Array], sums: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """A group's norm from a second pass, every leaf scaled by one exact power of two.

  Returned as ``(m, r)`` with norm = m·r and r an exact power of two: m stays
  finite (and normal) where the norm itself overflows (or underflows).
  """
  acc = _group_dtype(leaves)
  size = sum(x.size * (2 if jnp.iscomplexobj(x) else 1) for x in leaves)
  if len(sums) == 1:
    k = _rescue_exponent(sums[0], size)
  else:
    k = jnp.min(_rescue_exponent(jnp.stack(sums), size), axis=0)
  scale = pow2(k, acc)  # not ldexp: see pow2 (compile time with many leaves)
  total = []
  for x in leaves:
    # The barrier keeps XLA from sharing one full-size broadcast of ``scale``
    # between leaves of the same shape (a buffer of half the largest leaf, even
    # when this branch never runs); each leaf's scaling fuses into its sum.
    s, x = lax.optimization_barrier((scale, x))
    total.append(_sumsq(x, acc, s))
  # m·r is exact unless the norm itself is out of range (inf, or flushed to 0).
  return jnp.sqrt(_total(total)), 1 / scale


# Groups at least this large get their own branch in the rare path, so that one
# zero or overflowing leaf among many (leaf_norms) does not re-read them all;
# re-reading a smaller group costs less than a branch and its compile time.
_OWN_BRANCH_SIZE = 2**16


def _fast(total: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(m, r)`` of a one-pass sum of squares: (√total, 1)."""
  return jnp.sqrt(total), jnp.ones_like(total)


def _rescue(
  groups: list[list[jax.Array]], sums: list[list[jax.Array]], totals: list[jax.Array]
) -> list[tuple[jax.Array, jax.Array]]:
  """Groups whose one-pass sum is accurate keep it; the others are rescaled."""
  out = []
  for g, s, t in zip(groups, sums, totals):
    ok = _fast_path_ok(t)
    if len(groups) > 1 and sum(x.size for x in g) >= _OWN_BRANCH_SIZE:
      out.append(lax.cond(ok, lambda t=t: _fast(t), lambda g=g, s=s: _rescued(g, s)))
    else:
      out.append(jax.tree.map(lambda a, b, ok=ok: jnp.where(ok, a, b), _fast(t), _rescued(g, s)))
  return out


def _l2_norms_one(groups: list[list[jax.Array]]) -> tuple[jax.Array, jax.Array]:
  """The Euclidean norm of each group of leaves (a group is one vector), as (m, r)
  stacked [G] (:func:`_stacked`).

  The norm is m·r with r an exact power of two (1 on the fast path), so that
  a norm beyond the largest float is still known: m finite, m·r = inf.

  One pass computes every leaf's sum of squares; ONE cond checks every group,
  so the common case costs a single scalar branch however many groups there
  are. Only if some group's sum overflowed or may have lost underflowed
  squares does the rare branch run: a second, rescaled pass over the leaves
  (over a large group only if it needs it), kept only for those groups. The
  totals are passed into the branch, not summed again there: that made XLA
  fuse both passes into one huge kernel, slow to compile.
  """
  sums, totals = _sumsqs(groups)
  return _guarded(totals, lambda: _rescue(groups, sums, totals))


@jax.custom_batching.custom_vmap
def _l2_norms_batchable(groups: list[list[jax.Array]]) -> tuple[jax.Array, jax.Array]:
  return _l2_norms_one(groups)


@_l2_norms_batchable.def_vmap
def _l2_norms_vmap(axis_size, in_batched, groups):
  """Under vmap, one cond for the whole batch rather than a select per example.

  A batched predicate would turn the cond into a select that always pays for
  the rescaled branch; here every example takes the fast path unless one of
  them needs rescuing, and then each example is handled as when unbatched.
  """
  (batched,) = in_batched
  in_axes = [[0 if b else None for b in bg] for bg in batched]
  sums, totals = jax.vmap(_sumsqs, in_axes=(in_axes,), axis_size=axis_size)(groups)
  rescue = jax.vmap(_rescue, in_axes=(in_axes, 0, 0), axis_size=axis_size)
  # [B, G]: batched along the leading axis
  return _guarded(totals, lambda: rescue(groups, sums, totals), axis=1), (True, True)


def _stacked(
  pairs: list[tuple[jax.Array, jax.Array]], axis: int = 0
) -> tuple[jax.Array, jax.Array]:
  """Groups' ``(m, r)`` pairs as two arrays, stacked along ``axis``, in their widest
  dtype (exact: a wider float holds every narrower one, and r is a power of two)."""
  dtype = jnp.result_type(*[m.dtype for m, _ in pairs])
  return (
    jnp.stack([m.astype(dtype) for m, _ in pairs], axis),
    jnp.stack([r.astype(dtype) for _, r in pairs], axis),
  )


def _guarded(
  totals: list[jax.Array], rescue: Callable[[], list], axis: int = 0
) -> tuple[jax.Array, jax.Array]:
  """Every group's ``(m, r)``, stacked along ``axis`` (:func:`_stacked`): the fast
  path's unless some total needs rescuing (``rescue()``, the rare branch). One
  kernel for all square roots where the totals share a dtype."""
  if len({t.dtype for t in totals}) != 1:
    fast = lambda: _stacked([_fast(t) for t in totals], axis)
  else:
    fast = lambda: _fast(jnp.stack(totals, axis))
  return rare_path(~_all_fast(totals), lambda: _stacked(rescue(), axis), fast)


def _add3(a: tuple, b: tuple) -> tuple:
  return a[0] + b[0], a[1] + b[1], a[2] + b[2]


def _three_sums(x: jax.Array, acc: Any, sd: jax.Array, su: jax.Array, keep: int = 0) -> tuple:
  """Σx², Σ(x·sd)² and Σ(x·su)² of a leaf by ONE variadic reduction: one read, one
  kernel, whatever the backend's fusion heuristics. The first ``keep`` axes are
  not summed over (a stack of leaves: one sum per leaf)."""
  zero = jnp.zeros((), acc)
  found = [
    lax.reduce(
      (part * part, (part * sd) ** 2, (part * su) ** 2),
      (zero, zero, zero),
      _add3,
      tuple(range(keep, part.ndim)),
    )
    for part in _real_parts(x, acc)
  ]
  return functools.reduce(_add3, found)


def _l2_branchless(groups: list[list[jax.Array]]) -> tuple[jax.Array, jax.Array]:
  """The GPU/TPU form of :func:`_l2_norms_one`: no conditional.

  Each leaf is read once, by one variadic reduction, for three sums of
  squares: plain, scaled by 2^-a and by 2^b (:func:`_scale_exponents`). The
  plain sum is kept where accurate (:func:`_fast_path_ok`), the scaled-down one
  where it overflowed (or an entry is inf), the scaled-up one where it is small
  or NaN. Few kernels read the leaves: a group's leaves are concatenated
  (:func:`_concatenated`), and single leaves of one size are stacked, each
  into one reduction.
  """
  sums: list = [None] * len(groups)
  exponents = []
  # Groups of one real leaf of the same size and dtype share their scales and are
  # stacked, flattened: one reduction for all of them (XLA:GPU fuses the stack
  # into it).
  same: dict = {}
  for i, g in enumerate(groups):
    size = sum(x.size * (2 if jnp.iscomplexobj(x) else 1) for x in g)
    exponents.append(_scale_exponents(size, _group_dtype(g)))
    alone = len(g) != 1 or jnp.iscomplexobj(g[0])
    same.setdefault(i if alone else (g[0].size, g[0].dtype), []).append(i)
  big_scales = [2.0**a for a, _ in exponents]
  small_scales = [2.0**-b for _, b in exponents]
  for members in same.values():
    g = groups[members[0]]
    acc = _group_dtype(g)
    a, b = exponents[members[0]]
    # The barrier hides the scales' values: XLA would otherwise rewrite
    # (x·c)·(x·c) as (x·x)·(c·c), where x·x overflows and c·c underflows.
    sd, su = lax.optimization_barrier((jnp.asarray(2.0**-a, acc), jnp.asarray(2.0**b, acc)))
    if len(members) == 1:
      three = [_three_sums(x, acc, sd, su) for x in _concatenated(g, acc)]
      sums[members[0]] = tuple(_total([t[j] for t in three]) for j in range(3))
      continue
    for start in range(0, len(members), _CONCAT_LEAVES):
      chunk = members[start : start + _CONCAT_LEAVES]
      stack = jnp.stack([groups[i][0].reshape(-1) for i in chunk])
      stacked = _three_sums(stack, acc, sd, su, keep=1)
      for k, i in enumerate(chunk):
        sums[i] = tuple(t[k] for t in stacked)
  if len({s[0].dtype for s in sums}) == 1:
    # every group's choice in one kernel: [G] sums, the scales as constants
    plain, down, up = (jnp.stack([s[j] for s in sums]) for j in range(3))
    big, small = (jnp.asarray(x, plain.dtype) for x in (big_scales, small_scales))
    return _choose(plain, down, up, big, small)
  return _stacked(
    [
      _choose(p, d, u, jnp.asarray(bs, p.dtype), jnp.asarray(ss, p.dtype))
      for (p, d, u), bs, ss in zip(sums, big_scales, small_scales)
    ]
  )


# Leaves per concatenation in :func:`_concatenated`: well within XLA:GPU's budget
# of operands for one fusion, so that the concatenation always fuses into its
# reduction rather than being copied.
_CONCAT_LEAVES = 32


def _concatenated(leaves: list[jax.Array], acc: Any) -> list[jax.Array]:
  """A group's leaves as few vectors with the same sums of squares: flattened (real
  and imaginary parts apart) and concatenated, up to :data:`_CONCAT_LEAVES` at a
  time. XLA:GPU fuses a concatenation into the reduction that reads it, so a
  group of many leaves is read by one kernel rather than one per leaf (the
  GPU/TPU form only: XLA:CPU copies a concatenation)."""
  parts = [p for x in leaves for p in _real_parts(x, acc)]
  if len(parts) == 1:
    return parts
  flat = [p.reshape(-1) for p in parts]
  return [
    jnp.concatenate(flat[i : i + _CONCAT_LEAVES]) for i in range(0, len(flat), _CONCAT_LEAVES)
  ]


def _choose(plain, down, up, big, small) -> tuple[jax.Array, jax.Array]:
  """``(m, r)`` from the three sums of squares of :func:`_l2_branchless` (``big`` and
  ``small``: r where the scaled-down or scaled-up sum is taken)."""
  ok = _fast_path_ok(plain)
  large = jnp.isinf(plain)
  m = jnp.where(ok, plain, jnp.where(large, down, up))
  r = jnp.where(ok, jnp.ones_like(plain), jnp.where(large, big, small))
  return jnp.sqrt(m), r


def _l2_by_platform(groups: list[list[jax.Array]]) -> tuple[jax.Array, jax.Array]:
  return by_platform(_l2_norms_batchable, _l2_branchless, groups)


@jax.custom_jvp
def _l2_norms(groups: list[list[jax.Array]]) -> tuple[jax.Array, jax.Array]:
  """The Euclidean norms as (m, r) stacked [G] (:func:`_stacked`), with a NaN-free
  derivative; see :func:`by_platform`. ``groups`` is not empty."""
  return _l2_by_platform(groups)


@_l2_norms.defjvp
def _l2_norms_jvp(primals, tangents):
  (groups,), (dgroups,) = primals, tangents
  ms, rs = _l2_norms(groups)
  dms = [_l2_jvp(ms[i], rs[i], g, dg) for i, (g, dg) in enumerate(zip(groups, dgroups))]
  return (ms, rs), (jnp.stack([d.astype(ms.dtype) for d in dms]), jnp.zeros_like(rs))


def _l2_jvp(
  m: jax.Array, r: jax.Array, leaves: list[jax.Array], dleaves: list[jax.Array]
) -> jax.Array:
  """dm for ‖x‖ = m·r: d‖x‖/r with d‖x‖ = Re<x/‖x‖, dx>, and 0 at x = 0 (the zero subgradient).

  x/‖x‖ is formed as (x·2^k/r)/(m·2^k) with m·2^k in [0.5, 1): 1/‖x‖ alone
  is subnormal (flushed to 0) for norms above 1/tiny (1e38 in float32), and
  its derivative −1/‖x‖² overflows for norms below 1e-19, which made second
  derivatives −inf there. Both stay NaN-free at 0.
  """
  s, inv = pow2_inverse(m)
  r = lax.stop_gradient(r)
  # x/r is at most m, finite; s/r alone could be subnormal (2^-127).
  to_m = 1 / r
  dots = []
  for x, dx in zip(leaves, dleaves):
    dtype = jnp.promote_types(x.dtype, m.dtype)
    unit = ((x.astype(dtype) * to_m.astype(dtype)) * s.astype(dtype)) * inv.astype(dtype)
    dots.append(jnp.real(jnp.sum(jnp.conj(unit) * dx)).astype(m.dtype))
  return _total(dots) / r


def _other_norm(leaves: list[jax.Array], ord: Any) -> tuple[jax.Array, jax.Array]:
  """ord 1 (sum of |x|) or inf (max |x|) of ``leaves`` taken as one vector, as (m, r).

  A sum of |x| that overflows is taken again scaled by 2^-64 (r = 2^64):
  finite entries can then no longer overflow it.
  """
  acc = _group_dtype(leaves)
  if ord != 1:
    amax = jnp.max(jnp.stack([_amax(x, acc) for x in leaves]))
    return amax, jnp.ones_like(amax)

  def l1(scale):
    return sum(jnp.sum(_abs(x).astype(acc) * scale) for x in leaves)

  total = l1(1)
  one = jnp.ones((), acc)

  def cpu():
    return rare_path(
      ~jnp.isfinite(total),
      lambda: (l1(jnp.asarray(2.0**-64, acc)), one * 2.0**64),
      lambda: (total, one),
    )

  def default():  # both sums from one read of each leaf; no conditional
    small = l1(lax.optimization_barrier(jnp.asarray(2.0**-64, acc)))
    ok = ~jnp.isinf(total)
    return jnp.where(ok, total, small), jnp.where(ok, one, one * 2.0**64)

  return by_platform(cpu, default)


# Jitted so that eager calls compile once per tree structure and shapes instead
# of dispatching (and compiling the conds) op by op; inlined under an outer jit.
@functools.partial(jax.jit, static_argnames="ord")
def _norms_stacked(groups: list[list[jax.Array]], ord: Any) -> tuple[jax.Array, jax.Array]:
  """One norm per group of leaves (``groups`` not empty), as (m, r) [G] with
  norm = m·r, in the groups' widest dtype; ``ord`` already checked."""
  if ord is None or ord == 2:
    return _l2_norms(groups)
  return _stacked([_other_norm(g, ord) for g in groups])


def _norms(groups: list[list[jax.Array]], ord: Any) -> list[tuple[jax.Array, jax.Array]]:
  """:func:`_norms_stacked` as one (m, r) pair per group, in its own dtype."""
  if not groups:
    return []
  ms, rs = _norms_stacked(groups, ord)
  dtypes = [_group_dtype(g) for g in groups]
  return [(ms[i].astype(d), rs[i].astype(d)) for i, d in enumerate(dtypes)]


def tree_norm(tree: Any, ord: int | float | None = None) -> jax.Array:
  """The norm of all leaves of a pytree taken as one vector.

  Unlike ``sqrt(sum(x**2))`` it neither overflows nor underflows, accumulates float16 and
  bfloat16 in float32, and has derivative 0, not NaN, at zero: see the norms guide.

  Args:
    tree: a pytree of floating-point or complex arrays (None leaves skipped; empty: norm 0.0).
    ord: None or 2 (Euclidean), 1 or ``inf``.

  Returns:
    A scalar in the accumulation dtype (at least float32); ``inf`` or ``nan`` if an entry is.

  Raises:
    TypeError: a leaf is an integer or bool array (the message names its path).
    ValueError: ``ord`` is not one of the accepted values.

  Examples:
    >>> import jax.numpy as jnp, gnorm_jax
    >>> float(gnorm_jax.tree_norm({"w": jnp.array([3.0, 0.0]), "b": jnp.array(4.0)}))
    5.0
    >>> float(gnorm_jax.tree_norm(jnp.array([1e20, 1e20])))  # no overflow in float32
    1.4142135...e+20

  References:
    Blue 1978, https://doi.org/10.1145/355769.355771; Anderson 2017,
    https://doi.org/10.1145/3061665.
  """
  m, r = tree_norm_split(tree, ord)
  return m * r


def tree_norm_split(tree: Any, ord: Any = None) -> tuple[jax.Array, jax.Array]:
  """:func:`tree_norm` as ``(m, r)``: norm = m·r, r an exact power of two.

  m is finite whenever every entry is (r = 1 on the common path), even where
  the norm overflows to inf: clipping divides by m and multiplies by 1/r, so
  an update of norm 4e38 in float32 is clipped, not zeroed. m carries the
  derivative, r none.
  """
  check_ord(ord)
  leaves = _checked_leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32)
  return _norms([leaves], ord)[0]


def leaf_norms(tree: Any, ord: int | float | None = None) -> Any:
  """One norm per leaf: a pytree of scalars with the structure of ``tree``.

  Each leaf's norm follows :func:`tree_norm`'s numerical contract (dtype, overflow safety,
  NaN-free derivatives); None leaves stay None. Useful for per-layer logging and clipping.

  Args:
    tree: a pytree of floating-point or complex arrays.
    ord: None or 2 (Euclidean), 1 or ``inf``.

  Returns:
    A pytree with the structure of ``tree`` of scalar norms, each in its leaf's accumulation
    dtype (``inf``/``nan`` as in :func:`tree_norm`).

  Raises:
    TypeError: a leaf is an integer or bool array (the message names its path).
    ValueError: ``ord`` is not one of the accepted values.

  Examples:
    >>> import jax.numpy as jnp, gnorm_jax
    >>> norms = gnorm_jax.leaf_norms({"w": jnp.array([3.0, 4.0]), "b": jnp.zeros(2)})
    >>> {k: float(v) for k, v in norms.items()}
    {'b': 0.0, 'w': 5.0}
  """
  ms, rs = leaf_norms_split(tree, ord)
  return jax.tree.map(lambda m, r: m * r, ms, rs)


def leaf_norms_split(tree: Any, ord: Any = None) -> tuple[Any, Any]:
  """:func:`leaf_norms` as two trees ``(m, r)``, leaf by leaf as in :func:`tree_norm_split`."""
  check_ord(ord)
  leaves = _checked_leaves(tree)
  pairs = _norms([[x] for x in leaves], ord)
  treedef = jax.tree.structure(tree)
  return (
    jax.tree.unflatten(treedef, [m for m, _ in pairs]),
    jax.tree.unflatten(treedef, [r for _, r in pairs]),
  )


def stacked_group_norms(groups: list[list[jax.Array]]) -> tuple[jax.Array, jax.Array]:
  """The Euclidean norm of each group of leaves (``groups`` not empty; a group is one
  vector) as ``(m, r)``, two arrays [G] in the groups' widest accumulation dtype
  with norm = m·r: what engines that combine many norms use (no slice per group)."""
  return _norms_stacked(groups, None)


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
