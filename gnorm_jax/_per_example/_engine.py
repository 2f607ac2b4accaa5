"""The engine: one batched forward+backward, then per-leaf routes chosen by cost.

The single-example loss is evaluated from its jaxpr with a zero perturbation
added to the output of every recognized use; the gradient with respect to
that perturbation is the use's output cotangent gᵢ, and the use's other
operands are recorded on the way — one vmapped pass for all layers. Fallback
leaves get exact per-example gradients in the same pass, as vmap of grad
would give them. Then each recognized leaf takes the cheaper exact route
(mixed rule, Bu et al. 2022):

* ghost: ‖Σ_t P_t ⊗ Q_t‖² = Σ_ts ⟨P_t,P_s⟩⟨Q_t,Q_s⟩ over all its uses' positions,
  on factors rescaled per example by powers of two (no overflow, no
  underflow), with an error bound: an example whose sum may have lost more
  than ~1e-3 to cancellation (or is not finite) is recomputed exactly, one
  example at a time, in a branch taken only when some example needs it;
* direct: the per-example gradient of the leaf, a vjp of its uses' equations.

Per-leaf norms are combined by the norm core (``tree_norm``). With clip
weights wᵢ known, a ghost leaf's clipped sum Σᵢ wᵢ Σ_t P_t ⊗ Q_t is one
contraction of the same factors (book-keeping, Bu et al. 2023); a direct
leaf's is a weighted sum of its per-example gradients.

A rematerialized scan over stacked layers is *streamed* instead (:class:`Stream`):
its layers' norms are formed inside the scan's backward pass, so nothing the
remat dropped is kept, and the clipped sum is a second, weighted backward pass.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from gnorm_jax._norms import tree_norm
from gnorm_jax._numerics import pow2_exponent
from gnorm_jax._per_example._analysis import (
    REMAT_PRIMITIVES,
    Analysis,
    bind,
    call_body,
    chain_layout,
)
from gnorm_jax._per_example._rules import Dense, Ghost, Index, Use

# Relative error above which a ghost sum is recomputed exactly.
GHOST_RTOL = 1e-3


def _inside(key: tuple, uses: dict) -> dict:
  """The uses nested under the equation at ``key``."""
  return {k: u for k, u in uses.items() if len(k) > len(key) and k[:len(key)] == key}


def eval_instrumented(closed: jcore.ClosedJaxpr, flat_args: list, uses: dict,
                      streams: dict | None = None, tangents: dict | None = None) -> Callable:
  """A function of perturbations {key: array} evaluating ``closed``: it adds
  ``perts[key]`` to each use's output and records the use's operands (the
  parameter slot as None). Returns (outputs, {key: operands}).

  Scan bodies holding uses are run by ``lax.scan`` with the perturbations
  scanned over and the operands stacked as outputs; ``checkpoint`` bodies are
  re-wrapped in ``jax.checkpoint``; ``cond`` branches run by ``lax.switch``,
  each recording zeros for the other branches' uses. A scan in ``streams``
  computes its leaves' per-step norms in its own backward pass (see
  :class:`Stream`); its perturbation is the zero input those norms are the
  cotangent of. A custom-derivative call in ``tangents`` adds its rule's
  tangent map at zero tangents to its outputs: a zero in value, through which
  the perturbations of the uses inside the rule get the custom rule's
  cotangents.
  """
  run = make_run(uses, streams or {}, tangents or {})

  def evaluate(perts):
    operands = {}
    outs = run(closed.jaxpr, closed.consts, flat_args, (), perts, operands)
    return outs, operands

  return evaluate


def make_run(uses: dict, streams: dict, tangents: dict, remat: bool = True) -> Callable:
  """The interpreter behind :func:`eval_instrumented`; ``remat=False`` inlines
  ``checkpoint`` bodies (inside a backward pass that already recomputes)."""

  def run(jaxpr, consts, args, path, perts, operands):
    env = {}

    def read(v):
      return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
      env[v] = x
    for v, x in zip(jaxpr.invars, args):
      env[v] = x
    for i, eqn in enumerate(jaxpr.eqns):
      key = path + (i,)
      invals = [read(v) for v in eqn.invars]
      inner = _inside(key, uses)
      name = eqn.primitive.name
      body = call_body(eqn)
      if key in streams:
        outs = _scan_streamed(eqn, invals, key, perts[key], streams[key], tangents)
      elif key in tangents and inner:
        outs = bind(eqn, invals)
        t, derived = tangents[key]
        zeros = [jnp.zeros(jnp.shape(invals[j]), t.jaxpr.invars[len(invals) + m].aval.dtype)
                 for m, j in enumerate(derived)]
        touts = run(t.jaxpr, t.consts, [*invals, *zeros], key, perts, operands)
        outs = [o + d.astype(o.dtype) if jnp.issubdtype(o.dtype, jnp.inexact) else o
                for o, d in zip(outs, touts)]
      elif body is not None and name in REMAT_PRIMITIVES and inner and remat:
        outs = _remat(eqn, body, invals, key, perts, operands, inner, run)
      elif body is not None:
        outs = run(body.jaxpr, body.consts, invals, key, perts, operands)
      elif name == "scan" and inner:
        outs = _scan(eqn, invals, key, perts, operands, inner, run)
      elif name == "cond" and inner:
        outs = _switch(eqn, invals, key, perts, operands, inner, run)
      else:
        outs = bind(eqn, invals)
        if key in uses:
          u = uses[key]
          operands[key] = tuple(None if j == u.operand or not u.rule.records else x
                                for j, x in enumerate(invals))
          outs = [outs[0] + perts[key]]
      for v, x in zip(eqn.outvars, outs):
        if not isinstance(v, jcore.DropVar):
          env[v] = x
    return [read(v) for v in jaxpr.outvars]

  return run


def _remat(eqn, body, invals, key, perts, operands, inner, run):
  def fn(args, ps):
    ops = {}
    outs = run(body.jaxpr, body.consts, args, key, ps, ops)
    return outs, ops

  params = eqn.params
  outs, ops = jax.checkpoint(fn, prevent_cse=params.get("prevent_cse", True),
                             policy=params.get("policy"))(invals, {k: perts[k] for k in inner})
  operands.update(ops)
  return outs


def _scan(eqn, invals, key, perts, operands, inner, run):
  p = eqn.params
  nc, nk = p["num_consts"], p["num_carry"]
  body = p["jaxpr"]
  consts, init, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]

  layout = []  # where each recorded operand sits among the distinct values

  def step(carry, x):
    x_vals, ps = x
    ops = {}
    outs = run(body.jaxpr, body.consts, [*consts, *carry, *x_vals], key, ps, ops)
    # Several uses often record the same value (an LSTM's four gates read one
    # h): stack each distinct value once.
    distinct, index = [], {}
    layout.clear()
    for k, vals in ops.items():
      row = []
      for x in vals:
        if x is None:
          row.append(None)
          continue
        if id(x) not in index:
          index[id(x)] = len(distinct)
          distinct.append(x)
        row.append(index[id(x)])
      layout.append((k, row))
    return outs[:nk], (outs[nk:], distinct)

  carry, (ys, distinct) = lax.scan(step, init, (xs, {k: perts[k] for k in inner}),
                                   length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
  for k, row in layout:
    operands[k] = tuple(None if i is None else distinct[i] for i in row)
  return [*carry, *ys]


def _switch(eqn, invals, key, perts, operands, inner, run):
  index, args = invals[0], invals[1:]
  branches = eqn.params["branches"]
  ps = {k: perts[k] for k in inner}

  def branch_fn(b):
    def fn(args, ps):
      ops = {}
      outs = run(branches[b].jaxpr, branches[b].consts, args, key + (b,), ps, ops)
      return outs, ops

    return fn

  shapes = [jax.eval_shape(branch_fn(b), args, ps)[1] for b in range(len(branches))]
  every = {k: v for s in shapes for k, v in s.items()}

  def padded(b):
    def fn(args, ps):
      outs, ops = branch_fn(b)(args, ps)
      full = {k: ops.get(k, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), v))
              for k, v in every.items()}
      return outs, full

    return fn

  outs, ops = lax.switch(index, [padded(b) for b in range(len(branches))], args, ps)
  operands.update(ops)
  return outs


# ------------------------------------------------------------------ streamed scans

STREAMED = ("streamed: per-step norms in the backward pass of its rematerialized scan (global"
            " clipping: the clipped sum by a second, weighted backward pass)")


@dataclasses.dataclass(frozen=True)
class Stream:
  """A rematerialized scan over stacked parameters (``nn.scan(nn.remat(...))``)
  whose leaves' per-example norms are computed step by step in its backward pass.

  Step l of the scan sees slice l of each such leaf and nothing else does, so
  a leaf's squared norm is the sum over steps of its slices'. Each step runs
  under a ``custom_vjp`` that keeps only the step's inputs (as the remat the
  user asked for would) and, on the way back, recomputes the step with its
  uses instrumented, forms each slice's per-example norm by the leaf's route
  (ghost or direct) and returns [norm, suspect] as the cotangent of a zero
  input. The operands and cotangents of a step live only during its backward
  step: memory stays that of the rematerialized plain gradient. The clipped
  sum then comes from a second, weighted backward pass (:func:`run`).
  """

  key: tuple
  length: int
  slots: dict  # scan input index -> leaf
  leaves: tuple  # the streamed leaves, in the order of the norms' axis
  uses: dict  # leaf -> its uses, re-rooted at the scan body (the step's slice)
  routes: dict  # leaf -> "ghost" | "direct"
  slices: dict  # leaf -> (shape, dtype) of one step's slice

  @property
  def inner(self) -> dict:
    return {u.key: u for us in self.uses.values() for u in us}


def _path_eqns(jaxpr: Any, key: tuple) -> list:
  """The equations on the path ``key`` (through calls, scans and cond branches)."""
  out, i = [], 0
  while i < len(key):
    eqn = jaxpr.eqns[key[i]]
    out.append(eqn)
    i += 1
    if i == len(key):
      break
    if eqn.primitive.name == "cond":
      jaxpr, i = eqn.params["branches"][key[i]].jaxpr, i + 1
    elif eqn.primitive.name == "scan":
      jaxpr = eqn.params["jaxpr"].jaxpr
    else:
      body = call_body(eqn)
      if body is None:
        break
      jaxpr = body.jaxpr
  return out


def plan_streams(closed: jcore.ClosedJaxpr, analysis: Analysis, routes: dict,
                 params_flat: list) -> dict:
  """The scans whose leaves are streamed: scans reached through calls only,
  over leaves used nowhere else and with a rule for every use inside, and
  rematerialized inside (the user asked for the activations not to be kept)."""
  streams = {}
  perturbed = analysis.perturbed
  for skey, slots in analysis.scan_slices.items():
    path = _path_eqns(closed.jaxpr, skey)
    if any(call_body(e) is None or e.primitive.name in REMAT_PRIMITIVES for e in path[:-1]):
      continue
    inner = {k: u for k, u in perturbed.items() if k[:len(skey)] == skey}
    leaves = tuple(sorted(set(slots.values())))
    if not inner or len(leaves) != len(slots) or any(
        routes[leaf].route not in ("ghost", "direct", "unused") for leaf in leaves):
      continue
    if any(u.leaf not in leaves for u in inner.values()):
      continue
    if any(u.key[:len(skey)] != skey or u.chain[0] or u.scopes[0][0] != "xs"
           for leaf in leaves for u in analysis.uses[leaf]):
      continue
    if not any(e.primitive.name in REMAT_PRIMITIVES
               for k in inner for e in _path_eqns(closed.jaxpr, k)[len(path):]):
      continue
    rerooted = {leaf: [dataclasses.replace(u, chain=u.chain[1:], scopes=u.scopes[1:])
                       for u in analysis.uses[leaf]] for leaf in leaves}
    w = {leaf: params_flat[leaf] for leaf in leaves}
    streams[skey] = Stream(
        skey, path[-1].params["length"], dict(slots), leaves, rerooted,
        {leaf: routes[leaf].route for leaf in leaves},
        {leaf: (w[leaf].shape[1:], w[leaf].dtype) for leaf in leaves})
  return streams


_PLAIN = make_run({}, {}, {})  # evaluates a jaxpr as it is


def _float0_zeros(x):
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, jax.dtypes.float0)


def _step_norms(stream: Stream, ops: dict, cts: dict, dtype) -> jax.Array:
  """[leaves, 2]: each streamed leaf's slice norm for one example and step, and
  1 where the ghost sum may have lost accuracy (0 otherwise)."""
  rows = []
  for leaf in stream.leaves:
    us = stream.uses[leaf]
    if not us:
      rows.append(jnp.zeros((2,), dtype))
      continue
    shape, wdtype = stream.slices[leaf]
    ob = {u.key: tuple(None if o is None else o[None] for o in ops[u.key]) for u in us}
    cb = {u.key: cts[u.key][None] for u in us}
    if stream.routes[leaf] == "ghost":
      n, suspect = ghost_terms(ghosts(us, ob, cb, len(shape)))
    else:
      n = _per_example_norms(direct_grads(us, ob, cb, jnp.zeros(shape, wdtype)))
      suspect = jnp.zeros_like(n, bool)
    rows.append(jnp.stack([n[0].astype(dtype), suspect[0].astype(dtype)]))
  return jnp.stack(rows)


def _scan_streamed(eqn, invals, key, z, stream: Stream, tangents: dict):
  p = eqn.params
  nc, nk = p["num_consts"], p["num_carry"]
  body = p["jaxpr"]
  consts, init, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]
  slots = set(stream.slots)
  run = make_run(stream.inner, {}, tangents, remat=False)

  @jax.custom_vjp
  def step_fn(args, z):
    del z
    return _PLAIN(body.jaxpr, body.consts, args, key, {}, {})

  def fwd(args, z):
    return step_fn(args, z), (args, z)

  def bwd(res, ct):
    args, z = res
    diff = [j for j, x in enumerate(args)
            if j not in slots and jnp.issubdtype(x.dtype, jnp.inexact)]

    def inst(dvals, ps):
      full = list(args)
      for j, v in zip(diff, dvals):
        full[j] = v
      ops = {}
      outs = run(body.jaxpr, body.consts, full, key, ps, ops)
      return outs, ops

    ps0 = {k: jnp.zeros((*u.steps, *u.out_aval.shape), u.out_aval.dtype)
           for k, u in stream.inner.items()}
    _, vjp_fn, ops = jax.vjp(inst, [args[j] for j in diff], ps0, has_aux=True)
    d_diff, d_ps = vjp_fn(list(ct))
    dargs = [_float0_zeros(x) for x in args]
    for j, d in zip(diff, d_diff):
      dargs[j] = d
    return dargs, _step_norms(stream, ops, d_ps, z.dtype)

  step_fn.defvjp(fwd, bwd)

  def step(carry, xz):
    x, zl = xz
    outs = step_fn([*consts, *carry, *x], zl)
    return outs[:nk], outs[nk:]

  carry, ys = lax.scan(step, list(init), (list(xs), z), length=p["length"],
                       reverse=p["reverse"], unroll=p["unroll"])
  return [*carry, *ys]


def _apply_chain(segment: tuple, w: jax.Array) -> jax.Array:
  for eqn in segment:
    if isinstance(eqn, tuple):  # slot j of a concatenation: zeros in the others
      eqn, j = eqn
      invals = [w if k == j else jnp.zeros(v.aval.shape, v.aval.dtype)
                for k, v in enumerate(eqn.invars)]
    else:
      invals = [v.val if isinstance(v, jcore.Literal) else w for v in eqn.invars]
    (w,) = bind(eqn, invals)
  return w


def use_output(use: Use, operands: tuple, w: jax.Array) -> jax.Array:
  """The use's output for one example from leaf value ``w``; inside scans, the
  outputs of every step, stacked (the operands carry the step axes)."""

  def at(level, w, ops):
    w = _apply_chain(use.chain[level], w)
    if level == len(use.scopes):
      # Operands a rule does not record do not enter its gradient: zeros stand in.
      vals = [jnp.zeros(v.aval.shape, v.aval.dtype) if o is None else o
              for o, v in zip(ops, use.eqn.invars)]
      vals[use.operand] = w
      return bind(use.eqn, vals)[0]
    kind, length = use.scopes[level]
    if kind == "const":
      return jax.vmap(lambda o: at(level + 1, w, o), axis_size=length)(ops)
    return jax.vmap(lambda wl, o: at(level + 1, wl, o), axis_size=length)(w, ops)

  return at(0, w, operands)


def batched_pass(closed, analysis: Analysis, assemble: Callable, params_flat, batch_flat, b,
                 streams: dict | None = None, norm_dtype=jnp.float32):
  """One vmapped forward+backward over the batch.

  Returns (fallback gradients {leaf: [B, ...]}, operands {key: [B, ...]},
  cotangents {key: [B, ...]}, auxiliary outputs [B, ...] (the loss's outputs
  after the first)). A streamed scan's cotangent is its [B, steps, leaves, 2]
  per-step norms and flags (:class:`Stream`).
  """
  streams = streams or {}
  streamed = {k for st in streams.values() for k in st.inner}
  uses = {k: u for k, u in analysis.perturbed.items() if k not in streamed}
  fallback = sorted(analysis.fallback)

  def single(fb_vals, perts, batch_vals):
    leaves = dict(enumerate(params_flat))
    leaves.update(zip(fallback, fb_vals))
    outs, operands = eval_instrumented(closed, assemble(leaves, batch_vals), uses,
                                       streams, analysis.tangents)(perts)
    return outs[0], (operands, outs[1:])

  grad_fn = jax.grad(single, argnums=(0, 1), has_aux=True)
  perts = {
      k: jnp.zeros((b, *u.steps, *u.out_aval.shape), u.out_aval.dtype) for k, u in uses.items()
  }
  perts.update({k: jnp.zeros((b, st.length, len(st.leaves), 2), norm_dtype)
                for k, st in streams.items()})
  (fb_grads, cots), (operands, aux) = jax.vmap(grad_fn, in_axes=(None, 0, 0))(
      [params_flat[i] for i in fallback], perts, batch_flat
  )
  return dict(zip(fallback, fb_grads)), operands, cots, aux


# ------------------------------------------------------------------ planning


@dataclasses.dataclass(frozen=True)
class LeafRoute:
  """How one leaf's per-example norm is computed, with its estimated cost."""

  route: str  # "ghost" | "direct" | "materialized" | "unused"
  flops: int | None  # per batch
  bytes: int  # extra memory per batch (beyond the batched pass)
  why: str = ""


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
    return None if x is None else x.reshape((b * math.prod(steps),) + x.shape[1 + n:])

  g = use.rule.ghost(use, [merge(o) for o in operands], merge(cot), perm, coef)
  if g is None or not steps:
    return g
  head, pg, qg = g.layout
  if any(not isinstance(e, int) for e in head) or scope_heads != sorted(scope_heads) or (
      head and scope_heads and max(scope_heads) >= min(head)):
    return None  # the heads would not be in leaf-axis order
  kinds = [k for k, _ in use.scopes]
  xs_ax = [1 + i for i, k in enumerate(kinds) if k == "xs"]
  c_ax = [1 + i for i, k in enumerate(kinds) if k == "const"]

  def fold(x):  # [B·L…, H, T, (K)] -> [B, L_xs…·H, L_const…·T, (K)]
    x = x.reshape(b, *steps, *x.shape[1:])
    order = [0, *xs_ax, 1 + n, *c_ax, 2 + n, *range(3 + n, x.ndim)]
    x = jnp.transpose(x, order)
    h = math.prod(x.shape[1:2 + len(xs_ax)])
    t = math.prod(x.shape[2 + len(xs_ax):3 + n])
    return x.reshape(b, h, t, *x.shape[3 + n:])

  layout = (tuple(sorted([*scope_heads, *head])), pg, qg)
  p = (Index(fold(g.p.index), fold(g.p.valid), g.p.size) if isinstance(g.p, Index)
       else Dense(fold(g.p.value), g.p.kind))
  return Ghost(layout, p, Dense(fold(g.q.value), g.q.kind))


