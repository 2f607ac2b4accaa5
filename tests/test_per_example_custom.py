"""Parameters inside custom_jvp / custom_vjp functions: the per-example gradient is the custom
rule's, whether or not it is the derivative of the primal computation.

Each model is checked against vmap of jax.grad (which applies the custom rules), and the plan
says which leaves the engine looked through and which fell back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gnorm_jax

B, T = 5, 3


@jax.custom_vjp
def vjp_linear(x, w):
  return x @ w


vjp_linear.defvjp(lambda x, w: (x @ w, (x, w)), lambda r, g: (g @ r[1].T, r[0].T @ g))


@jax.custom_jvp
def jvp_linear(x, w):
  return x @ w


@jvp_linear.defjvp
def _jvp_linear_rule(primals, tangents):
  (x, w), (dx, dw) = primals, tangents
  return x @ w, dx @ w + x @ dw


@jax.custom_vjp
def scaled_rule_linear(x, w):
  """x @ w whose custom gradient for w is 3 times the true one: not the primal's derivative."""
  return x @ w


scaled_rule_linear.defvjp(
  lambda x, w: (x @ w, (x, w)), lambda r, g: (g @ r[1].T, 3.0 * (r[0].T @ g))
)


@jax.custom_vjp
def straight_through(w):
  """Rounding to quarters with the identity as its gradient (quantization-aware training)."""
  return jnp.round(w * 4) / 4


straight_through.defvjp(lambda w: (straight_through(w), None), lambda _, g: (g,))


@jax.custom_vjp
def clipped_rule_linear(x, w):
  """A bwd rule that clips the cotangent: not linear, so it cannot be transposed."""
  return x @ w


clipped_rule_linear.defvjp(
  lambda x, w: (x @ w, (x, w)), lambda r, g: (g @ r[1].T, r[0].T @ jnp.clip(g, -0.1, 0.1))
)


SHAPES = {"a": (4, 6), "b": (6,), "c": (6, 6), "d": (6, 5), "e": (5, 5), "f": (5, 4), "g": (4, 2)}


def loss(p, x, y):
  h = jnp.tanh(vjp_linear(x, p["a"]) + p["b"])
  h = jnp.tanh(jvp_linear(h, p["c"]))
  h = h @ jax.nn.softplus(p["d"])  # softplus is a custom_jvp: a chain link
  h = h @ straight_through(p["e"])
  h = jnp.tanh(scaled_rule_linear(h, p["f"]))
  h = clipped_rule_linear(h, p["g"])
  return jnp.mean((h - y) ** 2)


def _case(seed=0):
  rng = np.random.default_rng(seed)
  params = {
    k: jnp.asarray(rng.normal(size=s) / np.sqrt(s[0]), jnp.float32) for k, s in SHAPES.items()
  }
  x = jnp.asarray(rng.normal(size=(B, T, 4)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(B, T, 2)), jnp.float32)
  return params, x, y


def _reference(params, x, y):
  g = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, x, y)
  g = jax.tree.map(lambda v: np.asarray(v, np.float64), g)
  norms = np.sqrt(sum(np.sum(v.reshape(B, -1) ** 2, 1) for v in jax.tree.leaves(g)))
  return g, norms


def test_plan_looks_through_linearizable_rules_only():
  params, x, y = _case()
  plan = gnorm_jax.per_example_plan(loss, batch_argnums=(1, 2))(params, x, y)
  routes = {leaf.path: (leaf.route, leaf.rules, leaf.why) for leaf in plan.leaves}
  for name in "abcdef":
    assert routes[f"['{name}']"][0] in ("ghost", "direct"), routes[f"['{name}']"]
    assert routes[f"['{name}']"][1] == ("dot_general",) or name == "b"
  route, _, why = routes["['g']"]
  assert route == "materialized" and "custom_vjp_call" in why, routes["['g']"]


@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_custom_rules_match_vmap_of_grad(method):
  params, x, y = _case()
  g, want = _reference(params, x, y)
  norms = jax.jit(gnorm_jax.per_example_grad_norms(loss, batch_argnums=(1, 2), method=method))(
    params, x, y
  )
  np.testing.assert_allclose(norms, want, rtol=2e-5)
  c = float(np.median(want))
  got = jax.jit(
    gnorm_jax.clipped_grad(loss, max_norm=c, batch_argnums=(1, 2), reduce="sum", method=method)
  )(params, x, y)
  weights = np.minimum(1.0, c / want)
  for k in SHAPES:
    want_k = np.tensordot(weights, g[k], 1)
    scale = np.max(np.abs(want_k))
    np.testing.assert_allclose(np.asarray(got[k]) / scale, want_k / scale, atol=2e-5, err_msg=k)


def test_the_custom_rule_is_used_not_the_primal_derivative():
  """f's rule triples its gradient and e's passes rounding straight through: the primal's
  derivative would give other norms (rounding has derivative 0), and the engine must not."""
  params, x, y = _case(1)
  _, want = _reference(params, x, y)

  def primal_loss(p, x, y):
    h = jnp.tanh(x @ p["a"] + p["b"])
    h = jnp.tanh(h @ p["c"])
    h = h @ jax.nn.softplus(p["d"])
    h = h @ (jnp.round(p["e"] * 4) / 4)
    h = jnp.tanh(h @ p["f"])
    return jnp.mean((h @ p["g"] - y) ** 2)

  primal = jax.vmap(jax.grad(primal_loss), in_axes=(None, 0, 0))(params, x, y)
  got = jax.jit(gnorm_jax.per_example_grad_norms(loss, batch_argnums=(1, 2)))(params, x, y)
  np.testing.assert_allclose(got, want, rtol=2e-5)
  primal_norms = np.sqrt(
    sum(np.sum(np.asarray(v, np.float64).reshape(B, -1) ** 2, 1) for v in jax.tree.leaves(primal))
  )
  assert np.max(np.abs(primal_norms - want) / want) > 0.3  # so the check above can fail


def test_ghost_method_accepts_linearizable_rules_and_names_the_other():
  params, x, y = _case()
  with pytest.raises(ValueError, match=r"\['g'\]: used by custom_vjp_call"):
    gnorm_jax.per_example_grad_norms(loss, batch_argnums=(1, 2), method="ghost")(params, x, y)

  def linearizable(p, x, y):
    h = jnp.tanh(vjp_linear(x, p["a"]) + p["b"])
    return jnp.mean((jvp_linear(h, p["c"])[..., :2] - y) ** 2)

  sub = {k: params[k] for k in "abc"}
  g = jax.vmap(jax.grad(linearizable), in_axes=(None, 0, 0))(sub, x, y)
  want = np.sqrt(
    sum(np.sum(np.asarray(v, np.float64).reshape(B, -1) ** 2, 1) for v in jax.tree.leaves(g))
  )
  got = jax.jit(
    gnorm_jax.per_example_grad_norms(linearizable, batch_argnums=(1, 2), method="ghost")
  )(sub, x, y)
  np.testing.assert_allclose(got, want, rtol=2e-5)
