"""conv_general_dilated with the parameter as its input: a learned image or position map
convolved with an example-dependent kernel.

For z = conv(P, K) the per-example gradient of P is the transposed convolution of
the output cotangent with the example's kernel K (what the vjp of the one
equation computes, with K recorded). It is formed per example by the direct
route, exact for any strides, padding, dilations and groups; the rule has no
ghost route (the gradient is no sum of outer products over P's axes).
"""

from __future__ import annotations

from gnorm_jax._per_example._rules import ACCEPT, Rule, conv, refuse, register


def _match(eqn, operand):
  return ACCEPT if operand == 0 else refuse("the parameter is the convolution's kernel")


# The input's vjp, a transposed convolution, costs what the kernel's does.
RULE = register(Rule("conv_input", ("conv_general_dilated",), _match, None, conv.RULE.direct_flops))
