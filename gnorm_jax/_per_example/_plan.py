"""Stage 3, Plan: every leaf's route and cost, every stream, the whole-call choice.

The plan is made once per traced call from the :class:`~._program.Program` and
the call's options, and it is the one object both :func:`per_example_plan`
prints and the run executes:

* each recognized leaf takes the exact route estimated faster on the backend
  (the mixed rule, Bu et al. 2022, priced in flops, bytes and kernels):
  ``ghost`` (Gram matrices of its factors) or ``direct`` (its per-example
  gradient formed from recorded operands);
  a leaf no rule recognizes is ``materialized`` (exact per-example gradients
  of that leaf alone, in the batched pass);
* a rematerialized scan over stacked layers whose leaves all have routes is
  *streamed* (:class:`~._stream.Stream`), when every leaf gets the same clip
  weights (norms only, or one global threshold);
* the whole call runs ``vmap`` of ``jax.grad`` of the user's loss when asked
  (``method="vmap"``), when no leaf has a rule (it is then as cheap and
  simpler), or, for ``method="auto"`` on a GPU or TPU, when the cost model
  (:class:`Machine`) estimates it at most ``VMAP_MARGIN`` of the engine's time
  and its memory stays near the engine's; otherwise the ``engine``.

The cost model prices what each alternative adds to the plain gradient as
flops/F + bytes moved/BW + kernels·L with per-backend constants. On a GPU, where
a step of a small model takes about a millisecond, kernels can cost more than
flops; in XLA:GPU's programs of the GPU form, a formed leaf adds about as many
kernels to the engine as to vmap(grad), so vmap is estimated faster only where
the engine's ghost leaves cost more kernels than they save. On a CPU "auto" keeps
the engine: measured on real models (docs/benchmarks.md), vmap is at most about
10% faster there (small dense transformers, within run-to-run noise), up to 20x
slower (grouped convolutions, whose per-example kernel gradients vmap runs as
B·G groups) and takes 1.5-5x the engine's memory.
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
STREAMED_ONE_PASS = (
  "streamed: per-step norms in the backward pass of its rematerialized scan, and each"
  " step's factors kept for the clipped sum (one pass)"
)


@dataclasses.dataclass(frozen=True)
class Machine:
  """Constants of the cost model of one backend: time = flops/flops_per_s +
  bytes/bytes_per_s + kernels·s_per_kernel, with the kernels each route adds
  per leaf (``kernels``, "vmap" for vmap(grad)'s) and each method per call
  (``call_kernels``: combining the leaves' norms)."""

  flops_per_s: float
  bytes_per_s: float
  s_per_kernel: float
  kernels: dict
  call_kernels: dict

  def seconds(self, flops: float, nbytes: float, kernels: float) -> float:
    return flops / self.flops_per_s + nbytes / self.bytes_per_s + kernels * self.s_per_kernel


# Kernels per leaf and per call, from the HLO census of the benchmark and real
# models (docs/benchmarks.md): XLA:CPU's programs of the CPU form, and XLA:GPU's
# of the GPU/TPU form (compiled for an H100 without a GPU), where a group's
# leaves share their norm reductions: there a formed leaf adds about half a
# kernel to the engine and to vmap(grad) alike, a ghost leaf about three, and
# each method about four per call. TPU programs are not measured; they take the
# GPU form's counts.
_CPU_KERNELS = {"ghost": 10, "direct": 5, "materialized": 4, "unused": 0, "vmap": 4}
_GPU_KERNELS = {"ghost": 3, "direct": 0.5, "materialized": 0.5, "unused": 0, "vmap": 0.5}
# Set from the benchmark models (docs/benchmarks.md): the CPU's from a 2-core
# x86 machine, the GPU's from an H100 (float32 at HIGHEST precision, HBM3, a
# launch of a small fusion), the TPU's from a v5e-class chip.
MACHINES = {
  "cpu": Machine(5e10, 1e10, 2e-6, _CPU_KERNELS, {"engine": 8, "vmap": 4}),
  "gpu": Machine(2e13, 2e12, 5e-6, _GPU_KERNELS, {"engine": 4, "vmap": 4}),
  "tpu": Machine(5e13, 8e11, 2e-6, _GPU_KERNELS, {"engine": 4, "vmap": 4}),
}
# "auto" runs vmap only when estimated at most VMAP_MARGIN of the engine's time,
# and when its extra memory is at most VMAP_MEMORY_FACTOR times the engine's
# plus VMAP_SLACK_BYTES: the engine is often chosen for its memory.
VMAP_MARGIN = 0.8
VMAP_MEMORY_FACTOR = 2
VMAP_SLACK_BYTES = 64 * 2**20
# vmap(grad) forms a convolution's per-example kernel gradients as a convolution
# of B·G groups. Measured on CPU (2026-12-07, B=32, each against the batched
# gradient of the same convolution): an ungrouped one costs 1.0-2.7x (the more
# for strided and large kernels), a grouped or depthwise one 10-27x. Their flops
# are priced this many times a dense contraction's.
VMAP_CONV_SLOWDOWN = 2
VMAP_GROUPED_CONV_SLOWDOWN = 10
# Tests set this to price and choose as on another backend.
_PLATFORM: str | None = None


@dataclasses.dataclass(frozen=True)
class LeafRoute:
  """How one leaf's per-example norm is computed, with its estimated cost."""

  route: str  # "ghost" | "direct" | "materialized" | "unused"
  flops: int | None  # per batch
  bytes: int  # extra memory per batch (beyond the batched pass)
  why: str = ""
  # Every alternative considered: (route, flops, bytes), the chosen one included.
  options: tuple = ()
  # What vmap(grad) of the whole loss adds for this leaf: (flops, bytes).
  vmap: tuple = (0, 0)
  # Bytes the ghost route reads beyond its Grams: its factors, once more.
  factor_bytes: int = 0


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
    estimates: estimated seconds per pass of ``"engine"`` and ``"vmap"`` on
      ``platform`` (what ``method="auto"`` compares).
    platform: the backend the estimates are for.
  """

  program: Program
  routes: dict
  streams: dict
  method: str
  batch_size: int
  num_passes: int = 1
  estimates: Any = None
  platform: str = "cpu"

  @property
  def streamed(self) -> set:
    return {leaf for st in self.streams.values() for leaf in st.leaves}

  def why(self, leaf: int) -> str:
    for st in self.streams.values():
      if leaf in st.leaves:
        return STREAMED_ONE_PASS if st.one_pass else STREAMED
    return self.routes[leaf].why


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


def _vmap_slowdown(use: Use) -> int:
  """How many times slower vmap(grad) forms the use's per-example gradients than
  a dense contraction of the same flops."""
  if use.eqn.name != "conv_general_dilated":
    return 1
  grouped = use.eqn.params.get("feature_group_count", 1) > 1
  return VMAP_GROUPED_CONV_SLOWDOWN if grouped else VMAP_CONV_SLOWDOWN


def plan_leaf(uses: list[Use], w: Any, b: int, platform: str = "cpu") -> LeafRoute:
  """The cheaper exact route for a recognized leaf on ``platform`` (the mixed rule).

  Both routes contract each example's factors over its positions once: the
  direct route to form the per-example gradients, which its weighted sum then
  reads, the ghost route for the clipped sum. What differs is the ghost Grams
  against the direct route's B per-example gradients, written and read twice
  (the norms, the weighted sum): the choice weighs those alone, in the
  backend's time (a streamed leaf chooses again: :func:`by_flops`). The flops
  reported are each route's own.
  """
  itemsize = jnp.dtype(w.dtype).itemsize
  n = math.prod(w.shape)
  if not uses:
    return LeafRoute("unused", 0, 0)
  direct_flops = sum(u.rule.direct_flops(u) * math.prod(u.steps) for u in uses)
  direct_total = b * (direct_flops + 2 * n)
  slow = max([_vmap_slowdown(u) for u in uses])
  vmap = (4 * b * n + (slow - 1) * direct_total, b * n * itemsize)
  direct = LeafRoute("direct", direct_total, b * n * itemsize, vmap=vmap)
  statics = [_ghost_static(u, len(w.shape)) for u in uses]
  if any(s is None for s in statics) or len({s[0] for s in statics}) != 1:
    return dataclasses.replace(direct, options=(("direct", direct.flops, direct.bytes),))
  h = statics[0][1]
  t = sum(s[2] for s in statics)
  t_dense = sum(s[2] for s in statics if not s[5])  # index factors' Grams are comparisons
  kp = max([s[3] for s in statics if not s[5]], default=1)
  kq = statics[0][4]
  acc = 8 if jnp.issubdtype(w.dtype, jnp.complexfloating) else 4
  ghost_total = b * h * (2 * t_dense * t_dense * kp + 2 * t * t * kq + 4 * t * t)
  factor_bytes = b * h * (t * kp + t * kq) * itemsize
  ghost = LeafRoute(
    "ghost", ghost_total, b * h * t * t * 2 * acc, vmap=vmap, factor_bytes=factor_bytes
  )
  options = (("ghost", ghost.flops, ghost.bytes), ("direct", direct.flops, direct.bytes))
  machine = MACHINES.get(platform, MACHINES["gpu"])
  chosen = (
    ghost if route_seconds(machine, ghost, n, b) <= route_seconds(machine, direct, n, b) else direct
  )
  return dataclasses.replace(chosen, options=options)


def by_flops(r: LeafRoute) -> LeafRoute:
  """``r`` with the route of fewer flops among its options (ghost on a tie).

  For a streamed leaf, whose clipped sum comes from a second backward pass:
  there the direct route's per-example gradients serve the norms alone, so
  the routes compare by their own flops. On the one-pass route too: the
  direct route would keep B per-example slices at every step (on the scanned
  GPT of the benchmarks, the mixed rule's direct attention projections took
  313 MiB of temp against 232)."""
  options = {name: (flops, nbytes) for name, flops, nbytes in r.options}
  if "ghost" not in options:
    return r
  route = "ghost" if options["ghost"][0] <= options["direct"][0] else "direct"
  flops, nbytes = options[route]
  return dataclasses.replace(r, route=route, flops=flops, bytes=nbytes)


def route_seconds(machine: Machine, r: LeafRoute, n: int, b: int) -> float:
  """What a leaf's route adds to the plain gradient's time (``n`` its size, ``b``
  the batch). Every route forms the weight gradient's contraction once (the
  ghost route as its clipped sum, the others per example), so what a route adds
  is: the ghost route's Grams (their flops; their bytes, written once and read
  about twice; its factors read once more); the B per-example gradients of a
  direct or materialized leaf, written once and read twice (the norms, the
  weighted sum), about four flops per entry."""
  if r.route == "unused":
    return 0.0
  if r.route == "ghost":
    return machine.seconds(r.flops or 0, 3 * r.bytes + r.factor_bytes, machine.kernels["ghost"])
  return machine.seconds(4 * b * n, 3 * r.bytes, machine.kernels[r.route])


def estimate(routes: dict, params_flat: list, b: int, platform: str) -> dict:
  """Estimated seconds that the engine and vmap(grad) add to the plain gradient
  in one pass, and their extra memory: ``{"engine": s, "vmap": s, "engine_bytes":
  n, "vmap_bytes": n}``. vmap's B per-example gradients of a leaf cost as the
  direct route's (a convolution's formed slower: :func:`_vmap_slowdown`)."""
  machine = MACHINES.get(platform, MACHINES["gpu"])
  engine = machine.seconds(0, 0, machine.call_kernels["engine"])
  vmap = machine.seconds(0, 0, machine.call_kernels["vmap"])
  engine_bytes = vmap_bytes = 0
  for leaf, r in routes.items():
    w = params_flat[leaf]
    materialized = (4 * b * w.size, b * w.size * jnp.dtype(w.dtype).itemsize)
    vf, vb = r.vmap if r.route in ("ghost", "direct") else materialized
    engine += route_seconds(machine, r, w.size, b)
    vmap += machine.seconds(vf, 3 * vb, machine.kernels["vmap"])
    engine_bytes += r.bytes
    vmap_bytes += vb
  return {"engine": engine, "vmap": vmap, "engine_bytes": engine_bytes, "vmap_bytes": vmap_bytes}


def auto_prefers_vmap(est: dict, platform: str) -> bool:
  """``method="auto"``: vmap on a GPU or TPU when estimated clearly faster and its
  memory stays near the engine's; on CPU never (see the module's docstring)."""
  near = est["vmap_bytes"] <= VMAP_MEMORY_FACTOR * est["engine_bytes"] + VMAP_SLACK_BYTES
  return platform != "cpu" and est["vmap"] <= VMAP_MARGIN * est["engine"] and near


def plan_streams(program: Program, routes: dict, params_flat: list, one_pass: bool) -> dict:
  """The scans whose leaves are streamed: scans reached through calls only,
  over leaves used nowhere else and with a rule for every use inside, and
  rematerialized inside (the user asked for the activations not to be kept).
  With ``one_pass`` each keeps its steps' factors for the clipped sum."""
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
      path[-1].bodies[0],
      program.tangents,
      one_pass,
    )
  return streams


