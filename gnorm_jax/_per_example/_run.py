"""Stage 4, run: executes a :class:`~._plan.Plan` on one batch.

One batched forward+backward pass (:mod:`._interpret`; or, for a ``vmap``
plan, ``jax.vmap(jax.grad(fun))`` of the user's own loss) gives the
materialized leaves' per-example gradients and every use's operands and
output cotangents. Each leaf then takes its planned route (:mod:`._ghost`,
:mod:`._direct`, :mod:`._stream`); the norm core gives the formed leaves'
norms, and each example's per-leaf norms are combined into its norm without a
conditional (:func:`_scaled_norms`). With clip weights wᵢ known, a ghost leaf's clipped sum
Σᵢ wᵢ Σ_t P_t ⊗ Q_t is one contraction of the same factors (book-keeping, Bu
et al. 2023); a direct or materialized leaf's is a weighted sum of its
per-example gradients; with streams, one weighted backward pass gives all.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from gnorm_jax._norms import tree_norm
from gnorm_jax._numerics import binary_exponent, by_platform, ldexp, pairwise, rare_path
from gnorm_jax._per_example._direct import (
  direct_grads,
  exact_norm,
  norm_dtype,
  per_example_group_norms,
  weighted_sum,
)
from gnorm_jax._per_example._ghost import (
  acc_dtype,
  can_cancel,
  divided,
  factor_grads,
  ghost_terms,
  outer_factors,
  planned_ghosts,
  rescue,
  weighted_rows,
)
from gnorm_jax._per_example._interpret import PLAIN, batched_pass
from gnorm_jax._per_example._jaxpr import Body
from gnorm_jax._per_example._plan import Plan


@dataclasses.dataclass(frozen=True, eq=False)
class Traced:
  """Stage 1, trace: the single-example loss over flat arguments.

  Attributes:
    body: its jaxpr, read by :mod:`._jaxpr`.
    params_flat: the parameter leaves.
    assemble: ``(leaves {leaf: value}, batch values) -> flat arguments of body``.
    loss: ``(parameter leaves, batch values) -> (value, aux leaves)``: the user's
      own loss for one example (what ``method="vmap"`` differentiates).
    aux_tree: the auxiliary output's tree structure (None without ``has_aux``).
    param_positions: flat argument position -> parameter leaf.
  """

  body: Body
  params_flat: list
  assemble: Callable
  loss: Callable
  aux_tree: Any
  param_positions: dict


def _loss_of(
  traced: Traced, batch_vals: list, leaves: dict | None = None, params: list | None = None
) -> jax.Array:
  """The single-example loss with some parameter leaves replaced."""
  vals = dict(enumerate(traced.params_flat if params is None else params))
  vals.update(leaves or {})
  return PLAIN(traced.body, traced.assemble(vals, batch_vals), (), {}, {})[0]


def exact_leaf_norm(traced: Traced, leaves: list) -> Callable:
  """One example's exact norms [len(leaves)] of those leaves' gradients (a full
  gradient of the example), from its batch values: ``one`` of :func:`~._ghost.rescue`."""
  params_flat = traced.params_flat

  def one(batch_vals):
    gs = jax.grad(lambda ws: _loss_of(traced, batch_vals, dict(zip(leaves, ws))))(
      [params_flat[i] for i in leaves]
    )
    return jnp.stack([tree_norm(g) for g in gs])

  return one


def weighted_grads(traced: Traced, batch_flat: list, weights, keep) -> list:
  """Σᵢ wᵢ ∇loss(xᵢ) for every leaf, by one weighted backward pass. Rows not
  kept (padding, or a non-finite gradient with ``nan_safe``) are replaced by a
  kept row before the pass (their weight is 0), so 0·inf cannot reach the sum."""
  first = jnp.argmax(keep)
  kept = [jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, x[first]) for x in batch_flat]

  def total(ps):
    losses = jax.vmap(lambda bv: _loss_of(traced, bv, params=ps))(kept)
    return jnp.sum(weights.astype(losses.dtype) * losses)

  grads = jax.grad(total)(list(traced.params_flat))
  return [jnp.where(jnp.any(keep), g, jnp.zeros_like(g)) for g in grads]


def _vmap_pass(traced: Traced, batch_flat: list):
  """jax.vmap(jax.grad(loss)) of the user's own loss: (gradients {leaf: [B, ...]}, aux)."""
  grad_fn = jax.grad(traced.loss, has_aux=True)
  grads, aux = jax.vmap(grad_fn, in_axes=(None, 0))(list(traced.params_flat), batch_flat)
  return dict(enumerate(grads)), aux


