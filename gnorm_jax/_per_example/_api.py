"""Public per-example API: per_example_grad_norms and clipped_grad."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from gnorm_jax._checks import (
  check_argnums,
  check_bool,
  check_choice,
  check_count,
  check_fun,
  check_grad_args,
  check_number,
  check_threshold_tree,
  concrete_number,
  is_tree,
  path_str,
  signature_fix,
)
from gnorm_jax._norms import tree_norm
from gnorm_jax._numerics import clip_scales, pow2_split
from gnorm_jax._per_example import _jaxpr, _plan, _program, _run

_METHODS = ("auto", "engine", "ghost", "vmap")
_REDUCTIONS = ("mean", "sum")


def _as_tuple(nums: int | Sequence[int]) -> tuple[int, ...]:
  """Checked argnums (an int, or a tuple or list of ints) as a tuple."""
  return tuple(nums) if isinstance(nums, Sequence) else (nums,)


class _PerExample:
  """Validated configuration shared by per_example_grad_norms and clipped_grad."""

  def __init__(
    self,
    loss,
    argnums,
    batch_argnums,
    method,
    caller,
    *,
    has_aux=False,
    nan_safe=True,
    microbatch_size=None,
    keep_scan_factors=False,
  ):
    """``caller`` is the public function being built (its name and signature go
    into the messages)."""
    self.caller = caller.__name__
    check_fun(loss, self.caller)
    fix = signature_fix(caller)
    check_grad_args(caller, argnums, has_aux)
    check_argnums("batch_argnums", batch_argnums, fix)
    check_choice("method", method, _METHODS)
    nan_safe = check_bool("nan_safe", nan_safe)
    self.keep_scan_factors = check_bool("keep_scan_factors", keep_scan_factors)
    microbatch_size = check_count(
      "microbatch_size",
      microbatch_size,
      allow_none=True,
      fix="It is the number of examples per pass, e.g. microbatch_size=32 (None: one pass).",
    )
    self.loss = loss
    self.argnums = _as_tuple(argnums)
    self.batch_argnums = _as_tuple(batch_argnums)
    overlap = set(self.argnums) & set(self.batch_argnums)
    if overlap:
      raise ValueError(
        f"argnums={argnums!r} and batch_argnums={batch_argnums!r} share {sorted(overlap)}:"
        " differentiated parameters are shared by all examples and carry no batch axis."
        f" {fix}"
      )
    self.single_params = not isinstance(argnums, (tuple, list))
    self.method = method
    self.has_aux = has_aux
    self.nan_safe = nan_safe
    self.microbatch_size = microbatch_size

  # ---------------------------------------------------------------- helpers

  def _check_call(self, args: tuple, kwargs: dict) -> int:
    needed = max(self.argnums + self.batch_argnums) + 1
    if kwargs:
      raise TypeError(
        f"the function {self.caller} returns takes the parameters and the batch"
        f" positionally (argnums and batch_argnums count positions) and only mask= by"
        f" keyword; got the keyword argument(s) {', '.join(sorted(kwargs))}. Pass them"
        " positionally, in the order of fun's parameters."
      )
    if len(args) < needed:
      raise TypeError(
        f"argnums={self.argnums} and batch_argnums={self.batch_argnums} need at least"
        f" {needed} positional arguments, got {len(args)}."
      )
    sizes = {
      f"argument {i}" + (f" at {path_str(path)}" if path else ""): jnp.shape(x)[0]
      if jnp.ndim(x)
      else None
      for i in self.batch_argnums
      for path, x in jax.tree_util.tree_flatten_with_path(args[i])[0]
    }
    distinct = set(sizes.values())
    if not sizes or None in distinct or len(distinct) != 1:
      shown = "; ".join(f"{k}: {'a scalar' if v is None else v}" for k, v in sizes.items())
      raise ValueError(
        "every leaf of the batched arguments (batch_argnums) needs the same leading batch"
        f" axis; got leading sizes {shown or 'none (no array leaves)'}. Give every batched"
        " leaf the batch as its first axis, or leave unbatched arguments out of"
        " batch_argnums."
      )
    if distinct == {0}:
      raise ValueError(
        "the batch is empty (leading axis of size 0): there is no example to take a"
        " gradient of. Pass at least one example, or skip the call."
      )
    for i in self.argnums:
      for path, x in jax.tree_util.tree_flatten_with_path(args[i])[0]:
        if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
          raise TypeError(
            f"parameters must be floating point to be differentiated; argument {i} has a"
            f" leaf {jax.tree_util.keystr(path)} of dtype {jnp.result_type(x)}."
          )
    size = distinct.pop()
    if size is None:  # not reached: a scalar leaf was rejected above
      raise AssertionError("a batched leaf has no batch axis")
    return size

  def _params(self, args):
    params = tuple(args[i] for i in self.argnums)
    return params[0] if self.single_params else params

  def _trace(self, args) -> _run.Traced:
    """Stage 1: traces the single-example loss over its flat arguments."""
    dynamic = sorted(set(self.argnums) | set(self.batch_argnums))
    # Arguments that are neither parameters nor batched are closed over as they
    # are (a Python bool stays a bool), as vmap of grad would pass them.

    def loss_of_dynamic(*dyn):
      full = list(args)
      for i, x in zip(dynamic, dyn):
        full[i] = x
      return self.loss(*full)

    single = [
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x)), args[i])
      if i in self.batch_argnums
      else args[i]
      for i in dynamic
    ]
    closed, out_shape = jax.make_jaxpr(loss_of_dynamic, return_shape=True)(*single)
    aux_tree = None
    if self.has_aux:
      if not (isinstance(out_shape, (tuple, list)) and len(out_shape) == 2):
        raise TypeError(
          "with has_aux=True fun must return a pair (value, aux); got"
          f" {jax.tree.structure(out_shape)}."
        )
      value_shape, aux_shape = out_shape
      aux_tree = jax.tree.structure(aux_shape)
    else:
      value_shape = out_shape
    if not (
      isinstance(value_shape, jax.ShapeDtypeStruct)
      and value_shape.shape == ()
      and jnp.issubdtype(value_shape.dtype, jnp.floating)
    ):
      raise TypeError(
        "fun must return one real scalar per example (it is the single-example loss,"
        " called without the batch axis; with has_aux=True, (scalar, aux)); got"
        f" {out_shape}."
      )
    # Flat argument positions (as make_jaxpr flattened them) of the batched
    # leaves and of the parameter leaves, numbered in jax.grad's output order.
    arg_leaves = {i: jax.tree.leaves(args[i]) for i in dynamic}
    arg_trees = {i: jax.tree.structure(args[i]) for i in dynamic}
    offsets, n = {}, 0
    for i in dynamic:
      offsets[i], n = n, n + len(arg_leaves[i])
    flat_args = [leaf for i in dynamic for leaf in arg_leaves[i]]
    batch_positions = [
      offsets[i] + j for i in self.batch_argnums for j in range(len(arg_leaves[i]))
    ]
    param_positions: dict[int, int] = {}  # flat position -> parameter leaf
    for i in self.argnums:
      for j in range(len(arg_leaves[i])):
        param_positions[offsets[i] + j] = len(param_positions)
    params_flat = [jnp.asarray(flat_args[p]) for p in param_positions]

    def assemble(leaves, batch_vals):
      flat = list(flat_args)
      for pos, leaf in param_positions.items():
        flat[pos] = leaves[leaf]
      for pos, x in zip(batch_positions, batch_vals):
        flat[pos] = x
      return flat

    def user_loss(param_leaves, batch_vals):
      """The user's own loss of one example: (value, aux leaves)."""
      flat = assemble(dict(enumerate(param_leaves)), batch_vals)
      dyn = [
        jax.tree.unflatten(arg_trees[i], flat[offsets[i] : offsets[i] + len(arg_leaves[i])])
        for i in dynamic
      ]
      out = loss_of_dynamic(*dyn)
      return (out[0], jax.tree.leaves(out[1])) if self.has_aux else (out, [])

    return _run.Traced(
      _jaxpr.read(closed), params_flat, assemble, user_loss, aux_tree, param_positions
    )

  def _make_plan(self, args, traced: _run.Traced, batch_size: int, max_norm=None) -> _plan.Plan:
    """Stages 2 and 3: the Program and the one Plan the call executes."""
    mb = self.microbatch_size
    chunk = batch_size if mb is None or mb >= batch_size else mb
    if self.method == "vmap":
      every = {leaf: "method='vmap'" for leaf in traced.param_positions.values()}
      program = _program.Program(traced.body, {}, every)
    else:
      program = _program.build(traced.body, traced.param_positions)
    if self.method == "ghost" and program.fallback:
      paths = _param_paths(self._params(args))
      why = "; ".join(f"{_show_path(paths[l])}: {r}" for l, r in sorted(program.fallback.items()))
      raise ValueError(
        "method='ghost' needs a per-example rule for every parameter leaf, but these have"
        f" none: {why}. Use method='auto' to compute exact per-example gradients for just"
        " those leaves, and gnorm_jax.per_example_plan to see every leaf's route."
      )
    return _plan.make_plan(
      program,
      traced.params_flat,
      chunk,
      method=self.method,
      uniform_weights=max_norm is None or not is_tree(max_norm),
      # Per-layer thresholds keep the factors in any case: without streams the
      # scan's remat would be inlined and every step's activations kept.
      keep_factors=max_norm is not None and (self.keep_scan_factors or is_tree(max_norm)),
      num_passes=-(-batch_size // chunk),
    )

  def _clip_weights(self, args, max_norm):
    """A function of partial norms [B, P], the leaves each covers (see
    :func:`_run.run`), norms [B] (both scaled by 1/r) and r [B] giving each leaf's
    clip weights and scales [B] (see _weight); each leaf's boost (the weights are
    B·min(1, C/‖gᵢ‖)), threshold C and group (None: one threshold)."""
    params = self._params(args)
    dtypes = [jnp.result_type(w) for w in jax.tree.leaves(params)]
    if not is_tree(max_norm):  # one weight per example (streams use the first leaf's)
      boost, n = _boost(max_norm, dtypes), len(dtypes)
      return (
        (lambda part_norms, covered, norms, r: [_weight(norms, r, max_norm, boost)] * n),
        [boost] * n,
        [max_norm] * n,
        None,
      )
    thresholds = jax.tree.leaves(max_norm)
    ids = jax.tree.unflatten(jax.tree.structure(max_norm), range(len(thresholds)))
    try:
      group_of = jax.tree.leaves(
        jax.tree.map(lambda g, sub: jax.tree.map(lambda _: g, sub), ids, params)
      )
    except ValueError as e:
      raise ValueError(
        "max_norm must be a number or a pytree prefix of the parameters (one threshold per"
        f" group of leaves); its structure {jax.tree.structure(max_norm)} is not a prefix"
        f" of the parameters' {jax.tree.structure(params)}."
      ) from e

    def weights(part_norms, covered, norms, r):
      per_group = []
      for g in range(len(thresholds)):
        # a partial norm covers leaves of one group
        cols = [j for j, leaves in enumerate(covered) if group_of[leaves[0]] == g]
        gn = (
          jax.vmap(tree_norm)(part_norms[:, cols]) if cols else jnp.zeros(norms.shape, norms.dtype)
        )
        per_group.append(gn)
      return [_weight(per_group[g], r, thresholds[g], b) for g, b in zip(group_of, boosts)]

    boosts = [_boost(thresholds[g], [d]) for g, d in zip(group_of, dtypes)]
    return weights, boosts, [thresholds[g] for g in group_of], group_of

  # ---------------------------------------------------------------- calls

  def __call__(self, args, kwargs, max_norm=None, reduce="mean", mask=None):
    """Returns (clipped gradient tree or None, norms [B], aux or None)."""
    batch_size = self._check_call(args, kwargs)
    if mask is not None:
      want = (
        f"mask must be a bool array of shape ({batch_size},) (one flag per example,"
        " False for padding; mask=None: no padding)"
      )
      try:
        mask = jnp.asarray(mask)
      except TypeError:
        raise TypeError(f"{want}, got mask={mask!r}.") from None
      if mask.shape != (batch_size,) or mask.dtype != jnp.bool_:
        raise ValueError(f"{want}, got shape {mask.shape} and dtype {mask.dtype}.")
    traced = self._trace(args)
    plan = self._make_plan(args, traced, batch_size, max_norm)
    weights_fn, groups = None, None
    if max_norm is not None:
      clip_weights, boosts, thresholds, groups = self._clip_weights(args, max_norm)
      # Each sum is divided by its boost (and by B for a mean) in the run: the
      # weights are divided instead where that cannot underflow.
      # (one divisor per distinct boost: one threshold shares it between all leaves)
      n = batch_size if reduce == "mean" else 1
      each: dict[int, jax.Array] = {}
      divisors = [each.setdefault(id(b), b * n) for b in boosts]
      folds = [_folds(c, n, len(boosts)) for c in thresholds]

      def weights_fn(part_norms, covered, norms, r):
        pairs = clip_weights(part_norms, covered, norms, r)
        return [(w, u, d, f) for (w, u), d, f in zip(pairs, divisors, folds)]

    batch_flat = [jnp.asarray(x) for i in self.batch_argnums for x in jax.tree.leaves(args[i])]
    if mask is not None:
      batch_flat = _fill_padding(batch_flat, mask)
    norms, sums, aux = _execute(
      plan, traced, batch_flat, batch_size, weights_fn, mask, self.nan_safe, groups
    )
    if traced.aux_tree is not None:
      aux = jax.tree.unflatten(traced.aux_tree, aux)
    else:
      aux = None
    if sums is None:
      return None, norms, aux
    grads = jax.tree.unflatten(jax.tree.structure(self._params(args)), sums)
    return grads, norms, aux

  def plan(self, args, max_norm=None) -> "PerExamplePlan":
    batch_size = self._check_call(args, {})
    traced = self._trace(args)
    return describe(
      self._make_plan(args, traced, batch_size, max_norm),
      _param_paths(self._params(args)),
      [tuple(w.shape) for w in traced.params_flat],
    )


def _boost(max_norm: Any, dtypes: list) -> jax.Array:
  """A power of two B with C·B in [4, 8) (at least 1; at most 2^(maxexp/2) of ``dtypes``).

  The clip weight C/‖gᵢ‖ is subnormal, and flushed to 0, for ‖gᵢ‖ > C/tiny
  (8.5e37·C in float32): such an example silently dropped out of the sum.
  Weighted by B·C/‖gᵢ‖ >= 4/max >= tiny instead, and the sum divided by B
  (exact), it is kept; for C >= 4 (B = 1) nothing changes.
  """
  c = jnp.asarray(max_norm, jnp.float32)
  s, _ = pow2_split(c)
  cap = min(2.0 ** (jnp.finfo(d).maxexp // 2) for d in dtypes) if dtypes else 1.0
  boost = jnp.clip(s * 8, 1, cap)
  return jnp.where(jnp.isfinite(c) & (c > 0), boost, 1)


def _folds(max_norm: Any, n: int, leaves: int) -> bool:
  """Whether a clip weight divided by its boost and by ``n`` (B for a mean) is a
  normal float32 number for every finite norm, known when tracing: the norms the
  weights see are at most 2^(SCALE_ABOVE+1)·√leaves (larger ones are scaled down
  first), so the quotient is at least C/n·2^-(SCALE_ABOVE+1)/√leaves. Then the
  sums are weighted by that quotient, with no division after them; otherwise
  (a traced or tiny C) the division is made where needed."""
  try:
    c = float(max_norm)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return False
  if not (math.isfinite(c) and c > 0):
    return False
  least = c / n * 2.0 ** -(_run.SCALE_ABOVE + 1) / math.sqrt(max(leaves, 1))
  return least >= 4 * float(jnp.finfo(jnp.float32).tiny)


def _weight(norms: jax.Array, r: jax.Array, max_norm: Any, boost: jax.Array) -> tuple:
  """``(w, u)`` with w·u = B·min(1, C/‖gᵢ‖), for ‖gᵢ‖ = ``norms``·r (r [B] powers of
  two, 1 unless the norm is near or beyond float32's largest): u = 1/r where
  clipping (else 1) scales the gradient, and w = (f·B)·s with u·s·f the clip factor
  (clip_scales): f·B is in (4, 16] where clipping, so nothing underflows or
  overflows on the way."""
  u, s, f = clip_scales(norms, max_norm, r)
  return (f * boost.astype(f.dtype)) * s, u


def _fill_padding(batch_flat: list, mask: jax.Array) -> list:
  """Padding rows replaced by the first kept example (the "double where").

  Their norms and weights are zeroed afterwards; computing them from a real
  example keeps NaN or inf held in padding out of the derivatives too (0·NaN
  is NaN in the backward pass of a where).
  """
  first = jnp.argmax(mask)
  return [jnp.where(mask.reshape((-1,) + (1,) * (x.ndim - 1)), x, x[first]) for x in batch_flat]


def _execute(
  plan: _plan.Plan,
  traced: _run.Traced,
  batch_flat: list,
  batch_size: int,
  weights_fn,
  mask,
  nan_safe: bool,
  groups: list[int] | None,
):
  """Runs ``plan`` over the batch, in ``plan.num_passes`` microbatches."""
  chunk = plan.batch_size
  if plan.num_passes == 1:
    return _run.run(plan, traced, batch_flat, weights_fn, mask, nan_safe, groups)
  pad = plan.num_passes * chunk - batch_size
  keep = jnp.ones((batch_size,), bool) if mask is None else mask
  keep = jnp.pad(keep, (0, pad)).reshape(plan.num_passes, chunk)
  chunks = [
    jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(plan.num_passes, chunk, *x.shape[1:])
    for x in batch_flat
  ]
  norms, sums, aux = jax.lax.map(
    lambda c: _run.run(plan, traced, c[0], weights_fn, c[1], nan_safe, groups), (chunks, keep)
  )
  norms = norms.reshape(-1)[:batch_size]
  aux = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:])[:batch_size], aux)
  sums = None if sums is None else [jnp.sum(s, axis=0).astype(s.dtype) for s in sums]
  return norms, sums, aux


