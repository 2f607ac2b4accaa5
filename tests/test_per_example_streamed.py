"""Rematerialized scans over layers: per-example norms streamed through the scan's backward pass.

A leaf scanned over by a scan whose body is rematerialized (``nn.scan(nn.remat(Block))``, or
``lax.scan`` over stacked weights with ``jax.checkpoint``) has its per-example norm formed step by
step in the scan's backward pass; the clipped sum then comes from a second, weighted backward
pass, or (``keep_scan_factors=True``, and always with per-layer thresholds) from each step's
factors kept in the same pass. Everything is checked against vmap of jax.grad, with the float64
clipped sum from numpy, on both routes.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import gnorm_jax
from gnorm_jax import _numerics

B, T, D, L = 4, 6, 8, 3


def _stack_loss(remat: bool):
  """Embedding, L residual blocks (Dense + bias, LayerNorm-like scale) scanned over stacked
  weights, a tied output projection: the single-example loss, params and a batch."""

  def block(h, p):
    y = jnp.tanh(h @ p["w"] + p["b"]) * p["scale"]
    return h + y, None

  body = jax.checkpoint(block) if remat else block

  def loss(p, tokens, targets):
    h = p["embed"][tokens]
    h, _ = lax.scan(body, h, p["layers"])
    logits = h @ p["embed"].T
    return jnp.mean(
      jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[:, None], -1)[:, 0]
    )

  rng = np.random.default_rng(0)
  params = {
    "embed": jnp.asarray(rng.normal(size=(11, D)), jnp.float32),
    "layers": {
      "w": jnp.asarray(rng.normal(size=(L, D, D)) / np.sqrt(D), jnp.float32),
      "b": jnp.asarray(rng.normal(size=(L, D)) * 0.1, jnp.float32),
      "scale": jnp.asarray(1 + rng.normal(size=(L, D)) * 0.1, jnp.float32),
    },
  }
  tokens = jnp.asarray(rng.integers(0, 11, size=(B, T)))
  targets = jnp.asarray(rng.integers(0, 11, size=(B, T)))
  return loss, params, (tokens, targets)


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.LayerNorm()(x)
    return x + nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(2 * x.shape[-1])(h))), None


class _Stack(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(D)(x)
    stack = nn.scan(
      nn.remat(_Block), variable_axes={"params": 0}, split_rngs={"params": True}, length=L
    )
    x, _ = stack()(x, None)
    return nn.Dense(2)(x)


def _flax_loss():
  model = _Stack()
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(B, T, 5)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(B, T, 2)), jnp.float32)
  params = model.init(jax.random.key(0), x[0])

  def loss(p, x, y):
    return jnp.mean((model.apply(p, x) - y) ** 2)

  return loss, params, (x, y)


def _reference(loss, params, batch):
  """Per-example gradients by vmap of grad, their float64 norms."""
  g = jax.vmap(jax.grad(loss), in_axes=(None, *[0] * len(batch)))(params, *batch)
  leaves = [np.asarray(x, np.float64).reshape(B, -1) for x in jax.tree.leaves(g)]
  return g, np.sqrt(sum(np.sum(x**2, axis=1) for x in leaves))


def _clipped_sum(g, weights):
  return jax.tree.map(lambda x: np.tensordot(weights, np.asarray(x, np.float64), 1), g)


def _assert_tree_close(got, want, rtol=2e-4):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    scale = max(float(np.max(np.abs(b))), 1e-30)
    np.testing.assert_allclose(np.asarray(a, np.float64) / scale, b / scale, atol=rtol)


def _streamed_leaves(loss, params, batch, **kw):
  plan = gnorm_jax.per_example_plan(loss, batch_argnums=(1, 2), **kw)(params, *batch)
  return {leaf.path for leaf in plan.leaves if leaf.streamed}


def _one_pass_leaves(loss, params, batch, **kw):
  plan = gnorm_jax.per_example_plan(loss, batch_argnums=(1, 2), **kw)(params, *batch)
  return {leaf.path for leaf in plan.leaves if leaf.streamed and "one pass" in leaf.why}


KEEP = [pytest.param(False, id="two-pass"), pytest.param(True, id="one-pass")]
# The CPU form (conditionals) and the GPU/TPU form (none), both run here.
FORMS = ["cpu", "default"]


CASES = {"lax_scan_checkpoint": lambda: _stack_loss(True), "flax_scan_remat": _flax_loss}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("keep", KEEP)
@pytest.mark.parametrize("name", sorted(CASES))
def test_streamed_norms_and_clipped_sums_match_vmap(name, keep, form, monkeypatch):
  monkeypatch.setattr(_numerics, "_FORCE_FORM", form)
  loss, params, batch = CASES[name]()
  streamed = _streamed_leaves(loss, params, batch)
  assert streamed and all("layers" in p or "Scan" in p for p in streamed), streamed
  one_pass = _one_pass_leaves(loss, params, batch, max_norm=1.0, keep_scan_factors=keep)
  assert one_pass == (streamed if keep else set()), one_pass
  g, want = _reference(loss, params, batch)
  norms = jax.jit(gnorm_jax.per_example_grad_norms(loss, batch_argnums=(1, 2)))(params, *batch)
  np.testing.assert_allclose(norms, want, rtol=2e-5)
  c = float(np.median(want))
  weights = np.minimum(1.0, c / want)
  for reduce, div in (("mean", B), ("sum", 1)):
    fn = gnorm_jax.clipped_grad(
      loss,
      max_norm=c,
      batch_argnums=(1, 2),
      reduce=reduce,
      return_norms=True,
      keep_scan_factors=keep,
    )
    got, got_norms = jax.jit(fn)(params, *batch)
    np.testing.assert_allclose(got_norms, want, rtol=2e-5)
    _assert_tree_close(got, jax.tree.map(lambda s: s / div, _clipped_sum(g, weights)))


def test_without_remat_nothing_is_streamed_and_results_agree():
  loss, params, batch = _stack_loss(False)
  assert not _streamed_leaves(loss, params, batch)
  loss_r, _, _ = _stack_loss(True)
  a = jax.jit(gnorm_jax.clipped_grad(loss, max_norm=1.0, batch_argnums=(1, 2)))(params, *batch)
  b = jax.jit(gnorm_jax.clipped_grad(loss_r, max_norm=1.0, batch_argnums=(1, 2)))(params, *batch)
  _assert_tree_close(a, jax.tree.map(lambda x: np.asarray(x, np.float64), b), rtol=1e-5)


def _scaled_sums(factor, c, keep, mask=None):
  """clipped_grad(reduce="sum", return_norms=True) of the stacked loss with example i's loss
  scaled by ``factor[i]``."""
  loss, params, (tokens, targets) = _stack_loss(True)

  def scaled(p, tok, tgt, f):
    return f * loss(p, tok, tgt)

  fn = gnorm_jax.clipped_grad(
    scaled,
    max_norm=c,
    batch_argnums=(1, 2, 3),
    reduce="sum",
    return_norms=True,
    keep_scan_factors=keep,
  )
  return jax.jit(fn)(params, tokens, targets, factor, mask=mask)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("keep", KEEP)
def test_mask_and_non_finite_example_with_streaming(keep, form, monkeypatch):
  """Example 1 is padding, example 3's loss is scaled by inf: both get weight 0, and the
  weighted backward pass (which runs every row), or the kept factors (whose rows are zeroed),
  still give the others' clipped sum."""
  monkeypatch.setattr(_numerics, "_FORCE_FORM", form)
  g, want = _reference(*_stack_loss(True))
  mask = jnp.array([True, False, True, True])
  factor = jnp.array([1.0, 1.0, 1.0, jnp.inf])
  c = float(np.median(want))
  got, norms = _scaled_sums(factor, c, keep, mask)
  assert float(norms[1]) == 0.0 and not np.isfinite(float(norms[3]))
  np.testing.assert_allclose(np.asarray(norms)[[0, 2]], want[[0, 2]], rtol=2e-5)
  keep = np.array([1.0, 0.0, 1.0, 0.0])
  _assert_tree_close(got, _clipped_sum(g, keep * np.minimum(1.0, c / want)))


