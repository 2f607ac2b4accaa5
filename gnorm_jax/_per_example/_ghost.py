"""The ghost route: per-example norms from factors, never a per-example gradient.

A use whose per-example gradient is Σ_t P_t ⊗ Q_t over two groups of the leaf's
axes has the squared norm Σ_ts ⟨P_t,P_s⟩⟨Q_t,Q_s⟩ (Goodfellow 2015; Li et al.
2021). All uses of a leaf whose layouts agree stack along positions, so
cross terms between uses are part of the norm. The sum is formed on factors
rescaled per example by powers of two (no overflow, no underflow), with an
error bound: an example whose sum may have lost more than ``GHOST_RTOL`` to
cancellation (or is not finite) is flagged and recomputed exactly. On CPU
every flagged example is recomputed, behind one ``lax.cond``; on GPU and TPU
(no conditional: :func:`~gnorm_jax._numerics.by_platform`) the ``RESCUED``
worst examples are recomputed on every call, and any further flagged one
takes the bound's upper end, √(s + error bound) ≥ its norm, so that its clip
weight never exceeds the exact one (:func:`rescue_worst`). With clip
weights wᵢ the clipped sum Σᵢ wᵢ Σ_t P_t ⊗ Q_t is one contraction of the
same factors (book-keeping, Bu et al. 2023).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from gnorm_jax._norms import safe_sqrt
from gnorm_jax._numerics import by_platform, ldexp, pairwise, pow2_exponent, rare_path
from gnorm_jax._per_example._program import chain_layout
from gnorm_jax._per_example._rules import Dense, Ghost, Index, Use

# Relative error above which a ghost sum is recomputed exactly.
GHOST_RTOL = 1e-3
# On GPU/TPU, the number of flagged examples recomputed per leaf (or per
# streamed scan) on every call, whether or not any is flagged.
RESCUED = 2


def acc_dtype(dtype) -> jnp.dtype:
  """The accumulation dtype: at least float32 (complex kept)."""
  return jnp.promote_types(dtype, jnp.float32)


def divided(x: jax.Array, divisor: Any, dtype: Any = None) -> jax.Array:
  """``x/divisor`` (a scalar; None: no division), divided in at least float32
  (B·boost can exceed float16's range) and rounded once to ``dtype`` (default:
  ``x``'s)."""
  if divisor is None:
    return x.astype(x.dtype if dtype is None else dtype)
  acc = acc_dtype(x.dtype)
  quotient = x.astype(acc) / jnp.asarray(divisor).astype(jnp.finfo(acc).dtype)
  return quotient.astype(x.dtype if dtype is None else dtype)


def keep_rows(keep: jax.Array, x: Any) -> Any:
  """``x`` [B, ...] with the rows where ``keep`` is False set to 0 (floats only)."""
  if x is None or not jnp.issubdtype(x.dtype, jnp.inexact):
    return x
  return jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0)


def weighted_rows(
  x: jax.Array,
  scale: jax.Array | None,
  weights: jax.Array | None,
  keep: jax.Array | None,
  dtype: Any,
  flat: bool = False,
) -> jax.Array:
  """``x`` [B, ...] with each row multiplied by its ``scale`` (a power of two), then,
  in ``dtype``, by its weight, and the rows where ``keep`` is False zeroed (each
  step stays representable; None: skipped).

  Weighed as [B, n] where ``flat`` (per-example gradients, which XLA then
  reduces over the batch in one pass with the weighting) or where ``x`` is
  [B, 1, ..., 1, N]: a dense layer's bias (its cotangent [B, N]) and its
  kernel's cotangent factor ([B, 1, 1, N]) then weigh the same values by the
  same operations, and XLA computes them once (it does not merge passes that
  differ by a reshape). Other factors keep their shape: reshaping one stacked
  by a scan would make XLA copy it into row-major order first."""
  shape = x.shape
  if flat or (x.ndim > 2 and all(d == 1 for d in shape[1:-1])):
    x = x.reshape(shape[0], -1)
  col = (-1,) + (1,) * (x.ndim - 1)
  if scale is not None:
    x = x * scale.astype(x.dtype).reshape(col)
  x = x.astype(dtype)
  if weights is not None:
    x = x * weights.astype(dtype).reshape(col)
  if keep is not None:
    x = keep_rows(keep, x)
  return x.reshape(shape)


