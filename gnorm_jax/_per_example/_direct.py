"""The direct route: a leaf's per-example gradients formed from its uses.

Each use's equation is re-bound from the recorded operands and the leaf's
value (through its chain), and its vjp with the recorded output cotangent is
the use's part of the example's gradient; a leaf's uses add up to ONE gradient.
Inside scans the operands carry the step axes and the use is vmapped over them.
Where the uses have ghost factors of one layout, Σ_t P_t ⊗ Q_t is one batched
contraction instead (a convolution's patches times its output cotangents).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gnorm_jax._norms import stacked_group_norms, tree_norm, tree_norm_split
from gnorm_jax._numerics import binary_exponent, ldexp
from gnorm_jax._per_example._ghost import acc_dtype, divided, factor_grads, ghosts, use_ghost
from gnorm_jax._per_example._jaxpr import Lit
from gnorm_jax._per_example._program import Part, Rebuild
from gnorm_jax._per_example._rules import Use


def norm_dtype(w) -> jnp.dtype:
  """The real dtype a norm of ``w`` is accumulated and returned in."""
  return jnp.finfo(acc_dtype(w.dtype)).dtype


def per_example_norms(g: jax.Array) -> jax.Array:
  """[B] norms of per-example values [B, ...], by the norm core."""
  return jax.vmap(tree_norm)(g)


def per_example_leaf_norms(gs: list[jax.Array]) -> tuple[list[jax.Array], list[jax.Array]]:
  """``(ms, es)``, one column [B] per array of ``gs`` (per-example values [B, ...]):
  the norms m·2^e (floats in their widest accumulation dtype, int32 exponents; m
  finite where the norm overflows), by ONE call of the norm core
  (:func:`per_example_group_norms`)."""
  return per_example_group_norms([[g] for g in gs])


def per_example_group_norms(
  groups: list[list[jax.Array]],
) -> tuple[list[jax.Array], list[jax.Array]]:
  """``(ms, es)``, one column [B] per group of per-example arrays [B, ...]: each
  example's norm of the group's values together, as m·2^e (as
  :func:`per_example_leaf_norms`), by ONE call of the norm core: one fast pass
  and one check for all of them (in the GPU/TPU form, one reduction per group).
  The columns are sliced out of its stacked result before anything else reads
  them: a slice fuses into its reader, where the stacked array read whole (a
  concatenation, or a transpose of it) is a kernel of its own."""
  # [G, B]: the layout the core's stack has under vmap, so no transpose stands
  # between it and the slices.
  ms, rs = jax.vmap(stacked_group_norms, out_axes=1)(groups)
  cols = range(len(groups))
  return [ms[j] for j in cols], [binary_exponent(rs[j]) for j in cols]


def _apply_chain(segment: tuple, w: jax.Array, params) -> jax.Array:
  for eqn in segment:
    if isinstance(eqn, Rebuild):  # a parameter-only value, from this leaf and the others
      w = eqn.apply(w, params)
    elif isinstance(eqn, Part):  # one output of a split
      w = eqn.eqn.bind([w])[eqn.index]
    elif isinstance(eqn, tuple):  # slot j of a concatenation: zeros in the others
      eqn, j = eqn
      (w,) = eqn.bind(
        [w if k == j else jnp.zeros(a.shape, a.dtype) for k, a in enumerate(eqn.in_avals)]
      )
    else:
      (w,) = eqn.bind([a.value if isinstance(a, Lit) else w for a in eqn.inputs])
  return w


def use_output(use: Use, operands: tuple, w: jax.Array, params=None) -> jax.Array:
  """The use's output for one example from leaf value ``w`` (``params``: every leaf's
  value, for a parameter-only chain); inside scans, the outputs of every step,
  stacked (the operands carry the step axes)."""

  def at(level, w, ops):
    w = _apply_chain(use.chain[level], w, params)
    if level == len(use.scopes):
      # Operands a rule does not record do not enter its gradient: zeros stand in.
      vals = [
        jnp.zeros(a.shape, a.dtype) if o is None else o for o, a in zip(ops, use.eqn.in_avals)
      ]
      vals[use.operand] = w
      return use.eqn.bind(vals)[0]
    kind, length = use.scopes[level]
    if kind == "const":
      return jax.vmap(lambda o: at(level + 1, w, o), axis_size=length)(ops)
    return jax.vmap(lambda wl, o: at(level + 1, wl, o), axis_size=length)(w, ops)

  return at(0, w, operands)


def direct_grads(
  uses: list[Use], operands: dict, cots: dict, w: jax.Array, params=None
) -> jax.Array:
  """[B, *w.shape]: each example's gradient of leaf ``w`` from its uses (``params``: every
  leaf's value, for uses through a parameter-only value).

  Where the uses have ghost factors of one layout, Σ_t P_t ⊗ Q_t is one batched
  contraction (a convolution's patches times its output cotangents); otherwise
  it is the vjp of the uses' equations, vmapped over the batch.
  """
  gs = ghosts(uses, operands, cots, w.ndim)
  found = [g for g in gs if g is not None]
  if len(found) == len(gs) and len({g.layout for g in found}) == 1:
    return factor_grads(found, w)
  pulled = _pulled_back(uses, operands, cots, w, params)
  if pulled is not None:
    return pulled
  ops = [operands[u.key] for u in uses]
  cs = [cots[u.key] for u in uses]
  return jax.vmap(lambda o, c: one_grad(uses, o, c, w, params))(ops, cs)


def _pulled_back(uses: list[Use], operands: dict, cots: dict, w: jax.Array, params):
  """Σ over uses of each use's per-example gradient with respect to its operand (the
  value the chain makes of the leaf: a weight-normalized kernel, a slice), formed
  from the use's factors as one batched contraction, then pulled back through the
  chain to the leaf (a linear map, vmapped). None if a use sits in a scan or has no
  factors: a vmapped vjp of a grouped convolution with a per-example kernel runs
  as B·G groups, tens of times slower than the contraction."""
  if any(u.scopes for u in uses):
    return None
  total: jax.Array | int = 0
  for u in uses:
    aval = u.operand_aval(u.operand)
    bare = dataclasses.replace(u, chain=((),))
    g = use_ghost(bare, operands[u.key], cots[u.key], len(aval.shape))
    if g is None:
      return None
    value_grads = factor_grads([g], jnp.zeros(aval.shape, aval.dtype))
    _, pull = jax.vjp(lambda w, u=u: _apply_chain(u.chain[0], w, params).astype(aval.dtype), w)
    total = total + jax.vmap(lambda c, pull=pull: pull(c)[0])(value_grads)
  return None if isinstance(total, int) else total


def one_grad(uses: list[Use], ops: list, cs: list, w: jax.Array, params=None) -> jax.Array:
  """One example's gradient of ``w``: the vjp of its uses' equations."""
  _, vjp = jax.vjp(lambda w: [use_output(u, o, w, params) for u, o in zip(uses, ops)], w)
  (g,) = vjp(list(cs))
  return g


def exact_norm(uses, operands, cots, w, shift):
  """``(one, examples)`` for :func:`~._ghost.rescue`: one example's exact norm of
  ``w``'s gradient from its operands and cotangents, times 2^-shift (``shift`` [B]
  int32, the exponent of :func:`~._ghost.ghost_terms`), and those, batched."""
  ops = [operands[u.key] for u in uses]
  cs = [cots[u.key] for u in uses]

  def one(example):
    ops, cs, k = example
    m, r = tree_norm_split(one_grad(uses, ops, cs, w))
    return ldexp(m, binary_exponent(r) - k)

  return one, (ops, cs, shift)


def weighted_sum(weights: jax.Array, per_example: jax.Array, divisor=None) -> jax.Array:
  """Σᵢ wᵢ·gᵢ over the leading axis (divided by ``divisor``), accumulated in at least
  float32 (complex kept)."""
  acc = acc_dtype(per_example.dtype)
  total = jnp.tensordot(weights.astype(acc), per_example.astype(acc), axes=1)
  return divided(total, divisor, per_example.dtype)
