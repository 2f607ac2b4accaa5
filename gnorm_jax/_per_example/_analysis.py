"""Jaxpr analysis: where each parameter leaf meets the example.

A value derived from ONE parameter leaf through a chain of unary equations
(layout changes, casts, scalar factors, elementwise functions whose other
inputs are literals) is followed until it meets other values. That equation
is a *use*; the rule registry decides whether some rule handles it. A leaf
all of whose uses have rules is *recognized*; any other use (a primitive with
no rule, two parameters meeting, a while body, a custom rule JAX cannot linearize,
a value returned as it is) makes the leaf a *fallback* leaf, whose
per-example gradient is computed exactly. The analysis only ever errs
towards fallback: it can cost speed, never accuracy.

Nested ``jit`` calls and ``checkpoint``/``remat`` are looked through (``jnp``
functions and user code wrap layers in them); so are ``scan`` bodies (a
parameter closed over by the body is used at every step; one scanned over, as
by ``nn.scan`` over layers, is sliced per step) and ``cond``/``switch``
branches. A ``custom_jvp``/``custom_vjp`` call is looked through by way of its
own rule: a custom function of the parameter alone (``softplus(w)``) is a
chain link, re-bound by the direct route; where the parameter meets the
example inside one, the rule's linear map from the parameter's tangent to the
output's (the jvp rule, or the transposed bwd rule) is analysed instead of
the primal, so the per-example gradient is the custom rule's, never the
primal's derivative. Uses are keyed by their path of equation (and branch)
indices.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore

from gnorm_jax._per_example import _rules
from gnorm_jax._per_example._rules import CHAIN_OPS, LAYOUT_OPS, Use

# Call-like primitives whose body is evaluated inline by the engine.
CALL_PRIMITIVES = frozenset({"jit", "pjit", "closed_call", "core_call"})
# Rematerialization: looked through, and re-applied around the instrumented body.
REMAT_PRIMITIVES = frozenset({"checkpoint", "remat", "remat2"})
# Custom derivatives: looked through by way of their own rule (see _tangent_jaxpr).
CUSTOM_PRIMITIVES = frozenset({"custom_jvp_call", "custom_vjp_call"})

_rules.load_rules()


def call_body(eqn: Any) -> jcore.ClosedJaxpr | None:
  """The closed body of an inlinable call equation, else None."""
  if eqn.primitive.name not in CALL_PRIMITIVES | REMAT_PRIMITIVES:
    return None
  body = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
  if isinstance(body, jcore.Jaxpr):
    body = jcore.ClosedJaxpr(body, ())
  return body if isinstance(body, jcore.ClosedJaxpr) else None


@dataclasses.dataclass(frozen=True)
class Origin:
  """A value derived from parameter leaf ``leaf`` by ``chain`` (one tuple of
  equations per level of ``scopes``, as in :class:`Use`)."""

  leaf: int
  chain: tuple = ((),)
  scopes: tuple = ()

  def then(self, eqn: Any) -> "Origin":
    return Origin(self.leaf, self.chain[:-1] + (self.chain[-1] + (eqn,),), self.scopes)

  def enter(self, kind: str, length: int) -> "Origin":
    return Origin(self.leaf, self.chain + ((),), self.scopes + ((kind, length),))


def _parts(o: Any) -> tuple:
  """The origins of a value: one, or several for a concatenation of parameters."""
  return () if o is None else (o if isinstance(o, tuple) else (o,))


def _each(o: Any, fn) -> Any:
  out = tuple(fn(x) for x in _parts(o))
  return out[0] if len(out) == 1 else out


def _is_chain(eqn: Any, operand: int) -> bool:
  """Whether ``eqn`` is a unary function of input ``operand`` (others literal)."""
  if eqn.primitive.name not in CHAIN_OPS or eqn.primitive.multiple_results:
    return False
  return all(isinstance(v, jcore.Literal) for i, v in enumerate(eqn.invars) if i != operand)


def _is_custom_chain(eqn: Any, operand: int) -> bool:
  """A custom-derivative function of one parameter-derived value (``softplus(w)``): a chain
  link the direct route re-binds, so its gradient goes through the custom rule itself."""
  return (eqn.primitive.name in CUSTOM_PRIMITIVES and len(eqn.outvars) == 1
          and all(isinstance(v, jcore.Literal) for i, v in enumerate(eqn.invars) if i != operand))


def bind(eqn: Any, invals: list) -> list:
  """Applies ``eqn``'s primitive to ``invals``, as jax.core.eval_jaxpr does."""
  bind_params = eqn.primitive.get_bind_params(eqn.params)
  subfuns, params = bind_params if isinstance(bind_params, tuple) else ((), bind_params)
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*subfuns, *invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def _tangent_jaxpr(eqn: Any, derived: list) -> jcore.ClosedJaxpr | None:
  """The custom rule's own linear map from the parameter-derived inputs' tangents to the
  outputs' tangents, as a jaxpr of (all inputs, those tangents), or None.

  For ``custom_jvp`` it is the jvp rule with tangents on those inputs only; for
  ``custom_vjp`` the transpose of the bwd rule (linear in the cotangent). The
  per-example gradient through the call is that map's transpose, so rules
  found inside it are exact for the custom rule, whatever the primal computes.
  """
  n = len(eqn.invars)

  def tangent(*vals):
    args, dws = list(vals[:n]), list(vals[n:])

    def f(*ws):
      a = list(args)
      for j, w in zip(derived, ws):
        a[j] = w
      return bind(eqn, a)

    ws = [args[j] for j in derived]
    if eqn.primitive.name == "custom_jvp_call":
      return jax.jvp(f, ws, dws)[1]
    out, vjp = jax.vjp(f, *ws)
    return jax.linear_transpose(vjp, out)(tuple(dws))[0]

  avals = [v.aval for v in eqn.invars]
  specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals]
  specs += [specs[j] for j in derived]
  try:
    return jax.make_jaxpr(tangent)(*specs)
  except Exception:  # a rule JAX cannot linearize or transpose: the leaves fall back
    return None


