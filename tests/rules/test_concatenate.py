"""The concatenate rule: a parameter joined to the example's values (a ViT's CLS and register
tokens, a learned feature channel), checked against ``jax.vmap(jax.grad(loss))``
(per_example_harness)."""

import flax.linen as nn
import haiku as hk
import jax.numpy as jnp
import pytest
from flax import nnx
from per_example_harness import METHODS, check, check_plan, zoo_tests
from per_example_models import HEADS, D, T, haiku, linen, nnx_model, plain, sequence

RULES = {"concatenate", "dot_general", "bias", "scale"}


class _LinenViTHead(nn.Module):
  """Patch embedding, a CLS token and position embeddings, attention, a head on the CLS token."""

  @nn.compact
  def __call__(self, patches):
    cls = self.param("cls", nn.initializers.normal(), (1, D))
    pos = self.param("pos", nn.initializers.normal(), (T + 1, D))
    x = jnp.concatenate([cls, nn.Dense(D)(patches)]) + pos
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS)(nn.LayerNorm()(x))
    return nn.Dense(D)(x[0])


class _NnxRegisterTokens(nnx.Module):
  """Two parameters (a CLS token and register tokens) in one concatenation."""

  def __init__(self, rngs):
    self.cls = nnx.Param(jnp.zeros((1, D)))
    self.registers = nnx.Param(jnp.zeros((2, D)))
    self.embed = nnx.Linear(D, D, rngs=rngs)
    self.out = nnx.Linear(D, D, rngs=rngs)

  def __call__(self, x):
    h = jnp.concatenate([self.cls[...], self.registers[...], self.embed(x)])
    return self.out(jnp.tanh(h))


def _haiku_cls_twice(x):
  """The same token at both ends: one leaf, two slots of one use."""
  cls = hk.get_parameter("cls", (1, D), init=hk.initializers.RandomNormal())
  return hk.Linear(D)(jnp.tanh(jnp.concatenate([cls, x, cls])))


def _feature_channel(p, x):
  """A learned channel broadcast over positions and joined along the feature axis."""
  h = jnp.concatenate([x, jnp.broadcast_to(p["channel"], (x.shape[0], 2))], axis=1)
  return jnp.tanh(h) @ p["w"]


MODELS = {
  "concat_linen_vit_cls": lambda: sequence(linen(_LinenViTHead()), 40, out_shape=(D,)),
  "concat_nnx_registers": lambda: sequence(nnx_model(_NnxRegisterTokens), 41, out_shape=(T + 3, D)),
  "concat_haiku_cls_twice": lambda: sequence(haiku(_haiku_cls_twice), 42, out_shape=(T + 2, D)),
  "concat_feature_channel": lambda: sequence(
    plain(_feature_channel, {"channel": (2,), "w": (D + 2, D)}), 43
  ),
}

test_zoo_matches_vmap_of_grad, test_zoo_plan_materializes_nothing = zoo_tests(MODELS, RULES)


def test_plan_names_the_concatenation():
  loss, params, batch = MODELS["concat_linen_vit_cls"]()
  rules = {leaf.path: leaf.rules for leaf in check_plan(loss, params, *batch, rules=RULES).leaves}
  assert rules["['params']['cls']"] == ("concatenate",)
  assert rules["['params']['pos']"] == ("bias",)


@pytest.mark.parametrize("scale", [1e20, 1e-20], ids=["huge", "tiny"])
def test_huge_and_tiny_losses(scale):
  loss, params, batch = MODELS["concat_nnx_registers"]()
  check(lambda p, *b: scale * loss(p, *b), params, *batch, methods=METHODS)