def test_per_layer_thresholds_stream_in_one_pass_and_match():
  loss, params, batch = _stack_loss(True)
  g, _ = _reference(loss, params, batch)
  thresholds = {"embed": 0.5, "layers": 0.3}
  one_pass = _one_pass_leaves(loss, params, batch, max_norm=thresholds)
  assert one_pass == {"['layers']['b']", "['layers']['scale']", "['layers']['w']"}, one_pass
  fn = gnorm_jax.clipped_grad(loss, max_norm=thresholds, batch_argnums=(1, 2), reduce="sum")
  got = jax.jit(fn)(params, *batch)
  want = {}
  for group, c in thresholds.items():
    sub = np.sqrt(
      sum(
        np.sum(np.asarray(x, np.float64).reshape(B, -1) ** 2, axis=1)
        for x in jax.tree.leaves(g[group])
      )
    )
    want[group] = _clipped_sum(g[group], np.minimum(1.0, c / sub))
  _assert_tree_close(got, want)


@pytest.mark.parametrize("keep", KEEP)
def test_microbatches_and_aux_with_streaming(keep):
  loss, params, batch = _stack_loss(True)

  def with_aux(p, tok, tgt):
    value = loss(p, tok, tgt)
    return value, {"twice": 2 * value}

  full = jax.jit(gnorm_jax.clipped_grad(loss, max_norm=0.7, batch_argnums=(1, 2)))(params, *batch)
  fn = gnorm_jax.clipped_grad(
    with_aux,
    has_aux=True,
    max_norm=0.7,
    batch_argnums=(1, 2),
    microbatch_size=3,
    keep_scan_factors=keep,
  )
  got, aux = jax.jit(fn)(params, *batch)
  _assert_tree_close(got, jax.tree.map(lambda x: np.asarray(x, np.float64), full), rtol=1e-5)
  want_aux = 2 * jax.vmap(loss, in_axes=(None, 0, 0))(params, *batch)
  np.testing.assert_allclose(aux["twice"], want_aux, rtol=1e-6)


