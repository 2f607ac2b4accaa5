"""Builders of the per-example engine's zoo: a layer of any framework as ``(loss, params, batch)``.

A test module that defines zoo models exposes them at module level as ``MODELS``, a dict of name
-> builder, each builder a function of no arguments returning ``(loss, params, batch)`` with
``loss(params, *example)`` and every array of ``batch`` batched along its first axis
(``per_example_harness.all_models`` gathers them). A model is a framework adapter
(:func:`linen`, :func:`haiku`, :func:`nnx_model`, :func:`eqx_model`, :func:`plain`: each gives
``(apply, init)``) fed to a data builder: :func:`sequence` (a [T, D] sequence regression),
:func:`language` (next-token prediction) or :func:`shaped` (an input of the model's own shape).
Parameters are filled with random values (no initializer to compile, no unit scales).
"""

import equinox as eqx
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

B, T, D, VOCAB, HEADS = 4, 5, 8, 11, 2


def normal(key, *shape):
  """0.5·N(0, 1) data drawn by jax.random."""
  return 0.5 * jax.random.normal(key, shape)


def normal_np(rng, *shape):
  """0.5·N(0, 1) data drawn by numpy: jax.random would compile a kernel for every shape."""
  return jnp.asarray(0.5 * rng.normal(size=shape), jnp.float32)


def fill(abstract, seed):
  """Random values for a tree of ShapeDtypeStructs (no initializer to compile, no unit scales)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), abstract)


def mse(out, y):
  return 0.5 * jnp.sum((out - y) ** 2)


def next_token_loss(logits, tokens):
  return optax.softmax_cross_entropy_with_integer_labels(logits[:-1], tokens[1:]).mean()


# ------------------------------------------------------------------ framework adapters
# Each returns (apply, init): apply(params, x) for one example, init(x) the parameters' shapes.


def linen(module):
  return module.apply, lambda x: jax.eval_shape(module.init, jax.random.key(0), x)


def haiku(forward):
  model = hk.without_apply_rng(hk.transform(forward))
  return model.apply, lambda x: jax.eval_shape(model.init, jax.random.key(0), x)


def nnx_model(make):
  """An nnx module: nnx.split into its Params (an nnx.State), nnx.merge inside the loss."""
  graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))), nnx.Param, ...)
  return (lambda p, x: nnx.merge(graphdef, p, rest)(x)), lambda x: params


def eqx_model(make):
  """A single-example equinox model; its inexact arrays are the parameters."""
  model = eqx.filter_eval_shape(make, jax.random.key(0))
  inexact = lambda x: isinstance(x, jax.ShapeDtypeStruct) and jnp.issubdtype(x.dtype, jnp.inexact)
  params, static = eqx.partition(model, inexact)
  return (lambda p, x: eqx.combine(p, static)(x)), lambda x: params


def plain(apply, shapes):
  """A plain-jax ``apply(params, x)``; ``shapes`` maps parameter names to their shapes."""
  params = {name: jax.ShapeDtypeStruct(shape, jnp.float32) for name, shape in shapes.items()}
  return apply, lambda x: params


class EqxSequence(eqx.Module):
  """Applies a per-position layer at every position (equinox layers are unbatched)."""

  layer: eqx.Module

  def __call__(self, x):
    return jax.vmap(self.layer)(x)


# ------------------------------------------------------------------ data builders


def sequence(model, seed, out_shape=(T, D)):
  """The model on a [T, D] input with a squared error against a target: every example is a
  sequence of T positions, so each parameter is used at several positions (cross terms
  matter)."""
  apply, init = model
  k = jax.random.split(jax.random.key(seed), 2)
  x, y = normal(k[0], B, T, D), normal(k[1], B, *out_shape)
  return (lambda p, x, y: mse(apply(p, x), y)), fill(init(x[0]), seed), (x, y)


def language(model, seed):
  """Logits from T integer tokens with the next-token cross entropy (tokens are batched too)."""
  apply, init = model
  tokens = jax.random.randint(jax.random.key(seed), (B, T), 0, VOCAB)
  loss = lambda p, tokens: next_token_loss(apply(p, tokens), tokens)
  return loss, fill(init(tokens[0]), seed), (tokens,)


def shaped(model, seed, in_shape):
  """The model on an input of ``in_shape``, with a squared error against a target of the
  output's shape (data by numpy)."""
  apply, init = model
  rng = np.random.default_rng(seed)
  x = normal_np(rng, B, *in_shape)
  params = fill(init(x[0]), seed)
  out = jax.eval_shape(apply, params, x[0])
  y = normal_np(rng, B, *out.shape)
  return (lambda p, x, y: mse(apply(p, x), y)), params, (x, y)
