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

A value computed from parameters alone by any other equations (a fused kernel
split into gates, a slice, a flipped kernel, weight normalization
``v · g / ‖v‖``, where two leaves meet before the example) is a *parameter-only*
value: for each leaf it depends on, its chain is one :class:`Rebuild` link,
the value recomputed from that leaf with the other leaves held at their
values. Its partial derivative in the leaf is the leaf's part of the use's
gradient, so the direct route stays exact (the vjp of the recomputation,
per example). Parameter-only values are followed through calls, not into
scan, cond or custom-derivative bodies.
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


@dataclasses.dataclass(frozen=True, eq=False)
class Part:
  """A chain link: output ``index`` of the chain equation ``eqn`` (a part of ``jnp.split``)."""

  eqn: Eqn
  index: int


@dataclasses.dataclass(frozen=True, eq=False)
class Recipe:
  """A parameter-only value: leaf ``leaf``, or output ``index`` of ``eqn`` applied to
  ``inputs`` (literals and recipes). ``leaves``: the leaves it depends on."""

  leaves: frozenset
  leaf: int | None = None
  eqn: Eqn | None = None
  inputs: tuple = ()
  index: int = 0

  @staticmethod
  def of(eqn: Eqn, inputs: tuple, index: int) -> "Recipe":
    leaves = frozenset().union(*[r.leaves for r in inputs if isinstance(r, Recipe)])
    return Recipe(leaves, None, eqn, inputs, index)

  def value(self, params: dict, memo: dict) -> Any:
    """The value from ``params`` (leaf -> value); ``memo`` shares common parts."""
    if self.eqn is None:
      return params[self.leaf]
    if self not in memo:
      invals = [a.value(params, memo) if isinstance(a, Recipe) else a.value for a in self.inputs]
      memo[self] = self.eqn.bind(invals)[self.index]
    return memo[self]


@dataclasses.dataclass(frozen=True, eq=False)
class Rebuild:
  """A chain link: the parameter-only value ``recipe`` as a function of leaf ``leaf``, every
  other leaf held at its value in ``params``. It replaces the chain before it."""

  recipe: Recipe
  leaf: int

  def apply(self, w: jax.Array, params) -> jax.Array:
    if params is None:
      raise ValueError("a parameter-only value is recomputed from every parameter leaf")
    return self.recipe.value({**dict(enumerate(params)), self.leaf: w}, {})


def _parts(o: Any) -> tuple:
  """The origins of a value: one, or several for a concatenation of parameters."""
  return () if o is None else (o if isinstance(o, tuple) else (o,))


def _each(o: Any, fn) -> Any:
  out = tuple(fn(x) for x in _parts(o))
  return out[0] if len(out) == 1 else out


def _others_literal(eqn: Eqn, operand: int) -> bool:
  return all(isinstance(a, Lit) for i, a in enumerate(eqn.inputs) if i != operand)


def _is_chain(eqn: Eqn, operand: int) -> bool:
  """Whether ``eqn`` is a unary function of input ``operand`` (others literal); ``split`` has
  several outputs, each a chain link :class:`Part`."""
  return (
    eqn.kind == _jaxpr.OP
    and eqn.name in CHAIN_OPS
    and (eqn.name == "split" or not eqn.multiple_results)
    and _others_literal(eqn, operand)
  )


def _is_custom_chain(eqn: Eqn, operand: int) -> bool:
  """A custom-derivative function of one parameter-derived value (``softplus(w)``): a chain
  link the direct route re-binds, so its gradient goes through the custom rule itself."""
  return (
    eqn.kind in (_jaxpr.CUSTOM_JVP, _jaxpr.CUSTOM_VJP)
    and len(eqn.outputs) == 1
    and _others_literal(eqn, operand)
  )


