"""Per-example norms and clipped gradients of convolutions, recurrent cells and control flow.

The layers of test_per_example_zoo.py met the dot_general, bias, scale and gather rules on
[T, D] sequences; these meet the conv rule (flax, equinox and haiku convolutions of every rank,
strided, dilated, grouped, padded and transposed) and the engine's look into scan bodies (flax,
equinox and haiku recurrent cells; nn.scan over layers with nn.remat), checkpoint, cond, switch
and fori_loop. Every case is checked as that file's `check` does, against the float64 reference
built from `jax.vmap(jax.grad(loss))` (computed once per model for both methods), and its plan
with that file's `check_plan`. A while_loop, which no rule looks into, is the last case.
"""


import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_per_example_zoo as zoo
from jax import lax
from per_example_harness import RULES
from test_per_example_zoo import (
  METHODS,
  B,
  _fill,
  _mse,
  _next_token_loss,
  check,
)

import gnorm_jax

C, H = 4, 8  # channels (of images, and of the inputs of recurrent cells) and hidden size
IMAGE = (8, 8, C)  # channels last (flax, haiku); equinox is channels first
T = 6  # time steps
GPT_T, GPT_D, GPT_VOCAB, GPT_HEADS, GPT_LAYERS = 6, 16, 13, 2, 2


# ------------------------------------------------------------------ builders
# Each builder returns (loss, params, batch) with loss(params, *example), as in the zoo; here the
# input shape is the model's own, and the target has the shape of the model's output.


def _normal(rng, *shape):
  """0.5·N(0, 1) data drawn by numpy: jax.random would compile a kernel for every shape."""
  return jnp.asarray(0.5 * rng.normal(size=shape), jnp.float32)


def _regression(apply, init, seed, in_shape):
  """`apply(params, x)` on an input of `in_shape`, with a squared error against a target."""
  rng = np.random.default_rng(seed)
  x = _normal(rng, B, *in_shape)
  params = _fill(init(x[0]), seed)
  out = jax.eval_shape(apply, params, x[0])
  y = _normal(rng, B, *out.shape)
  return (lambda p, x, y: _mse(apply(p, x), y)), params, (x, y)


def _linen(module, seed, in_shape=IMAGE):
  init = lambda x: jax.eval_shape(module.init, jax.random.key(0), x)
  return _regression(module.apply, init, seed, in_shape)


def _haiku(forward, seed, in_shape=IMAGE):
  model = hk.without_apply_rng(hk.transform(forward))
  init = lambda x: jax.eval_shape(model.init, jax.random.key(0), x)
  return _regression(model.apply, init, seed, in_shape)


def _eqx(make, seed, in_shape):
  """A single-example equinox model; its inexact arrays are the parameters."""
  model = eqx.filter_eval_shape(make, jax.random.key(0))
  inexact = lambda x: isinstance(x, jax.ShapeDtypeStruct) and jnp.issubdtype(x.dtype, jnp.inexact)
  params, static = eqx.partition(model, inexact)
  apply = lambda p, x: eqx.combine(p, static)(x)
  return _regression(apply, lambda x: params, seed, in_shape)


def _plain(apply, shapes, seed, in_shape=(T, C)):
  """A plain-jax `apply(params, x)`; `shapes` maps parameter names to their shapes."""
  params = {name: jax.ShapeDtypeStruct(shape, jnp.float32) for name, shape in shapes.items()}
  return _regression(apply, lambda x: params, seed, in_shape)


# ------------------------------------------------------------------ convolutions


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