def _ghost_static(use: Use, ndim: int):
  """(layout, H, T, Kp, Kq, p is index) of a use's ghost factors, or None."""
  found = []

  def shapes(operands, cot):
    found.append(use_ghost(use, operands, cot, ndim))
    return 0

  avals = [None if j == use.operand else
           jax.ShapeDtypeStruct((1, *use.steps, *v.aval.shape), v.aval.dtype)
           for j, v in enumerate(use.eqn.invars)]
  cot = jax.ShapeDtypeStruct((1, *use.steps, *use.out_aval.shape), use.out_aval.dtype)
  jax.eval_shape(shapes, avals, cot)
  (g,) = found
  if g is None:
    return None
  if isinstance(g.p, Index):
    _, h, t = g.p.index.shape
    kp, index = 1, True
  else:
    _, h, t, kp = g.p.value.shape
    index = False
  return g.layout, h, t, kp, g.q.value.shape[-1], index


def plan_leaf(uses: list[Use], w: Any, b: int) -> LeafRoute:
  """The cheaper exact route for a recognized leaf (the mixed rule)."""
  itemsize = jnp.dtype(w.dtype).itemsize
  n = math.prod(w.shape)
  if not uses:
    return LeafRoute("unused", 0, 0)
  direct_flops = sum(u.rule.direct_flops(u) * math.prod(u.steps) for u in uses)
  direct = LeafRoute("direct", b * (direct_flops + 2 * n),
                     b * n * itemsize)
  statics = [_ghost_static(u, len(w.shape)) for u in uses]
  if any(s is None for s in statics) or len({s[0] for s in statics}) != 1:
    return direct
  h = statics[0][1]
  t = sum(s[2] for s in statics)
  t_dense = sum(s[2] for s in statics if not s[5])  # index factors' Grams are comparisons
  kp = max([s[3] for s in statics if not s[5]], default=1)
  kq = statics[0][4]
  acc = 8 if jnp.issubdtype(w.dtype, jnp.complexfloating) else 4
  ghost = LeafRoute("ghost", b * h * (2 * t_dense * t_dense * kp + 2 * t * t * kq + 4 * t * t),
                    b * h * t * t * 2 * acc)
  return ghost if ghost.flops <= direct.flops else direct