def use_ghost(use: Use, operands: tuple, cot: jax.Array, ndim: int) -> Ghost | None:
  """The use's ghost factors for batched ``operands`` and ``cot``, or None.

  Inside scans the rule sees the steps as extra examples; its factors are then
  folded back: steps of a "const" scope become positions, steps of an "xs"
  scope (each its own slice of the leaf) become heads.
  """
  if use.rule.ghost is None:
    return None
  lay = chain_layout(use, ndim)
  if lay is None:
    return None
  perm, coef, scope_heads = lay
  b, steps = cot.shape[0], use.steps
  n = len(steps)

  def merge(x):
    return None if x is None else x.reshape((b * math.prod(steps),) + x.shape[1 + n :])

  g = use.rule.ghost(use, [merge(o) for o in operands], merge(cot), perm, coef)
  if g is None or not steps:
    return g
  head, pg, qg = g.layout
  if (
    any(not isinstance(e, int) for e in head)
    or scope_heads != sorted(scope_heads)
    or (head and scope_heads and max(scope_heads) >= min(head))
  ):
    return None  # the heads would not be in leaf-axis order
  kinds = [k for k, _ in use.scopes]
  xs_ax = [1 + i for i, k in enumerate(kinds) if k == "xs"]
  c_ax = [1 + i for i, k in enumerate(kinds) if k == "const"]

  def fold(x):  # [B·L…, H, T, (K)] -> [B, L_xs…·H, L_const…·T, (K)]
    x = x.reshape(b, *steps, *x.shape[1:])
    order = [0, *xs_ax, 1 + n, *c_ax, 2 + n, *range(3 + n, x.ndim)]
    x = jnp.transpose(x, order)
    h = math.prod(x.shape[1 : 2 + len(xs_ax)])
    t = math.prod(x.shape[2 + len(xs_ax) : 3 + n])
    return x.reshape(b, h, t, *x.shape[3 + n :])

  layout = (tuple(sorted([*scope_heads, *head])), pg, qg)
  p = (
    Index(fold(g.p.index), fold(g.p.valid), g.p.size)
    if isinstance(g.p, Index)
    else Dense(fold(g.p.value), g.p.kind)
  )
  return Ghost(layout, p, Dense(fold(g.q.value), g.q.kind))


def _conj(x):
  return jnp.conj(x) if jnp.iscomplexobj(x) else x


def _gram(x, y, looped: bool = False):
  """Each example's Gram [B, H, T, S] of the rows of ``x`` and ``y`` [B, H, T|S, K].

  ``looped`` (the CPU form): where the rows are long (K at least LOOPED_K and
  16·T: an output layer's logits cotangent), one matrix product per example in
  a loop over the batch. XLA:CPU runs the batched product of such operands at
  about half the rate of B separate ones (an [64, 8000] Gram at B=32: 82 against
  45 ms); the values are the same.
  """
  if looped and x.shape[-1] >= max(LOOPED_K, 16 * max(x.shape[2], y.shape[2])):
    return lax.map(
      lambda ab: jnp.einsum("htk,hsk->hts", ab[0], _conj(ab[1]), precision=lax.Precision.HIGHEST),
      (x, y),
    )
  return jnp.einsum("bhtk,bhsk->bhts", x, _conj(y), precision=lax.Precision.HIGHEST)


# Row length from which the CPU form forms Grams one example at a time (:func:`_gram`).
LOOPED_K = 2048


def _amax(x: jax.Array, acc) -> jax.Array:
  return jnp.max(jnp.abs(x), axis=tuple(range(1, x.ndim)), initial=0).astype(acc)


def ghosts(uses: list[Use], operands: dict, cots: dict, ndim: int) -> list[Ghost | None]:
  return [use_ghost(u, operands[u.key], cots[u.key], ndim) for u in uses]


def planned_ghosts(uses: list[Use], operands: dict, cots: dict, ndim: int) -> list[Ghost]:
  """:func:`ghosts` of a leaf the plan routed to "ghost": every use has factors (the
  plan found them on the same shapes)."""
  gs = ghosts(uses, operands, cots, ndim)
  found = [g for g in gs if g is not None]
  if len(found) != len(gs):
    raise AssertionError("a use of a ghost-routed leaf has no ghost factors")
  return found


