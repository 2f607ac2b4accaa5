"""Stage 4b, streamed scans: per-example norms inside a rematerialized scan's backward pass.

A rematerialized scan over stacked layers (``nn.scan(nn.remat(Block))``, or
``lax.scan`` over stacked weights with a ``jax.checkpoint`` body) would force
the batched pass to keep what the remat dropped. Instead, each step runs under
a ``custom_vjp`` that keeps only the step's inputs; its backward step
recomputes the step with its uses instrumented and forms each layer's slice
norm there (ghost or direct). The plan decides which scans stream
(:func:`~._plan.plan_streams`); the clipped sum then comes from a second,
weighted backward pass (:mod:`._run`) or, on the one-pass route, from the
factors each backward step keeps (the ghost leaves' operands and output
cotangents, the direct leaves' per-example slice gradients).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gnorm_jax._per_example._direct import direct_grads, per_example_leaf_norms
from gnorm_jax._per_example._ghost import ghost_terms, planned_ghosts
from gnorm_jax._per_example._interpret import PLAIN, make_run


@dataclasses.dataclass(frozen=True, eq=False)
class Stream:
  """A rematerialized scan over stacked parameters whose leaves' per-example
  norms are computed step by step in its backward pass.

  Step l of the scan sees slice l of each such leaf and nothing else does, so
  a leaf's squared norm is the sum over steps of its slices'. Each step's
  backward recomputes the step with its uses instrumented, forms each slice's
  per-example norm by the leaf's route (ghost or direct) and returns
  [m, e, suspect, upper] (the norm m·2^e) as the cotangent of a zero input.
  The operands and cotangents of a step live only during its backward step:
  memory stays that of the rematerialized plain gradient. On the one-pass
  route (``one_pass``) the step also returns the factors its clipped sums
  contract, kept until every norm is known.
  """

  key: tuple
  length: int
  slots: dict  # scan input index -> leaf
  leaves: tuple  # the streamed leaves, in the order of the norms' axis
  uses: dict  # leaf -> its uses, re-rooted at the scan body (the step's slice)
  routes: dict  # leaf -> "ghost" | "direct" | "unused"
  slices: dict  # leaf -> (shape, dtype) of one step's slice
  body: Any = None  # the scan's body
  tangents: Any = None  # the program's custom-derivative tangent maps (:func:`make_run`)
  # Each step's factors are kept and the clipped sum formed from them (no second
  # backward pass): see :meth:`zeros`.
  one_pass: bool = False

  @property
  def inner(self) -> dict:
    return {u.key: u for us in self.uses.values() for u in us}

  def zeros(self, b: int, dtype) -> tuple:
    """The zero input [B, steps, ...] whose cotangent is every step's norms
    (:meth:`_step_norms`) and, on the one-pass route, its kept factors
    (:meth:`_factors`)."""
    norms = jnp.zeros((b, self.length, len(self.leaves), 4), dtype)
    if not self.one_pass:
      return norms, {}
    shapes, _ = self._factor_spec
    return norms, jax.tree.map(lambda a: jnp.zeros((b, self.length, *a.shape), a.dtype), shapes)

  @property
  def layout(self) -> dict:
    """Ghost use -> where its operands are among the kept distinct ones (None: not
    recorded): uses of one value (a block's query, key and value projections of
    the same input) keep it once."""
    return self._factor_spec[1]

  @functools.cached_property
  def _factor_spec(self) -> tuple:
    """One step's kept factors as shapes, and their :attr:`layout`: the body traced
    once (abstractly) with its uses recorded."""
    run = make_run(self.inner, {}, self.tangents, remat=False)
    found = {}

    def factors(args):
      ops: dict = {}
      ps = {
        k: jnp.zeros((*u.steps, *u.out_aval.shape), u.out_aval.dtype) for k, u in self.inner.items()
      }
      run(self.body, args, self.key, ps, ops)
      kept, found["layout"] = self._factors(ops, ps, {})
      return kept

    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in self.body.invars]
    return jax.eval_shape(factors, avals), found["layout"]

  def _factors(self, ops: dict, cts: dict, grads: dict) -> tuple[dict, dict]:
    """One step's kept factors, ``{"ops": [distinct operands], "cts": {use: output
    cotangent}}`` of the ghost leaves and ``{"grads": {leaf: slice gradient}}`` of
    the direct ones (zeros of the slice's shape where ``grads`` lacks the leaf),
    and the :meth:`layout` of the operands."""
    ghost = [u.key for leaf in self.leaves if self.routes[leaf] == "ghost" for u in self.uses[leaf]]
    distinct: list = []
    index: dict = {}
    layout = {}
    for k in ghost:
      row = []
      for o in ops[k]:
        if o is not None and id(o) not in index:
          index[id(o)] = len(distinct)
          distinct.append(o)
        row.append(None if o is None else index[id(o)])
      layout[k] = tuple(row)
    direct: dict = {}
    for leaf in self.leaves:
      if self.routes[leaf] == "direct" and self.uses[leaf]:
        shape, wdtype = self.slices[leaf]
        direct[leaf] = grads.get(leaf, jnp.zeros(shape, wdtype))
    return {"ops": distinct, "cts": {k: cts[k] for k in ghost}, "grads": direct}, layout

  def scan(self, eqn, invals: list, z: tuple, tangents: dict) -> list:
    """Runs the scan ``eqn`` on ``invals``; ``z`` is the zero input (:meth:`zeros`)
    whose cotangent is the per-step norms, suspect flags and upper bounds, and
    on the one-pass route each step's factors."""
    s = eqn.scan
    nc, nk = s.num_consts, s.num_carry
    (body,) = eqn.bodies
    consts, init, xs = invals[:nc], invals[nc : nc + nk], invals[nc + nk :]
    slots = set(self.slots)
    key = self.key
    run = make_run(self.inner, {}, tangents, remat=False)

    @jax.custom_vjp
    def step_fn(args, z):
      del z
      return PLAIN(body, args, key, {}, {})

    def fwd(args, z):
      return step_fn(args, z), (args, z[0])  # the factors' zeros are not kept

    def bwd(res, ct):
      args, z_norms = res
      diff = [
        j for j, x in enumerate(args) if j not in slots and jnp.issubdtype(x.dtype, jnp.inexact)
      ]

      def inst(dvals: list, ps: dict) -> tuple[list, dict]:
        full = list(args)
        for j, v in zip(diff, dvals):
          full[j] = v
        ops: dict = {}
        outs = run(body, full, key, ps, ops)
        return outs, ops

      ps0 = {
        k: jnp.zeros((*u.steps, *u.out_aval.shape), u.out_aval.dtype) for k, u in self.inner.items()
      }
      _, vjp_fn, ops = jax.vjp(inst, [args[j] for j in diff], ps0, has_aux=True)
      d_diff, d_ps = vjp_fn(list(ct))
      dargs = [_float0_zeros(x) for x in args]
      for j, d in zip(diff, d_diff):
        dargs[j] = d
      norms, grads = self._step_norms(ops, d_ps, z_norms.dtype)
      return dargs, (norms, self._factors(ops, d_ps, grads)[0] if self.one_pass else {})

    step_fn.defvjp(fwd, bwd)

    def step(carry, xz):
      x, zl = xz
      outs = step_fn([*consts, *carry, *x], zl)
      return outs[:nk], outs[nk:]

    carry, ys = lax.scan(
      step, list(init), (list(xs), z), length=s.length, reverse=s.reverse, unroll=s.unroll
    )
    return [*carry, *ys]

  def _step_norms(self, ops: dict, cts: dict, dtype) -> tuple[jax.Array, dict]:
    """[leaves, 4] for one example and step: each streamed leaf's slice norm as
    m·2^e (m, then e as a float: exact), 1 where the ghost sum may have lost
    accuracy (0 otherwise), and an upper bound of the exact slice norm in m's
    scale; and the direct leaves' slice gradients."""
    rows, grads = [], {}
    for leaf in self.leaves:
      us = self.uses[leaf]
      if not us:
        rows.append(jnp.zeros((4,), dtype))
        continue
      shape, wdtype = self.slices[leaf]
      ob = {u.key: tuple(None if o is None else o[None] for o in ops[u.key]) for u in us}
      cb = {u.key: cts[u.key][None] for u in us}
      if self.routes[leaf] == "ghost":
        m, e, suspect, upper = ghost_terms(planned_ghosts(us, ob, cb, len(shape)))
      else:
        g = direct_grads(us, ob, cb, jnp.zeros(shape, wdtype))
        grads[leaf] = g[0]
        (m,), (e,) = per_example_leaf_norms([g])
        upper, suspect = m, jnp.zeros_like(m, bool)
      rows.append(jnp.stack([m[0], e[0], suspect[0], upper[0]]).astype(dtype))
    return jnp.stack(rows), grads


def _float0_zeros(x):
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, jax.dtypes.float0)