# ------------------------------------------------------------------ the routes


def _acc(dtype) -> jnp.dtype:
  return jnp.promote_types(dtype, jnp.float32)


def _conj(x):
  return jnp.conj(x) if jnp.iscomplexobj(x) else x


def _gram(x, y):
  return jnp.einsum("bhtk,bhsk->bhts", x, _conj(y), precision=lax.Precision.HIGHEST)


def _amax(x: jax.Array, acc) -> jax.Array:
  return jnp.max(jnp.abs(x), axis=tuple(range(1, x.ndim)), initial=0).astype(acc)


def ghosts(uses: list[Use], operands: dict, cots: dict, ndim: int) -> list[Ghost]:
  return [use_ghost(u, operands[u.key], cots[u.key], ndim) for u in uses]


def ghost_norms(gs: list[Ghost], exact: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """[B] norms of Σ_uses Σ_t P_t ⊗ Q_t, exact where the ghost sum may not be."""
  norms, suspect = ghost_terms(gs)
  return lax.cond(jnp.any(suspect), lambda: jnp.where(suspect, exact(suspect), norms),
                  lambda: norms)


def ghost_terms(gs: list[Ghost]) -> tuple[jax.Array, jax.Array]:
  """([B] ghost norms, [B] bool: the sum may have lost more than GHOST_RTOL)."""
  dense = [g for g in gs if isinstance(g.p, Dense)]
  index = [g for g in gs if isinstance(g.p, Index)]
  acc = _acc(jnp.result_type(*[g.q.value.dtype for g in gs],
                             *[g.p.value.dtype for g in dense]))
  real = jnp.finfo(acc).dtype
  # Per-example powers of two: every term of the sum has two cotangent factors,
  # and (without index factors) two activation factors.
  kinds = {"cot": [], "act": []}
  for g in gs:
    for f in (g.p, g.q):
      if isinstance(f, Dense):
        kinds[f.kind].append(_amax(f.value, real))
  e = {k: -pow2_exponent(jnp.max(jnp.stack(v), axis=0)) if v and (k == "cot" or not index)
       else None for k, v in kinds.items()}

  def scaled(f):
    x = f.value.astype(acc)
    if e[f.kind] is None:
      return x
    return x * jnp.ldexp(jnp.ones((), real), -e[f.kind])[:, None, None, None]

  q = jnp.concatenate([scaled(g.q) for g in dense + index], axis=2)
  blocks, diag_p = [], []
  if dense:
    pd = jnp.concatenate([scaled(g.p) for g in dense], axis=2)
    diag_p.append(jnp.sum(jnp.abs(pd) ** 2, axis=-1))
  if index:
    idx = jnp.concatenate([g.p.index for g in index], axis=2)
    valid = jnp.concatenate([g.p.valid for g in index], axis=2)
    diag_p.append(valid.astype(real))
    ii = ((idx[..., :, None] == idx[..., None, :]) & valid[..., :, None]
          & valid[..., None, :]).astype(acc)
  if dense and index:
    # ⟨onehot(i_t), d_s⟩ = conj(d_s[i_t]): a gather of the dense factor.
    di = jnp.take_along_axis(jnp.swapaxes(pd, 2, 3), idx[..., None], axis=2)  # [B,H,Ti,Td]
    di = di * valid[..., None]
    blocks = [[_gram(pd, pd), jnp.swapaxes(di, 2, 3)], [_conj(di), ii]]
  elif dense:
    blocks = [[_gram(pd, pd)]]
  else:
    blocks = [[ii]]
  pg = jnp.concatenate([jnp.concatenate(row, axis=3) for row in blocks], axis=2)
  s = jnp.real(jnp.sum(pg * _gram(q, q), axis=(1, 2, 3)))
  bound = jnp.sum(jnp.concatenate(diag_p, axis=2) * jnp.sum(jnp.abs(q) ** 2, axis=-1),
                  axis=(1, 2))
  t = q.shape[2]
  k = q.shape[3] + max([g.p.value.shape[-1] for g in dense], default=1)
  tol = 4 * float(jnp.finfo(real).eps) * (math.sqrt(k) + t) / GHOST_RTOL
  suspect = ~jnp.isfinite(s) | (s < tol * bound)
  shift = sum(x for x in e.values() if x is not None)
  return jnp.ldexp(jnp.sqrt(jnp.maximum(s, 0)), shift), suspect


def direct_grads(uses: list[Use], operands: dict, cots: dict, w: jax.Array) -> jax.Array:
  """[B, *w.shape]: each example's gradient of leaf ``w`` from its uses.

  Where the uses have ghost factors of one layout, Σ_t P_t ⊗ Q_t is one batched
  contraction (a convolution's patches times its output cotangents); otherwise
  it is the vjp of the uses' equations, vmapped over the batch.
  """
  gs = ghosts(uses, operands, cots, w.ndim)
  if all(g is not None for g in gs) and len({g.layout for g in gs}) == 1:
    return _factor_grads(gs, w)
  ops = [operands[u.key] for u in uses]
  cs = [cots[u.key] for u in uses]
  return jax.vmap(lambda o, c: one_grad(uses, o, c, w))(ops, cs)


def _factor_grads(gs: list[Ghost], w: jax.Array, weights: jax.Array | None = None,
                  keep: jax.Array | None = None) -> jax.Array:
  """Σ_t P_t ⊗ Q_t in the leaf's layout: [B, *w.shape] per example, or with
  ``weights`` the book-keeping sum Σᵢ wᵢ Σ_t P_t ⊗ Q_t, [*w.shape]. Rows where
  ``keep`` is False are zeroed first (a non-finite example cannot reach the
  sum through 0·inf)."""
  head, pa, qa = gs[0].layout
  total = 0
  for g in gs:
    q = g.q.value
    if keep is not None:
      q = _rows(keep, q)
    if weights is not None:
      q = q * weights.astype(q.dtype)[:, None, None, None]
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
      pv = g.p.value if keep is None else _rows(keep, g.p.value)
      spec = "bhtp,bhtq->bhpq" if weights is None else "bhtp,bhtq->hpq"
      out = jnp.einsum(spec, pv, q, precision=lax.Precision.HIGHEST)
      total = total + (out if weights is None else out[None])
  b = total.shape[0]
  groups = [e for e in head if not isinstance(e, int)]
  if groups:  # ("split", axis, G): G groups of one axis (grouped convolutions)
    (_, axis, n_groups), = groups
    sizes = [w.shape[a] // n_groups if a == axis else w.shape[a] for a in pa + qa]
    x = total.reshape(b, n_groups, *sizes)
    x = jnp.moveaxis(x, 1, 1 + (pa + qa).index(axis))
    x = x.reshape(b, *[w.shape[a] for a in pa + qa])
    order = list(pa + qa)
  else:
    order = list(head + pa + qa)
    x = total.reshape(b, *[w.shape[a] for a in order])
  x = jnp.transpose(x, [0] + [1 + order.index(j) for j in range(w.ndim)]).astype(w.dtype)
  return x if weights is None else x[0]


def one_grad(uses: list[Use], ops: list, cs: list, w: jax.Array) -> jax.Array:
  """One example's gradient of ``w``: the vjp of its uses' equations."""
  _, vjp = jax.vjp(lambda w: [use_output(u, o, w) for u, o in zip(uses, ops)], w)
  (g,) = vjp(list(cs))
  return g


def exact_norms(uses, operands, cots, w):
  """A function of ``which`` [B] giving exact norms, one example at a time."""
  ops = [operands[u.key] for u in uses]
  cs = [cots[u.key] for u in uses]

  def fn(which):
    def each(args):
      flag, o, c = args
      return lax.cond(flag, lambda: tree_norm(one_grad(uses, o, c, w)),
                      lambda: jnp.zeros((), _norm_dtype(w)))

    return lax.map(each, (which, ops, cs))

  return fn


def _norm_dtype(w):
  return jnp.finfo(_acc(w.dtype)).dtype


def _rows(keep: jax.Array, x: Any) -> Any:
  """``x`` [B, ...] with the rows where ``keep`` is False set to 0 (floats only)."""
  if x is None or not jnp.issubdtype(x.dtype, jnp.inexact):
    return x
  return jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0)


def weighted_sum(weights: jax.Array, per_example: jax.Array) -> jax.Array:
  """Σᵢ wᵢ·gᵢ over the leading axis, accumulated in at least float32 (complex kept)."""
  acc = _acc(per_example.dtype)
  return jnp.tensordot(weights.astype(acc), per_example.astype(acc), axes=1).astype(
      per_example.dtype)


# ------------------------------------------------------------------ orchestration


def _per_example_norms(g: jax.Array) -> jax.Array:
  return jax.vmap(tree_norm)(g)


def _loss_of(closed, assemble, params_flat: list, batch_vals: list, leaves: dict) -> jax.Array:
  """The single-example loss with some parameter leaves replaced."""
  vals = dict(enumerate(params_flat))
  vals.update(leaves)
  return _PLAIN(closed.jaxpr, closed.consts, assemble(vals, batch_vals), (), {}, {})[0]


def exact_leaf_norms(closed, assemble, params_flat, batch_flat, leaves: list,
                     dtype) -> Callable:
  """A function of ``which`` [B] giving [B, len(leaves)] exact norms of those
  leaves' per-example gradients (a full gradient of one example at a time)."""

  def each(args):
    flag, batch_vals = args

    def compute():
      gs = jax.grad(lambda ws: _loss_of(closed, assemble, params_flat, batch_vals,
                                        dict(zip(leaves, ws))))([params_flat[i] for i in leaves])
      return jnp.stack([tree_norm(g).astype(dtype) for g in gs])

    return lax.cond(flag, compute, lambda: jnp.zeros((len(leaves),), dtype))

  return lambda which: lax.map(each, (which, batch_flat))


def weighted_grads(closed, assemble, params_flat, batch_flat, weights, keep) -> list:
  """Σᵢ wᵢ ∇loss(xᵢ) for every leaf, by one weighted backward pass. Rows not
  kept (padding, or a non-finite gradient with ``nan_safe``) are replaced by a
  kept row before the pass (their weight is 0), so 0·inf cannot reach the sum."""
  first = jnp.argmax(keep)
  rows = [jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, x[first])
          for x in batch_flat]

  def total(ps):
    losses = jax.vmap(lambda bv: _loss_of(closed, assemble, ps, bv, {}))(rows)
    return jnp.sum(weights.astype(losses.dtype) * losses)

  grads = jax.grad(total)(list(params_flat))
  return [jnp.where(jnp.any(keep), g, jnp.zeros_like(g)) for g in grads]


