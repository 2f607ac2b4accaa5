"""Models that meet several rules at once: self-attention of flax (linen, nnx), equinox and
haiku (dot_general and bias) and a GPT block with a tied output embedding (every rule but conv),
checked against ``jax.vmap(jax.grad(loss))`` (per_example_harness)."""

import equinox as eqx
import flax.linen as nn
import haiku as hk
from flax import nnx
from per_example_harness import RULES, check_plan, zoo_tests
from per_example_models import (
  HEADS,
  VOCAB,
  D,
  eqx_model,
  haiku,
  language,
  linen,
  nnx_model,
  sequence,
)


class _LinenSelfAttention(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.MultiHeadDotProductAttention(num_heads=HEADS)(x)


class _LinenGPT(nn.Module):
  """Embed → LayerNorm → causal self-attention → MLP → LayerNorm → tied output embedding."""

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(VOCAB, D)
    x = embed(tokens)
    mask = nn.make_causal_mask(tokens)
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS)(nn.LayerNorm()(x), mask=mask)
    x = x + nn.Dense(D)(nn.gelu(nn.Dense(4 * D)(x)))
    return embed.attend(nn.LayerNorm()(x))


class _EqxSelfAttention(eqx.Module):
  attention: eqx.nn.MultiheadAttention

  def __init__(self, key):
    biases = dict(use_query_bias=True, use_value_bias=True, use_output_bias=True)
    self.attention = eqx.nn.MultiheadAttention(HEADS, D, **biases, key=key)

  def __call__(self, x):
    return self.attention(x, x, x)


def _haiku_self_attention(x):
  w_init = hk.initializers.VarianceScaling(1.0)
  return hk.MultiHeadAttention(HEADS, D // HEADS, w_init=w_init)(x, x, x)


MODELS = {
  "linen_self_attention": lambda: sequence(linen(_LinenSelfAttention()), 9),
  "linen_gpt_tied": lambda: language(linen(_LinenGPT()), 10),
  "nnx_self_attention": lambda: sequence(
    nnx_model(lambda r: nnx.MultiHeadAttention(HEADS, D, decode=False, rngs=r)), 15
  ),
  "eqx_self_attention": lambda: sequence(eqx_model(_EqxSelfAttention), 19),
  "haiku_self_attention": lambda: sequence(haiku(_haiku_self_attention), 24),
}

test_zoo_matches_vmap_of_grad, test_zoo_plan_materializes_nothing = zoo_tests(MODELS, RULES)


def test_plan_names_the_rules_of_a_gpt_block():
  """The tied embedding is one leaf with two uses: its gather and its output matmul."""
  loss, params, batch = MODELS["linen_gpt_tied"]()
  rules = {leaf.path: set(leaf.rules) for leaf in check_plan(loss, params, *batch).leaves}
  assert rules["['params']['Embed_0']['embedding']"] == {"gather", "dot_general"}
  assert rules["['params']['Dense_0']['kernel']"] == {"dot_general"}
  assert rules["['params']['Dense_0']['bias']"] == {"bias"}
  assert rules["['params']['LayerNorm_0']['scale']"] == {"scale"}
  assert rules["['params']['LayerNorm_0']['bias']"] == {"bias"}
  attention = "['params']['MultiHeadDotProductAttention_0']"
  assert rules[f"{attention}['query']['kernel']"] == {"dot_general"}
  assert rules[f"{attention}['out']['bias']"] == {"bias"}