def describe(plan: _plan.Plan, paths: list[str], shapes: list[tuple]) -> "PerExamplePlan":
  """The public view of ``plan``: exactly what the run executes."""
  leaves = []
  for leaf, w in enumerate(shapes):
    r = plan.routes[leaf]
    rules = tuple(dict.fromkeys(u.rule.name for u in plan.program.uses.get(leaf, [])))
    leaves.append(
      LeafPlan(
        paths[leaf],
        w,
        rules,
        r.route,
        r.flops,
        r.bytes,
        plan.why(leaf),
        leaf in plan.streamed,
        r.options,
      )
    )
  return PerExamplePlan(
    tuple(leaves),
    plan.batch_size * plan.num_passes,
    plan.method,
    plan.batch_size,
    plan.estimates,
    plan.platform,
  )


def _show_path(path: str) -> str:
  return path or "(the parameters themselves)"


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """The route of one parameter leaf.

  Attributes:
    path: the leaf's path in the parameters (``jax.tree_util.keystr``).
    shape: its shape.
    rules: the rules that recognized its uses, in order of first use.
    route: ``"ghost"`` (norm from Gram matrices of the layer's inputs and output
      cotangents, no per-example gradient), ``"direct"`` (per-example gradient
      formed from the recorded inputs and cotangents), ``"materialized"`` (no
      rule: exact per-example gradients, as vmap of grad) or ``"unused"``.
    flops: estimated flops of the route for the whole batch (None: not estimated,
      a materialized leaf costs what its share of vmap of grad costs).
    bytes: estimated extra memory of the route for the whole batch.
    why: for a materialized leaf, the use no rule recognized (naming the
      primitive, and the parameter JAX describes it with when gnorm_jax cannot
      read it); for a streamed leaf, that its norm is streamed and how its
      clipped sum is formed (a second, weighted backward pass, or "one pass"
      from each step's kept factors).
    streamed: the leaf belongs to a rematerialized scan over layers whose norms
      are computed step by step in the scan's backward pass (memory stays that
      of the rematerialized gradient, plus each step's factors on the one-pass
      route; ``route`` is the route of each step).
    options: every route considered, as ``(route, flops, bytes)`` tuples (the
      chosen one included); the one estimated faster on the backend wins (on a
      streamed leaf, the one of fewer flops).
  """

  path: str
  shape: tuple
  rules: tuple
  route: str
  flops: int | None
  bytes: int
  why: str = ""
  streamed: bool = False
  options: tuple = ()