def _independent(eqn: Eqn, derived: list) -> bool:
  """Whether parameter-derived inputs ``derived`` of ``eqn`` are each a use whose rule records
  nothing: each one's gradient is then independent of the others' values (parameters added
  together, or concatenated with the example)."""
  rules = [_rules.find_rule(eqn, j)[0] for j in derived]
  return all(r is not None and not r.records for r in rules)


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
    if not isinstance(eqn, Eqn):  # a slot of a concatenation, a Part or a Rebuild
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

  def walk(
    body: Body, origins: dict, path: tuple, passthrough: bool = False, recipes: dict | None = None
  ) -> None:
    """``origins``: variable -> its Origin(s); ``recipes``: variable -> its Recipe where it is
    parameter-only (followed into calls only: other bodies start without)."""
    recipes = {} if recipes is None else recipes

    def origin_of(a):
      return None if isinstance(a, Lit) else origins.get(a)

    for i, eqn in enumerate(body.eqns):
      key = path + (i,)
      name = eqn.name
      ins = [origin_of(a) for a in eqn.inputs]
      derived = [j for j, o in enumerate(ins) if o is not None]
      if not derived:
        continue
      chain = len(derived) == 1 and _is_chain(eqn, derived[0])
      joined = name == "concatenate" and len(derived) == len(eqn.inputs)
      recipe_ins = None  # the inputs' recipes, where the equation computes a parameter-only value
      if (
        eqn.kind in (_jaxpr.OP, _jaxpr.CUSTOM_JVP, _jaxpr.CUSTOM_VJP)
        and not eqn.unread
        and all(isinstance(a, Lit) or a in recipes for a in eqn.inputs)
      ):
        recipe_ins = tuple(a if isinstance(a, Lit) else recipes[a] for a in eqn.inputs)
      if eqn.unread:
        for j in derived:
          unrecognized(
            ins[j],
            f"used by {name}, which this JAX version describes in a way"
            f" gnorm_jax cannot read ({eqn.unread})",
          )
      elif eqn.kind in (_jaxpr.CALL, _jaxpr.REMAT):
        (inner_body,) = eqn.bodies
        inner = {v: o for v, o in zip(inner_body.invars, ins) if o is not None}
        inner_recipes = {
          v: recipes[a]
          for v, a in zip(inner_body.invars, eqn.inputs)
          if not isinstance(a, Lit) and a in recipes
        }
        walk(inner_body, inner, key, passthrough=True, recipes=inner_recipes)
        # A call returning a value derived from a leaf extends its chain.
        for out, v in zip(eqn.outputs, inner_body.outputs):
          if out is not None and not isinstance(v, Lit) and v in inner:
            origins[out] = inner[v]
            if v in inner_recipes:
              recipes[out] = inner_recipes[v]
      elif eqn.kind == _jaxpr.SCAN:
        (inner_body,) = eqn.bodies
        nc, nk = eqn.scan.num_consts, eqn.scan.num_carry
        inner = {}
        for j in derived:
          if nc <= j < nc + nk:
            unrecognized(ins[j], "enters a scan as its carry")
          else:
            inner[inner_body.invars[j]] = _each(
              ins[j], lambda o, j=j: o.enter("const" if j < nc else "xs", eqn.scan.length)
            )
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
      elif recipe_ins is not None and not chain and not joined:
        for k, out in enumerate(eqn.outputs):
          if out is not None:
            r = recipes[out] = Recipe.of(eqn, recipe_ins, k)
            parts = tuple(Origin(leaf, ((Rebuild(r, leaf),),)) for leaf in sorted(r.leaves))
            origins[out] = parts[0] if len(parts) == 1 else parts
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
      elif chain:
        for k, out in enumerate(eqn.outputs):
          link = Part(eqn, k) if eqn.multiple_results else eqn
          if out is not None:
            origins[out] = _each(ins[derived[0]], lambda o, link=link: o.then(link))
      elif joined:
        # Parameters concatenated (OptimizedLSTMCell's gate kernels): each is a
        # slice of the result; its chain re-binds the concatenation with zeros
        # in the other slots (exact for the direct route; no ghost layout).
        origins[eqn.outputs[0]] = tuple(x.then((eqn, j)) for j in derived for x in _parts(ins[j]))
      elif len(eqn.outputs) == 1 and (len(derived) == 1 or _independent(eqn, derived)):
        for j in derived:
          rule, why = _rules.find_rule(eqn, j)
          for o in _parts(ins[j]):
            if rule is None:
              unrecognized(o, why)
            else:
              uses.setdefault(o.leaf, []).append(Use(key, o.leaf, o.chain, j, eqn, rule, o.scopes))
      else:
        for o in ins:
          if o is not None:
            unrecognized(
              o,
              f"used by {name} together with another parameter"
              if len(derived) > 1
              else f"used by {name}",
            )
      if recipe_ins is not None:  # a parameter-only value, its chain kept
        for k, out in enumerate(eqn.outputs):
          if out is not None and out in origins and out not in recipes:
            recipes[out] = Recipe.of(eqn, recipe_ins, k)
    if passthrough:
      return
    for a in body.outputs:
      if (o := origin_of(a)) is not None:
        unrecognized(o, "returned by the loss" if not path else "returned from a nested body")

  origins = {body.invars[pos]: Origin(leaf) for pos, leaf in param_positions.items()}
  recipes = {
    body.invars[pos]: Recipe(frozenset({leaf}), leaf) for pos, leaf in param_positions.items()
  }
  walk(body, origins, (), recipes=recipes)
  recognized = {leaf: us for leaf, us in uses.items() if leaf not in bad}
  for leaf in param_positions.values():
    if leaf not in bad and leaf not in recognized:
      recognized[leaf] = []  # never used: a zero gradient
  return Program(body, recognized, bad, scan_slices, tangents)
