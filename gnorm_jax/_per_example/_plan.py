"""Stage 3, Plan: every leaf's route and cost, every stream, the whole-call choice.

The plan is made once per traced call from the :class:`~._program.Program` and
the call's options, and it is the one object both :func:`per_example_plan`
prints and the run executes:

* each recognized leaf takes the cheaper exact route by estimated flops (the
  mixed rule, Bu et al. 2022): ``ghost`` (Gram matrices of its factors) or
  ``direct`` (its per-example gradient formed from recorded operands);
  a leaf no rule recognizes is ``materialized`` (exact per-example gradients
  of that leaf alone, in the batched pass);
* a rematerialized scan over stacked layers whose leaves all have routes is
  *streamed* (:class:`~._stream.Stream`), when every leaf gets the same clip
  weights (norms only, or one global threshold);
* the whole call runs ``vmap`` of ``jax.grad`` of the user's loss when asked
  (``method="vmap"``) or when no leaf has a rule (it is then as cheap and
  simpler); otherwise the ``engine``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from gnorm_jax._per_example import _jaxpr
from gnorm_jax._per_example._ghost import use_ghost
from gnorm_jax._per_example._program import Program
from gnorm_jax._per_example._rules import Index, Use
from gnorm_jax._per_example._stream import Stream

STREAMED = (
  "streamed: per-step norms in the backward pass of its rematerialized scan (global"
  " clipping: the clipped sum by a second, weighted backward pass)"
)


@dataclasses.dataclass(frozen=True)
class LeafRoute:
  """How one leaf's per-example norm is computed, with its estimated cost."""

  route: str  # "ghost" | "direct" | "materialized" | "unused"
  flops: int | None  # per batch
  bytes: int  # extra memory per batch (beyond the batched pass)
  why: str = ""


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
  """What one call executes.

  Attributes:
    program: the loss in the engine's terms.
    routes: leaf -> its :class:`LeafRoute`.
    streams: scan key -> its :class:`~._stream.Stream`.
    method: ``"engine"`` or ``"vmap"`` (vmap of ``jax.grad`` of the user's loss).
    batch_size: examples per pass (the microbatch size when microbatching).
    num_passes: passes over microbatches (1 without microbatching).
  """

  program: Program
  routes: dict
  streams: dict
  method: str
  batch_size: int
  num_passes: int = 1

  @property
  def streamed(self) -> set:
    return {leaf for st in self.streams.values() for leaf in st.leaves}

  def why(self, leaf: int) -> str:
    return STREAMED if leaf in self.streamed else self.routes[leaf].why


def _ghost_static(use: Use, ndim: int):
  """(layout, H, T, Kp, Kq, p is index) of a use's ghost factors, or None."""
  found = []

  def shapes(operands, cot):
    found.append(use_ghost(use, operands, cot, ndim))
    return 0

  avals = [
    None if j == use.operand else jax.ShapeDtypeStruct((1, *use.steps, *a.shape), a.dtype)
    for j, a in enumerate(use.eqn.in_avals)
  ]
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
  direct_total = b * (direct_flops + 2 * n)
  direct = LeafRoute("direct", direct_total, b * n * itemsize)
  statics = [_ghost_static(u, len(w.shape)) for u in uses]
  if any(s is None for s in statics) or len({s[0] for s in statics}) != 1:
    return direct
  h = statics[0][1]
  t = sum(s[2] for s in statics)
  t_dense = sum(s[2] for s in statics if not s[5])  # index factors' Grams are comparisons
  kp = max([s[3] for s in statics if not s[5]], default=1)
  kq = statics[0][4]
  acc = 8 if jnp.issubdtype(w.dtype, jnp.complexfloating) else 4
  ghost_total = b * h * (2 * t_dense * t_dense * kp + 2 * t * t * kq + 4 * t * t)
  ghost = LeafRoute("ghost", ghost_total, b * h * t * t * 2 * acc)
  return ghost if ghost_total <= direct_total else direct


def plan_streams(program: Program, routes: dict, params_flat: list) -> dict:
  """The scans whose leaves are streamed: scans reached through calls only,
  over leaves used nowhere else and with a rule for every use inside, and
  rematerialized inside (the user asked for the activations not to be kept)."""
  streams = {}
  perturbed = program.perturbed
  for skey, slots in program.scan_slices.items():
    path = program.eqns_on(skey)
    if any(e.kind != _jaxpr.CALL for e in path[:-1]):
      continue
    inner = {k: u for k, u in perturbed.items() if k[: len(skey)] == skey}
    leaves = tuple(sorted(set(slots.values())))
    if (
      not inner
      or len(leaves) != len(slots)
      or any(routes[leaf].route not in ("ghost", "direct", "unused") for leaf in leaves)
    ):
      continue
    if any(u.leaf not in leaves for u in inner.values()):
      continue
    if any(
      u.key[: len(skey)] != skey or u.chain[0] or u.scopes[0][0] != "xs"
      for leaf in leaves
      for u in program.uses[leaf]
    ):
      continue
    if not any(e.kind == _jaxpr.REMAT for k in inner for e in program.eqns_on(k)[len(path) :]):
      continue
    rerooted = {
      leaf: [
        dataclasses.replace(u, chain=u.chain[1:], scopes=u.scopes[1:]) for u in program.uses[leaf]
      ]
      for leaf in leaves
    }
    w = {leaf: params_flat[leaf] for leaf in leaves}
    scan = path[-1].scan
    if scan is None:  # not reached: the keys of scan_slices are scans
      raise AssertionError(f"the equation at {skey} is not a scan")
    streams[skey] = Stream(
      skey,
      scan.length,
      dict(slots),
      leaves,
      rerooted,
      {leaf: routes[leaf].route for leaf in leaves},
      {leaf: (w[leaf].shape[1:], w[leaf].dtype) for leaf in leaves},
    )
  return streams


def make_plan(
  program: Program,
  params_flat: list,
  batch_size: int,
  *,
  method: str,
  uniform_weights: bool,
  num_passes: int = 1,
) -> Plan:
  """The plan of one call.

  Args:
    program: the loss in the engine's terms (for ``method="vmap"``, every leaf a
      fallback leaf).
    params_flat: the parameter leaves.
    batch_size: examples per pass.
    method: the user's ``method`` ("auto", "ghost" or "vmap").
    uniform_weights: every leaf gets the same clip weights (norms only, or one
      global threshold), which lets rematerialized scans stream.
    num_passes: microbatch passes.
  """
  routes = {}
  for leaf, w in enumerate(params_flat):
    if leaf in program.fallback:
      routes[leaf] = LeafRoute(
        "materialized", None, batch_size * w.size * w.dtype.itemsize, program.fallback[leaf]
      )
    else:
      routes[leaf] = plan_leaf(program.uses[leaf], w, batch_size)
  every_materialized = any(r.route == "materialized" for r in routes.values()) and all(
    r.route in ("materialized", "unused") for r in routes.values()
  )
  if method == "vmap" or every_materialized:
    return Plan(program, routes, {}, "vmap", batch_size, num_passes)
  streams = plan_streams(program, routes, params_flat) if uniform_weights else {}
  return Plan(program, routes, streams, "engine", batch_size, num_passes)
