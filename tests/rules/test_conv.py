"""The conv rule: flax, equinox and haiku convolutions of every rank, strided, dilated, grouped,
padded and transposed, and a small CNN, checked against ``jax.vmap(jax.grad(loss))``
(per_example_harness)."""

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import pytest
from per_example_harness import check, zoo_tests
from per_example_models import eqx_model, haiku, linen, shaped

import gnorm_jax

RULES = {"conv", "bias", "scale", "dot_general"}
C = 4  # channels
IMAGE = (8, 8, C)  # channels last (flax, haiku); equinox is channels first


class _LinenCNN(nn.Module):
  """conv → GroupNorm → relu → strided conv → average pool → Dense."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3))(x)
    x = nn.relu(nn.GroupNorm(num_groups=2, reduction_axes=(-3, -2, -1))(x))
    x = nn.Conv(8, (3, 3), strides=(2, 2))(x)
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    return nn.Dense(3)(x.reshape(-1))


class _EqxConv(eqx.Module):
  conv: eqx.nn.Conv2d

  def __init__(self, key):
    self.conv = eqx.nn.Conv2d(C, 6, 3, padding=1, key=key)

  def __call__(self, x):
    return jnp.tanh(self.conv(x))


# SAME padding is flax's and haiku's default (equinox's is explicit); the explicit padding below
# is asymmetric (2, 2) and (1, 3).
MODELS = {
  "linen_conv1d": lambda: shaped(linen(nn.Conv(6, (3,))), 100, in_shape=(8, C)),
  "linen_conv2d": lambda: shaped(linen(nn.Conv(6, (3, 3))), 101, IMAGE),
  "linen_conv3d": lambda: shaped(linen(nn.Conv(6, (2, 2, 2))), 102, in_shape=(4, 4, 4, 3)),
  "linen_conv2d_strided_valid": lambda: shaped(
    linen(nn.Conv(6, (3, 3), strides=(2, 2), padding="VALID")), 103, IMAGE
  ),
  "linen_conv2d_dilated_explicit_padding": lambda: shaped(
    linen(nn.Conv(6, (3, 3), kernel_dilation=(2, 2), padding=((2, 2), (1, 3)))), 104, IMAGE
  ),
  "linen_conv2d_depthwise_no_bias": lambda: shaped(
    linen(nn.Conv(2 * C, (3, 3), feature_group_count=C, use_bias=False)), 105, IMAGE
  ),
  "linen_conv2d_grouped": lambda: shaped(
    linen(nn.Conv(6, (3, 3), feature_group_count=2)), 106, IMAGE
  ),
  "linen_conv_transpose": lambda: shaped(
    linen(nn.ConvTranspose(6, (3, 3), strides=(2, 2))), 110, IMAGE
  ),
  "linen_cnn": lambda: shaped(linen(_LinenCNN()), 111, IMAGE),
  "eqx_conv2d": lambda: shaped(eqx_model(_EqxConv), 112, in_shape=(C, 8, 8)),
  "haiku_conv2d": lambda: shaped(haiku(lambda x: hk.Conv2D(6, 3)(x)), 113, IMAGE),
}

test_zoo_matches_vmap_of_grad, test_zoo_plan_materializes_nothing = zoo_tests(MODELS, RULES)


def test_plan_names_the_conv_rule():
  loss, params, batch = MODELS["linen_cnn"]()
  plan = gnorm_jax.per_example_plan(loss, batch_argnums=(1, 2))(params, *batch)
  rules = {leaf.path: leaf.rules for leaf in plan.leaves}
  assert rules["['params']['Conv_0']['kernel']"] == ("conv",)
  assert rules["['params']['Conv_1']['bias']"] == ("bias",)
  assert rules["['params']['Dense_0']['kernel']"] == ("dot_general",)


def _odd_conv(x, kernel):
  """Every option of conv_general_dilated at once (bar batch groups)."""
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    window_strides=(2, 1),
    padding=((-1, 2), (1, -1)),  # negative and asymmetric
    lhs_dilation=(2, 1),
    rhs_dilation=(1, 2),
    dimension_numbers=("NWCH", "HOWI", "CNWH"),
    feature_group_count=2,
  )


@pytest.mark.parametrize("scale", [1.0, 1e20, 1e-20])
def test_patches_of_a_convolution_with_every_option(scale):
  """A convolution with a batch of its own in each example, a layout of neither flax nor
  equinox, negative padding, input and kernel dilation, unequal strides and two feature
  groups: the patches the rule gathers must be the ones the convolution reads."""
  k = jax.random.split(jax.random.key(7), 3)
  params = {"kernel": jax.random.normal(k[0], (3, 2, 4, 2))}  # (H, O, W, I/G)
  x = jax.random.normal(k[1], (5, 2, 9, 4, 7))  # B=5; each example N=2, W=9, C=4, H=7
  out = jax.eval_shape(_odd_conv, x[0], params["kernel"]).shape
  y = jax.random.normal(k[2], (5, *out))

  def loss(p, x, y):
    return scale * jnp.sum(jnp.tanh(_odd_conv(x, p["kernel"])) * y)

  check(loss, params, x, y, batch_argnums=(1, 2))
  plan = gnorm_jax.per_example_plan(loss, batch_argnums=(1, 2))(params, x, y)
  assert [leaf.rules for leaf in plan.leaves] == [("conv",)]