def _literal(eqn: Any, operand: int) -> Any:
  (value,) = [v.val for i, v in enumerate(eqn.invars) if i != operand]
  return value


def _segment_layout(chain: tuple, axes: list, coef: Any) -> tuple[list, Any] | None:
  for eqn in chain:
    if isinstance(eqn, tuple):  # a slot of a concatenation
      return None
    name = eqn.primitive.name
    operand = next(i for i, v in enumerate(eqn.invars) if not isinstance(v, jcore.Literal))
    if name == "transpose":
      axes = [axes[p] for p in eqn.params["permutation"]]
    elif name in LAYOUT_OPS:
      pass
    elif name == "neg":
      coef = -coef
    elif name in ("mul", "div") and np.ndim(_literal(eqn, operand)) == 0:
      c = _literal(eqn, operand)
      if name == "div" and operand == 1:
        return None  # c / W is not linear in W
      coef = coef * c if name == "mul" else coef / c
    elif name in ("add", "sub") and np.ndim(_literal(eqn, operand)) == 0:
      coef = -coef if (name == "sub" and operand == 1) else coef
    else:
      return None
  return axes, coef


def chain_layout(use: Any, ndim: int) -> tuple[list, Any, list] | None:
  """(leaf axis of each axis of the use's operand, scalar factor, leaf axes
  scanned over by the use's "xs" scopes), or None when some chain is more than
  a permutation, a cast and a scalar factor."""
  axes, coef, heads = list(range(ndim)), 1.0, []
  for level, segment in enumerate(use.chain):
    out = _segment_layout(segment, axes, coef)
    if out is None:
      return None
    axes, coef = out
    if level < len(use.scopes) and use.scopes[level][0] == "xs":
      heads.append(axes[0])
      axes = axes[1:]
  return axes, coef, heads


@dataclasses.dataclass
class Analysis:
  uses: dict[int, list[Use]]  # recognized leaf -> its uses (empty: the leaf is unused)
  fallback: dict[int, str]  # fallback leaf -> why (first unrecognized use)
  # scan key -> {input index: leaf} for leaves scanned over as they are (no
  # chain), by a scan inside no other scan (``nn.scan`` over layers).
  scan_slices: dict[tuple, dict[int, int]] = dataclasses.field(default_factory=dict)
  # custom-derivative call key -> (its rule's tangent jaxpr, the derived input indices)
  tangents: dict[tuple, tuple] = dataclasses.field(default_factory=dict)

  @property
  def recognized(self) -> list[int]:
    return sorted(self.uses)

  @property
  def perturbed(self) -> dict[tuple, Use]:
    return {u.key: u for us in self.uses.values() for u in us}


