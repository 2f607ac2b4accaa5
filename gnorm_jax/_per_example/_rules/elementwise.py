"""Biases and scales: a parameter broadcast against the activations.

``bias``: z = x ± b (flax/haiku/equinox biases, norm-layer offsets). The
per-example gradient of b is ±g summed over the broadcast axes.
``scale``: z = x · s (norm-layer scales, gates). It is Σ (x ⊙ g) over the
broadcast axes.
Both gradients are no larger than the parameter (the chain's
``broadcast_in_dim`` transposes to a sum), so the direct route — forming them
per example from the recorded operand and cotangent — is the cheapest exact
one; these rules have no ghost route.
"""

from __future__ import annotations

from gnorm_jax._per_example._rules import ACCEPT, Rule, refuse, register, size


def _binary(eqn, operand):
  if operand not in (0, 1):
    return refuse("not an operand")
  shape, out = eqn.in_avals[operand].shape, eqn.out_avals[0].shape
  # A rank-0 operand broadcasts to any shape (lax's binary ops accept scalars).
  if shape and (len(shape) != len(out) or any(s not in (1, o) for s, o in zip(shape, out))):
    return refuse(f"operand shape {shape} does not broadcast to the output's {out}")
  return ACCEPT


def _elementwise_flops(use):
  return 2 * size(use.out_aval.shape)


BIAS = register(
  Rule("bias", ("add", "sub", "add_any"), _binary, None, _elementwise_flops, records=False)
)
SCALE = register(Rule("scale", ("mul",), _binary, None, _elementwise_flops))