@dataclasses.dataclass(frozen=True)
class PerExamplePlan:
  """What :func:`per_example_grad_norms` and :func:`clipped_grad` will do.

  It is the plan the call executes, made from the same arguments and options.

  Attributes:
    leaves: one :class:`LeafPlan` per parameter leaf, in ``jax.tree.leaves`` order.
    batch_size: the batch size the plan was made for.
    method: what the call runs: ``"engine"`` (the per-leaf routes below, in one
      batched pass) or ``"vmap"`` (``jax.vmap(jax.grad(fun))`` of the loss
      itself: asked for with ``method="vmap"``, or chosen by ``"auto"`` when no
      leaf has a rule).
    microbatch_size: examples per pass (``batch_size`` without microbatching);
      flops and bytes are per pass.
    estimates: the cost model's estimate of the seconds that ``"engine"`` and
      ``"vmap"`` add to the plain gradient per pass on ``platform``, and of their
      extra memory in bytes
      (``"engine_bytes"``, ``"vmap_bytes"``); ``method="auto"`` runs the faster,
      vmap only where its memory is at most twice the engine's plus 64 MiB.
    platform: the backend the estimates are for (JAX's default backend when
      the call was traced).
  """

  leaves: tuple
  batch_size: int
  method: str
  microbatch_size: int | None = None
  estimates: Any = None
  platform: str = "cpu"

  def __str__(self) -> str:
    passes = (
      ""
      if self.microbatch_size in (None, self.batch_size)
      else f", passes of {self.microbatch_size}"
    )
    rows = [f"per-example plan (batch {self.batch_size}{passes}, runs {self.method!r})"]
    if self.estimates:
      e = self.estimates
      rows.append(
        f"estimated on {self.platform}, beyond the plain gradient: engine"
        f" {e['engine'] * 1e3:.3g} ms"
        f" ({e['engine_bytes'] / 2**20:.3g} MiB extra), vmap {e['vmap'] * 1e3:.3g} ms"
        f" ({e['vmap_bytes'] / 2**20:.3g} MiB extra)"
      )
    rows += [
      "| leaf | shape | rules | route | GFLOP | MiB | other routes (GFLOP, MiB) | note |",
      "|---|---|---|---|---:|---:|---|---|",
    ]
    for l in self.leaves:
      gflop = "—" if l.flops is None else f"{l.flops / 1e9:.3g}"
      others = ", ".join(
        f"{r} {f / 1e9:.3g}, {b / 2**20:.3g}" for r, f, b in l.options if r != l.route
      )
      rows.append(
        f"| {l.path} | {l.shape} | {', '.join(l.rules) or '—'} | {l.route} |"
        f" {gflop} | {l.bytes / 2**20:.3g} | {others or '—'} | {l.why} |"
      )
    return "\n".join(rows)