def outer_factors(gs: list[Ghost]) -> tuple[jax.Array, jax.Array] | None:
  """``(P, Q)`` [B, 1, 1, K] when each example's gradient of the leaf is one outer
  product P ⊗ Q (one use, at one position, with one head and dense factors), or
  None. Its norm is then ‖P‖·‖Q‖: two reductions of the norm core, shared with
  the other leaves, instead of a Gram with its own scaling."""
  if len(gs) != 1 or not isinstance(gs[0].p, Dense) or gs[0].q.value.shape[1:3] != (1, 1):
    return None
  return gs[0].p.value, gs[0].q.value


def can_cancel(gs: list[Ghost]) -> bool:
  """Whether the ghost sum has several positions, whose terms may cancel. At one
  position the sum is one product ‖P‖²‖Q‖², which cannot cancel; a non-finite
  one is what the exact gradient gives too."""
  return sum(g.q.value.shape[2] for g in gs) > 1


def rescue(
  norms: list[jax.Array],
  suspect: list[jax.Array],
  upper: list[jax.Array],
  one: Callable[[Any], jax.Array],
  examples: Any,
) -> list[jax.Array]:
  """``norms`` (L columns [B], one per leaf) with the ``suspect`` entries recomputed,
  by platform.

  ``one(example)`` gives one example's exact norms [L] from its slice of
  ``examples`` (a pytree of arrays with a leading batch axis). CPU: every
  example with a suspect entry, one at a time, behind one ``lax.cond``.
  GPU/TPU: :func:`rescue_worst`.
  """

  def exact_one(example):
    return one(example).astype(norms[0].dtype)

  def cpu():
    n, s = jnp.stack(norms, axis=1), jnp.stack(suspect, axis=1)
    rows = jnp.any(s, axis=1)
    zeros = jnp.zeros(n.shape[1:], n.dtype)

    def each(args):
      flag, example = args
      return lax.cond(flag, lambda: exact_one(example), lambda: zeros)

    def recomputed():
      return jnp.where(s, lax.map(each, (rows, examples)), n)

    out = rare_path(jnp.any(rows), recomputed, lambda: n)
    return [out[:, j] for j in range(len(norms))]

  def default():
    def exact_at(idx):
      return jax.vmap(exact_one)(jax.tree.map(lambda x: x[idx], examples))

    return rescue_worst(norms, suspect, upper, exact_at)

  return by_platform(cpu, default)


def rescue_worst(
  norms: list[jax.Array],
  suspect: list[jax.Array],
  upper: list[jax.Array],
  exact_at: Callable[[jax.Array], jax.Array],
) -> list[jax.Array]:
  """The ``RESCUED`` worst examples recomputed, any further suspect entry at ``upper``
  (L columns [B] each; ``exact_at(idx)``: the exact norms [len(idx), L]).

  Examples are ranked by their largest ``upper/norm`` over suspect entries
  (a non-finite or zero norm first); the work is the same whatever the data,
  so there is no conditional. An example beyond the ``RESCUED`` worst keeps
  the upper end of its error bound, which is never below its norm: its clip
  weight is at most the exact one (a clipped example's contribution stays
  within the threshold). Column by column, with neither a stack nor a scatter:
  the ranking and the recomputed values' placement are elementwise, and XLA
  fuses them into the kernels that read the norms.
  """
  b = norms[0].shape[0]

  def priority(n, s, u):
    finite = jnp.isfinite(u) & (n > 0)
    ratio = jnp.where(finite, u / jnp.where(finite, n, 1), jnp.inf)
    return jnp.where(s, ratio, -jnp.inf)

  worst = pairwise(jnp.maximum, [priority(*c) for c in zip(norms, suspect, upper)])
  _, at = lax.top_k(worst, min(RESCUED, b))  # one op (XLA TopK), no loop
  fixed = exact_at(at)
  rows = jnp.arange(b)
  out = []
  for j, (n, s, u) in enumerate(zip(norms, suspect, upper)):
    col = jnp.where(s, u.astype(n.dtype), n)
    for i in range(at.shape[0]):  # distinct rows (top_k's)
      col = jnp.where((rows == at[i]) & s, fixed[i, j], col)
    out.append(col)
  return out


