"""Jaxpr analysis: which parameter leaves enter the loss only through matmuls.

A parameter leaf is *recognized* when every use of it, after a chain of
layout-only ops (transpose, reshape, squeeze, convert_element_type, copy), is one operand
of a ``dot_general`` whose other operand does not come from a parameter in the
same way. For such a leaf the per-example gradient is a sum, over its uses, of
contractions of the activation operand aᵢ with the output cotangent gᵢ, and
never needs to be formed per example. Any other use (a gather, an elementwise
op, a scan/while/cond body, a custom_jvp/custom_vjp rule, a convolution) makes
the leaf a *fallback* leaf: its per-example gradient is computed exactly. The
analysis only ever errs towards fallback, so it can cost speed, never accuracy.

Nested ``jit`` calls are looked through (``jnp`` functions and user code wrap
layers in them); uses are keyed by their path of equation indices.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jax.extend import core as jcore

# Layout-only ops: the gradient through them is a permutation/cast of the
# gradient of their output, so they can sit between a leaf and its matmul.
CHAIN_PRIMITIVES = frozenset({"transpose", "reshape", "squeeze", "convert_element_type", "copy"})
# Call-like primitives whose body is evaluated inline by the engine.
CALL_PRIMITIVES = frozenset({"jit", "pjit", "closed_call", "core_call"})

UseKey = tuple  # path of equation indices from the top-level jaxpr


def call_body(eqn: Any) -> jcore.ClosedJaxpr | None:
  """The closed body of an inlinable call equation, else None."""
  if eqn.primitive.name not in CALL_PRIMITIVES:
    return None
  body = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
  if isinstance(body, jcore.Jaxpr):
    body = jcore.ClosedJaxpr(body, ())
  return body if isinstance(body, jcore.ClosedJaxpr) else None


@dataclasses.dataclass(frozen=True)
class Origin:
  """A value that is a parameter leaf seen through layout-only ops."""

  leaf: int
  chain: tuple  # the JaxprEqns applied, in order, from the leaf to this value


@dataclasses.dataclass(frozen=True)
class DotUse:
  """A recognized use: parameter leaf → chain → operand ``side`` of a dot_general."""

  key: UseKey
  leaf: int
  chain: tuple
  side: int  # 0: the parameter is the lhs operand; 1: the rhs
  dimension_numbers: Any
  eqn: Any  # the dot_general equation, to re-bind it
  act_shape: tuple  # single-example shape of the activation operand
  out_shape: tuple
  out_dtype: Any


@dataclasses.dataclass
class Analysis:
  uses: dict[int, list[DotUse]]  # recognized leaf -> its uses
  fallback: dict[int, str]  # fallback leaf -> why (first unrecognized use)

  @property
  def recognized(self) -> list[int]:
    return sorted(self.uses)

  @property
  def perturbed(self) -> dict[UseKey, DotUse]:
    return {u.key: u for us in self.uses.values() for u in us}


def analyze(closed: jcore.ClosedJaxpr, param_positions: dict[int, int]) -> Analysis:
  """Classifies parameter leaves.

  Args:
    closed: the single-example loss as a closed jaxpr over flat arguments.
    param_positions: flat argument position -> parameter leaf index.
  """
  uses: dict[int, list[DotUse]] = {}
  bad: dict[int, str] = {}

  def unrecognized(origin: Origin, why: str) -> None:
    bad.setdefault(origin.leaf, why)

  def walk(jaxpr: jcore.Jaxpr, origins: dict, path: tuple) -> None:
    def origin_of(v):
      return None if isinstance(v, jcore.Literal) else origins.get(v)

    for i, eqn in enumerate(jaxpr.eqns):
      key = path + (i,)
      name = eqn.primitive.name
      ins = [origin_of(v) for v in eqn.invars]
      body = call_body(eqn)
      if name in CHAIN_PRIMITIVES and ins and ins[0] is not None:
        origins[eqn.outvars[0]] = Origin(ins[0].leaf, ins[0].chain + (eqn,))
      elif body is not None:
        inner = {v: o for v, o in zip(body.jaxpr.invars, ins) if o is not None}
        walk(body.jaxpr, inner, key)
        for v in body.jaxpr.outvars:
          if not isinstance(v, jcore.Literal) and v in inner:
            unrecognized(inner[v], f"returned from a nested call ({name})")
      elif name == "dot_general" and (ins[0] is None) != (ins[1] is None):
        side = 0 if ins[0] is not None else 1
        o = ins[side]
        uses.setdefault(o.leaf, []).append(
            DotUse(
                key=key,
                leaf=o.leaf,
                chain=o.chain,
                side=side,
                dimension_numbers=eqn.params["dimension_numbers"],
                eqn=eqn,
                act_shape=tuple(eqn.invars[1 - side].aval.shape),
                out_shape=tuple(eqn.outvars[0].aval.shape),
                out_dtype=eqn.outvars[0].aval.dtype,
            )
        )
      else:
        for o in ins:
          if o is not None:
            unrecognized(o, f"used by {name}")
    for v in jaxpr.outvars:
      if (o := origin_of(v)) is not None:
        unrecognized(o, "returned by the loss")

  origins = {closed.jaxpr.invars[pos]: Origin(leaf, ()) for pos, leaf in param_positions.items()}
  walk(closed.jaxpr, origins, ())
  recognized = {leaf: us for leaf, us in uses.items() if leaf not in bad}
  # Leaves with no use at all have a zero gradient: recognized, with no uses.
  for leaf in param_positions.values():
    if leaf not in bad and leaf not in recognized:
      recognized[leaf] = []
  return Analysis(uses=recognized, fallback=bad)