def _param_paths(params) -> list[str]:
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


_RULES_DOC = """
  The loss is traced to a jaxpr; each use of a parameter leaf is matched by a
  rule of the per-example engine — ``dot_general`` (dense layers, einsums,
  attention projections, tied output layers), ``bias`` (an added broadcast
  parameter: biases, norm offsets, position embeddings), ``scale`` (a
  multiplied broadcast parameter: norm scales), ``gather`` (embedding lookups)
  — and ``conv`` (convolutions of any rank, strides, dilations, groups), also
  inside ``scan`` bodies (steps are extra positions; a parameter scanned over
  is sliced per step), ``checkpoint``/``remat`` and ``cond``/``switch``. The
  rule supplies the per-example norm of that leaf's gradient by the cheaper
  exact route: ghost Gram matrices of the layer's inputs and output
  cotangents over positions (Goodfellow 2015; Li et al. 2021), or the
  per-example gradient formed directly from them (the mixed rule of Bu et al.
  2022). A leaf with several uses (a tied embedding's lookup and output
  projection) gets ONE gradient, cross terms included. Leaves no rule
  recognizes (a parameter in a ``while_loop`` body or a scan carry, inside a
  custom derivative, or combined with another parameter) get exact
  per-example gradients of just those leaves in the same pass;
  :func:`per_example_plan` shows every leaf's route.

  Numerics: per-example norms are overflow- and underflow-safe as
  :func:`tree_norm` is (per-example power-of-two rescaling; per-leaf norms
  combined by the norm core), complex leaves follow JAX's gradient convention,
  and a ghost sum whose error bound exceeds ~1e-3 relative (cancelling
  positions) is recomputed exactly for the examples concerned — finite inputs
  never give a negative or NaN norm. Results equal ``vmap`` of ``jax.grad`` up
  to float rounding."""


