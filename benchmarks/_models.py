"""Models shared by the per-example benchmarks and tests: flax GPT blocks."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


class Block(nn.Module):
  """A pre-LayerNorm GPT block: causal self-attention and a GELU MLP."""

  d: int
  heads: int

  @nn.compact
  def __call__(self, x):
    t = x.shape[-2]
    mask = nn.make_causal_mask(jnp.ones(t, jnp.int32))[0]
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(nn.LayerNorm()(x), mask=mask)
    h = nn.gelu(nn.Dense(4 * self.d)(nn.LayerNorm()(x)))
    return x + nn.Dense(self.d)(h)


class _Step(nn.Module):
  """One block as a scan step (carry in, carry out)."""

  d: int
  heads: int

  @nn.compact
  def __call__(self, x, _):
    return Block(self.d, self.heads)(x), None


class GPT(nn.Module):
  """Token embedding, learned positions, ``layers`` blocks, a tied output projection.

  ``scanned``: the blocks as ``nn.scan(nn.remat(Block))`` (parameters stacked over
  layers), how deep flax transformers are written; otherwise a Python loop.
  """

  vocab: int
  d: int
  heads: int
  seq: int
  layers: int = 1
  scanned: bool = False

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(self.vocab, self.d)
    pos = self.param("pos", nn.initializers.normal(0.02), (self.seq, self.d))
    x = embed(tokens) + pos[: tokens.shape[-1]]
    if self.scanned:
      stack = nn.scan(
        nn.remat(_Step),
        variable_axes={"params": 0},
        split_rngs={"params": True},
        length=self.layers,
      )
      x, _ = stack(self.d, self.heads)(x, None)
    else:
      for _ in range(self.layers):
        x = Block(self.d, self.heads)(x)
    return embed.attend(nn.LayerNorm()(x))


def gpt(key, *, batch, seq, d, heads, vocab, layers=1, scanned=False):
  """(loss, params, (tokens, targets)): next-token cross entropy of ONE sequence."""
  model = GPT(vocab, d, heads, seq, layers, scanned)
  k1, k2, k3 = jax.random.split(key, 3)
  params = model.init(k1, jnp.zeros((seq,), jnp.int32))

  def loss(p, tokens, targets):
    logits = model.apply(p, tokens)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))

  tokens = jax.random.randint(k2, (batch, seq), 0, vocab)
  targets = jax.random.randint(k3, (batch, seq), 0, vocab)
  return loss, params, (tokens, targets)


class CNN(nn.Module):
  """Six convolutions (strided, 1×1, depthwise), GroupNorm, two dense layers."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.GroupNorm(8)(nn.Conv(32, (3, 3))(x)))
    x = nn.relu(nn.Conv(64, (3, 3), strides=2)(x))
    x = nn.relu(nn.Conv(64, (1, 1))(x))
    x = nn.relu(nn.Conv(64, (3, 3), feature_group_count=64)(x))  # depthwise
    x = nn.relu(nn.GroupNorm(8)(nn.Conv(128, (3, 3), strides=2)(x)))
    x = nn.relu(nn.Conv(128, (3, 3), strides=2)(x))
    x = x.reshape(-1)
    return nn.Dense(10)(nn.relu(nn.Dense(128)(x)))


def cnn(key, *, batch, size=32, classes=10):
  model = CNN()
  k1, k2, k3 = jax.random.split(key, 3)
  params = model.init(k1, jnp.zeros((size, size, 3)))

  def loss(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y)

  x = jax.random.normal(k2, (batch, size, size, 3))
  y = jax.random.randint(k3, (batch,), 0, classes)
  return loss, params, (x, y)


def lstm(key, *, batch, seq, hidden, features=32, classes=10):
  model = nn.RNN(nn.LSTMCell(hidden))
  head = nn.Dense(classes)
  k1, k2, k3, k4 = jax.random.split(key, 4)
  params = {
    "rnn": model.init(k1, jnp.zeros((seq, features))),
    "head": head.init(k2, jnp.zeros(hidden)),
  }

  def loss(p, x, y):
    h = model.apply(p["rnn"], x)[-1]
    return optax.softmax_cross_entropy_with_integer_labels(head.apply(p["head"], h), y)

  x = jax.random.normal(k3, (batch, seq, features))
  y = jax.random.randint(k4, (batch,), 0, classes)
  return loss, params, (x, y)