def run(closed, analysis: Analysis, routes: dict, assemble, params_flat, batch_flat, b,
        weights_fn: Callable | None, mask: jax.Array | None, nan_safe: bool,
        uniform_weights: bool = True):
  """Per-example norms [B], the clipped sums Σᵢ wᵢ gᵢ of every leaf (when
  ``weights_fn`` maps (per-leaf norms [B, L], norms [B]) to each leaf's weights
  [B]), and the loss's auxiliary outputs stacked over the batch.

  ``mask`` [B] (False: padding) zeroes an example's norm and weight; with
  ``nan_safe`` an example whose gradient is not finite gets weight 0 (its norm
  is reported as computed) and cannot make the sums NaN. ``uniform_weights``:
  every leaf gets the same weights (global clipping), which lets rematerialized
  scans stream (:class:`Stream`): their sums then come from one weighted
  backward pass.
  """
  dtype = jnp.result_type(*[_norm_dtype(w) for w in params_flat]) if params_flat else jnp.float32
  streams = plan_streams(closed, analysis, routes, params_flat) if uniform_weights else {}
  fb_grads, operands, cots, aux = batched_pass(
      closed, analysis, assemble, params_flat, batch_flat, b, streams, dtype)
  streamed = {}  # leaf -> its norms [B] and suspect flags [B]
  for skey, st in streams.items():
    for n, leaf in enumerate(st.leaves):
      per_step = cots[skey][:, :, n]
      streamed[leaf] = (jax.vmap(tree_norm)(per_step[..., 0]), jnp.any(per_step[..., 1] > 0, 1))
  if streamed:
    order = sorted(streamed)
    suspect = jnp.stack([streamed[leaf][1] for leaf in order], axis=1)
    fast = jnp.stack([streamed[leaf][0] for leaf in order], axis=1)
    exact = exact_leaf_norms(closed, assemble, params_flat, batch_flat, order, dtype)
    fixed = lax.cond(jnp.any(suspect), lambda: jnp.where(suspect, exact(jnp.any(suspect, 1)), fast),
                     lambda: fast)
    streamed = {leaf: fixed[:, n] for n, leaf in enumerate(order)}
  formed, factors, leaf_norms = {}, {}, []
  for leaf, w in enumerate(params_flat):
    route = routes[leaf].route
    uses = analysis.uses.get(leaf, [])
    if leaf in streamed:
      n = streamed[leaf]
    elif route == "materialized":
      formed[leaf] = fb_grads[leaf]
    elif route == "direct":
      formed[leaf] = direct_grads(uses, operands, cots, w)
    if leaf in streamed:
      pass
    elif leaf in formed:
      n = _per_example_norms(formed[leaf])
    elif route == "ghost":
      factors[leaf] = ghosts(uses, operands, cots, w.ndim)  # reused for the clipped sum
      n = ghost_norms(factors[leaf], exact_norms(uses, operands, cots, w))
    else:
      n = jnp.zeros((b,), dtype)
    leaf_norms.append(n.astype(dtype))
  leaf_norms = jnp.stack(leaf_norms, axis=1) if leaf_norms else jnp.zeros((b, 0), dtype)
  norms = jax.vmap(tree_norm)(leaf_norms)
  keep = jnp.ones((b,), bool) if mask is None else mask
  if mask is not None:
    norms = jnp.where(keep, norms, 0)
    leaf_norms = jnp.where(keep[:, None], leaf_norms, 0)
  if weights_fn is None:
    return norms, None, aux
  if nan_safe:
    keep = keep & jnp.isfinite(norms)
  zero_rows = keep if (nan_safe or mask is not None) else None
  if streams:  # one weight per example: a second, weighted backward pass
    weights = jnp.where(keep, weights_fn(leaf_norms, norms)[0], 0)
    return norms, weighted_grads(closed, assemble, params_flat, batch_flat, weights, keep), aux
  sums = []
  for leaf, (w, weights) in enumerate(zip(params_flat, weights_fn(leaf_norms, norms))):
    weights = jnp.where(keep, weights, 0)
    if leaf in formed:
      g = formed[leaf] if zero_rows is None else _rows(zero_rows, formed[leaf])
      sums.append(weighted_sum(weights, g))
    elif leaf in factors:  # Σᵢ wᵢ Σ_t P_t ⊗ Q_t from the norm's own factors
      sums.append(_factor_grads(factors[leaf], w, weights, zero_rows))
    else:
      sums.append(jnp.zeros_like(w))
  return norms, sums, aux
