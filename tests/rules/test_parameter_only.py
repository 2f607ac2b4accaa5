"""Parameters used through parameter-only computations before they meet the example: parts of a
parameter (a fused-gate LSTM kernel split into gates, slices, a flipped convolution kernel) and
several parameters combined (weight normalization ``v · g / ‖v‖`` of flax linen, equinox, by
hand), checked against ``jax.vmap(jax.grad(loss))`` (per_example_harness). Their chains are
re-bound by the direct route, so each leaf's gradient is exact, overlaps and cross terms
included."""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax import lax
from per_example_harness import METHODS, check, check_plan, zoo_tests
from per_example_models import (
  D,
  EqxSequence,
  T,
  eqx_model,
  linen,
  plain,
  sequence,
  shaped,
)

RULES = {"dot_general", "bias", "scale", "conv"}
H = 4  # LSTM hidden size


def _fused_lstm(p, xs):
  """An LSTM whose gate kernels are one [D, 4H] and one [H, 4H] parameter, split per step."""

  def step(carry, x):
    h, c = carry
    wx, wh, b = jnp.split(p["wx"], 4, axis=1), jnp.split(p["wh"], 4, axis=1), jnp.split(p["b"], 4)
    i, f, g, o = (x @ wx[k] + h @ wh[k] + b[k] for k in range(4))
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), h

  return lax.scan(step, (jnp.zeros(H), jnp.zeros(H)), xs)[1]


def _overlapping_slices(p, x):
  """Three parts of one kernel, overlapping: W[:, :D], W[:, D/2:3D/2] and a dynamic slice."""
  w = p["w"]
  y = x @ w[:, :D] + jnp.tanh(x @ w[:, D // 2 : D // 2 + D])
  return y + x @ lax.dynamic_slice(w, (0, 3), (D, D)) + (x @ w[:, 5])[:, None]


def _flipped_kernel(p, x):
  """A convolution by a kernel and by its flip (a correlation and a convolution, tied)."""
  dn = ("NHWC", "HWIO", "NHWC")
  conv = lambda k: lax.conv_general_dilated(x[None], k, (1, 1), "SAME", dimension_numbers=dn)
  return jnp.tanh(conv(p["k"])) + conv(jnp.flip(p["k"], (0, 1)))


def _grouped_conv_weightnorm(p, x):
  """Wav2Vec2's positional convolution: a grouped 1-D convolution whose kernel is
  weight-normalized (v·g/‖v‖ over all but the kernel axis)."""
  v = p["v"]
  k = v * (p["g"] / jnp.sqrt(jnp.sum(v * v, axis=(1, 2), keepdims=True)))
  dn = ("NWC", "WIO", "NWC")
  y = lax.conv_general_dilated(
    x[None], k, (1,), [(1, 1)], dimension_numbers=dn, feature_group_count=2
  )
  return jax.nn.gelu(y[0])


def _weightnorm_by_hand(p, x):
  w = p["v"] * (p["g"] / jnp.linalg.norm(p["v"], axis=0))
  return jnp.tanh(x @ w) @ p["v"].T  # v is also used directly


MODELS = {
  "param_only_fused_lstm": lambda: sequence(
    plain(_fused_lstm, {"wx": (D, 4 * H), "wh": (H, 4 * H), "b": (4 * H,)}), 50, out_shape=(T, H)
  ),
  "param_only_overlapping_slices": lambda: sequence(
    plain(_overlapping_slices, {"w": (D, 2 * D)}), 51, out_shape=(T, D)
  ),
  "param_only_flipped_kernel": lambda: shaped(
    plain(_flipped_kernel, {"k": (3, 3, 2, 3)}), 52, in_shape=(6, 5, 2)
  ),
  "param_only_weightnorm_by_hand": lambda: sequence(
    plain(_weightnorm_by_hand, {"v": (D, D), "g": (D,)}), 53
  ),
  "param_only_grouped_conv_weightnorm": lambda: sequence(
    plain(_grouped_conv_weightnorm, {"v": (3, D // 2, D), "g": (3, 1, 1)}), 58
  ),
  "param_only_linen_weightnorm": lambda: sequence(linen(nn.WeightNorm(nn.Dense(D))), 54),
  "param_only_eqx_weightnorm": lambda: sequence(
    eqx_model(lambda k: EqxSequence(eqx.nn.WeightNorm(eqx.nn.Linear(D, D, key=k)))), 56
  ),
  "param_only_scalar_scale": lambda: sequence(
    plain(lambda p, x: jnp.tanh(x * p["s"]) @ p["w"], {"s": (), "w": (D, D)}), 57
  ),
}

test_zoo_matches_vmap_of_grad, test_zoo_plan_materializes_nothing = zoo_tests(MODELS, RULES)


def test_weightnorm_leaves_take_the_direct_route():
  loss, params, batch = MODELS["param_only_linen_weightnorm"]()
  plan = check_plan(loss, params, *batch, rules=RULES)
  assert {leaf.route for leaf in plan.leaves} == {"direct"}, plan


def test_a_rank_0_scale_is_the_scale_rule():
  loss, params, batch = MODELS["param_only_scalar_scale"]()
  rules = {leaf.path: leaf.rules for leaf in check_plan(loss, params, *batch, rules=RULES).leaves}
  assert rules["['s']"] == ("scale",)


@pytest.mark.parametrize("scale", [1e20, 1e-20], ids=["huge", "tiny"])
def test_huge_and_tiny_losses(scale):
  loss, params, batch = MODELS["param_only_weightnorm_by_hand"]()
  check(lambda p, *b: scale * loss(p, *b), params, *batch, methods=METHODS)