CONVS = {
    "linen_conv1d": lambda: _linen(nn.Conv(6, (3,)), 100, in_shape=(8, C)),
    "linen_conv2d": lambda: _linen(nn.Conv(6, (3, 3)), 101),
    "linen_conv3d": lambda: _linen(nn.Conv(6, (2, 2, 2)), 102, in_shape=(4, 4, 4, 3)),
    "linen_conv2d_strided_valid": lambda: _linen(
        nn.Conv(6, (3, 3), strides=(2, 2), padding="VALID"), 103
    ),
    "linen_conv2d_dilated_explicit_padding": lambda: _linen(
        nn.Conv(6, (3, 3), kernel_dilation=(2, 2), padding=((2, 2), (1, 3))), 104
    ),
    "linen_conv2d_depthwise_no_bias": lambda: _linen(
        nn.Conv(2 * C, (3, 3), feature_group_count=C, use_bias=False), 105
    ),
    "linen_conv2d_grouped": lambda: _linen(nn.Conv(6, (3, 3), feature_group_count=2), 106),
    "linen_conv_transpose": lambda: _linen(nn.ConvTranspose(6, (3, 3), strides=(2, 2)), 110),
    "linen_cnn": lambda: _linen(_LinenCNN(), 111),
    "eqx_conv2d": lambda: _eqx(_EqxConv, 112, in_shape=(C, 8, 8)),
    "haiku_conv2d": lambda: _haiku(lambda x: hk.Conv2D(6, 3)(x), 113),
}
# SAME padding is flax's and haiku's default (equinox's is explicit); the explicit padding above is
# asymmetric (2, 2) and (1, 3).


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
  params = _fill(jax.eval_shape(model.init, jax.random.key(0), tokens[0]), 120)
  loss = lambda p, tokens: _next_token_loss(model.apply(p, tokens), tokens)
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
    "linen_rnn_lstm": lambda: _linen(nn.RNN(nn.LSTMCell(H)), 130, in_shape=(T, C)),
    "linen_rnn_gru": lambda: _linen(nn.RNN(nn.GRUCell(H)), 131, in_shape=(T, C)),
    "linen_rnn_optimized_lstm": lambda: _linen(
        nn.RNN(nn.OptimizedLSTMCell(H)), 132, in_shape=(T, C)
    ),
    "linen_scan_remat_layers": lambda: _linen(_LinenStack(), 133, in_shape=(T, H)),
    "linen_scan_remat_gpt": _scanned_gpt,
    "eqx_lstm_scan": lambda: _eqx(_EqxLSTM, 134, in_shape=(T, C)),
    "haiku_lstm_dynamic_unroll": lambda: _haiku(_haiku_lstm, 135, in_shape=(T, C)),
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
  x = _normal(rng, B, T, C)
  params = _fill({n: jax.ShapeDtypeStruct(s, jnp.float32) for n, s in shapes.items()}, seed)
  y = _normal(rng, B, *jax.eval_shape(apply, params, x[0], extra[0]).shape)
  return (lambda p, x, e, y: _mse(apply(p, x, e), y)), params, (x, extra, y)


CONTROL = {
    "jax_checkpoint": lambda: _plain(jax.checkpoint(_mlp), _UWB, 140),
    "jax_cond": lambda: _batched_regression(_cond, _BRANCHES, 141, _FLAGS),
    "jax_switch": lambda: _batched_regression(_switch, _BRANCHES, 142, _INDICES),
    "jax_fori_loop": lambda: _plain(_fori, _UWB, 143),
    "jax_scan_rnn_data_state": lambda: _batched_regression(
        _rnn, _UWB, 144, _normal(np.random.default_rng(145), B, H)
    ),
}

ZOO = {**CONVS, **RECURRENT, **CONTROL}


# ------------------------------------------------------------------ the zoo against vmap


_case = zoo.case_runner(ZOO)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_matches_vmap_of_grad(name, method):
  zoo.check_case(_case, name, method)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_plan_materializes_nothing(name):
  loss, params, batch = ZOO[name]()
  zoo.check_plan(loss, params, *batch, rules=RULES | {"conv"})  # the zoo's rules, convolutions


def test_plan_names_the_conv_rule():
  loss, params, batch = CONVS["linen_cnn"]()
  plan = gnorm_jax.per_example_plan(loss, batch_argnums=(1, 2))(params, *batch)
  rules = {leaf.path: leaf.rules for leaf in plan.leaves}
  assert rules["['params']['Conv_0']['kernel']"] == ("conv",)
  assert rules["['params']['Conv_1']['bias']"] == ("bias",)
  assert rules["['params']['Dense_0']['kernel']"] == ("dot_general",)


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
  return (1.0 + n) * _mse(h, y)


def _while_case():
  rng = np.random.default_rng(150)
  params = _fill({n: jax.ShapeDtypeStruct(s, jnp.float32) for n, s in _WB.items()}, 150)
  x = _normal(rng, B, T, H) * np.array([0.1, 0.3, 1.0, 3.0], np.float32)[:, None, None]
  return params, x, _normal(rng, B, T, H)


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