def analyze(closed: jcore.ClosedJaxpr, param_positions: dict[int, int]) -> Analysis:
  """Classifies parameter leaves.

  Args:
    closed: the single-example loss as a closed jaxpr over flat arguments.
    param_positions: flat argument position -> parameter leaf index.
  """
  uses: dict[int, list[Use]] = {}
  bad: dict[int, str] = {}
  scan_slices: dict[tuple, dict[int, int]] = {}
  tangents: dict[tuple, tuple] = {}

  def unrecognized(origin: Any, why: str) -> None:
    for o in _parts(origin):
      bad.setdefault(o.leaf, why)

  def walk(jaxpr: jcore.Jaxpr, origins: dict, path: tuple, passthrough: bool = False) -> None:
    def origin_of(v):
      return None if isinstance(v, jcore.Literal) else origins.get(v)

    for i, eqn in enumerate(jaxpr.eqns):
      key = path + (i,)
      name = eqn.primitive.name
      ins = [origin_of(v) for v in eqn.invars]
      derived = [j for j, o in enumerate(ins) if o is not None]
      if not derived:
        continue
      body = call_body(eqn)
      if body is not None:
        inner = {v: o for v, o in zip(body.jaxpr.invars, ins) if o is not None}
        walk(body.jaxpr, inner, key, passthrough=True)
        # A call returning a value derived from a leaf extends its chain.
        for out, v in zip(eqn.outvars, body.jaxpr.outvars):
          if not isinstance(v, jcore.Literal) and v in inner:
            origins[out] = inner[v]
      elif name == "scan" and not {"jaxpr", "num_consts", "num_carry"} <= set(eqn.params):
        for o in ins:  # a scan this JAX version describes otherwise: exact fallback
          if o is not None:
            unrecognized(o, "used in a scan whose parameters this JAX version names differently")
      elif name == "scan":
        body = eqn.params["jaxpr"].jaxpr
        nc, nk = eqn.params["num_consts"], eqn.params["num_carry"]
        inner = {}
        for j in derived:
          if nc <= j < nc + nk:
            unrecognized(ins[j], "enters a scan as its carry")
          else:
            inner[body.invars[j]] = _each(ins[j], lambda o, j=j: o.enter(
                "const" if j < nc else "xs", eqn.params["length"]))
            o = ins[j]
            if j >= nc + nk and isinstance(o, Origin) and not o.scopes and o.chain == ((),):
              scan_slices.setdefault(key, {})[j] = o.leaf
        walk(body, inner, key)
      elif name == "cond":
        if ins[0] is not None:
          unrecognized(ins[0], "used as a cond index")
        for b, branch in enumerate(eqn.params["branches"]):
          inner = {v: o for v, o in zip(branch.jaxpr.invars, ins[1:]) if o is not None}
          walk(branch.jaxpr, inner, key + (b,))
      elif len(derived) == 1 and _is_custom_chain(eqn, derived[0]):
        origins[eqn.outvars[0]] = _each(ins[derived[0]], lambda o: o.then(eqn))
      elif name in CUSTOM_PRIMITIVES:
        t = _tangent_jaxpr(eqn, derived)
        if t is None:
          for j in derived:
            unrecognized(ins[j], f"used by {name} (its rule could not be linearized)")
        else:
          tangents[key] = (t, tuple(derived))
          n = len(eqn.invars)
          inner = {t.jaxpr.invars[n + m]: ins[j] for m, j in enumerate(derived)}
          walk(t.jaxpr, inner, key)
      elif len(derived) == 1 and _is_chain(eqn, derived[0]):
        origins[eqn.outvars[0]] = _each(ins[derived[0]], lambda o: o.then(eqn))
      elif name == "concatenate" and len(derived) == len(eqn.invars):
        # Parameters concatenated (OptimizedLSTMCell's gate kernels): each is a
        # slice of the result; its chain re-binds the concatenation with zeros
        # in the other slots (exact for the direct route; no ghost layout).
        origins[eqn.outvars[0]] = tuple(
            x.then((eqn, j)) for j in derived for x in _parts(ins[j]))
      elif len(derived) == 1 and len(eqn.outvars) == 1:
        rule, why = _rules.find_rule(eqn, derived[0])
        for o in _parts(ins[derived[0]]):
          if rule is None:
            unrecognized(o, why)
          else:
            uses.setdefault(o.leaf, []).append(
                Use(key, o.leaf, o.chain, derived[0], eqn, rule, o.scopes))
      else:
        for o in ins:
          if o is not None:
            unrecognized(o, f"used by {name} together with another parameter"
                         if len(derived) > 1 else f"used by {name}")
    if passthrough:
      return
    for v in jaxpr.outvars:
      if (o := origin_of(v)) is not None:
        unrecognized(o, "returned by the loss" if not path else "returned from a nested body")

  origins = {closed.jaxpr.invars[pos]: Origin(leaf) for pos, leaf in param_positions.items()}
  walk(closed.jaxpr, origins, ())
  recognized = {leaf: us for leaf, us in uses.items() if leaf not in bad}
  for leaf in param_positions.values():
    if leaf not in bad and leaf not in recognized:
      recognized[leaf] = []  # never used: a zero gradient
  return Analysis(uses=recognized, fallback=bad, scan_slices=scan_slices, tangents=tangents)
