"""The bias and scale rules: layer, RMS and group norms of flax (linen, nnx), equinox and haiku,
whose scales and offsets meet the activations elementwise, checked against
``jax.vmap(jax.grad(loss))`` (per_example_harness)."""

import equinox as eqx
import flax.linen as nn
import haiku as hk
from flax import nnx
from per_example_harness import zoo_tests
from per_example_models import HEADS, D, EqxSequence, eqx_model, haiku, linen, nnx_model, sequence

RULES = {"bias", "scale"}

MODELS = {
  "linen_layernorm": lambda: sequence(linen(nn.LayerNorm()), 6),
  "linen_rmsnorm": lambda: sequence(linen(nn.RMSNorm()), 7),
  "linen_groupnorm": lambda: sequence(
    linen(nn.GroupNorm(num_groups=HEADS, reduction_axes=(-2, -1))), 8
  ),
  "nnx_layernorm": lambda: sequence(nnx_model(lambda r: nnx.LayerNorm(D, rngs=r)), 13),
  "nnx_rmsnorm": lambda: sequence(nnx_model(lambda r: nnx.RMSNorm(D, rngs=r)), 14),
  "eqx_layernorm": lambda: sequence(eqx_model(lambda k: EqxSequence(eqx.nn.LayerNorm(D))), 18),
  "haiku_layernorm": lambda: sequence(haiku(lambda x: hk.LayerNorm(-1, True, True)(x)), 22),
  "haiku_rmsnorm": lambda: sequence(haiku(lambda x: hk.RMSNorm(-1)(x)), 23),
}

test_zoo_matches_vmap_of_grad, test_zoo_plan_materializes_nothing = zoo_tests(MODELS, RULES)