def ghost_terms(gs: list[Ghost]) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """([B] ghost norms m, [B] int32 exponents e: the norm is m·2^e; [B] bool: the sum
  may have lost more than GHOST_RTOL; [B] an upper bound of m, √(s + error bound)).

  m is formed from the factors scaled per example, so it neither overflows nor
  underflows; m·2^e may (a norm beyond float32's largest is still known)."""
  # (P, Q) factors of the uses, those with dense P first.
  dense = [(g.p, g.q) for g in gs if isinstance(g.p, Dense)]
  index = [(g.p, g.q) for g in gs if isinstance(g.p, Index)]
  acc = acc_dtype(
    jnp.result_type(*[g.q.value.dtype for g in gs], *[p.value.dtype for p, _ in dense])
  )
  real = jnp.finfo(acc).dtype
  # Per-example powers of two: every term of the sum has two cotangent factors,
  # and (without index factors) two activation factors.
  kinds: dict[str, list[jax.Array]] = {"cot": [], "act": []}
  for g in gs:
    for f in (g.p, g.q):
      if isinstance(f, Dense):
        kinds[f.kind].append(_amax(f.value, real))
  e = {
    k: -pow2_exponent(jnp.max(jnp.stack(v), axis=0)) if v and (k == "cot" or not index) else None
    for k, v in kinds.items()
  }
  exps = [x for x in e.values() if x is not None]
  shift = jnp.zeros(gs[0].q.value.shape[:1], jnp.int32)
  for x in exps:
    shift = shift + x.astype(jnp.int32)
  # Every term of the sum holds each scaled kind twice: forming it on the
  # factors as they are and scaling the small results by 2^(2·shift) gives the
  # same sum (powers of two), with no copy of a factor, wherever no product can
  # overflow or underflow: every factor's largest entry within 2^±RAW_RANGE.
  safe = jnp.all(jnp.stack([jnp.all(jnp.abs(x) <= RAW_RANGE) for x in exps] or [True]))

  def scaled(f: Dense) -> jax.Array:
    x = f.value.astype(acc)
    exponent = e[f.kind]
    if exponent is None:
      return x
    return x * ldexp(jnp.ones((), real), -exponent)[:, None, None, None]

  def raw(f: Dense) -> jax.Array:
    return f.value.astype(acc)

  def terms(form: Callable[[Dense], jax.Array], factor: jax.Array, looped: bool):
    s, bound = _ghost_sum(dense, index, form, acc, looped)
    return s * factor, bound * factor

  def on_factors(looped: bool):
    return terms(scaled, jnp.ones(shift.shape, real), looped)

  def on_results():
    # 2^(-2·shift) in two steps: each stays a normal number
    half = ldexp(jnp.ones((), real), -shift)
    return terms(raw, half * half, True)

  # (looped: the CPU form's Grams of long rows, :func:`_gram`)
  s, bound = by_platform(
    lambda: rare_path(~safe, lambda: on_factors(True), on_results), lambda: on_factors(False)
  )
  t = sum(q.value.shape[2] for _, q in dense + index)
  k = gs[0].q.value.shape[3] + max([p.value.shape[-1] for p, _ in dense], default=1)
  err = 4 * float(jnp.finfo(real).eps) * (math.sqrt(k) + t)  # |error of s| <= err·bound
  suspect = ~jnp.isfinite(s) | (s < err / GHOST_RTOL * bound)
  upper = jnp.sqrt(jnp.maximum(s, 0) + err * bound)
  # safe_sqrt: the derivative at s = 0 (an example whose gradient is 0) is 0, not NaN.
  return safe_sqrt(jnp.maximum(s, 0)), shift, suspect, lax.stop_gradient(upper)


# Largest |exponent| of a factor's per-example power of two at which the ghost
# sum is formed on the factors as they are (CPU): products of four entries
# within 2^±64, summed over up to 2^60 terms, stay finite and far above
# float32's smallest normal number.
RAW_RANGE = 16