def test_cancelling_positions_are_recomputed_exactly():
  """Two positions whose inputs nearly cancel: the ghost sum loses every digit (the true
  gradient is 1e-4 of its terms), so the example is recomputed exactly."""
  v = jnp.linspace(0.5, 1.5, D, dtype=jnp.float32)

  def loss(p, x):
    def block(acc, w):
      return acc + jnp.sum((x @ w) * v), None

    total, _ = lax.scan(jax.checkpoint(block), jnp.zeros(()), p)
    return total

  rng = np.random.default_rng(3)
  u = rng.normal(size=(B, 1, D))
  delta = np.array([1e-4, 1.0, 1e-4, 0.5])[:, None, None]
  x = jnp.asarray(np.concatenate([u, -u * (1 + delta)], axis=1), jnp.float32)  # [B, 2, D]
  params = jnp.asarray(rng.normal(size=(L, D, D)), jnp.float32)
  assert _streamed_leaves(lambda p, x, _: loss(p, x), params, (x, x)) == {""}
  # Exact per-example gradient of each layer: (x_0 + x_1) ⊗ v, in float64 from the float32 inputs.
  xs = np.asarray(x, np.float64)
  per_layer = np.sqrt(np.sum((xs[:, 0] + xs[:, 1]) ** 2, -1)) * np.linalg.norm(np.asarray(v))
  want = np.sqrt(L) * per_layer
  got = jax.jit(gnorm_jax.per_example_grad_norms(loss))(params, x)
  # float32 forms x_0·v + x_1·v from terms 1e4 times the result: ~1e-3 relative is exact here;
  # the ghost sum alone would be off by O(1) (its terms cancel to 1e-8 of themselves).
  np.testing.assert_allclose(got, want, rtol=2e-3)
  # Both routes' clipped sums, weighted by the recomputed norms: every layer's is
  # Σᵢ wᵢ (x_i0 + x_i1) ⊗ v.
  c = float(np.median(want))
  per_example = np.einsum("bi,j->bij", xs[:, 0] + xs[:, 1], np.asarray(v, np.float64))
  layer = np.einsum("b,bij->ij", np.minimum(1.0, c / want), per_example)
  for keep in (False, True):
    fn = gnorm_jax.clipped_grad(loss, max_norm=c, reduce="sum", keep_scan_factors=keep)
    _assert_tree_close(jax.jit(fn)(params, x), np.broadcast_to(layer, (L, D, D)), rtol=2e-3)


@pytest.mark.parametrize("form", FORMS)
def test_one_pass_clips_an_example_whose_norm_overflows(form, monkeypatch):
  """Example 2's loss is scaled by 5e37: its gradient is finite, its norm beyond float32's
  largest. On the one-pass route it is clipped (its factors scaled down by a power of two before
  its weight), as outside streams; the clipped sum matches float64."""
  monkeypatch.setattr(_numerics, "_FORCE_FORM", form)
  g, _ = _reference(*_stack_loss(True))
  factor = jnp.array([1.0, 1.0, 5e37, 1.0], jnp.float32)
  big = jax.tree.map(
    lambda x: (
      np.asarray(x, np.float64)
      * np.asarray(factor, np.float64)[(slice(None),) + (None,) * (x.ndim - 1)]
    ),
    g,
  )
  norms = np.sqrt(sum(np.sum(x.reshape(B, -1) ** 2, 1) for x in jax.tree.leaves(big)))
  assert np.isfinite(np.max(np.abs(jax.tree.leaves(big)[0]))) and norms[2] > 3.5e38
  c = 0.5
  got, got_norms = _scaled_sums(factor, c, True)
  assert np.isinf(float(got_norms[2]))
  _assert_tree_close(got, _clipped_sum(big, np.minimum(1.0, c / norms)))
