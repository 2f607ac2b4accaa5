"""The conv_input rule: a parameter that is a convolution's input (a learned image or position
map convolved with an example-dependent kernel), checked against ``jax.vmap(jax.grad(loss))``
(per_example_harness)."""

import flax.linen as nn
import jax.numpy as jnp
from jax import lax
from per_example_harness import check_plan, zoo_tests
from per_example_models import linen, plain, sequence, shaped

RULES = {"conv_input", "conv", "dot_general", "bias"}
NHWC = ("NHWC", "HWIO", "NHWC")


class _LinenHyperConv(nn.Module):
  """A learned position map convolved with a kernel a dense layer makes from the example."""

  @nn.compact
  def __call__(self, x):
    image = self.param("image", nn.initializers.normal(), (1, 6, 5, 2))
    kernel = nn.Dense(3 * 3 * 2 * 4)(x.mean(0)).reshape(3, 3, 2, 4)
    return lax.conv_general_dilated(image, kernel, (1, 1), "SAME", dimension_numbers=NHWC)


def _strided_grouped(p, kernel):
  """NCHW, strides, a kernel dilation, two feature groups. The image's convolution with a learned
  kernel is a parameter-only value, added to the example's (the bias rule, through it)."""
  conv = lambda lhs, rhs: lax.conv_general_dilated(
    lhs, rhs, (2, 1), ((1, 0), (2, 1)), rhs_dilation=(1, 2), feature_group_count=2
  )
  image = p["image"]
  return jnp.tanh(conv(image, kernel)) + conv(image, p["kernel"]) + p["b"][:, None, None]


MODELS = {
  "conv_input_linen_hyper_kernel": lambda: sequence(
    linen(_LinenHyperConv()), 60, out_shape=(1, 6, 5, 4)
  ),
  "conv_input_strided_grouped": lambda: shaped(
    plain(_strided_grouped, {"image": (1, 4, 7, 7), "kernel": (4, 2, 3, 3), "b": (4,)}),
    61,
    in_shape=(4, 2, 3, 3),
  ),
}

test_zoo_matches_vmap_of_grad, test_zoo_plan_materializes_nothing = zoo_tests(MODELS, RULES)


def test_plan_names_the_input_rule():
  loss, params, batch = MODELS["conv_input_strided_grouped"]()
  rules = {leaf.path: leaf.rules for leaf in check_plan(loss, params, *batch, rules=RULES).leaves}
  assert rules["['image']"] == ("conv_input", "bias")
  assert rules["['kernel']"] == ("bias",)