def per_example_grad_norms(
  fun: Callable[..., jax.Array],
  argnums: int | Sequence[int] = 0,
  has_aux: bool = False,
  *,
  batch_argnums: int | Sequence[int] = 1,
  method: str = "auto",
) -> Callable[..., Any]:
  """Returns a function computing the Euclidean norm of every example's gradient.

  ``fun(params, *example)`` is the loss of ONE example; the arguments at ``batch_argnums`` carry
  a leading batch axis, the others (arrays, Python flags) are passed to every example as they
  are. Each use of a parameter leaf is matched by a rule (dense layers, biases, scales,
  embeddings, convolutions, also inside ``scan``, ``remat`` and ``cond``) that gives its
  per-example norm by the cheaper exact route, without forming per-example gradients where it
  can; other leaves get exact per-example gradients. Results equal ``vmap`` of ``jax.grad`` up to
  float rounding, with :func:`tree_norm`'s overflow safety. How routes are chosen:
  :doc:`the per-example guide </per_example>`; :func:`per_example_plan` shows them.

  Args:
    fun: the single-example loss, returning a real scalar (``(scalar, aux)`` with ``has_aux``).
    argnums: which argument(s) are the parameters (int or tuple).
    has_aux: ``fun`` returns ``(value, aux)``; the function then returns ``(norms, aux)`` with
      every example's aux stacked on a leading axis.
    batch_argnums: which argument(s) carry the leading batch axis.
    method: ``"auto"`` (the engine or ``"vmap"``, whichever the cost model estimates faster),
      ``"engine"`` (every leaf on its cheaper route), ``"ghost"`` (the engine, raising a
      ValueError for any leaf no rule recognizes) or ``"vmap"`` (the reference).

  Returns:
    A function ``(*args, mask=None) -> norms`` with ``norms`` of shape ``[B]``, float32 (float64
    under x64). ``mask`` ([B] bool, optional): rows with False are padding and get norm 0.

  Raises:
    TypeError: ``fun`` is not callable, ``argnums`` or ``batch_argnums`` is not an int or a
      non-empty tuple of ints, or ``has_aux`` is not a bool.
    ValueError: ``argnums`` and ``batch_argnums`` share a position or have negative entries, or
      ``method`` is not an accepted value.

  Examples:
    >>> import jax, jax.numpy as jnp, gnorm_jax
    >>> loss = lambda w, x, y: (x @ w - y) ** 2  # one example: x [3], y []
    >>> w, x, y = jnp.array([1.0, 0.0, 0.0]), jnp.eye(3), jnp.zeros(3)
    >>> norms = jax.jit(gnorm_jax.per_example_grad_norms(loss, batch_argnums=(1, 2)))(w, x, y)
    >>> [round(float(n), 4) for n in norms]
    [2.0, 0.0, 0.0]

  References:
    Goodfellow 2015, https://arxiv.org/abs/1510.01799; Li et al. 2021,
    https://arxiv.org/abs/2110.05679; Bu et al. 2022, https://arxiv.org/abs/2205.10683.
  """
  spec = _PerExample(fun, argnums, batch_argnums, method, per_example_grad_norms, has_aux=has_aux)

  @functools.wraps(fun)
  def norms_fn(*args, mask=None, **kwargs):
    _, norms, aux = spec(args, kwargs, mask=mask)
    return (norms, aux) if has_aux else norms

  return norms_fn


