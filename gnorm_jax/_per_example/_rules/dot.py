"""dot_general: dense layers, einsums, attention projections, tied output layers.

For z = dot_general(a, O) the per-example gradient of O is, for each dot-batch
(head) index, Σ_t a_tᵀ g_t over the free positions t of the activation a: the
activation over O's contracted axes times the cotangent over O's free axes.
"""

from __future__ import annotations

from gnorm_jax._per_example._rules import (
  ACCEPT,
  Dense,
  Ghost,
  Rule,
  layout_of,
  refuse,
  register,
  size,
  to_factor,
)


def _match(eqn, operand):
  return ACCEPT if operand in (0, 1) else refuse("not an operand")


def _dims(use):
  """(O contracted, O batch, O free, act contracted, act batch, act free) axes."""
  (lc, rc), (lb, rb) = use.eqn.params["dimension_numbers"]
  side = use.operand
  oc, ob, ac, ab = (lc, lb, rc, rb) if side == 0 else (rc, rb, lc, lb)
  o_nd = len(use.operand_aval(side).shape)
  a_nd = len(use.operand_aval(1 - side).shape)
  of = [d for d in range(o_nd) if d not in oc and d not in ob]
  af = [d for d in range(a_nd) if d not in ac and d not in ab]
  return list(oc), list(ob), of, list(ac), list(ab), af


def _ghost(use, operands, cot, perm, coef):
  oc, ob, of, ac, ab, af = _dims(use)
  act = operands[1 - use.operand]
  # Output axes: dot batch, then lhs free, then rhs free.
  nb = len(ob)
  if use.operand == 0:
    out_of = list(range(nb, nb + len(of)))
    out_af = list(range(nb + len(of), nb + len(of) + len(af)))
  else:
    out_af = list(range(nb, nb + len(af)))
    out_of = list(range(nb + len(af), nb + len(af) + len(of)))
  head_axes = [perm[d] for d in ob]
  c_axes = [perm[d] for d in oc]
  f_axes = [perm[d] for d in of]
  a = to_factor(act, ab, af, ac, c_axes, head_axes)
  g = to_factor(cot, list(range(nb)), out_af, out_of, f_axes, head_axes)
  if coef != 1:
    g = g * coef
  layout, swapped = layout_of({"head": head_axes, "first": c_axes, "second": f_axes})
  p, q = (Dense(g, "cot"), Dense(a, "act")) if swapped else (Dense(a, "act"), Dense(g, "cot"))
  return Ghost(layout, p, q)


def _direct_flops(use):
  # The vjp forms Σ_t a_tᵀ g_t: 2·(output size)·(contracted size).
  oc, _, _, _, _, _ = _dims(use)
  o_shape = use.operand_aval(use.operand).shape
  return 2 * size(use.out_aval.shape) * size([o_shape[d] for d in oc])


RULE = register(Rule("dot_general", ("dot_general",), _match, _ghost, _direct_flops))
