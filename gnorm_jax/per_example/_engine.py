"""The ghost engine: one batched forward+backward gives every per-example norm.

For each recognized matmul use z = dot_general(a, O) with O = chain(W), a zero
perturbation p is added to z; the gradient of the per-example loss with respect
to p is the output cotangent gᵢ, and aᵢ is recorded on the way. The per-example
gradient of O is the contraction of aᵢ with gᵢ, whose squared norm is

  ‖Σ_t a_tᵀ g_t‖²_F = Σ_{t,s} (a_t·a_s)(g_t·g_s)        (ghost, Goodfellow 2015)

or, when the T² Gram matrices cost more than the d_in×d_out matrix, the matrix
itself is formed per example (direct) — the mixed rule of Bu et al. 2022.
Fallback leaves get exact per-example gradients in the same pass, as vmap of
grad would give them. With clip weights wᵢ known, a recognized leaf's clipped
sum Σᵢ wᵢ aᵢᵀgᵢ is one weighted contraction (book-keeping, Bu et al. 2023).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

from gnorm_jax.norms import accumulation_dtype, sum_of_squares
from gnorm_jax.per_example._analysis import Analysis, DotUse, call_body


def _bind(eqn: Any, invals: list) -> list:
  """Applies ``eqn``'s primitive to ``invals``, as jax.core.eval_jaxpr does."""
  bind_params = eqn.primitive.get_bind_params(eqn.params)
  # Older jax returned (subfuns, params).
  subfuns, params = bind_params if isinstance(bind_params, tuple) else ((), bind_params)
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*subfuns, *invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def eval_instrumented(
    closed: jcore.ClosedJaxpr,
    flat_args: list,
    perturbations: dict,
) -> tuple[Any, dict]:
  """Evaluates ``closed``, adding ``perturbations[key]`` to the output of the
  dot_general at ``key`` and recording that dot's operands.

  Returns the jaxpr's first output and {key: (lhs, rhs)}.
  """
  operands: dict = {}

  def run(jaxpr, consts, args, path):
    env = {}

    def read(v):
      return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
      env[v] = x
    for v, x in zip(jaxpr.invars, args):
      env[v] = x
    for i, eqn in enumerate(jaxpr.eqns):
      key = path + (i,)
      invals = [read(v) for v in eqn.invars]
      body = call_body(eqn)
      if body is not None:
        outs = run(body.jaxpr, body.consts, invals, key)
      else:
        outs = _bind(eqn, invals)
        if key in perturbations:
          operands[key] = tuple(invals)
          outs = [outs[0] + perturbations[key]]
      for v, x in zip(eqn.outvars, outs):
        if not isinstance(v, jcore.DropVar):
          env[v] = x
    return [read(v) for v in jaxpr.outvars]

  out = run(closed.jaxpr, closed.consts, flat_args, ())
  return out[0], operands


def _apply_chain(chain: tuple, w: jax.Array) -> jax.Array:
  for eqn in chain:
    (w,) = _bind(eqn, [w])
  return w


def _use_output(use: DotUse, act: jax.Array, w: jax.Array) -> jax.Array:
  """The single-example output of ``use`` with activation ``act``, from leaf ``w``."""
  o = _apply_chain(use.chain, w)
  (out,) = _bind(use.eqn, [o, act] if use.side == 0 else [act, o])
  return out


def _per_example_leaf_grads(uses, acts, cots, w) -> jax.Array:
  """[B, *w.shape]: each example's gradient of leaf ``w`` (direct method)."""

  def one(acts_i, cots_i):
    def linear(w):
      return sum(
          jnp.vdot(_use_output(u, a, w), c).real for u, a, c in zip(uses, acts_i, cots_i)
      )

    return jax.grad(linear)(w)

  return jax.vmap(one)(acts, cots)


def weighted_leaf_grad(uses, acts, cots, weights, w) -> jax.Array:
  """Σᵢ wᵢ·(per-example gradient of leaf ``w``) as one contraction (book-keeping)."""

  def linear(w):
    total = 0.0
    for u, a, c in zip(uses, acts, cots):
      outs = jax.vmap(lambda a_i: _use_output(u, a_i, w))(a)
      wc = c * weights.reshape((-1,) + (1,) * (c.ndim - 1)).astype(c.dtype)
      total = total + jnp.vdot(outs, wc).real
    return total

  return jax.grad(linear)(w)


# ---------------------------------------------------------------- ghost norms


def _activation_dims(use: DotUse) -> tuple[tuple, tuple, tuple]:
  """The activation operand's (batch, free, contracted) dims for this use."""
  (lc, rc), (lb, rb) = use.dimension_numbers
  a_c, a_b = (rc, rb) if use.side == 0 else (lc, lb)
  a_free = tuple(d for d in range(len(use.act_shape)) if d not in a_c and d not in a_b)
  return tuple(a_b), a_free, tuple(a_c)


def _sizes(use: DotUse) -> tuple[int, int, int, int]:
  """(H, T, K, N): dot batch size, positions, contracted size, parameter free size."""
  a_b, a_free, a_c = _activation_dims(use)
  h, t, k = (math.prod(use.act_shape[d] for d in dims) for dims in (a_b, a_free, a_c))
  n = math.prod(use.out_shape) // (h * t) if h * t else 0
  return h, t, k, n