def _ghost_sum(
  dense: list, index: list, form: Callable, acc, looped: bool = False
) -> tuple[jax.Array, jax.Array]:
  """The ghost sum s [B] and its error bound's scale [B] of the factors ``form``
  returns (``looped``: the CPU form's Grams, :func:`_gram`)."""
  q = jnp.concatenate([form(qf) for _, qf in dense + index], axis=2)
  gq = _gram(q, q, looped)
  if dense:
    pd = jnp.concatenate([form(p) for p, _ in dense], axis=2)
    gp = _gram(pd, pd, looped)
  if index:
    idx = jnp.concatenate([p.index for p, _ in index], axis=2)
    valid = jnp.concatenate([p.valid for p, _ in index], axis=2)
    ii = (
      (idx[..., :, None] == idx[..., None, :]) & valid[..., :, None] & valid[..., None, :]
    ).astype(acc)
  if dense and index:
    # ⟨d_s, onehot(i_t)⟩ = d_s[i_t]: a gather along the dense factor's last
    # axis (no transposed copy of the factor, which can be the logits' size).
    at = jnp.broadcast_to(idx[..., None, :], (*pd.shape[:3], idx.shape[-1]))  # [B,H,Td,Ti]
    dt = jnp.take_along_axis(pd, at, axis=3) * valid[..., None, :]
    blocks = [[gp, dt], [_conj(jnp.swapaxes(dt, 2, 3)), ii]]
  elif dense:
    blocks = [[gp]]
  else:
    blocks = [[ii]]
  pg = jnp.concatenate([jnp.concatenate(row, axis=3) for row in blocks], axis=2)
  terms = jnp.real(pg * gq)
  # The bound Σ_t ‖P_t‖²‖Q_t‖² is the sum of the diagonal terms (the rows'
  # squared norms are the Grams' diagonals; an index factor's is its valid
  # flag): no second pass over a factor and no gather of the diagonals. (Two
  # plain sums, not one variadic reduction: on XLA:CPU that measured 8x less
  # accurate on a tied output layer, 1.1e-6 against 1.3e-7 of float64.)
  t = terms.shape[-1]
  on_diagonal = jnp.arange(t)[:, None] == jnp.arange(t)[None, :]
  s = jnp.sum(terms, axis=(1, 2, 3))
  bound = jnp.sum(jnp.where(on_diagonal, terms, 0), axis=(1, 2, 3))
  return s, bound


def factor_grads(
  gs: list[Ghost],
  w: jax.Array,
  weights: jax.Array | None = None,
  keep: jax.Array | None = None,
  scale: jax.Array | None = None,
  divisor: jax.Array | None = None,
) -> jax.Array:
  """Σ_t P_t ⊗ Q_t in the leaf's layout: [B, *w.shape] per example, or with
  ``weights`` the book-keeping sum Σᵢ wᵢ Σ_t P_t ⊗ Q_t, [*w.shape], divided by
  ``divisor`` (a scalar) if given. Each example's cotangent factor is multiplied
  by its ``scale`` (a power of two), then by its weight; rows where ``keep`` is
  False are then zeroed (a non-finite example cannot reach the sum through 0·inf)."""
  head, pa, qa = gs[0].layout
  total: jax.Array | int = 0
  for g in gs:
    q = weighted_rows(g.q.value, scale, weights, keep, g.q.value.dtype)
    if isinstance(g.p, Index):
      b, h, t = g.p.index.shape
      q = q * g.p.valid[..., None].astype(q.dtype)
      hi = jnp.arange(h)[None, :, None]
      if weights is None:
        bi = jnp.arange(b)[:, None, None]
        rows = jnp.zeros((b, h, g.p.size, q.shape[-1]), q.dtype)
        total = total + rows.at[bi, hi, g.p.index].add(q)
      else:
        rows = jnp.zeros((1, h, g.p.size, q.shape[-1]), q.dtype)
        total = total + rows.at[0, hi, g.p.index].add(q)
    else:
      pv = g.p.value if keep is None else keep_rows(keep, g.p.value)
      spec = "bhtp,bhtq->bhpq" if weights is None else "bhtp,bhtq->hpq"
      out = jnp.einsum(spec, pv, q, precision=lax.Precision.HIGHEST)
      total = total + (out if weights is None else out[None])
  if isinstance(total, int):  # not reached: gs[0] above fails for no ghosts
    raise ValueError("factor_grads needs at least one ghost")
  b = total.shape[0]
  groups = [e for e in head if not isinstance(e, int)]
  if groups:  # ("split", axis, G): G groups of one axis (grouped convolutions)
    ((_, axis, n_groups),) = groups
    sizes = [w.shape[a] // n_groups if a == axis else w.shape[a] for a in pa + qa]
    x = total.reshape(b, n_groups, *sizes)
    x = jnp.moveaxis(x, 1, 1 + (pa + qa).index(axis))
    x = x.reshape(b, *[w.shape[a] for a in pa + qa])
    order = list(pa + qa)
  else:
    order = list(head + pa + qa)
    x = total.reshape(b, *[w.shape[a] for a in order])
  x = jnp.transpose(x, [0] + [1 + order.index(j) for j in range(w.ndim)])
  x = divided(x, divisor, w.dtype)
  return x if weights is None else x[0]
