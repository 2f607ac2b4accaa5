"""Per-example norms and clipped gradients through control flow: recurrent cells, scanned and
rematerialized layers, checkpoint, cond, switch, fori_loop and while_loop.

The engine looks into scan bodies (flax, equinox and haiku recurrent cells; nn.scan over layers
with nn.remat), checkpoint, cond, switch and fori_loop; the layers inside meet the rules of
tests/rules/. Every case is checked against the float64 reference built from
``jax.vmap(jax.grad(loss))`` (per_example_harness, computed once per model for both methods),
and its plan with ``check_plan``. A while_loop, which no rule looks into, is the last case.
"""

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from per_example_harness import RULES, check, zoo_tests
from per_example_models import (
  B,
  eqx_model,
  fill,
  haiku,
  linen,
  mse,
  next_token_loss,
  normal_np,
  plain,
  shaped,
)

import gnorm_jax

C, H = 4, 8  # channels of the inputs of recurrent cells, and hidden size
T = 6  # time steps
GPT_T, GPT_D, GPT_VOCAB, GPT_HEADS, GPT_LAYERS = 6, 16, 13, 2, 2


# ------------------------------------------------------------------ recurrent cells and layers


class _LinenStack(nn.Module):
  """Three Dense + LayerNorm blocks as nn.scan over layers of nn.remat(block)."""

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return nn.LayerNorm()(x + nn.Dense(x.shape[-1])(jnp.tanh(x))), None

  @nn.compact
  def __call__(self, x):
    blocks = nn.scan(
      nn.remat(self.Block), variable_axes={"params": 0}, split_rngs={"params": True}, length=3
    )
    return blocks(name="blocks")(x, None)[0]


class _GPTBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    mask = nn.make_causal_mask(x[:, 0])
    x = x + nn.MultiHeadDotProductAttention(num_heads=GPT_HEADS)(nn.LayerNorm()(x), mask=mask)
    x = x + nn.Dense(GPT_D)(nn.gelu(nn.Dense(4 * GPT_D)(nn.LayerNorm()(x))))
    return x, None


class _ScannedGPT(nn.Module):
  """Embedding + positions → nn.scan(nn.remat(block)) → LayerNorm → tied output embedding."""

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(GPT_VOCAB, GPT_D)
    x = embed(tokens) + nn.Embed(GPT_T, GPT_D, name="positions")(jnp.arange(tokens.shape[0]))
    blocks = nn.scan(
      nn.remat(_GPTBlock),
      variable_axes={"params": 0},
      split_rngs={"params": True},
      length=GPT_LAYERS,
    )
    x, _ = blocks(name="blocks")(x, None)
    return embed.attend(nn.LayerNorm()(x))


def _scanned_gpt():
  model = _ScannedGPT()
  tokens = jnp.asarray(np.random.default_rng(120).integers(0, GPT_VOCAB, (B, GPT_T)), jnp.int32)
  params = fill(jax.eval_shape(model.init, jax.random.key(0), tokens[0]), 120)
  loss = lambda p, tokens: next_token_loss(model.apply(p, tokens), tokens)
  return loss, params, (tokens,)


class _EqxLSTM(eqx.Module):
  """eqx.nn.LSTMCell over the time steps with jax.lax.scan, from a zero state."""

  cell: eqx.nn.LSTMCell

  def __init__(self, key):
    self.cell = eqx.nn.LSTMCell(C, H, key=key)

  def __call__(self, xs):
    def step(state, x):
      state = self.cell(x, state)
      return state, state[0]

    return lax.scan(step, (jnp.zeros(H), jnp.zeros(H)), xs)[1]


def _haiku_lstm(xs):
  lstm = hk.LSTM(H)
  return hk.dynamic_unroll(lstm, xs, lstm.initial_state(None))[0]


RECURRENT = {
  "linen_rnn_lstm": lambda: shaped(linen(nn.RNN(nn.LSTMCell(H))), 130, in_shape=(T, C)),
  "linen_rnn_gru": lambda: shaped(linen(nn.RNN(nn.GRUCell(H))), 131, in_shape=(T, C)),
  "linen_rnn_optimized_lstm": lambda: shaped(
    linen(nn.RNN(nn.OptimizedLSTMCell(H))), 132, in_shape=(T, C)
  ),
  "linen_scan_remat_layers": lambda: shaped(linen(_LinenStack()), 133, in_shape=(T, H)),
  "linen_scan_remat_gpt": _scanned_gpt,
  "eqx_lstm_scan": lambda: shaped(eqx_model(_EqxLSTM), 134, in_shape=(T, C)),
  "haiku_lstm_dynamic_unroll": lambda: shaped(haiku(_haiku_lstm), 135, in_shape=(T, C)),
}


# ------------------------------------------------------------------ plain jax control flow
# Parameters: u [C, H] reads the input, w [H, H] and b [H] the hidden state; the others are
# per-branch heads.


