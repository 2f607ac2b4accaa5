"""The gather rule: embedding lookups of flax (linen, nnx), equinox and haiku, alone before a
dense head or tied to the output projection (one leaf, two uses: the cross terms between the
lookup and the matmul are part of its norm), checked against ``jax.vmap(jax.grad(loss))``
(per_example_harness)."""

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
from flax import nnx
from per_example_harness import zoo_tests
from per_example_models import VOCAB, D, eqx_model, haiku, language, linen, nnx_model

RULES = {"gather", "dot_general", "bias", "scale"}


class _LinenTiedEmbed(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(VOCAB, D)
    return embed.attend(jnp.tanh(embed(tokens)))


class _LinenEmbedDense(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    return nn.Dense(VOCAB)(jnp.tanh(nn.Embed(VOCAB, D)(tokens)))


class _NnxTiedEmbed(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
    self.norm = nnx.LayerNorm(D, rngs=rngs)

  def __call__(self, tokens):
    return self.embed.attend(self.norm(self.embed(tokens)))


class _EqxEmbedLinear(eqx.Module):
  embed: eqx.nn.Embedding
  head: eqx.nn.Linear

  def __init__(self, key):
    k = jax.random.split(key)
    self.embed = eqx.nn.Embedding(VOCAB, D, key=k[0])
    self.head = eqx.nn.Linear(D, VOCAB, key=k[1])

  def __call__(self, tokens):
    return jax.vmap(self.head)(jnp.tanh(jax.vmap(self.embed)(tokens)))


def _haiku_tied_embed(tokens):
  embed = hk.Embed(VOCAB, D)
  return jnp.tanh(embed(tokens)) @ embed.embeddings.T


MODELS = {
  "linen_embed": lambda: language(linen(_LinenEmbedDense()), 4),
  "linen_embed_tied": lambda: language(linen(_LinenTiedEmbed()), 5),
  "nnx_embed_tied": lambda: language(nnx_model(_NnxTiedEmbed), 12),
  "eqx_embedding": lambda: language(eqx_model(_EqxEmbedLinear), 17),
  "haiku_embed_tied": lambda: language(haiku(_haiku_tied_embed), 21),
}

test_zoo_matches_vmap_of_grad, test_zoo_plan_materializes_nothing = zoo_tests(MODELS, RULES)
