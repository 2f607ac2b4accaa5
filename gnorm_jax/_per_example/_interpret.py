"""Stage 4a, the instrumented interpreter: one batched forward+backward pass.

The single-example loss is evaluated from its :class:`~._jaxpr.Body` with a
zero perturbation added to the output of every recognized use; the gradient
with respect to that perturbation is the use's output cotangent gᵢ, and the
use's other operands are recorded on the way: one vmapped pass for all layers.
Fallback leaves get exact per-example gradients in the same pass, as vmap of
grad gives them.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from gnorm_jax._per_example import _jaxpr
from gnorm_jax._per_example._jaxpr import Body, Lit


def _inside(key: tuple, uses: dict) -> dict:
  """The uses nested under the equation at ``key``."""
  return {k: u for k, u in uses.items() if len(k) > len(key) and k[: len(key)] == key}


def make_run(uses: dict, streams: dict, tangents: dict, remat: bool = True) -> Callable:
  """An interpreter ``run(body, args, path, perts, operands) -> outputs`` that adds
  ``perts[key]`` to each use's output and records the use's operands into
  ``operands[key]`` (the parameter slot, and every slot of a rule that does not
  record, as None).

  Scan bodies holding uses are run by ``lax.scan`` with the perturbations
  scanned over and the operands stacked as outputs; ``checkpoint`` bodies are
  re-wrapped in ``jax.checkpoint`` (inlined with ``remat=False``, inside a
  backward pass that already recomputes); ``cond`` branches run by
  ``lax.switch``, each recording zeros for the other branches' uses. A scan in
  ``streams`` is run by its stream (``streams[key].scan(eqn, invals, z,
  tangents)``), its perturbation ``z`` the zero input whose cotangent is its
  per-step norms. A custom-derivative call in ``tangents`` adds its rule's
  tangent map at zero tangents to its outputs: a zero in value, through which
  the perturbations of the uses inside the rule get the custom rule's
  cotangents.
  """

  def run(body: Body, args: list, path: tuple, perts: dict, operands: dict) -> list:
    env: dict = {}

    def read(a):
      return a.value if isinstance(a, Lit) else env[a]

    env.update(zip(body.constvars, body.consts))
    env.update(zip(body.invars, args))
    for i, eqn in enumerate(body.eqns):
      key = path + (i,)
      invals = [read(a) for a in eqn.inputs]
      inner = _inside(key, uses)
      if key in streams:
        outs = streams[key].scan(eqn, invals, perts[key], tangents)
      elif key in tangents and inner:
        outs = eqn.bind(invals)
        t, derived = tangents[key]
        zeros = [
          jnp.zeros(jnp.shape(invals[j]), t.invars[len(invals) + m].aval.dtype)
          for m, j in enumerate(derived)
        ]
        touts = run(t, [*invals, *zeros], key, perts, operands)
        outs = [
          o + d.astype(o.dtype) if jnp.issubdtype(o.dtype, jnp.inexact) else o
          for o, d in zip(outs, touts)
        ]
      elif eqn.kind == _jaxpr.REMAT and inner and remat:
        outs = _remat(eqn, invals, key, perts, operands, inner, run)
      elif eqn.kind in (_jaxpr.CALL, _jaxpr.REMAT):
        outs = run(eqn.bodies[0], invals, key, perts, operands)
      elif eqn.kind == _jaxpr.SCAN and inner:
        outs = _scan(eqn, invals, key, perts, operands, inner, run)
      elif eqn.kind == _jaxpr.COND and inner:
        outs = _switch(eqn, invals, key, perts, operands, inner, run)
      else:
        outs = eqn.bind(invals)
        if key in uses:
          u = uses[key]
          operands[key] = tuple(
            None if j == u.operand or not u.rule.records else x for j, x in enumerate(invals)
          )
          outs = [outs[0] + perts[key]]
      for v, x in zip(eqn.outputs, outs):
        if v is not None:
          env[v] = x
    return [read(a) for a in body.outputs]

  return run


PLAIN = make_run({}, {}, {})  # evaluates a body as it is


def _remat(eqn, invals, key, perts, operands, inner, run):
  (body,) = eqn.bodies

  def fn(args: list, ps: dict) -> tuple[list, dict]:
    ops: dict = {}
    outs = run(body, args, key, ps, ops)
    return outs, ops

  outs, ops = jax.checkpoint(fn, prevent_cse=eqn.remat.prevent_cse, policy=eqn.remat.policy)(
    invals, {k: perts[k] for k in inner}
  )
  operands.update(ops)
  return outs


def _scan(
  eqn: _jaxpr.Eqn,
  invals: list,
  key: tuple,
  perts: dict,
  operands: dict,
  inner: dict,
  run: Callable[..., list],
) -> list:
  s = eqn.scan
  if s is None:  # not reached: the caller checked eqn.kind == SCAN
    raise AssertionError(f"the equation at {key} is not a scan")
  nc, nk = s.num_consts, s.num_carry
  (body,) = eqn.bodies
  consts, init, xs = invals[:nc], invals[nc : nc + nk], invals[nc + nk :]

  layout: list = []  # where each recorded operand sits among the distinct values

  def step(carry: list, x: tuple[list, dict]) -> tuple[list, tuple[list, list]]:
    x_vals, ps = x
    ops: dict = {}
    outs = run(body, [*consts, *carry, *x_vals], key, ps, ops)
    # Several uses often record the same value (an LSTM's four gates read one
    # h): stack each distinct value once.
    distinct: list = []
    index: dict = {}
    layout.clear()
    for k, vals in ops.items():
      row: list[int | None] = []
      for v in vals:
        if v is None:
          row.append(None)
          continue
        if id(v) not in index:
          index[id(v)] = len(distinct)
          distinct.append(v)
        row.append(index[id(v)])
      layout.append((k, row))
    return outs[:nk], (outs[nk:], distinct)

  carry, (ys, distinct) = lax.scan(
    step,
    init,
    (xs, {k: perts[k] for k in inner}),
    length=s.length,
    reverse=s.reverse,
    unroll=s.unroll,
  )
  for k, row in layout:
    operands[k] = tuple(None if i is None else distinct[i] for i in row)
  return [*carry, *ys]


def _switch(eqn, invals, key, perts, operands, inner, run):
  index, args = invals[0], invals[1:]
  branches = eqn.bodies
  ps = {k: perts[k] for k in inner}

  def branch_fn(b):
    def fn(args: list, ps: dict) -> tuple[list, dict]:
      ops: dict = {}
      outs = run(branches[b], args, key + (b,), ps, ops)
      return outs, ops

    return fn

  shapes = [jax.eval_shape(branch_fn(b), args, ps)[1] for b in range(len(branches))]
  every = {k: v for s in shapes for k, v in s.items()}

  def padded(b):
    def fn(args, ps):
      outs, ops = branch_fn(b)(args, ps)
      full = {
        k: ops.get(k, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), v))
        for k, v in every.items()
      }
      return outs, full

    return fn

  outs, ops = lax.switch(index, [padded(b) for b in range(len(branches))], args, ps)
  operands.update(ops)
  return outs


def batched_pass(
  body: Body,
  uses: dict,
  fallback: list,
  streams: dict,
  tangents: dict,
  assemble: Callable,
  params_flat: list,
  batch_flat: list,
  b: int,
  norm_dtype: Any = jnp.float32,
):
  """One vmapped forward+backward over the batch.

  Returns (fallback gradients {leaf: [B, ...]}, operands {key: [B, ...]},
  cotangents {key: [B, ...]}, auxiliary outputs [B, ...] (the loss's outputs
  after the first)). A streamed scan's cotangent is its [B, steps, leaves, 3]
  per-step norms, flags and bounds, and its kept factors (:class:`~._stream.Stream`).
  """
  streamed = {k for st in streams.values() for k in st.inner}
  uses = {k: u for k, u in uses.items() if k not in streamed}
  run = make_run(uses, streams, tangents)

  def single(fb_vals: list, perts: dict, batch_vals: list) -> tuple[jax.Array, tuple[dict, list]]:
    leaves = dict(enumerate(params_flat))
    leaves.update(zip(fallback, fb_vals))
    operands: dict = {}
    outs = run(body, assemble(leaves, batch_vals), (), perts, operands)
    return outs[0], (operands, outs[1:])

  grad_fn = jax.grad(single, argnums=(0, 1), has_aux=True)
  perts = {
    k: jnp.zeros((b, *u.steps, *u.out_aval.shape), u.out_aval.dtype) for k, u in uses.items()
  }
  perts.update({k: st.zeros(b, norm_dtype) for k, st in streams.items()})
  (fb_grads, cots), (operands, aux) = jax.vmap(grad_fn, in_axes=(None, 0, 0))(
    [params_flat[i] for i in fallback], perts, batch_flat
  )
  return dict(zip(fallback, fb_grads)), operands, cots, aux