@dataclasses.dataclass(frozen=True, eq=False)
class ClippedGradFn:
  """A clipped-gradient function that carries the threshold bounding its sensitivity.

  :func:`clipped_grad` returns one. Calling it calls the function it wraps,
  ``(*args, mask=None) -> grads``, under ``jit``, ``grad`` and ``vmap`` alike; it keeps the
  loss's name, docstring and signature, and hashes by identity, so ``jax.jit`` caches it as a
  function. Its ``sensitivity()`` is the aggregate's L2 sensitivity; pass it to :func:`dp_noise`
  in place of ``max_norm`` and the noise matches the clipping by construction (see the DP guide).

  Attributes:
    fun: the function a call forwards to (what :func:`clipped_grad` built).
    max_norm: the clipping threshold C, or the tree of per-group thresholds,
      as given to :func:`clipped_grad`.
    reduce: ``"sum"`` or ``"mean"``, as given.
    has_aux: whether a call returns ``(result, aux)``, as given.
    return_norms: whether the result is ``(grads, norms)``, as given.
  """

  fun: Callable[..., Any]
  max_norm: Any
  reduce: str
  has_aux: bool = False
  return_norms: bool = False

  def __post_init__(self):
    # functools.update_wrapper's attributes, set past the frozen __setattr__. Not
    # fun's __dict__: it could hold names of the fields above.
    for name in functools.WRAPPER_ASSIGNMENTS:
      if hasattr(self.fun, name):
        object.__setattr__(self, name, getattr(self.fun, name))
    object.__setattr__(self, "__wrapped__", self.fun)

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    return self.fun(*args, **kwargs)

  def sensitivity(self, batch_size: float | None = None) -> float | jax.Array:
    r"""The L2 sensitivity of a call's aggregate to adding or removing one example.

    .. math::
      \max_{D \simeq D'} \|F(D) - F(D')\|_2 \le \Delta = \|(C_g)_g\|_2
      \quad (\texttt{reduce="sum"}), \qquad \frac{\Delta}{B}
      \quad (\texttt{reduce="mean"})

    Neighbouring batches D ≃ D' differ by one example (a real row against a
    padding row of the same fixed shape, as :func:`poisson_batches` makes
    them); each example's clipped gradient has norm at most Δ, the norm of
    the thresholds. Replacing one example by another (replace-one
    neighbours) moves the aggregate by up to 2Δ. The per-example norms and
    ``aux`` a call may also return are per example and not covered.

    Args:
      batch_size: for ``reduce="mean"``, the leading size B of the batched
        arguments (padding rows included), which the mean divides by; not
        used for ``reduce="sum"``.

    Returns:
      Δ (or Δ/B) as a Python float, computed in float64; a JAX scalar when a
      threshold is traced.

    Raises:
      ValueError: ``reduce="mean"`` and no ``batch_size``, or a
        ``batch_size`` that is not finite and positive.
      TypeError: a bool or a non-number ``batch_size``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import gnorm_jax
      >>> loss = lambda p, x: jnp.sum(x @ p["w"]) + jnp.sum(p["b"])
      >>> per_layer = gnorm_jax.clipped_grad(loss, max_norm={"w": 3.0, "b": 4.0}, reduce="sum")
      >>> per_layer.sensitivity()
      5.0
      >>> mean = gnorm_jax.clipped_grad(loss, max_norm=1.0)  # reduce="mean"
      >>> mean.sensitivity(batch_size=64)
      0.015625
    """
    fix = "Pass the leading size of the batched arguments (padding rows included), e.g. 64."
    if self.reduce == "mean":
      if batch_size is None:
        raise ValueError(
          "reduce='mean' divides the clipped sum by the batch size, so the sensitivity"
          f" depends on it: got batch_size=None. {fix}"
        )
      check_number("batch_size", batch_size, low=0, low_open=True, finite=True, fix=fix)
    thresholds = [concrete_number("max_norm", c) for c in jax.tree.leaves(self.max_norm)]
    if any(c is None for c in thresholds):  # traced: in the dtype of the thresholds
      delta: float | jax.Array = tree_norm(self.max_norm)
    else:
      delta = math.hypot(*(float(c) for c in thresholds))  # type: ignore[arg-type]
    return delta / batch_size if self.reduce == "mean" else delta  # type: ignore[operator]