# Tests set this to a function of (plan, {leaf: route taken}) to see what a run executes.
_observe: Callable[[Plan, dict], None] | None = None


def run(
  plan: Plan,
  traced: Traced,
  batch_flat: list,
  weights_fn: Callable | None,
  mask: jax.Array | None,
  nan_safe: bool,
  groups: list[int] | None = None,
):
  """Per-example norms [B], the clipped sums Σᵢ wᵢ·(uᵢ·gᵢ)/d of every leaf (when
  ``weights_fn`` maps (partial norms [B, P], the leaves each covers, norms [B],
  the partial norms and norms divided by r, and r [B]) to each leaf's weights
  and scales (w, u) [B], its divisor d (a scalar) and whether w/d is known when
  tracing never to underflow), and the loss's auxiliary outputs stacked over
  the batch. A partial norm is that of one leaf, or of several formed leaves
  of one threshold group (``groups``: each leaf's group; None: one group). r
  is a power of two, 1 unless some partial norm of the example is beyond
  2^SCALE_ABOVE: a norm beyond float32's largest is reported inf and its
  example still clipped.

  ``mask`` [B] (False: padding) zeroes an example's norm and weight; with
  ``nan_safe`` an example whose gradient is not finite gets weight 0 (its norm
  is reported as computed) and cannot make the sums NaN.
  """
  params_flat = traced.params_flat
  program, routes, streams, b = plan.program, plan.routes, plan.streams, plan.batch_size
  dtype = jnp.result_type(*[norm_dtype(w) for w in params_flat]) if params_flat else jnp.float32
  if plan.method == "vmap":
    fb_grads, aux = _vmap_pass(traced, batch_flat)
    operands, cots = {}, {}
  else:
    fb_grads, operands, cots, aux = batched_pass(
      program.body,
      program.perturbed,
      sorted(program.fallback),
      streams,
      program.tangents,
      traced.assemble,
      params_flat,
      batch_flat,
      b,
      dtype,
    )
  # leaf -> its norms m [B] (times 2^e), suspect flags [B], upper bounds [B] (in
  # m's scale) and exponents e [B] int32
  stream_stats = {}
  for skey, st in streams.items():
    for i, leaf in enumerate(st.leaves):
      per_step = cots[skey][0][:, :, i]  # [B, steps, (m, e, suspect, upper)]
      m, up = per_step[..., 0], per_step[..., 3]
      e = per_step[..., 1].astype(jnp.int32)
      suspect_steps = per_step[..., 2] > 0
      top = jnp.max(jnp.where(jnp.isfinite(m) & (m > 0), e, jnp.iinfo(jnp.int32).min), 1)
      top = jnp.where(top == jnp.iinfo(jnp.int32).min, 0, top)  # every slice 0 (or not finite)
      down = e - top[:, None]
      stream_stats[leaf] = (
        jax.vmap(tree_norm)(ldexp(m, down)),
        jnp.any(suspect_steps, 1),
        jax.vmap(tree_norm)(ldexp(jnp.where(suspect_steps, up, m), down)),
        top,
      )
  # Partial norms m·2^e (m finite where the norm overflows), one column per leaf
  # (per group of formed leaves: ``covers``), keyed by its (first) leaf: leaf ->
  # (m [B], e [B] int32), as the stages give them: no
  # concatenation stands between the norms and the clip weights, which XLA then
  # forms in one fused pass (:func:`_scaled_norms`).
  columns: dict[int, tuple[jax.Array, jax.Array]] = {}

  if stream_stats:
    order = sorted(stream_stats)
    ms, suspects, uppers, exps = ([stream_stats[leaf][j] for leaf in order] for j in range(4))
    exact = exact_leaf_norm(traced, order)
    fixed = rescue(
      ms,
      suspects,
      uppers,
      lambda ex: ldexp(exact(ex[0]), -ex[1]),
      (batch_flat, jnp.stack(exps, axis=1)),
    )
    columns.update(zip(order, zip(fixed, exps)))
  formed, factors, taken = {}, {}, {}
  outer: dict[int, tuple] = {}  # ghost leaf -> (P, Q): its gradient is one outer product
  ghost_norms: dict[int, tuple] = {}  # ghost leaf -> its norms (m [B], e [B])
  cancel: dict[int, tuple] = {}  # ghost leaf -> (m, e, suspect, upper, one, examples)
  # One-pass streams' leaves: direct ones' per-example gradients [B, steps, ...],
  # ghost ones' (stream, kept factors).
  stream_formed: dict[int, jax.Array] = {}
  stream_ghosts: dict[int, tuple] = {}
  for skey, st in streams.items():
    if st.one_pass:
      kept = cots[skey][1]
      ops = {
        k: tuple(None if i is None else kept["ops"][i] for i in row) for k, row in st.layout.items()
      }
      factors_of = {"ops": ops, "cts": kept["cts"]}
      stream_formed.update(kept["grads"])
      stream_ghosts.update(
        {leaf: (st, factors_of) for leaf in st.leaves if st.routes[leaf] == "ghost"}
      )
  for leaf, w in enumerate(params_flat):
    route = routes[leaf].route
    uses = program.uses.get(leaf, [])
    if leaf in stream_stats:
      taken[leaf] = f"streamed {route}"
    elif route == "materialized" or plan.method == "vmap":
      formed[leaf], taken[leaf] = fb_grads[leaf], "materialized"
    elif route == "direct":
      formed[leaf], taken[leaf] = direct_grads(uses, operands, cots, w, params_flat), "direct"
    elif route == "ghost":
      factors[leaf] = planned_ghosts(uses, operands, cots, w.ndim)  # reused for the clipped sum
      taken[leaf] = "ghost"
      if (pq := outer_factors(factors[leaf])) is not None:
        outer[leaf] = pq
        continue
      m, e, suspect, upper = ghost_terms(factors[leaf])
      if can_cancel(factors[leaf]):
        cancel[leaf] = (m, e, suspect, upper, *exact_norm(uses, operands, cots, w, e))
      else:
        ghost_norms[leaf] = (m, e)
    else:  # gradient 0: no partial norm
      taken[leaf] = "unused"
  # The formed leaves' norms and the outer-product factors' in one call of the
  # norm core, the ghost sums that may cancel checked (and rescued) together:
  # per call, not per leaf.
  # The formed leaves of one threshold group share one partial norm: in the GPU/TPU
  # form, their norm core's group is read by one reduction.
  covers: dict[int, tuple[int, ...]] = {}
  if formed or outer:
    parts: dict[int, list[int]] = {}
    for leaf in sorted(formed):
      parts.setdefault(0 if groups is None else groups[leaf], []).append(leaf)
    order = [part[0] for part in parts.values()]
    covers.update((part[0], tuple(part)) for part in parts.values())
    pairs = sorted(outer)
    # Q flattened to [B, n], as a bias's per-example gradient: on CPU, where they are
    # the same cotangent, XLA computes their norms once.
    arrays = [[formed[leaf] for leaf in part] for part in parts.values()] + [
      [x] for leaf in pairs for x in (outer[leaf][0], outer[leaf][1].reshape(b, -1))
    ]
    ms, es = per_example_group_norms(arrays)
    n = len(order)
    columns.update(zip(order, zip(ms, es)))
    for i, leaf in enumerate(pairs):  # ‖P ⊗ Q‖ = ‖P‖·‖Q‖, each as m·2^e
      at = n + 2 * i
      mp, mq, ep, eq = ms[at], ms[at + 1], es[at], es[at + 1]
      # m·m overflows only at the edge (a plain sum of squares below float32's
      # largest, twice): then one factor is taken down by 2^64 first.
      m = mp * mq
      edge = jnp.isinf(m) & jnp.isfinite(mp) & jnp.isfinite(mq)
      m = jnp.where(edge, (mp * jnp.asarray(2.0**-64, mp.dtype)) * mq, m)
      columns[leaf] = (m, ep + eq + jnp.where(edge, 64, 0))
  if cancel:
    order = sorted(cancel)
    ms, suspects, uppers = ([cancel[leaf][j] for leaf in order] for j in (0, 2, 3))
    ones = [cancel[leaf][4] for leaf in order]
    fixed = rescue(
      ms,
      suspects,
      uppers,
      lambda examples: jnp.stack([one(ex) for one, ex in zip(ones, examples)]),
      [cancel[leaf][5] for leaf in order],
    )
    columns.update((leaf, (m, cancel[leaf][1])) for leaf, m in zip(order, fixed))
  columns.update(ghost_norms)
  if _observe is not None:
    _observe(plan, taken)
  keys = sorted(columns)
  covered = [covers.get(key, (key,)) for key in keys]
  part_norms, norms, scale = _scaled_norms(columns, b, dtype)
  # A row's factors or per-example gradients hold inf/NaN only if its norm does.
  all_finite = jnp.all(jnp.isfinite(norms))
  found = ldexp(norms, scale)  # the norms themselves (inf beyond float32's largest)
  keep = jnp.ones((b,), bool) if mask is None else mask
  if mask is not None:
    found = jnp.where(keep, found, 0)
    norms = jnp.where(keep, norms, 0)
    part_norms = jnp.where(keep[:, None], part_norms, 0)
  if weights_fn is None:
    return found, None, aux
  if nan_safe:
    keep = keep & jnp.isfinite(norms)
  zero_rows = keep if (nan_safe or mask is not None) else None
  r = ldexp(jnp.ones((), dtype), scale)
  # each leaf's (weights, scales, divisor, whether weights/divisor never underflows)
  quads = weights_fn(part_norms, covered, norms, r)
  divisors = [d for _, _, d, _ in quads]
  if any(not st.one_pass for st in streams.values()):
    # one weight per example: a second, weighted backward pass
    one = jnp.where(keep, quads[0][0] * quads[0][1], 0)
    sums = weighted_grads(traced, batch_flat, one, keep)
    return found, [divided(g, d) for g, d in zip(sums, divisors)], aux
  # Once per distinct weight vector and divisor (one threshold: one for all
  # leaves), so that a conditional's branches get each as one operand.
  each: dict = {}
  weights = [each.setdefault(id(wt), jnp.where(keep, wt, 0)) for wt, _, _, _ in quads]
  scales = [u for _, u, _, _ in quads]
  folded = [
    each.setdefault((id(w), id(d)), w / jnp.asarray(d).astype(w.dtype))
    for w, d in zip(weights, divisors)
  ]
  folds = [f for _, _, _, f in quads]
  # The CPU form's common path weights the sums by wᵢ/d: where no wᵢ/d underflows.
  tiny = jnp.finfo(dtype).tiny
  checks = {id(f): (f, w) for f, w, known in zip(folded, weights, folds) if not known}
  no_underflow = [jnp.all((f >= tiny) | (w == 0)) for f, w in checks.values()]
  fast = all_finite & jnp.all(scale == 0)
  if no_underflow:
    fast = fast & jnp.all(jnp.stack(no_underflow))
  formed.update(stream_formed)
  sums = clipped_sums(
    formed, factors, params_flat, weights, folded, folds, scales, divisors, zero_rows, fast
  )
  for leaf, (st, kept) in stream_ghosts.items():
    sums[leaf] = divided(
      stream_ghost_sum(st, leaf, kept, params_flat[leaf], weights[leaf], keep, scales[leaf]),
      divisors[leaf],
    )
  return found, sums, aux


