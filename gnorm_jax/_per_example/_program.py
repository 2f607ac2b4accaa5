"""Stage 2, Program: where each parameter leaf meets the example.

The single-example loss's jaxpr, read by :mod:`._jaxpr` into a :class:`Body`,
is walked once. A value derived from ONE parameter leaf through a chain of
unary equations (layout changes, casts, scalar factors, elementwise
functions whose other inputs are literals) is followed until it meets other
values. That equation is a *use*; the rule registry decides whether some rule
handles it. A leaf all of whose uses have rules is *recognized*; any other use
(a primitive with no rule, two parameters meeting, a while body, a custom
rule JAX cannot linearize, a value returned as it is, a structure the adapter
could not read) makes the leaf a *fallback* leaf, whose per-example gradient
is computed exactly. The analysis only ever errs towards fallback: it can cost
speed, never accuracy.

Calls (nested ``jit``) and ``checkpoint``/``remat`` are looked through (``jnp``
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

from gnorm_jax._per_example import _jaxpr, _rules
from gnorm_jax._per_example._jaxpr import Body, Eqn, Lit
from gnorm_jax._per_example._rules import CHAIN_OPS, LAYOUT_OPS, Use


@dataclasses.dataclass(frozen=True)
class Origin:
  """A value derived from parameter leaf ``leaf`` by ``chain`` (one tuple of
  equations per level of ``scopes``, as in :class:`Use`)."""

  leaf: int
  chain: tuple = ((),)
  scopes: tuple = ()

  def then(self, link: Any) -> "Origin":
    return Origin(self.leaf, self.chain[:-1] + (self.chain[-1] + (link,),), self.scopes)

  def enter(self, kind: str, length: int) -> "Origin":
    return Origin(self.leaf, self.chain + ((),), self.scopes + ((kind, length),))


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
  """The loss in the engine's terms.

  Attributes:
    body: the single-example loss over flat arguments.
    uses: recognized leaf -> its uses (empty: the leaf is unused).
    fallback: fallback leaf -> why (its first use no rule recognized).
    scan_slices: scan key -> {input index: leaf} for leaves scanned over as they
      are (no chain) by a scan inside no other scan (``nn.scan`` over layers).
    tangents: custom-derivative call key -> (its rule's tangent body, the input
      indices derived from parameters).
  """

  body: Body
  uses: dict
  fallback: dict
  scan_slices: dict = dataclasses.field(default_factory=dict)
  tangents: dict = dataclasses.field(default_factory=dict)

  @property
  def recognized(self) -> list[int]:
    return sorted(self.uses)

  @property
  def perturbed(self) -> dict[tuple, Use]:
    return {u.key: u for us in self.uses.values() for u in us}

  def eqns_on(self, key: tuple) -> list[Eqn]:
    """The equations on the path ``key`` (through calls, scans and cond branches)."""
    out, body, i = [], self.body, 0
    while i < len(key):
      eqn = body.eqns[key[i]]
      out.append(eqn)
      i += 1
      if i == len(key) or not eqn.bodies:
        break
      if eqn.kind == _jaxpr.COND:
        body, i = eqn.bodies[key[i]], i + 1
      else:
        body = eqn.bodies[0]
    return out


def _parts(o: Any) -> tuple:
  """The origins of a value: one, or several for a concatenation of parameters."""
  return () if o is None else (o if isinstance(o, tuple) else (o,))


def _each(o: Any, fn) -> Any:
  out = tuple(fn(x) for x in _parts(o))
  return out[0] if len(out) == 1 else out


def _others_literal(eqn: Eqn, operand: int) -> bool:
  return all(isinstance(a, Lit) for i, a in enumerate(eqn.inputs) if i != operand)


def _is_chain(eqn: Eqn, operand: int) -> bool:
  """Whether ``eqn`` is a unary function of input ``operand`` (others literal)."""
  return (eqn.kind == _jaxpr.OP and eqn.name in CHAIN_OPS and not eqn.multiple_results
          and _others_literal(eqn, operand))


def _is_custom_chain(eqn: Eqn, operand: int) -> bool:
  """A custom-derivative function of one parameter-derived value (``softplus(w)``): a chain
  link the direct route re-binds, so its gradient goes through the custom rule itself."""
  return (eqn.kind in (_jaxpr.CUSTOM_JVP, _jaxpr.CUSTOM_VJP) and len(eqn.outputs) == 1
          and _others_literal(eqn, operand))


def _tangent_body(eqn: Eqn, derived: list) -> Body | None:
  """The custom rule's own linear map from the parameter-derived inputs' tangents to the
  outputs' tangents, as a body of (all inputs, those tangents), or None.

  For ``custom_jvp`` it is the jvp rule with tangents on those inputs only; for
  ``custom_vjp`` the transpose of the bwd rule (linear in the cotangent). The
  per-example gradient through the call is that map's transpose, so rules
  found inside it are exact for the custom rule, whatever the primal computes.
  """
  n = len(eqn.inputs)

  def tangent(*vals):
    args, dws = list(vals[:n]), list(vals[n:])

    def f(*ws):
      a = list(args)
      for j, w in zip(derived, ws):
        a[j] = w
      return eqn.bind(a)

    ws = [args[j] for j in derived]
    if eqn.kind == _jaxpr.CUSTOM_JVP:
      return jax.jvp(f, ws, dws)[1]
    out, vjp = jax.vjp(f, *ws)
    return jax.linear_transpose(vjp, out)(tuple(dws))[0]

  specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in eqn.in_avals]
  specs += [specs[j] for j in derived]
  try:
    return _jaxpr.read(jax.make_jaxpr(tangent)(*specs))
  except Exception:  # a rule JAX cannot linearize or transpose: the leaves fall back
    return None


def _literal(eqn: Eqn, operand: int) -> Any:
  (value,) = [a.value for i, a in enumerate(eqn.inputs) if i != operand]
  return value


def _segment_layout(chain: tuple, axes: list, coef: Any) -> tuple[list, Any] | None:
  for eqn in chain:
    if isinstance(eqn, tuple):  # a slot of a concatenation
      return None
    name = eqn.name
    operand = next(i for i, a in enumerate(eqn.inputs) if not isinstance(a, Lit))
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


def chain_layout(use: Use, ndim: int) -> tuple[list, Any, list] | None:
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


def build(body: Body, param_positions: dict[int, int]) -> Program:
  """Classifies parameter leaves.

  Args:
    body: the single-example loss over flat arguments.
    param_positions: flat argument position -> parameter leaf index.
  """
  uses: dict[int, list[Use]] = {}
  bad: dict[int, str] = {}
  scan_slices: dict[tuple, dict[int, int]] = {}
  tangents: dict[tuple, tuple] = {}

  def unrecognized(origin: Any, why: str) -> None:
    for o in _parts(origin):
      bad.setdefault(o.leaf, why)

  def walk(body: Body, origins: dict, path: tuple, passthrough: bool = False) -> None:
    def origin_of(a):
      return None if isinstance(a, Lit) else origins.get(a)

    for i, eqn in enumerate(body.eqns):
      key = path + (i,)
      name = eqn.name
      ins = [origin_of(a) for a in eqn.inputs]
      derived = [j for j, o in enumerate(ins) if o is not None]
      if not derived:
        continue
      if eqn.unread:
        for j in derived:
          unrecognized(ins[j], f"used by {name}, which this JAX version describes in a way"
                       f" gnorm_jax cannot read ({eqn.unread})")
      elif eqn.kind in (_jaxpr.CALL, _jaxpr.REMAT):
        (inner_body,) = eqn.bodies
        inner = {v: o for v, o in zip(inner_body.invars, ins) if o is not None}
        walk(inner_body, inner, key, passthrough=True)
        # A call returning a value derived from a leaf extends its chain.
        for out, v in zip(eqn.outputs, inner_body.outputs):
          if out is not None and not isinstance(v, Lit) and v in inner:
            origins[out] = inner[v]
      elif eqn.kind == _jaxpr.SCAN:
        (inner_body,) = eqn.bodies
        nc, nk = eqn.scan.num_consts, eqn.scan.num_carry
        inner = {}
        for j in derived:
          if nc <= j < nc + nk:
            unrecognized(ins[j], "enters a scan as its carry")
          else:
            inner[inner_body.invars[j]] = _each(ins[j], lambda o, j=j: o.enter(
                "const" if j < nc else "xs", eqn.scan.length))
            o = ins[j]
            if j >= nc + nk and isinstance(o, Origin) and not o.scopes and o.chain == ((),):
              scan_slices.setdefault(key, {})[j] = o.leaf
        walk(inner_body, inner, key)
      elif eqn.kind == _jaxpr.COND:
        if ins[0] is not None:
          unrecognized(ins[0], "used as a cond index")
        for b, branch in enumerate(eqn.bodies):
          inner = {v: o for v, o in zip(branch.invars, ins[1:]) if o is not None}
          walk(branch, inner, key + (b,))
      elif len(derived) == 1 and _is_custom_chain(eqn, derived[0]):
        origins[eqn.outputs[0]] = _each(ins[derived[0]], lambda o: o.then(eqn))
      elif eqn.kind in (_jaxpr.CUSTOM_JVP, _jaxpr.CUSTOM_VJP):
        t = _tangent_body(eqn, derived)
        if t is None:
          for j in derived:
            unrecognized(ins[j], f"used by {name} (its rule could not be linearized)")
        else:
          tangents[key] = (t, tuple(derived))
          n = len(eqn.inputs)
          inner = {t.invars[n + m]: ins[j] for m, j in enumerate(derived)}
          walk(t, inner, key)
      elif len(derived) == 1 and _is_chain(eqn, derived[0]):
        if eqn.outputs[0] is not None:
          origins[eqn.outputs[0]] = _each(ins[derived[0]], lambda o: o.then(eqn))
      elif name == "concatenate" and len(derived) == len(eqn.inputs):
        # Parameters concatenated (OptimizedLSTMCell's gate kernels): each is a
        # slice of the result; its chain re-binds the concatenation with zeros
        # in the other slots (exact for the direct route; no ghost layout).
        origins[eqn.outputs[0]] = tuple(
            x.then((eqn, j)) for j in derived for x in _parts(ins[j]))
      elif len(derived) == 1 and len(eqn.outputs) == 1:
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
    for a in body.outputs:
      if (o := origin_of(a)) is not None:
        unrecognized(o, "returned by the loss" if not path else "returned from a nested body")

  origins = {body.invars[pos]: Origin(leaf) for pos, leaf in param_positions.items()}
  walk(body, origins, ())
  recognized = {leaf: us for leaf, us in uses.items() if leaf not in bad}
  for leaf in param_positions.values():
    if leaf not in bad and leaf not in recognized:
      recognized[leaf] = []  # never used: a zero gradient
  return Program(body, recognized, bad, scan_slices, tangents)
