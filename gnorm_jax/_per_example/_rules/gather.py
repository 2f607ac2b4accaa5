"""gather of whole slices: embedding lookups (``E[ids]``, ``jnp.take``, ``nn.Embed``; penzai's
``E[:, ids]`` on a [D, V] table: any one looked-up axis).

The per-example gradient of E [V, D…] is Σ_t onehot(i_t) ⊗ g_t (V the looked-up axis). Its
ghost factor over the row axis is an index, never a V-wide one-hot: the Gram is
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
  refuse,
  register,
  size,
  to_factor,
)


def _lookup_axis(eqn) -> int | None:
  """The table axis a whole-slice lookup indexes, or None when the gather is not one.

  A lookup reads, at each index, the table's whole slice along every other axis
  (``E[ids]``, ``E[:, ids]``, ``jnp.take(E, ids, axis=a)``). Other start indices
  may only address axes read whole, where they are clamped to 0 (vmap of ``E[i]``
  gathers with one per table axis).
  """
  dn = eqn.params["dimension_numbers"]
  shape, sizes = eqn.in_avals[0].shape, tuple(eqn.params["slice_sizes"])
  starts, collapsed = tuple(dn.start_index_map), tuple(dn.collapsed_slice_dims)
  narrow = [d for d in starts if sizes[d] != shape[d]]
  axis = collapsed[0] if len(collapsed) == 1 else (narrow[0] if len(narrow) == 1 else None)
  if (
    axis is None
    or axis not in starts
    or collapsed not in ((axis,), ())
    or sizes != tuple(1 if d == axis else n for d, n in enumerate(shape))
    or tuple(getattr(dn, "operand_batching_dims", ())) != ()
    or eqn.in_avals[1].shape[-1:] != (len(starts),)
    or (starts != (axis,) and eqn.params["mode"] == lax.GatherScatterMode.FILL_OR_DROP)
  ):
    return None
  return axis


def _match(eqn, operand):
  if operand != 0:
    return refuse("the parameter is the index")
  if _lookup_axis(eqn) is None:
    return refuse("not a lookup of whole slices along one axis")
  return ACCEPT


def _ghost(use, operands, cot, perm, coef):
  eqn = use.eqn
  axis = _lookup_axis(eqn)
  dn = eqn.params["dimension_numbers"]
  idx = operands[1][..., tuple(dn.start_index_map).index(axis)]
  rows = use.operand_aval(0).shape[axis]
  i = idx.reshape(idx.shape[0], 1, -1).astype(jnp.int32)
  if eqn.params.get("mode") == lax.GatherScatterMode.FILL_OR_DROP:
    valid = (i >= 0) & (i < rows)  # out-of-range lookups read fill values: no gradient
  else:
    valid = jnp.ones(i.shape, bool)
  i = jnp.clip(i, 0, rows - 1)
  # The output's offset dims are the table's uncollapsed axes in order; the others are the
  # index positions, in the indices' order (an uncollapsed lookup axis, of size 1, joins them).
  kept = [d for d in range(len(perm)) if d not in dn.collapsed_slice_dims]
  offset = dict(zip(kept, dn.offset_dims))
  out_nd = cot.ndim - 1
  feat_axes = [d for d in range(len(perm)) if d != axis]
  feat = [offset[d] for d in feat_axes]
  pos = [d for d in range(out_nd) if d not in dn.offset_dims] + (
    [offset[axis]] if axis in offset else []
  )
  f_leaf = [perm[d] for d in feat_axes]
  g = to_factor(cot, [], pos, feat, f_leaf, [])
  if coef != 1:
    g = g * coef
  # The index is always the P factor; a dense use of the same leaf stacks with it where the
  # looked-up axis precedes the others in the leaf (a [V, D] table), else the route is direct.
  layout = ((), (perm[axis],), tuple(sorted(f_leaf)))
  return Ghost(layout, Index(i, valid, rows), Dense(g, "cot"))


def _direct_flops(use):
  # The direct route scatters into a zero [V, D…] per example and squares it.
  return 2 * size(use.operand_aval(0).shape) + size(use.out_aval.shape)


RULE = register(Rule("gather", ("gather",), _match, _ghost, _direct_flops))
