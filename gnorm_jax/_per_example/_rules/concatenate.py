"""concatenate: a parameter joined to the example's values (a ViT's CLS or register tokens).

For z = concatenate([x₁, …, P, …, xₙ]) the per-example gradient of P is the
output cotangent's slice at P's place along the joined axis, summed over any
axes the chain broadcast P to (as for a bias). It does not depend on the other
operands (nothing is recorded; several parameters may share one concatenation)
and it is no larger than the parameter, so the direct route is the cheapest
exact one: the rule has no ghost route.
"""

from __future__ import annotations

from gnorm_jax._per_example._rules import ACCEPT, Rule, register, size


def _match(eqn, operand):
  return ACCEPT  # every input of a concatenation is a part of its output


def _direct_flops(use):
  return 2 * size(use.operand_aval(use.operand).shape)


RULE = register(Rule("concatenate", ("concatenate",), _match, None, _direct_flops, records=False))
