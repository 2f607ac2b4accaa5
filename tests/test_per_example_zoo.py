"""Per-example norms and clipped gradients of flax (linen, nnx), equinox and haiku layers.

Every case is checked against an independent reference, ``jax.vmap(jax.grad(loss))``, whose
per-example gradients are measured, clipped and summed in float64 numpy; the regressions at the
end (overflow, underflow, cancellation, complex parameters, a plain Python argument) and the
property tests use float64 numpy formulas where float32 cannot serve as the reference.
"""

import functools

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from per_example_harness import (  # noqa: F401  (the control zoo imports them from here too)
  METHODS,
  RTOL,
  _assert_norms,
  _assert_tree_close,
  _clipped_sum,
  _norms,
  _per_example_grads,
  _run,
  case_runner,
  check,
  check_case,
  check_plan,
)

import gnorm_jax

B, T, D, VOCAB, HEADS = 4, 5, 8, 11, 2


def _normal(key, *shape):
  return 0.5 * jax.random.normal(key, shape)


def _fill(abstract, seed):
  """Random values for a tree of ShapeDtypeStructs (no initializer to compile, no unit scales)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), abstract)


def _mse(out, y):
  return 0.5 * jnp.sum((out - y) ** 2)


def _next_token_loss(logits, tokens):
  return optax.softmax_cross_entropy_with_integer_labels(logits[:-1], tokens[1:]).mean()


# ------------------------------------------------------------------ the zoo
# Each builder returns (loss, params, batch) with loss(params, *example); every example is a
# sequence of T positions, so each parameter is used at several positions (cross terms matter).
# `init(example)` gives the parameters' shapes.


def _regression(apply, init, seed, out_shape=(T, D)):
  """A layer on a [T, D] input with a squared error against a target."""
  k = jax.random.split(jax.random.key(seed), 2)
  x, y = _normal(k[0], B, T, D), _normal(k[1], B, *out_shape)
  return (lambda p, x, y: _mse(apply(p, x), y)), _fill(init(x[0]), seed), (x, y)


def _language(apply, init, seed):
  """Logits from integer tokens with the next-token cross entropy (tokens are batched too)."""
  tokens = jax.random.randint(jax.random.key(seed), (B, T), 0, VOCAB)
  loss = lambda p, tokens: _next_token_loss(apply(p, tokens), tokens)
  return loss, _fill(init(tokens[0]), seed), (tokens,)


def _build(apply, init, seed, language=False, **kwargs):
  return (_language if language else _regression)(apply, init, seed, **kwargs)


def _linen(module, seed, **kwargs):
  init = lambda x: jax.eval_shape(module.init, jax.random.key(0), x)
  return _build(module.apply, init, seed, **kwargs)


def _haiku(forward, seed, **kwargs):
  model = hk.without_apply_rng(hk.transform(forward))
  init = lambda x: jax.eval_shape(model.init, jax.random.key(0), x)
  return _build(model.apply, init, seed, **kwargs)


def _nnx(make, seed, **kwargs):
  """An nnx module: nnx.split into its Params (an nnx.State), nnx.merge inside the loss."""
  graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))), nnx.Param, ...)
  apply = lambda p, x: nnx.merge(graphdef, p, rest)(x)
  return _build(apply, lambda x: params, seed, **kwargs)


def _eqx(make, seed, **kwargs):
  """A single-example equinox model; its inexact arrays are the parameters."""
  model = eqx.filter_eval_shape(make, jax.random.key(0))
  inexact = lambda x: isinstance(x, jax.ShapeDtypeStruct) and jnp.issubdtype(x.dtype, jnp.inexact)
  params, static = eqx.partition(model, inexact)
  apply = lambda p, x: eqx.combine(p, static)(x)
  return _build(apply, lambda x: params, seed, **kwargs)


class _LinenTiedEmbed(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(VOCAB, D)
    return embed.attend(jnp.tanh(embed(tokens)))


class _LinenEmbedDense(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    return nn.Dense(VOCAB)(jnp.tanh(nn.Embed(VOCAB, D)(tokens)))


class _LinenDenseGeneral(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.DenseGeneral((HEADS, D // HEADS))(x)  # [T, H, K]: two free kernel axes
    return nn.DenseGeneral(D, axis=(-2, -1))(jnp.tanh(h))  # two contracted kernel axes


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


class _NnxTiedEmbed(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
    self.norm = nnx.LayerNorm(D, rngs=rngs)

  def __call__(self, tokens):
    return self.embed.attend(self.norm(self.embed(tokens)))


class _EqxSequence(eqx.Module):
  """Applies a per-position layer at every position (equinox layers are unbatched)."""

  layer: eqx.Module

  def __call__(self, x):
    return jax.vmap(self.layer)(x)


class _EqxEmbedLinear(eqx.Module):
  embed: eqx.nn.Embedding
  head: eqx.nn.Linear

  def __init__(self, key):
    k = jax.random.split(key)
    self.embed = eqx.nn.Embedding(VOCAB, D, key=k[0])
    self.head = eqx.nn.Linear(D, VOCAB, key=k[1])

  def __call__(self, tokens):
    return jax.vmap(self.head)(jnp.tanh(jax.vmap(self.embed)(tokens)))


class _EqxSelfAttention(eqx.Module):
  attention: eqx.nn.MultiheadAttention

  def __init__(self, key):
    biases = dict(use_query_bias=True, use_value_bias=True, use_output_bias=True)
    self.attention = eqx.nn.MultiheadAttention(HEADS, D, **biases, key=key)

  def __call__(self, x):
    return self.attention(x, x, x)


def _haiku_tied_embed(tokens):
  embed = hk.Embed(VOCAB, D)
  return jnp.tanh(embed(tokens)) @ embed.embeddings.T


def _haiku_self_attention(x):
  w_init = hk.initializers.VarianceScaling(1.0)
  return hk.MultiHeadAttention(HEADS, D // HEADS, w_init=w_init)(x, x, x)


ZOO = {
    "linen_dense": lambda: _linen(nn.Dense(D), 0),
    "linen_dense_no_bias": lambda: _linen(nn.Dense(D, use_bias=False), 1),
    "linen_dense_general": lambda: _linen(_LinenDenseGeneral(), 2),
    "linen_einsum": lambda: _linen(
        nn.Einsum((D, HEADS, D // HEADS), "td,dhk->thk"), 3, out_shape=(T, HEADS, D // HEADS)
    ),
    "linen_embed": lambda: _linen(_LinenEmbedDense(), 4, language=True),
    "linen_embed_tied": lambda: _linen(_LinenTiedEmbed(), 5, language=True),
    "linen_layernorm": lambda: _linen(nn.LayerNorm(), 6),
    "linen_rmsnorm": lambda: _linen(nn.RMSNorm(), 7),
    "linen_groupnorm": lambda: _linen(nn.GroupNorm(num_groups=HEADS, reduction_axes=(-2, -1)), 8),
    "linen_self_attention": lambda: _linen(_LinenSelfAttention(), 9),
    "linen_gpt_tied": lambda: _linen(_LinenGPT(), 10, language=True),
    "nnx_linear": lambda: _nnx(lambda r: nnx.Linear(D, D, rngs=r), 11),
    "nnx_embed_tied": lambda: _nnx(_NnxTiedEmbed, 12, language=True),
    "nnx_layernorm": lambda: _nnx(lambda r: nnx.LayerNorm(D, rngs=r), 13),
    "nnx_rmsnorm": lambda: _nnx(lambda r: nnx.RMSNorm(D, rngs=r), 14),
    "nnx_self_attention": lambda: _nnx(
        lambda r: nnx.MultiHeadAttention(HEADS, D, decode=False, rngs=r), 15
    ),
    "eqx_linear": lambda: _eqx(lambda k: _EqxSequence(eqx.nn.Linear(D, D, key=k)), 16),
    "eqx_embedding": lambda: _eqx(_EqxEmbedLinear, 17, language=True),
    "eqx_layernorm": lambda: _eqx(lambda k: _EqxSequence(eqx.nn.LayerNorm(D)), 18),
    "eqx_self_attention": lambda: _eqx(_EqxSelfAttention, 19),
    "haiku_linear": lambda: _haiku(lambda x: hk.Linear(D)(x), 20),
    "haiku_embed_tied": lambda: _haiku(_haiku_tied_embed, 21, language=True),
    "haiku_layernorm": lambda: _haiku(lambda x: hk.LayerNorm(-1, True, True)(x), 22),
    "haiku_rmsnorm": lambda: _haiku(lambda x: hk.RMSNorm(-1)(x), 23),
    "haiku_self_attention": lambda: _haiku(_haiku_self_attention, 24),
}


# ------------------------------------------------------------------ the reference and checks


_case = case_runner(ZOO)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_matches_vmap_of_grad(name, method):
  check_case(_case, name, method)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_plan_materializes_nothing(name):
  loss, params, batch = ZOO[name]()
  check_plan(loss, params, *batch)


def test_plan_names_the_rules_of_a_gpt_block():
  """The tied embedding is one leaf with two uses: its gather and its output matmul."""
  loss, params, batch = ZOO["linen_gpt_tied"]()
  rules = {leaf.path: set(leaf.rules) for leaf in check_plan(loss, params, *batch).leaves}
  assert rules["['params']['Embed_0']['embedding']"] == {"gather", "dot_general"}
  assert rules["['params']['Dense_0']['kernel']"] == {"dot_general"}
  assert rules["['params']['Dense_0']['bias']"] == {"bias"}
  assert rules["['params']['LayerNorm_0']['scale']"] == {"scale"}
  assert rules["['params']['LayerNorm_0']['bias']"] == {"bias"}
  attention = "['params']['MultiHeadDotProductAttention_0']"
  assert rules[f"{attention}['query']['kernel']"] == {"dot_general"}
  assert rules[f"{attention}['out']['bias']"] == {"bias"}


# ------------------------------------------------------------------ regressions from the issue

_OVERFLOW_X = [[1.0, 2.0], [3.0, 4.0]]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scale", [1e20, 1e-25], ids=["overflow", "underflow"])
def test_huge_and_tiny_gradients_keep_their_norms(scale, method):
  """1e20: squared entries overflow float32 (clipping gave zeros); 1e-25: they underflow (0)."""
  loss = lambda w, x: scale * jnp.sum(x @ w)
  w, x = jnp.ones((2, 2)), jnp.array(_OVERFLOW_X)
  # Example i's gradient is s·xᵢ⊗(1, 1), of norm s·√2·‖xᵢ‖.
  s, x64 = np.float64(np.float32(scale)), np.array(_OVERFLOW_X)
  want_norms = s * np.sqrt(2.0) * np.linalg.norm(x64, axis=1)
  want_sum = np.tensordot(np.minimum(1.0, 1.0 / want_norms), s * x64, axes=1)[:, None] * [1, 1]
  norms, mean, norms2, total = _run(loss, w, (x,), (1,), method, 1.0, jit=False)
  vmap_norms, vmap_mean, _, vmap_total = _run(loss, w, (x,), (1,), "vmap", 1.0, jit=False)
  for got in (norms, norms2):
    assert np.all(np.asarray(got) > 0), got
    _assert_norms(got, want_norms, method)
    np.testing.assert_allclose(got, vmap_norms, rtol=RTOL)
  for got, want, vmap in ((mean, want_sum / 2, vmap_mean), (total, want_sum, vmap_total)):
    assert np.all(np.asarray(got) != 0), got
    np.testing.assert_allclose(got, want, rtol=RTOL)
    np.testing.assert_allclose(got, vmap, rtol=RTOL)


def test_relu_rnn_with_exploding_gradients():
  """A Python loop (not scan) reuses w at 10 steps: gradients near 1e22 square to inf in f32."""
  k = jax.random.split(jax.random.key(30), 4)
  params = {
      "w": 32.0 * jnp.eye(4) + jax.random.uniform(k[0], (4, 4)),
      "u": jax.random.uniform(k[1], (3, 4)),
      "b": jax.random.uniform(k[2], (4,)),
  }
  xs = jax.random.uniform(k[3], (B, 10, 3)) * 100.0 ** jnp.arange(B)[:, None, None]

  def loss(p, xs):
    h = jnp.zeros(4)
    for t in range(xs.shape[0]):
      h = jax.nn.relu(h @ p["w"] + xs[t] @ p["u"] + p["b"])
    return jnp.sum(h)

  check(loss, params, xs)


def _cancelling(form):
  """A 16×16 weight at two positions whose gradients nearly cancel: x₁ = x₀ + 1e-4·noise."""
  k = jax.random.split(jax.random.key(31), 4)
  w = _normal(k[0], 16, 16)
  x0, c = _normal(k[1], 12, 16), _normal(k[2], 12, 16)
  x1 = x0 + 1e-4 * jax.random.normal(k[3], (12, 16))
  if form == "two_uses":  # two dot_generals of the same leaf
    loss = lambda w, x0, x1, c: jnp.sum((x0 @ w) * c) - jnp.sum((x1 @ w) * c)
    return loss, w, (x0, x1, c), (x0, x1, c)
  # one dot_general over a sequence of two positions with opposite cotangents
  loss = lambda w, x, cc: jnp.sum((x @ w) * cc)
  return loss, w, (jnp.stack([x0, x1], 1), jnp.stack([c, -c], 1)), (x0, x1, c)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("form", ["two_uses", "two_positions"])
def test_cancelling_uses_are_exact(form, method):
  loss, w, batch, inputs = _cancelling(form)
  x0, x1, c = (np.asarray(a, np.float64) for a in inputs)
  # Example i's gradient is (x₀ᵢ − x₁ᵢ) ⊗ cᵢ, computed here without cancellation.
  want_norms = np.linalg.norm(x0 - x1, axis=1) * np.linalg.norm(c, axis=1)
  max_norm = float(np.median(want_norms))
  wts = np.minimum(1.0, max_norm / want_norms)
  want_sum = np.tensordot(wts, (x0 - x1)[:, :, None] * c[:, None, :], axes=1)
  # float32 rounds each term x⊗c before the two positions cancel: that bounds any method.
  terms = np.tensordot(wts, (np.abs(x0) + np.abs(x1))[:, :, None] * np.abs(c)[:, None, :], 1)
  batch_argnums = tuple(range(1, len(batch) + 1))
  for m in (method, "vmap"):  # vmap: float32 per-example gradients do meet RTOL here
    norms, mean, norms2, total = _run(loss, w, batch, batch_argnums, m, max_norm)
    _assert_norms(norms, want_norms, f"{m} per_example_grad_norms")
    _assert_norms(norms2, want_norms, f"{m} clipped_grad norms")
    for got, div in ((mean, 12), (total, 1)):
      np.testing.assert_allclose(
          got, want_sum / div, rtol=RTOL, atol=RTOL * np.max(terms) / div, err_msg=m
      )


@pytest.mark.parametrize("method", METHODS)
def test_complex_parameters(method):
  k = jax.random.split(jax.random.key(32), 4)
  w = (_normal(k[0], 4, 3) + 1j * _normal(k[1], 4, 3)).astype(jnp.complex64)
  x = (_normal(k[2], B, T, 4) + 1j * _normal(k[3], B, T, 4)).astype(jnp.complex64)
  loss = lambda w, x: jnp.sum(jnp.abs(x @ w) ** 2)
  check(loss, w, x, methods=(method,))  # against vmap(grad)
  got = _run(loss, w, (x,), (1,), method, 1.0)
  want = _run(loss, w, (x,), (1,), "vmap", 1.0)
  assert [g.dtype for g in got] == [jnp.float32, jnp.complex64, jnp.float32, jnp.complex64]
  for g, v in zip(got, want):
    np.testing.assert_allclose(g, v, rtol=RTOL, atol=RTOL * np.max(np.abs(v)))


@pytest.mark.parametrize("method", METHODS)
def test_plain_python_argument(method):
  """`train` is neither batched nor a parameter: the loss branches on it in Python."""
  k = jax.random.split(jax.random.key(33), 2)
  w, x = _normal(k[0], D, D), _normal(k[1], B, T, D)

  def loss(w, x, train):
    h = jnp.tanh(x @ w)
    if train:
      h = 0.5 * h
    return jnp.sum(h**2)

  check(loss, w, x, True, batch_argnums=(1,), methods=(method,), jit=False)


# ------------------------------------------------------------------ properties
# Dense layer z = x·W + b over T positions, loss Σₜ zₜ·cₜ: example i's gradient is (XᵢᵀCᵢ, Σₜ cᵢₜ),
# exact in float64 numpy from the float32 inputs.


def _dense_norms(x, c):
  x, c = np.asarray(x, np.float64), np.asarray(c, np.float64)
  gw = np.einsum("btd,bte->bde", x, c)
  return np.sqrt(np.sum(gw**2, axis=(1, 2)) + np.sum(np.sum(c, axis=1) ** 2, axis=1))


def _dense_loss(p, x, c):
  return jnp.sum((x @ p["w"] + p["b"]) * c)


@functools.cache
def _dense_norms_fn(method):  # one function per method: jit's cache serves every example
  return jax.jit(gnorm_jax.per_example_grad_norms(_dense_loss, batch_argnums=(1, 2), method=method))


def _check_dense(x, c, method):
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": jnp.zeros(4)}
  norms = _dense_norms_fn(method)(params, jnp.asarray(x), jnp.asarray(c))
  _assert_norms(norms, _dense_norms(x, c), method)


_exponents = st.lists(
    st.tuples(st.integers(-30, 30), st.integers(-30, 30)), min_size=3, max_size=3
)


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=25, deadline=None)
@given(t=st.integers(1, 4), exponents=_exponents, seed=st.integers(0, 2**16))
def test_dense_at_positions_any_scale(method, t, exponents, seed):
  """Example i's gradient is about 10^kᵢ, split between its inputs and its cotangents."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(3, t, 3))
  c = rng.normal(size=(3, t, 4))
  for i, (k, a) in enumerate(exponents):
    a = min(max(a, k - 30), k + 30)  # both factors within 10^±30
    x[i] *= 10.0**a
    c[i] *= 10.0 ** (k - a)
  _check_dense(x.astype(np.float32), c.astype(np.float32), method)


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=25, deadline=None)
@given(
    pairs=st.integers(1, 3),
    delta=st.integers(1, 3),
    k=st.integers(-30, 30),
    seed=st.integers(0, 2**16),
)
def test_dense_at_cancelling_positions(method, pairs, delta, k, seed):
  """Positions in pairs x, x + 10^-δ·noise with cotangents c, −c: the gradient nearly cancels."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(3, pairs, 3)).astype(np.float32)
  x1 = (x + 10.0**-delta * rng.normal(size=x.shape)).astype(np.float32)
  c = (10.0**k * rng.normal(size=(3, pairs, 4))).astype(np.float32)
  _check_dense(np.concatenate([x, x1], 1), np.concatenate([c, -c], 1), method)