def clipped_grad(
  fun: Callable[..., jax.Array],
  argnums: int | Sequence[int] = 0,
  has_aux: bool = False,
  *,
  max_norm: Any,
  batch_argnums: int | Sequence[int] = 1,
  method: str = "auto",
  reduce: str = "mean",
  return_norms: bool = False,
  nan_safe: bool = True,
  microbatch_size: int | None = None,
  keep_scan_factors: bool = False,
) -> ClippedGradFn:
  r"""Returns a function computing the aggregate of per-example clipped gradients.

  .. math::
    \bar g = \frac{1}{B}\sum_{i=1}^{B} \min\!\Big(1, \frac{C}{\|g_i\|}\Big)\, g_i,
    \qquad g_i = \nabla_\theta \ell(\theta, x_i)

  (``reduce="sum"`` drops the 1/B). This is the core of DP-SGD (Abadi et al. 2016);
  :func:`dp_noise` adds the noise. The norms are those of :func:`per_example_grad_norms`; for a
  ghost leaf the clipped sum is one contraction of the layer's recorded inputs and weighted
  cotangents (book-keeping, Bu et al. 2023): no second backward pass. A zero gradient has weight
  1, never NaN; the other edge cases: :ref:`the guide <clipping-edge-cases>`.

  Args:
    fun: the single-example loss, returning a real scalar (``(scalar, aux)`` with ``has_aux``).
    argnums: which argument(s) are the parameters (int or tuple).
    has_aux: ``fun`` returns ``(value, aux)``; the function then returns ``(result, aux)``, with
      every example's aux stacked on a leading axis.
    max_norm: the threshold C ≥ 0, keyword-only (a number is checked here, a traced value used
      as it is), or a pytree prefix of the parameters with one threshold per group (per-layer
      clipping; the sum's sensitivity is then √(Σ_g C_g²)).
    batch_argnums: which argument(s) carry the leading batch axis.
    method: ``"auto"``, ``"engine"``, ``"ghost"`` or ``"vmap"``, as in
      :func:`per_example_grad_norms`.
    reduce: ``"mean"`` (divide by B, padding rows included) or ``"sum"``.
    return_norms: also return the per-example norms (before clipping).
    nan_safe: give examples with a non-finite gradient weight 0.
    microbatch_size: process the batch in chunks of this many examples to bound memory; the
      results equal the unchunked call.
    keep_scan_factors: for a rematerialized scan over layers (``nn.scan(nn.remat(Block))``,
      :ref:`streamed <streamed-scans>`), keep each layer's factors (the inputs and output
      cotangents its clipped sum contracts) and form the clipped sum from them, instead of a
      second, weighted backward pass: faster, at the memory of those factors (about
      16·B·T·d floats per transformer layer; the remat keeps B·T·d). False keeps the memory
      the remat asks for. Per-layer thresholds always keep them. The results are the same.

  Returns:
    A :class:`ClippedGradFn`, called as ``(*args, mask=None) -> grads`` (``(grads, norms)``
    with ``return_norms``), ``grads`` with the parameters' structure; rows where the optional
    [B] bool ``mask`` is False are padding (weight 0, norm 0).

  Raises:
    ValueError: ``max_norm`` is a negative or NaN number, ``reduce`` or ``method`` is not
      accepted, or ``argnums`` and ``batch_argnums`` share a position or have negative entries.
    TypeError: ``fun`` is not callable, ``max_norm`` is missing or not a number, ``argnums`` or
      ``batch_argnums`` is not an int or a non-empty tuple of ints (pass ``max_norm=`` by
      keyword), or ``has_aux`` is not a bool.

  Examples:
    >>> import jax.numpy as jnp, gnorm_jax
    >>> loss = lambda w, x: jnp.sum(x * w)  # gradient of example i is x_i
    >>> x = jnp.array([[3.0, 4.0], [0.3, 0.4]])  # norms 5 and 0.5
    >>> g = gnorm_jax.clipped_grad(loss, max_norm=1.0, reduce="sum")(jnp.zeros(2), x)
    >>> [round(float(v), 4) for v in g]  # 0.2·(3,4) + 1·(0.3,0.4)
    [0.9, 1.2]

  References:
    Abadi et al. 2016, https://arxiv.org/abs/1607.00133; Bu et al. 2023,
    https://arxiv.org/abs/2210.00038.
  """
  if max_norm is None or not jax.tree.leaves(max_norm):
    raise ValueError(
      f"max_norm must be a non-negative number or a tree of them, got max_norm={max_norm!r}."
    )
  check_threshold_tree(
    "max_norm",
    max_norm,
    allow_tree=True,
    fix="Pass the clipping threshold C >= 0 (e.g. 1.0), or a tree of them"
    " (a prefix of the parameters) for per-layer clipping.",
  )
  check_choice("reduce", reduce, _REDUCTIONS)
  return_norms = check_bool("return_norms", return_norms)
  spec = _PerExample(
    fun,
    argnums,
    batch_argnums,
    method,
    clipped_grad,
    has_aux=has_aux,
    nan_safe=nan_safe,
    microbatch_size=microbatch_size,
    keep_scan_factors=keep_scan_factors,
  )

  @functools.wraps(fun)
  def clipped_fn(*args, mask=None, **kwargs):
    grads, norms, aux = spec(args, kwargs, max_norm, reduce, mask=mask)
    result = (grads, norms) if return_norms else grads
    return (result, aux) if has_aux else result

  return ClippedGradFn(clipped_fn, max_norm, reduce, has_aux, return_norms)