def _mlp(p, x):
  return jnp.tanh(x @ p["u"] + p["b"]) @ p["w"]


def _cond(p, x, flag):
  """Each example picks its branch (under vmap, a select of both)."""
  h = jnp.tanh(x @ p["u"] + p["b"])
  return lax.cond(flag, lambda h: h @ p["w"], lambda h: jnp.sin(h @ p["v"]) * p["s"], h)


def _switch(p, x, index):
  h = jnp.tanh(x @ p["u"])
  branches = [
    lambda h: h @ p["w"],
    lambda h: jnp.tanh(h @ p["v"] + p["b"]),
    lambda h: (h * p["s"]) @ p["w"],  # w at two branches
  ]
  return lax.switch(index, branches, h)


def _fori(p, x):
  """Three steps of h ↦ tanh(h·w + b): a static trip count, a scan underneath."""
  return lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["w"] + p["b"]), x @ p["u"])


def _rnn(p, xs, h0):
  """An Elman RNN from a per-example initial state (data, not a parameter)."""

  def step(h, x):
    h = jnp.tanh(h @ p["w"] + x @ p["u"] + p["b"])
    return h, h

  return lax.scan(step, h0, xs)[1]


_WB = {"w": (H, H), "b": (H,)}
_UWB = {"u": (C, H), **_WB}
_BRANCHES = {**_UWB, "v": (H, H), "s": (H,)}
_FLAGS = jnp.array([True, False, True, False])
_INDICES = jnp.array([0, 1, 2, 1])


def _batched_regression(apply, shapes, seed, extra):
  """loss(p, x, extra, y): `apply(p, x, extra)` with a batched third argument."""
  rng = np.random.default_rng(seed)
  x = normal_np(rng, B, T, C)
  params = fill({n: jax.ShapeDtypeStruct(s, jnp.float32) for n, s in shapes.items()}, seed)
  y = normal_np(rng, B, *jax.eval_shape(apply, params, x[0], extra[0]).shape)
  return (lambda p, x, e, y: mse(apply(p, x, e), y)), params, (x, extra, y)


CONTROL = {
  "jax_checkpoint": lambda: shaped(plain(jax.checkpoint(_mlp), _UWB), 140, in_shape=(T, C)),
  "jax_cond": lambda: _batched_regression(_cond, _BRANCHES, 141, _FLAGS),
  "jax_switch": lambda: _batched_regression(_switch, _BRANCHES, 142, _INDICES),
  "jax_fori_loop": lambda: shaped(plain(_fori, _UWB), 143, in_shape=(T, C)),
  "jax_scan_rnn_data_state": lambda: _batched_regression(
    _rnn, _UWB, 144, normal_np(np.random.default_rng(145), B, H)
  ),
}

MODELS = {**RECURRENT, **CONTROL}

test_zoo_matches_vmap_of_grad, test_zoo_plan_materializes_nothing = zoo_tests(MODELS, RULES)


# ------------------------------------------------------------------ a loop with no rule


def _while_loss(p, x, y):
  """w is used outside the loop and in its body, which runs until h is small (1 to 4 times here).

  Reverse mode cannot go through a while_loop, so only its integer trip count n reaches the loss:
  the loop's use of w contributes nothing to the gradient, but no rule can know that.
  """
  h = jnp.tanh(x @ p["w"] + p["b"])

  def body(carry):
    g, n = carry
    return 0.9 * jnp.tanh(g @ p["w"]), n + 1

  _, n = lax.while_loop(lambda c: (c[1] < 5) & (jnp.mean(c[0] ** 2) > 0.05), body, (h, 0))
  return (1.0 + n) * mse(h, y)


def _while_case():
  rng = np.random.default_rng(150)
  params = fill({n: jax.ShapeDtypeStruct(s, jnp.float32) for n, s in _WB.items()}, 150)
  x = normal_np(rng, B, T, H) * np.array([0.1, 0.3, 1.0, 3.0], np.float32)[:, None, None]
  return params, x, normal_np(rng, B, T, H)


def test_while_loop_falls_back_under_auto():
  params, x, y = _while_case()
  plan = gnorm_jax.per_example_plan(_while_loss, batch_argnums=(1, 2))(params, x, y)
  routes = {leaf.path: leaf.route for leaf in plan.leaves}
  assert routes["['w']"] == "materialized" and routes["['b']"] in ("ghost", "direct"), routes
  check(_while_loss, params, x, y, methods=("auto",))


def test_while_loop_under_ghost_names_the_leaf():
  params, x, y = _while_case()
  with pytest.raises(ValueError, match=r"\['w'\]: .*while"):
    gnorm_jax.per_example_grad_norms(_while_loss, batch_argnums=(1, 2), method="ghost")(
      params, x, y
    )
  with pytest.raises(ValueError, match=r"\['w'\]: .*while"):
    gnorm_jax.clipped_grad(_while_loss, max_norm=1.0, batch_argnums=(1, 2), method="ghost")(
      params, x, y
    )