def stream_ghost_sum(st, leaf: int, kept: dict, w: jax.Array, weights, keep, scale) -> jax.Array:
  """A one-pass stream's ghost leaf's clipped sum [steps, ...]: at each step,
  the book-keeping contraction of that step's kept factors (rows not kept
  zeroed, each example's cotangent factor scaled by its power of two)."""
  us = st.uses[leaf]
  keys = [u.key for u in us]

  def one_step(ops, cts, w_step):
    gs = planned_ghosts(us, ops, cts, w_step.ndim)
    return factor_grads(gs, w_step, weights, keep, scale)

  ops = {k: kept["ops"][k] for k in keys}
  cts = {k: kept["cts"][k] for k in keys}
  return jax.vmap(one_step, in_axes=(1, 1, 0))(ops, cts, w)


# Partial norms up to 2^SCALE_ABOVE are combined as they are; an example with a
# larger one has all its partial norms scaled down by one power of two first.
SCALE_ABOVE = 100


def _scaled_norms(columns: dict, b: int, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
  """From partial norms m·2^e, ``{key: (m [B], e [B] int32)}``: ``(partial norms
  [B, P], norms [B], k [B] int32)``, the columns in the keys' order, with every
  example's partial norms and norm scaled by 2^-k (k = 0 unless some partial
  norm exceeds 2^SCALE_ABOVE), so that both stay finite where the norm itself
  overflows float32. Non-finite norms stay non-finite.

  No conditional: each example's partial norms are scaled by 2^-E (2^E its
  largest) before they are squared, so that the sum neither overflows nor
  loses more than squares below 2^-126 of the largest. Column by column, with
  no concatenation: the largest exponent, the sum and the norm are one
  elementwise computation over the columns, which XLA fuses into one kernel;
  the partial norms [B, P] are stacked only where the weights read them.
  """
  if not columns:
    return jnp.zeros((b, 0), dtype), jnp.zeros((b,), dtype), jnp.zeros((b,), jnp.int32)
  leaves = sorted(columns)
  ms = [columns[leaf][0].astype(dtype) for leaf in leaves]
  es = [columns[leaf][1] for leaf in leaves]
  none = jnp.iinfo(jnp.int32).min // 2
  mags = [
    jnp.where(jnp.isfinite(m) & (m > 0), binary_exponent(m) + e, none) for m, e in zip(ms, es)
  ]
  top = pairwise(jnp.maximum, mags)
  top = jnp.where(top == none, 0, top)  # every partial norm 0 (or not finite)
  k = jnp.clip(top - SCALE_ABOVE, 0, SCALE_ABOVE)
  ts = [ldexp(m, e - top) for m, e in zip(ms, es)]  # finite ones below 2
  s = pairwise(jnp.add, [t * t for t in ts])
  root = jnp.where(s == 0, 0, jnp.sqrt(jnp.where(s == 0, 1, s)))  # derivative 0 at 0
  norms = ldexp(root, top - k)
  part_norms = jnp.stack([ldexp(m, e - k) for m, e in zip(ms, es)], axis=1)
  return part_norms, norms, k


def clipped_sums(
  formed: dict,
  factors: dict,
  ws: list,
  weights: list,
  folded: list,
  folds: list,
  scales: list,
  divisors: list,
  keep: jax.Array | None,
  fast: jax.Array,
) -> list:
  """Every leaf's clipped sum Σᵢ wᵢ·(uᵢ·gᵢ)/d (d: its ``divisors`` entry, a scalar;
  ``folded``: wᵢ/d, used where ``fast`` and where ``folds`` says it never
  underflows): from its per-example gradients
  (``formed``), from its ghost factors (Σᵢ wᵢ Σ_t P_t ⊗ uᵢQ_t), or zeros (unused);
  rows where ``keep`` is False left out. uᵢ (``scales``, powers of two) is 1 unless
  the example's norm is beyond 2^SCALE_ABOVE: its gradient is scaled down first,
  so that its weight does not underflow.

  A row left out has weight 0, so it can change the sums only through 0·inf,
  and only if it holds inf or NaN, which its norm then shows. On GPU/TPU the
  per-example gradients and ghost factors are zeroed and scaled in one
  elementwise pass before their contractions. On CPU that pass (a copy of every
  per-example gradient, and of every factor: the logits' size for an output
  layer) is taken only when ``fast`` is False (some norm not finite, some uᵢ
  not 1, or some wᵢ/d below the smallest normal number), behind one
  ``lax.cond`` for all leaves; there the per-example gradients are summed one
  example at a time, so the branch holds no copy of them. Otherwise the sums
  are weighted by wᵢ/d, which spares each leaf a division after its
  contraction."""
  order = sorted(formed) + sorted(factors)

  def rows_of(leaf, w):
    """The leaf's per-example gradients scaled by uᵢ, then weighted by ``w`` (in
    the accumulation dtype), the rows left out zeroed: one elementwise pass,
    which XLA fuses into the reduction over the batch that follows."""
    g = formed[leaf]
    return weighted_rows(g, scales[leaf], w, keep, acc_dtype(g.dtype), flat=True)

  def ghost_sums(fixing: bool):
    """The ghost leaves' sums, with the rows zeroed and scaled or (``fixing`` False) as
    they are, with the weights wᵢ/d."""
    sums = []
    for leaf in sorted(factors):
      w, d = by_fold(leaf, fixing)
      keep_, scale = (keep, scales[leaf]) if fixing else (None, None)
      sums.append(factor_grads(factors[leaf], ws[leaf], w, keep_, scale, d))
    return sums

  def by_fold(leaf, fixing: bool):
    """(weights, divisor) of a leaf's sum: wᵢ/d and none, or wᵢ and d."""
    if folds[leaf] or not fixing:
      return folded[leaf], None
    return weights[leaf], divisors[leaf]

  def as_they_are():
    return [weighted_sum(folded[leaf], formed[leaf]) for leaf in sorted(formed)] + ghost_sums(False)

  def row_by_row():
    leaves = sorted(formed)

    def add_row(i, sums):
      kept = True if keep is None else keep[i]
      out = []
      for leaf, total in zip(leaves, sums):
        g = formed[leaf][i]
        row = g * scales[leaf][i].astype(g.dtype)
        row = jnp.where(kept, row, jnp.zeros_like(row))
        out.append(total + weights[leaf][i].astype(total.dtype) * row.astype(total.dtype))
      return out

    zeros = [jnp.zeros(formed[leaf].shape[1:], acc_dtype(formed[leaf].dtype)) for leaf in leaves]
    sums = lax.fori_loop(0, formed[leaves[0]].shape[0], add_row, zeros) if leaves else []
    return [
      divided(x, divisors[leaf], formed[leaf].dtype) for leaf, x in zip(leaves, sums)
    ] + ghost_sums(True)

  def each_fixed():
    # The per-example vectors are read where they are formed: XLA:GPU recomputes a
    # cheap division or square root in each reader rather than giving it a kernel.
    sums = []
    for leaf in sorted(formed):
      w, d = by_fold(leaf, True)
      # A reduction over the batch, not a matrix-vector product: one kernel
      # with the scaling pass, writing the leaf in its own layout.
      total = jnp.sum(rows_of(leaf, w), axis=0)
      sums.append(divided(total, d, formed[leaf].dtype))
    return sums + ghost_sums(True)

  # (Inside the branch: formed outside it, the sums would keep a logits-sized
  # factor alive beside the branch's buffers.)
  done = (
    by_platform(lambda: rare_path(~fast, row_by_row, as_they_are), each_fixed)
    if formed or factors
    else []
  )
  out = [jnp.zeros_like(w) for w in ws]
  for leaf, g in zip(order, done):
    out[leaf] = g
  return out
