"""The one place that reads JAX's jaxpr internals.

JAX's jaxpr data structures are not a stable API: between the project's
floor (JAX 0.10) and the newest JAX, ``ClosedJaxpr`` and ``Jaxpr`` became one
class (a call's body now carries its own constants), ``scan`` lost its
``num_consts``/``num_carry`` parameters for ``ft_in``, and primitives were
renamed (``pjit`` -> ``jit``, ``remat2`` -> ``checkpoint``). Everything the
engine needs from a jaxpr is read here, once, into the engine's own types:

* :class:`Body`: variables, constants (with their values), equations, outputs;
* :class:`Eqn`: a primitive application; ``kind`` says what the engine may
  look into (a call, a rematerialized call, a scan, a cond, a custom
  derivative, or an opaque op), ``bodies`` holds the sub-bodies already read;
* :class:`Var` and :class:`Lit`: the atoms.

Where this module meets a structure it does not know (a scan with loop
state it cannot place, a body whose constants do not match its constant
variables), the equation is kept as an opaque op that binds as JAX wrote
it, and ``unread`` names the primitive and the parameter: the analysis then
treats every parameter reaching it as having no rule (exact, never wrong),
and ``per_example_plan`` shows the reason.

A rule reads only the ``params`` of the primitives it is written for (a
``dot_general``'s ``dimension_numbers``): those are the primitive's meaning,
documented by ``jax.lax``, not the jaxpr's structure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from jax.extend import core as jcore

# Normalized primitive names (JAX spells some differently across versions).
_ALIASES = {
  "pjit": "jit",
  "remat2": "checkpoint",
  "remat": "checkpoint",
  "custom_vjp_call_jaxpr": "custom_vjp_call",
}
_CALLS = frozenset({"jit", "closed_call", "core_call"})

# Kinds of equation.
OP, CALL, REMAT, SCAN, COND, CUSTOM_JVP, CUSTOM_VJP = (
  "op",
  "call",
  "remat",
  "scan",
  "cond",
  "custom_jvp",
  "custom_vjp",
)


class Var:
  """A variable of a :class:`Body` (compared by identity)."""

  __slots__ = ("aval",)

  def __init__(self, aval: Any):
    self.aval = aval

  def __repr__(self) -> str:
    return f"Var({self.aval})"


@dataclasses.dataclass(frozen=True, eq=False)
class Lit:
  """A literal input: its value and abstract value."""

  value: Any
  aval: Any


Atom = Var | Lit


@dataclasses.dataclass(frozen=True)
class ScanInfo:
  """A scan's loop structure: inputs are consts, then carry, then scanned-over xs."""

  num_consts: int
  num_carry: int
  length: int
  reverse: bool
  unroll: Any


@dataclasses.dataclass(frozen=True)
class RematInfo:
  prevent_cse: bool
  policy: Any


@dataclasses.dataclass(frozen=True, eq=False)
class Eqn:
  """One primitive application, in the engine's terms.

  Attributes:
    name: the primitive's name, normalized across JAX versions.
    kind: ``OP`` (opaque: bound as it is), ``CALL``, ``REMAT``, ``SCAN``, ``COND``,
      ``CUSTOM_JVP`` or ``CUSTOM_VJP``.
    inputs / outputs: atoms (an output JAX drops is None).
    params: the primitive's own parameters (what its ``jax.lax`` function takes).
    bodies: CALL/REMAT/SCAN: ``(body,)``; COND: one body per branch (inputs after
      the index); others: ``()``.
    scan / remat: their loop or rematerialization settings.
    unread: why a structure JAX describes here could not be read ("" if none).
  """

  name: str
  kind: str
  inputs: tuple
  outputs: tuple
  params: Mapping
  bodies: tuple = ()
  scan: ScanInfo | None = None
  remat: RematInfo | None = None
  unread: str = ""
  raw: Any = dataclasses.field(default=None, repr=False)

  @property
  def in_avals(self) -> tuple:
    return tuple(a.aval for a in self.inputs)

  @property
  def out_avals(self) -> tuple:
    return tuple(v.aval for v in self.raw.outvars)

  @property
  def multiple_results(self) -> bool:
    return bool(self.raw.primitive.multiple_results)

  def bind(self, invals: Sequence[Any]) -> list:
    """Applies the primitive to ``invals``, as ``jax.core.eval_jaxpr`` does."""
    eqn = self.raw
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    subfuns, params = bind_params if isinstance(bind_params, tuple) else ((), bind_params)
    with eqn.ctx.manager:
      out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


@dataclasses.dataclass(frozen=True, eq=False)
class Body:
  """A jaxpr with its constants: ``outputs = f(*invars)`` with ``constvars = consts``."""

  invars: tuple
  constvars: tuple
  consts: tuple
  eqns: tuple
  outputs: tuple


def read(closed: Any) -> Body:
  """The :class:`Body` of a jaxpr as ``jax.make_jaxpr`` returns it (any JAX version)."""
  body, why = _read(closed, {})
  if body is None:  # _read gives a Body, or None and why not
    raise NotImplementedError(f"gnorm_jax cannot read this JAX version's jaxpr: {why}")
  return body