def make_plan(
  program: Program,
  params_flat: list,
  batch_size: int,
  *,
  method: str,
  uniform_weights: bool,
  keep_factors: bool = False,
  num_passes: int = 1,
  platform: str | None = None,
) -> Plan:
  """The plan of one call.

  Args:
    program: the loss in the engine's terms (for ``method="vmap"``, every leaf a
      fallback leaf).
    params_flat: the parameter leaves.
    batch_size: examples per pass.
    method: the user's ``method`` ("auto", "engine", "ghost" or "vmap").
    uniform_weights: every leaf gets the same clip weights (norms only, or one
      global threshold), which lets rematerialized scans stream in two passes.
    keep_factors: rematerialized scans stream in one pass, keeping each step's
      factors for the clipped sum (with per-leaf thresholds too).
    num_passes: microbatch passes.
    platform: the backend the costs are estimated for (default: JAX's default
      backend).
  """
  platform = platform or _PLATFORM or jax.default_backend()
  routes = {}
  for leaf, w in enumerate(params_flat):
    if leaf in program.fallback:
      routes[leaf] = LeafRoute(
        "materialized", None, batch_size * w.size * w.dtype.itemsize, program.fallback[leaf]
      )
    else:
      routes[leaf] = plan_leaf(program.uses[leaf], w, batch_size, platform)
  every_materialized = any(r.route == "materialized" for r in routes.values()) and all(
    r.route in ("materialized", "unused") for r in routes.values()
  )
  streams = (
    plan_streams(program, routes, params_flat, keep_factors)
    if uniform_weights or keep_factors
    else {}
  )
  for key, st in streams.items():  # their leaves' routes compare by flops
    routes.update({leaf: by_flops(routes[leaf]) for leaf in st.leaves})
    streams[key] = dataclasses.replace(st, routes={leaf: routes[leaf].route for leaf in st.leaves})
  est = estimate(routes, params_flat, batch_size, platform)
  if (
    method == "vmap"
    or every_materialized
    or (method == "auto" and auto_prefers_vmap(est, platform))
  ):
    return Plan(program, routes, {}, "vmap", batch_size, num_passes, est, platform)
  return Plan(program, routes, streams, "engine", batch_size, num_passes, est, platform)