def _canonical(use: DotUse, act: jax.Array, cot: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A [B,H,T,K] and G [B,H,T,N] with per-example O-gradient Σ_t A_tᵀG_t per h."""
  a_b, a_free, a_c = _activation_dims(use)
  h, t, k, n = _sizes(use)
  a = jnp.transpose(act, [0] + [1 + d for d in (*a_b, *a_free, *a_c)])
  if use.side == 0:  # output layout (batch, w_free, a_free) -> (batch, a_free, w_free)
    nb, nf, out_nd = len(a_b), len(a_free), len(use.out_shape)
    nw = out_nd - nb - nf
    order = [*range(nb), *range(nb + nw, out_nd), *range(nb, nb + nw)]
    cot = jnp.transpose(cot, [0] + [1 + d for d in order])
  return a.reshape(act.shape[0], h, t, k), cot.reshape(cot.shape[0], h, t, n)


def _layout_key(use: DotUse, leaf_ndim: int):
  """How the leaf's axes split into (batch, contracted, free) for this use, or
  None when a reshape hides it. Uses with equal keys stack along T."""
  axes = list(range(leaf_ndim))
  for eqn in use.chain:
    if eqn.primitive.name == "transpose":
      axes = [axes[p] for p in eqn.params["permutation"]]
    elif eqn.primitive.name not in ("convert_element_type", "copy"):
      return None
  (lc, rc), (lb, rb) = use.dimension_numbers
  w_c, w_b = (lc, lb) if use.side == 0 else (rc, rb)
  w_free = [d for d in range(len(axes)) if d not in w_c and d not in w_b]
  pick = lambda dims: tuple(axes[d] for d in dims)  # noqa: E731
  return pick(w_b), pick(w_c), pick(w_free)


def plan_leaf(uses: list[DotUse], leaf_ndim: int) -> str:
  """'ghost' or 'direct' for a recognized leaf (the mixed rule)."""
  keys = {_layout_key(u, leaf_ndim) for u in uses}
  if len(keys) != 1 or None in keys:
    return "direct"
  _, _, k, n = _sizes(uses[0])
  t = sum(_sizes(u)[1] for u in uses)  # uses stack along positions
  # Per example and dot-batch entry: ghost costs T²(K+N), direct T·K·N.
  return "ghost" if t * (k + n) <= k * n else "direct"


def ghost_sq_norms(uses, acts, cots) -> jax.Array:
  """[B] squared norms of a leaf whose uses share one layout key."""
  pairs = [_canonical(u, a, c) for u, a, c in zip(uses, acts, cots)]
  acc = accumulation_dtype(jnp.result_type(*[x.dtype for p in pairs for x in p]))
  a = jnp.concatenate([p[0] for p in pairs], axis=2).astype(acc)
  g = jnp.concatenate([p[1] for p in pairs], axis=2).astype(acc)
  if a.shape[2] == 1:  # T = 1: ‖aᵢ‖²‖gᵢ‖², no Gram matrices at all
    return jnp.sum(jnp.sum(a * a, axis=(2, 3)) * jnp.sum(g * g, axis=(2, 3)), axis=1)
  aa = jnp.einsum("bhtk,bhsk->bhts", a, a, precision=lax.Precision.HIGHEST)
  gg = jnp.einsum("bhtn,bhsn->bhts", g, g, precision=lax.Precision.HIGHEST)
  return jnp.sum(aa * gg, axis=(1, 2, 3))


def leaf_sq_norms(plan, uses, acts, cots, w) -> jax.Array:
  if not uses:
    return jnp.zeros((), accumulation_dtype(w.dtype))
  if plan == "ghost":
    return ghost_sq_norms(uses, acts, cots)
  return jax.vmap(sum_of_squares)(_per_example_leaf_grads(uses, acts, cots, w))


def batched_pass(
    closed: jcore.ClosedJaxpr,
    analysis: Analysis,
    assemble: Callable[[dict, list], list],
    params_flat: list,
    batch_flat: list,
    batch_size: int,
):
  """One vmapped forward+backward over the batch.

  Returns (per-example fallback-leaf gradients {leaf: [B, ...]},
  acts {use key: [B, ...]}, cots {use key: [B, ...]}).
  ``assemble(leaf_values, batch_values)`` builds the flat argument list.
  """
  perturbed = analysis.perturbed
  fallback = sorted(analysis.fallback)

  def single(fb_vals, perts, batch_vals):
    leaves = dict(enumerate(params_flat))
    leaves.update(zip(fallback, fb_vals))
    out, operands = eval_instrumented(closed, assemble(leaves, batch_vals), perts)
    acts = {k: operands[k][1 - u.side] for k, u in perturbed.items()}
    return out, acts

  grad_fn = jax.grad(single, argnums=(0, 1), has_aux=True)
  perts = {k: jnp.zeros((batch_size, *u.out_shape), u.out_dtype) for k, u in perturbed.items()}
  (fb_grads, cots), acts = jax.vmap(grad_fn, in_axes=(None, 0, 0))(
      [params_flat[i] for i in fallback], perts, batch_flat
  )
  return dict(zip(fallback, fb_grads)), acts, cots