def _parts(j: Any) -> tuple[Any, tuple]:
  """(open jaxpr, consts) of a ClosedJaxpr (JAX < 0.11) or a Jaxpr with consts."""
  inner = getattr(j, "jaxpr", j)
  if inner is not j and isinstance(inner, jcore.Jaxpr):  # a ClosedJaxpr of JAX < 0.11
    return inner, tuple(j.consts)
  return j, tuple(getattr(j, "consts", None) or ())


def _read(j: Any, names: dict) -> tuple[Body | None, str]:
  jaxpr, consts = _parts(j)
  if not isinstance(jaxpr, jcore.Jaxpr):
    return None, f"a body of type {type(j).__name__}"
  if len(jaxpr.constvars) != len(consts):
    return None, (
      f"a body with {len(jaxpr.constvars)} constant variables but {len(consts)} constants"
    )

  def var(v):
    if v not in names:
      names[v] = Var(v.aval)
    return names[v]

  def atom(v):
    return Lit(v.val, v.aval) if isinstance(v, jcore.Literal) else var(v)

  invars = tuple(var(v) for v in jaxpr.invars)
  constvars = tuple(var(v) for v in jaxpr.constvars)
  eqns = []
  for e in jaxpr.eqns:
    inputs = tuple(atom(v) for v in e.invars)
    outputs = tuple(None if isinstance(v, jcore.DropVar) else var(v) for v in e.outvars)
    eqns.append(_eqn(e, inputs, outputs, names))
  return Body(invars, constvars, consts, tuple(eqns), tuple(atom(v) for v in jaxpr.outvars)), ""


def _eqn(e: Any, inputs: tuple, outputs: tuple, names: dict) -> Eqn:
  raw_name = e.primitive.name
  name = _ALIASES.get(raw_name, raw_name)
  p = e.params
  opaque = lambda why: Eqn(name, OP, inputs, outputs, p, unread=why, raw=e)  # noqa: E731

  def sub(key):
    body, why = _read(p[key], names)
    return body, (f"{raw_name}'s {key!r}: {why}" if why else "")

  if name in _CALLS or name == "checkpoint":
    key = "jaxpr" if "jaxpr" in p else "call_jaxpr"
    if key not in p:
      return opaque(f"{raw_name} without a 'jaxpr' parameter")
    body, why = sub(key)
    if why:
      return opaque(why)
    if name == "checkpoint":
      return Eqn(
        name,
        REMAT,
        inputs,
        outputs,
        p,
        (body,),
        remat=RematInfo(bool(p.get("prevent_cse", True)), p.get("policy")),
        raw=e,
      )
    return Eqn(name, CALL, inputs, outputs, p, (body,), raw=e)
  if name == "scan":
    info, why = _scan_info(p, len(inputs))
    if why:
      return opaque(why)
    body, why = sub("jaxpr")
    if why:
      return opaque(why)
    return Eqn(name, SCAN, inputs, outputs, p, (body,), scan=info, raw=e)
  if name == "cond":
    branches = []
    for b in p.get("branches", ()):
      body, why = _read(b, names)
      if why:
        return opaque(f"cond's 'branches': {why}")
      branches.append(body)
    if not branches:
      return opaque("cond without 'branches'")
    return Eqn(name, COND, inputs, outputs, p, tuple(branches), raw=e)
  if name == "custom_jvp_call":
    return Eqn(name, CUSTOM_JVP, inputs, outputs, p, raw=e)
  if name == "custom_vjp_call":
    return Eqn(name, CUSTOM_VJP, inputs, outputs, p, raw=e)
  return Eqn(name, OP, inputs, outputs, p, raw=e)


def _scan_info(p: Mapping, n_inputs: int) -> tuple[ScanInfo | None, str]:
  """The loop structure of a scan, from ``num_consts``/``num_carry`` (JAX < 0.11)
  or ``ft_in`` (JAX >= 0.11: one tuple of input types each for consts, carry and
  xs; None is a plain array)."""
  if "num_consts" in p and "num_carry" in p:
    nc, nk = int(p["num_consts"]), int(p["num_carry"])
  elif "ft_in" in p:
    ft = p["ft_in"]
    try:  # JAX's FlatTree (FTTuple): unpack() gives consts, carry and xs; iterating, leaves
      ft = tuple(tuple(g) for g in (ft.unpack() if hasattr(ft, "unpack") else ft))
    except (TypeError, ValueError):
      ft = ()
    if len(ft) != 3:
      return None, f"scan's 'ft_in' of an unknown form ({p['ft_in']!r})"
    if any(t is not None for g in ft for t in g):
      return None, f"scan's 'ft_in' holds input types other than plain arrays ({ft!r})"
    nc, nk = len(ft[0]), len(ft[1])
    if nc + nk + len(ft[2]) != n_inputs:
      return None, f"scan's 'ft_in' ({ft!r}) does not describe its {n_inputs} inputs"
  else:
    return None, f"scan without 'num_consts'/'num_carry' or 'ft_in' (has {sorted(p)})"
  return ScanInfo(nc, nk, int(p["length"]), bool(p.get("reverse", False)), p.get("unroll", 1)), ""