for _documented in (per_example_grad_norms, clipped_grad):
  if _documented.__doc__:  # None under python -OO
    _documented.__doc__ = _documented.__doc__.replace("{rules}", _RULES_DOC)


def per_example_plan(
  fun: Callable[..., jax.Array],
  argnums: int | Sequence[int] = 0,
  has_aux: bool = False,
  *,
  batch_argnums: int | Sequence[int] = 1,
  method: str = "auto",
  max_norm: Any = None,
  microbatch_size: int | None = None,
  keep_scan_factors: bool = False,
) -> Callable[..., PerExamplePlan]:
  """Returns a function showing how each parameter leaf's per-example norm is computed.

  The loss is traced (nothing is computed); for every parameter leaf the plan names the rules
  that recognized its uses, the route the cost model chose, whether it is streamed, and its
  estimated flops and extra memory; ``print(plan)`` shows a table. It is the very plan that
  :func:`per_example_grad_norms` and :func:`clipped_grad` execute given the same options.

  Args:
    fun: the single-example loss, as for :func:`per_example_grad_norms`.
    argnums: which argument(s) are the parameters (int or tuple).
    has_aux: ``fun`` returns ``(value, aux)`` (the aux is ignored).
    batch_argnums: which argument(s) carry the leading batch axis.
    method: ``"auto"``, ``"engine"``, ``"ghost"`` or ``"vmap"``, as in :func:`clipped_grad`.
    max_norm: the threshold of the :func:`clipped_grad` call to plan (None:
      :func:`per_example_grad_norms`); only whether it is a number or a tree matters.
    microbatch_size: as in :func:`clipped_grad`.
    keep_scan_factors: as in :func:`clipped_grad`.

  Returns:
    A function ``(*args) -> PerExamplePlan`` taking the same arguments as the function
    :func:`per_example_grad_norms` returns.

  Examples:
    >>> import jax.numpy as jnp, gnorm_jax
    >>> def loss(p, x):  # a dense layer with a bias, used at 3 positions
    ...   return jnp.sum(jnp.tanh(x @ p["w"] + p["b"]))
    >>> p = {"w": jnp.ones((64, 32)), "b": jnp.zeros(32)}
    >>> plan = gnorm_jax.per_example_plan(loss)(p, jnp.ones((8, 3, 64)))
    >>> [(l.path, l.rules, l.route) for l in plan.leaves]
    [("['b']", ('bias',), 'direct'), ("['w']", ('dot_general',), 'ghost')]
  """
  if max_norm is not None:
    check_threshold_tree(
      "max_norm",
      max_norm,
      allow_tree=True,
      fix="Pass the threshold of the clipped_grad call to plan, or None.",
    )
  spec = _PerExample(
    fun,
    argnums,
    batch_argnums,
    method,
    per_example_plan,
    has_aux=has_aux,
    microbatch_size=microbatch_size,
    keep_scan_factors=keep_scan_factors,
  )

  def plan_fn(*args):
    return spec.plan(args, max_norm)

  return plan_fn
