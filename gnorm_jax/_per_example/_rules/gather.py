"""gather of whole rows: embedding lookups (``E[ids]``, ``jnp.take``, ``nn.Embed``).

The per-example gradient of E [V, D…] is Σ_t onehot(i_t) ⊗ g_t. Its ghost
factor over the row axis is an index, never a V-wide one-hot: the Gram is
[i_t = i_s](g_t·g_s), and with a dense use of the same leaf (a tied output
projection z = x Eᵀ with cotangent c) the cross term is c_s[i_t](g_t·x_s) —
a gather of the cotangent. So an embedding costs T²·D per example, never
B×V×D.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from gnorm_jax._per_example._rules import (
    ACCEPT,
    Dense,
    Ghost,
    Index,
    Rule,
    layout_of,
    refuse,
    register,
    size,
)


def _match(eqn, operand):
  if operand != 0:
    return refuse("the parameter is the index")
  dn = eqn.params["dimension_numbers"]
  o_shape = eqn.in_avals[0].shape
  out_nd = len(eqn.out_avals[0].shape)
  n_rest = len(o_shape) - 1
  starts = tuple(dn.start_index_map)
  # Other start indices may only address axes read whole, where they are
  # clamped to 0 (vmap of ``E[i]`` gathers with one per operand axis).
  others_ok = starts == (0,) or (
      eqn.params["mode"] != lax.GatherScatterMode.FILL_OR_DROP and 0 in starts)
  collapsed = tuple(dn.collapsed_slice_dims)
  n_offset = n_rest + (collapsed == ())  # an uncollapsed row axis stays, of size 1
  if (collapsed not in ((0,), ()) or not others_ok
      or tuple(getattr(dn, "operand_batching_dims", ())) != ()
      or tuple(eqn.params["slice_sizes"]) != (1, *o_shape[1:])
      or tuple(dn.offset_dims) != tuple(range(out_nd - n_offset, out_nd))
      or eqn.in_avals[1].shape[-1:] != (len(starts),)):
    return refuse("not a lookup of whole rows along the first axis")
  return ACCEPT


def _ghost(use, operands, cot, perm, coef):
  starts = tuple(use.eqn.params["dimension_numbers"].start_index_map)
  idx = operands[1][..., starts.index(0)]
  rows = use.operand_aval(0).shape[0]
  i = idx.reshape(idx.shape[0], 1, -1).astype(jnp.int32)
  mode = use.eqn.params.get("mode")
  if mode == lax.GatherScatterMode.FILL_OR_DROP:
    valid = (i >= 0) & (i < rows)  # out-of-range lookups read fill values: no gradient
  else:
    valid = jnp.ones(i.shape, bool)
  i = jnp.clip(i, 0, rows - 1)
  n_rest = len(perm) - 1
  out_nd = cot.ndim - 1
  pos = list(range(out_nd - n_rest))
  feat = list(range(out_nd - n_rest, out_nd))
  f_axes = [perm[d] for d in range(1, len(perm))]
  order = sorted(range(n_rest), key=lambda k: f_axes[k])
  g = jnp.transpose(cot, [0, *[1 + d for d in pos], *[1 + feat[k] for k in order]])
  g = g.reshape(g.shape[0], 1, size(g.shape[1:1 + len(pos)]), -1)
  if coef != 1:
    g = g * coef
  layout, swapped = layout_of({"head": [], "first": [perm[0]], "second": f_axes})
  if swapped:  # the row axis is P unless a feature axis precedes it in the leaf
    return None
  return Ghost(layout, Index(i, valid, rows), Dense(g, "cot"))


def _direct_flops(use):
  # The direct route scatters into a zero [V, D…] per example and squares it.
  return 2 * size(use.operand_aval(0).shape) + size(use.out_aval.shape)


RULE = register(Rule("gather", ("gather",), _match, _ghost, _direct_flops))
