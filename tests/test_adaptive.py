"""Tests of gnorm_jax._adaptive: autoclip, zclip, quantile_clip, skip_spikes.

Every threshold is checked step by step against a float64 numpy transcription
of the paper's rule, fed the norms the transform measured (so float32 rounding
of the norm cannot flip a decision).
"""

from __future__ import annotations

import functools
import math

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import gnorm_jax

T = 60  # steps per synthetic stream
# A two-leaf gradient direction of norm 1; step t's gradient is norms[t] * UNIT.
UNIT = {"a": jnp.array([0.6], jnp.float32), "b": jnp.array([[0.0, 0.8]], jnp.float32)}


def _stream(kind: str) -> np.ndarray:
  rng = np.random.default_rng(sum(map(ord, kind)))
  t = np.arange(T)
  if kind == "steady":
    g = 1.0 + 0.05 * rng.standard_normal(T)
  elif kind == "constant":
    g = np.full(T, 2.0)
  elif kind == "drifting":
    g = np.linspace(1.0, 6.0, T) * (1 + 0.05 * rng.standard_normal(T))
  elif kind == "spiky":
    g = rng.lognormal(0.0, 0.2, T)
    g[[9, 23, 24, 41, 55]] *= [40.0, 25.0, 80.0, 12.0, 300.0]
  elif kind == "zeros":
    g = np.zeros(T)
  elif kind == "zeros_then_ones":
    g = np.where(t < T // 2, 0.0, 1.0)
  elif kind == "shift":  # a lasting change of scale, not a spike
    g = np.where(t < 30, 1.0, 100.0) * (1 + 0.05 * rng.standard_normal(T))
  elif kind == "nonfinite":
    g = rng.lognormal(0.0, 0.2, T)
    g[[2, 17, 30, 31, 50]] = [np.inf, np.nan, np.inf, 20.0, np.nan]
  else:
    raise ValueError(kind)
  return g.astype(np.float32)


STREAMS = [
  "steady",
  "constant",
  "drifting",
  "spiky",
  "zeros",
  "zeros_then_ones",
  "shift",
  "nonfinite",
]


def _grads(norms) -> dict:
  norms = jnp.asarray(norms, jnp.float32)
  return jax.tree.map(lambda u: norms.reshape((-1,) + (1,) * u.ndim) * u, UNIT)


def _params():
  return jax.tree.map(jnp.zeros_like, UNIT)


def _scan(tx):
  """jit(scan) of tx over a stream: stacked (updates, states after each step)."""

  def step(state, g):
    updates, state = tx.update(g, state, _params())
    return state, (updates, state)

  return jax.jit(lambda gs: jax.lax.scan(step, tx.init(_params()), gs)[1])


def _loop(tx, grads):
  """The same, eagerly, one Python step at a time."""
  state, outs = tx.init(_params()), []
  for t in range(jax.tree.leaves(grads)[0].shape[0]):
    updates, state = tx.update(jax.tree.map(lambda x: x[t], grads), state, _params())
    outs.append((updates, state))
  return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


# ---------------------------------------------------------------------------
# float64 references, one per paper. Each returns, per step, the threshold the
# norm is held to (None where the norm is non-finite) and the final counter.


def ref_autoclip(norms, quantile, history):
  buf, out = [], []
  for g in norms:
    if not np.isfinite(g):
      out.append(None)
      continue
    buf = (buf + [g])[-history:]
    out.append(np.quantile(buf, quantile))
  return out


def ref_zclip(norms, decay, z_threshold, warmup_steps, max_norm=None):
  """Algorithm 1 of Kumar et al. 2025 as in its reference implementation."""
  cap = np.inf if max_norm is None else max_norm
  buf, mean, var, out = [], None, None, []
  for g in norms:
    if not np.isfinite(g):
      out.append(None)
      continue
    if mean is None:  # warm-up
      buf.append(g)
      if len(buf) >= warmup_steps:
        mean, var = np.mean(buf), np.var(buf)
      out.append(cap)
      continue
    std = math.sqrt(var)
    z = (g - mean) / std if std > 0 else (math.inf if g > mean else 0.0)
    g_star = mean + z_threshold**2 / z * std if z > z_threshold else g
    out.append(min(g_star if z > z_threshold else math.inf, cap))
    mean = decay * mean + (1 - decay) * g_star
    var = decay * var + (1 - decay) * (g_star - mean) ** 2
  return out, (mean, var)


def ref_quantile(norms, quantile, adaptation_rate, initial_max_norm):
  c, out = initial_max_norm, []
  for g in norms:
    out.append(c if np.isfinite(g) else None)
    if np.isfinite(g):
      c *= math.exp(-adaptation_rate * (float(g <= c) - quantile))
  return out


def ref_skip(norms, history, z_threshold, warmup_steps, thresholds=None):
  """True where the step is skipped; a skipped spike is recorded at the threshold."""
  hist, skipped = [], []
  for g in norms:
    last = np.asarray(hist[-history:], np.float64)
    thr = last.mean() + z_threshold * last.std() if len(hist) >= warmup_steps else np.inf
    if thresholds is not None:
      thresholds.append(thr)
    skipped.append(not np.isfinite(g) or g > thr)
    if np.isfinite(g):
      hist.append(min(g, thr))
  return skipped


AUTOCLIP = dict(quantile=0.25, history=8)
ZCLIP = dict(decay=0.9, z_threshold=2.0, warmup_steps=5)
QUANTILE = dict(quantile=0.8, adaptation_rate=0.3, initial_max_norm=0.5)
SKIP = dict(history=16, z_threshold=3.0, warmup_steps=5)

CLIPPERS = {
  "autoclip": (lambda: gnorm_jax.autoclip(**AUTOCLIP), lambda g: ref_autoclip(g, **AUTOCLIP)),
  "zclip": (lambda: gnorm_jax.zclip(**ZCLIP), lambda g: ref_zclip(g, **ZCLIP)[0]),
  "zclip_capped": (
    lambda: gnorm_jax.zclip(**ZCLIP, max_norm=3.0),
    lambda g: ref_zclip(g, **ZCLIP, max_norm=3.0)[0],
  ),
  "quantile_clip": (
    lambda: gnorm_jax.quantile_clip(**QUANTILE),
    lambda g: ref_quantile(g, **QUANTILE),
  ),
}


@functools.cache
def _run_all(name: str):
  """All streams through one jit(vmap(scan)) of the transform ``name``."""
  tx = CLIPPERS[name][0]() if name in CLIPPERS else _skip_tx()
  grads = jax.vmap(_grads)(np.stack([_stream(s) for s in STREAMS]))
  return jax.jit(jax.vmap(_scan(tx)))(grads)


def _run(name: str, stream: str):
  """(measured norms float64, stacked updates, stacked states) of one stream."""
  updates, states = jax.tree.map(lambda x: x[STREAMS.index(stream)], _run_all(name))
  return np.asarray(states.grad_norm, np.float64), updates, states


def _skip_tx():
  return gnorm_jax.skip_spikes(optax.adam(0.1), **SKIP)


def _norms(updates) -> np.ndarray:
  return np.asarray(jax.vmap(gnorm_jax.tree_norm)(updates), np.float64)


# ---------------------------------------------------------------------------
# Thresholds, decisions and counters against the references.


@pytest.mark.parametrize("stream", STREAMS)
@pytest.mark.parametrize("name", list(CLIPPERS))
def test_clip_threshold_matches_reference(name, stream):
  norms, updates, states = _run(name, stream)
  limits = CLIPPERS[name][1](norms)
  finite = np.isfinite(norms)
  ref_limit = np.array([np.inf if x is None else x for x in limits])
  # The update is held to min(norm, threshold), exactly as the paper's rule.
  np.testing.assert_allclose(
    _norms(updates)[finite], np.minimum(norms, ref_limit)[finite], rtol=2e-5, atol=1e-6
  )
  clipped = np.diff(np.concatenate([[0], np.asarray(states.num_clipped)])) > 0
  np.testing.assert_array_equal(clipped[finite], (norms > ref_limit)[finite])
  if name != "zclip" and name != "zclip_capped":  # zclip reports mean + z·std when unclipped
    np.testing.assert_allclose(
      np.asarray(states.max_norm)[finite], ref_limit[finite], rtol=2e-5, atol=1e-6
    )
  assert np.all(np.asarray(states.count) == np.arange(1, T + 1))


@pytest.mark.parametrize("stream", STREAMS)
def test_zclip_statistics_and_reported_threshold(stream):
  norms, updates, states = _run("zclip", stream)
  _, (mean, var) = ref_zclip(norms, **ZCLIP)
  np.testing.assert_allclose(float(states.mean[-1]), mean, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(float(states.var[-1]), var, rtol=1e-4, atol=1e-6)
  # max_norm: inf during warm-up, then the clip value on spikes, else mean + z·std.
  mean_prev = np.concatenate([[0.0], np.asarray(states.mean[:-1], np.float64)])
  std_prev = np.sqrt(np.concatenate([[0.0], np.asarray(states.var[:-1], np.float64)]))
  warm = np.asarray(states.num_recorded) - np.isfinite(norms) < ZCLIP["warmup_steps"]
  limits = np.array([np.inf if x is None else x for x in ref_zclip(norms, **ZCLIP)[0]])
  expected = np.where(warm, np.inf, np.minimum(limits, mean_prev + 2.0 * std_prev))
  ok = np.isfinite(norms)
  np.testing.assert_allclose(np.asarray(states.max_norm)[ok], expected[ok], rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("stream", STREAMS)
def test_skip_spikes_matches_reference_and_independent_adam(stream):
  norms, updates, states = _run("skip", stream)
  skipped = np.array(ref_skip(norms, **SKIP))
  assert int(states.num_skipped[-1]) == skipped.sum()
  # Skipped steps: zero updates, inner state bit-for-bit the previous one.
  for t in np.flatnonzero(skipped):
    assert all(np.all(np.asarray(u[t]) == 0) for u in jax.tree.leaves(updates))
    if t > 0:
      chex.assert_trees_all_equal(
        jax.tree.map(lambda x: x[t], states.inner_state),
        jax.tree.map(lambda x: x[t - 1], states.inner_state),
      )
  # Kept steps: exactly optax.adam run on the kept gradients only.
  grads = _grads(_stream(stream))
  adam, state = optax.adam(0.1), optax.adam(0.1).init(_params())
  for t in np.flatnonzero(~skipped):
    expect, state = adam.update(jax.tree.map(lambda x: x[t], grads), state)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[t], updates), expect, rtol=1e-5)
  chex.assert_trees_all_close(jax.tree.map(lambda x: x[-1], states.inner_state), state)


def test_skip_spikes_recovers_from_a_lasting_shift():
  # A 100x lasting jump: each skipped norm enters the window at the threshold,
  # which ratchets up until steps are taken again (~40 steps at these settings).
  rng = np.random.default_rng(0)
  norms = np.where(np.arange(150) < 30, 1.0, 100.0) * (1 + 0.05 * rng.standard_normal(150))
  _, states = _scan(_skip_tx())(_grads(norms))
  skipped = np.diff(np.concatenate([[0], np.asarray(states.num_skipped)])) > 0
  assert skipped[30] and not skipped[-50:].any()  # the jump is skipped, training resumes
  np.testing.assert_array_equal(skipped, ref_skip(np.asarray(states.grad_norm), **SKIP))


def test_autoclip_first_step_is_not_clipped():
  tx = gnorm_jax.autoclip(0.01)
  updates, state = tx.update(UNIT, tx.init(_params()))
  chex.assert_trees_all_close(updates, UNIT)
  assert float(state.max_norm) == pytest.approx(1.0) and int(state.num_clipped) == 0


@pytest.mark.parametrize("max_norm", [None, 0.5])
def test_zclip_warmup_does_not_clip_except_the_cap(max_norm):
  tx = gnorm_jax.zclip(warmup_steps=3, max_norm=max_norm)
  state = tx.init(_params())
  for g in (1.0, 1000.0, 2.0):
    updates, state = tx.update(jax.tree.map(lambda u: g * u, UNIT), state)
    expect = g if max_norm is None else min(g, max_norm)
    assert float(gnorm_jax.tree_norm(updates)) == pytest.approx(expect, rel=1e-6)
  # The warm-up statistics are the plain mean and population variance.
  assert float(state.mean) == pytest.approx(np.mean([1, 1000, 2]), rel=1e-6)
  assert float(state.var) == pytest.approx(np.var([1, 1000, 2]), rel=1e-5)


def test_zclip_paper_example_by_hand():
  """Warm-up on (1, 3): mean 2, std 1. A norm of 7 has z = 5 > 2.5 and is
  clipped to 2 + 2.5²/5 = 3.25, which then enters the EMA."""
  tx = gnorm_jax.zclip(decay=0.9, warmup_steps=2)
  state = tx.init(jnp.zeros(1))
  for g in (1.0, 3.0, 7.0):
    updates, state = tx.update(jnp.array([g]), state)
  np.testing.assert_allclose(updates, [3.25], rtol=1e-5)
  mean = 0.9 * 2 + 0.1 * 3.25
  np.testing.assert_allclose(
    [state.mean, state.var], [mean, 0.9 + 0.1 * (3.25 - mean) ** 2], rtol=1e-5
  )


# ---------------------------------------------------------------------------
# eager = jit = vmap; dtypes.

ALL = {**{k: v[0] for k, v in CLIPPERS.items()}, "skip_spikes": _skip_tx}


@pytest.mark.parametrize("name", list(ALL))
def test_eager_equals_jit_equals_vmap(name):
  tx = ALL[name]()
  # Short streams that still pass every branch: warm-up, clipping, a spike.
  streams = np.stack([_stream("spiky")[3:11], _stream("zeros_then_ones")[26:34]])
  grads = jax.vmap(_grads)(streams)
  jitted = _scan(tx)
  batched = jax.jit(jax.vmap(jitted))(grads)
  for i in range(len(streams)):
    one = jax.tree.map(lambda x: x[i], grads)
    chex.assert_trees_all_close(
      jax.tree.map(lambda x: x[i], batched), jitted(one), rtol=1e-5, atol=1e-7
    )
  first = jax.tree.map(lambda x: x[0], grads)
  chex.assert_trees_all_close(jitted(first), _loop(tx, first), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", list(ALL))
def test_low_precision_updates_keep_their_dtype(name, dtype):
  tx = ALL[name]()
  params = jax.tree.map(lambda u: u.astype(dtype), UNIT)
  state = tx.init(params)
  for g in (1.0, 2.0, 50.0):
    updates, state = tx.update(jax.tree.map(lambda u: (g * u).astype(dtype), UNIT), state, params)
    assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
  assert state.grad_norm.dtype == jnp.float32
  assert float(state.grad_norm) == pytest.approx(50.0, rel=1e-2)


# ---------------------------------------------------------------------------
# Zeros and non-finite norms.


@pytest.mark.parametrize("name", list(ALL))
def test_zero_gradients_never_give_nan(name):
  _, updates, states = _run(name if name != "skip_spikes" else "skip", "zeros")
  for x in jax.tree.leaves((updates, states)):
    if jnp.issubdtype(x.dtype, jnp.floating):
      assert not np.isnan(np.asarray(x)).any()
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))


STATISTICS = {
  "autoclip": ("history", "num_recorded"),
  "zclip": ("mean", "var", "num_recorded"),
  "zclip_capped": ("mean", "var", "num_recorded"),
  "quantile_clip": ("next_max_norm",),
  "skip": ("history", "num_recorded", "inner_state"),
}


@pytest.mark.parametrize("name", list(STATISTICS))
def test_nonfinite_norms_do_not_poison_the_statistics(name):
  norms, updates, states = _run(name, "nonfinite")
  bad = np.flatnonzero(~np.isfinite(norms))
  assert bad.size == 4
  for t in bad:
    for field in STATISTICS[name]:
      chex.assert_trees_all_equal(
        jax.tree.map(lambda x: x[t], getattr(states, field)),
        jax.tree.map(lambda x: x[t - 1], getattr(states, field)),
      )
    step = [np.asarray(u[t]) for u in jax.tree.leaves(updates)]
    if name == "skip":  # skipped: zero update
      assert all(np.all(u == 0) for u in step)
    else:  # passed on non-finite, as optax.clip_by_global_norm does
      assert not all(np.isfinite(u).all() for u in step)
  # Finite steps after a bad one are unaffected (the reference drops bad norms).
  assert np.isfinite(_norms(updates)[np.isfinite(norms)]).all()


# ---------------------------------------------------------------------------
# Extreme norms: the statistics neither overflow nor get stuck (float64 references).


def _clip_run(tx, norms):
  """(measured norms float64, update norms float64, states) of ``tx`` over ``norms``."""
  updates, states = _scan(tx)(_grads(norms))
  return np.asarray(states.grad_norm, np.float64), _norms(updates), states


@pytest.mark.parametrize("spike", [4e19, 1e20])
def test_zclip_huge_warmup_norm_matches_float64(spike):
  # Regression: Welford's delta·(norm − mean) overflowed for a warm-up norm of
  # ≳3e19, the variance became NaN for good: the next spike was zeroed and
  # every later one passed. 4e19: the variance (2.6e38) fits float32 and the
  # run matches float64 throughout. 1e20: it does not and saturates at
  # float32's largest number, so the run matches float64 once it has decayed.
  rng = np.random.default_rng(0)
  norms = 1 + 0.05 * rng.standard_normal(1500)
  spikes = [1200, 1300, 1490]
  norms[2], norms[spikes] = spike, [50.0, 1e3, 1e30]
  norms, out, states = _clip_run(gnorm_jax.zclip(**ZCLIP), norms)
  limits, (mean, var) = ref_zclip(norms, **ZCLIP)
  expected = np.minimum(norms, np.array(limits, np.float64))
  start = 0 if spike < 1e20 else 1100
  np.testing.assert_allclose(out[start:], expected[start:], rtol=1e-4)
  assert np.all(out[spikes] < 2)  # every later spike is clipped to about 1
  np.testing.assert_allclose([states.mean[-1], states.var[-1]], [mean, var], rtol=1e-3)
  assert np.isfinite(np.asarray(states.var)).all()


def test_skip_spikes_huge_norms_float32():
  # Regression: (x − mean)² overflowed for norms of 1e20 (deviations ≳ 2e19),
  # the threshold was inf and a spike of 1e21 was applied.
  rng = np.random.default_rng(1)
  norms = 1e20 * rng.lognormal(0.0, 0.2, 40)
  norms[[20, 30]] = [1e21, 3e38]
  norms, _, states = _clip_run(_skip_tx(), norms)
  thresholds = []
  skipped = ref_skip(norms, **SKIP, thresholds=thresholds)
  assert skipped[20] and skipped[30]
  steps = np.diff(np.concatenate([[0], np.asarray(states.num_skipped)])) > 0
  np.testing.assert_array_equal(steps, skipped)
  np.testing.assert_allclose(np.asarray(states.max_norm, np.float64), thresholds, rtol=1e-5)


def test_skip_spikes_huge_norms_float64():
  with jax.enable_x64(True):
    tx = gnorm_jax.skip_spikes(optax.sgd(1.0), **SKIP)
    rng = np.random.default_rng(2)
    norms = 1e160 * rng.lognormal(0.0, 0.2, 30)
    norms[20] = 1e161
    state, skipped, thresholds = tx.init(jnp.zeros(1)), [], []
    step = jax.jit(tx.update)
    for g in norms:
      _, state = step(jnp.array([g]), state)
      skipped.append(int(state.num_skipped))
      thresholds.append(float(state.max_norm))
    # The reference itself overflows at 1e160 (1e320 > 1.8e308): run it scaled.
    want_thresholds = []
    want = ref_skip(norms / 1e160, **SKIP, thresholds=want_thresholds)
    np.testing.assert_array_equal(np.diff(np.concatenate([[0], skipped])) > 0, want)
    assert want[20]
    np.testing.assert_allclose(thresholds, np.array(want_thresholds) * 1e160, rtol=1e-12)


def test_skip_spikes_records_a_skipped_spike_at_the_threshold():
  # One spike cannot raise the bar: it enters the window as the threshold.
  tx = gnorm_jax.skip_spikes(optax.sgd(1.0), history=4, z_threshold=3.0, warmup_steps=2)
  state = tx.init(jnp.zeros(1))
  for g in (1.0, 1.2, 0.8):
    _, state = tx.update(jnp.array([g]), state)
  _, state = tx.update(jnp.array([1e6]), state)
  threshold = 1.0 + 3 * np.std([1.0, 1.2, 0.8])
  assert int(state.num_skipped) == 1
  np.testing.assert_allclose(np.sort(state.history), [0.8, 1.0, 1.2, threshold], rtol=1e-6)


def test_quantile_clip_threshold_never_reaches_zero():
  # Regression: ~4400 zero norms at the default rate underflowed C to exactly
  # 0, and a geometric update cannot leave 0: every later update was zeroed.
  # C now stops at float32's smallest normal number and grows back by e^{ηγ}
  # per step above it.
  kwargs = dict(quantile=0.9, adaptation_rate=0.2, initial_max_norm=1.0)
  norms = np.concatenate([np.zeros(6000), np.ones(600)])
  norms, out, states = _clip_run(gnorm_jax.quantile_clip(**kwargs), norms)
  tiny = float(np.finfo(np.float32).tiny)
  c, expected = 1.0, []
  for g in norms:  # float64 reference with the documented floor
    expected.append(min(g, c))
    c = max(c * math.exp(-0.2 * (float(g <= c) - 0.9)), tiny)
  assert np.all(np.asarray(states.next_max_norm) >= tiny)
  np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-37)
  assert out[-1] == pytest.approx(1.0)  # recovered


def test_quantile_clip_large_rate_keeps_a_positive_threshold():
  # One zero norm at η = 80 used to send C to 0 (e^-72 of 1e-30 underflows).
  tx = gnorm_jax.quantile_clip(0.1, adaptation_rate=80.0, initial_max_norm=1e-30)
  norms = np.concatenate([np.zeros(3), np.ones(20)])
  norms, out, states = _clip_run(tx, norms)
  assert np.all(np.asarray(states.next_max_norm) >= np.finfo(np.float32).tiny)
  assert np.all(np.isfinite(np.asarray(states.next_max_norm)))
  assert out[3:].max() == pytest.approx(1.0)  # the threshold came back up
  c, expected = 1e-30, []
  for g in norms:  # float64 reference with the documented floor
    expected.append(min(g, c))
    c = max(c * math.exp(-80.0 * (float(g <= c) - 0.1)), float(np.finfo(np.float32).tiny))
  np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-37)


@pytest.mark.parametrize("name", list(ALL))
def test_python_float_leaves(name):
  # Regression: Python-float leaves raised AttributeError ('float' has no dtype).
  tx = ALL[name]()
  g = {"a": 3.0, "b": [4.0, None]}
  state = tx.init(g)
  out, _ = tx.update(g, state, g)
  ref, _ = tx.update(jax.tree.map(jnp.float32, g), state, g)
  chex.assert_trees_all_close(out, ref)


def test_skip_spikes_skips_nonfinite_before_warmup_steps():
  tx = gnorm_jax.skip_spikes(optax.sgd(1.0), warmup_steps=100)
  state = tx.init(_params())
  updates, state = tx.update(jax.tree.map(lambda u: u * jnp.nan, UNIT), state)
  assert int(state.num_skipped) == 1 and int(state.num_recorded) == 0
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, UNIT))


# ---------------------------------------------------------------------------
# Derivatives through the clip (meta-gradients), at ordinary points and at 0.


def _warmed(tx, norms):
  state = tx.init(_params())
  for g in norms:
    _, state = tx.update(jax.tree.map(lambda u: g * u, UNIT), state)
  return state


@pytest.mark.parametrize("name", list(CLIPPERS))
def test_check_grads_through_the_clip(name):
  tx = CLIPPERS[name][0]()
  state = _warmed(tx, [1.0, 1.3, 0.7, 1.1, 0.9, 1.2])
  f = jax.jit(lambda g: tx.update(g, state)[0])  # one compilation for all points
  clipped = jax.jit(lambda g: tx.update(g, state)[1].num_clipped > state.num_clipped)
  for scale, expect_clipped in [(5.0, True), (0.5, False), (0.0, False)]:  # 0: at zero
    g = {"a": jnp.array([0.6, -0.3]) * scale, "b": jnp.array([0.2, 0.8]) * scale}
    check_grads(f, (g,), order=1, modes=("fwd", "rev"), eps=1e-3, atol=1e-2, rtol=1e-2)
    jac = jax.jacrev(f)(g)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(jac))
    assert bool(clipped(g)) == expect_clipped


# ---------------------------------------------------------------------------
# Hyperparameters: validation, and traced values without retracing.

BAD = [
  (gnorm_jax.autoclip, dict(quantile=0.0), "quantile"),
  (gnorm_jax.autoclip, dict(quantile=1.5), "quantile"),
  (gnorm_jax.autoclip, dict(quantile=10.0), r"quantile must be in \(0, 1\]"),
  (gnorm_jax.autoclip, dict(quantile=-3), "quantile"),
  (gnorm_jax.autoclip, dict(history=0), "history"),
  (gnorm_jax.zclip, dict(decay=0.0), "decay"),
  (gnorm_jax.zclip, dict(decay=1.0), "decay"),
  (gnorm_jax.zclip, dict(z_threshold=-1.0), "z_threshold"),
  (gnorm_jax.zclip, dict(warmup_steps=0), "warmup_steps"),
  (gnorm_jax.zclip, dict(warmup_steps=2.5), "warmup_steps"),
  (gnorm_jax.zclip, dict(max_norm=-1.0), "max_norm"),
  (gnorm_jax.quantile_clip, dict(quantile=0.0), "quantile"),
  (gnorm_jax.quantile_clip, dict(quantile=1.5), "quantile"),
  (gnorm_jax.quantile_clip, dict(adaptation_rate=-0.1), "adaptation_rate"),
  (gnorm_jax.quantile_clip, dict(initial_max_norm=0.0), "initial_max_norm"),
  (functools.partial(gnorm_jax.skip_spikes, optax.sgd(1.0)), dict(history=0), "history"),
  (functools.partial(gnorm_jax.skip_spikes, optax.sgd(1.0)), dict(z_threshold=-1.0), "z_threshold"),
  (functools.partial(gnorm_jax.skip_spikes, optax.sgd(1.0)), dict(warmup_steps=0), "warmup_steps"),
  (
    functools.partial(gnorm_jax.skip_spikes, optax.sgd(1.0)),
    dict(warmup_steps=2.5),
    "warmup_steps must be an integer",
  ),
  # Concrete arrays and numpy scalars are numbers too (they used to pass unchecked).
  (gnorm_jax.zclip, dict(max_norm=jnp.array(-1.0)), "max_norm must be >= 0"),
  (gnorm_jax.zclip, dict(decay=np.float32(1.5)), r"decay must be in \(0, 1\)"),
  (gnorm_jax.zclip, dict(warmup_steps=np.float64(2.5)), "warmup_steps must be an integer"),
  (gnorm_jax.quantile_clip, dict(initial_max_norm=jnp.array(0.0)), "initial_max_norm"),
  (gnorm_jax.quantile_clip, dict(initial_max_norm=math.inf), "initial_max_norm"),
  (gnorm_jax.quantile_clip, dict(adaptation_rate=900.0), r"adaptation_rate must be in \[0, 88"),
  (gnorm_jax.autoclip, dict(quantile=jnp.array(math.nan)), "quantile"),
]


@pytest.mark.parametrize("factory,kwargs,name", BAD)
def test_bad_hyperparameters_raise_at_construction(factory, kwargs, name):
  with pytest.raises(ValueError, match=name):
    factory(**kwargs)


@pytest.mark.parametrize(
  "factory,kwargs",
  [
    (gnorm_jax.autoclip, dict(quantile=True)),
    (gnorm_jax.zclip, dict(max_norm="1.0")),
    (gnorm_jax.zclip, dict(warmup_steps=jnp.ones(2))),
    (gnorm_jax.quantile_clip, dict(quantile=True)),
    (functools.partial(gnorm_jax.skip_spikes, optax.sgd(1.0)), dict(z_threshold=True)),
  ],
)
def test_non_number_hyperparameters_raise_type_error(factory, kwargs):
  with pytest.raises(TypeError, match=f"{next(iter(kwargs))} must be a"):
    factory(**kwargs)


@pytest.mark.parametrize(
  "factory,old",
  [
    (gnorm_jax.autoclip, dict(percentile=10.0)),
    (gnorm_jax.zclip, dict(alpha=0.97)),
    (gnorm_jax.quantile_clip, dict(target_quantile=0.9)),
    (gnorm_jax.quantile_clip, dict(learning_rate=0.2)),
    (functools.partial(gnorm_jax.skip_spikes, optax.sgd(1.0)), dict(window=128)),
    (functools.partial(gnorm_jax.skip_spikes, optax.sgd(1.0)), dict(num_sigmas=6.0)),
    (functools.partial(gnorm_jax.skip_spikes, optax.sgd(1.0)), dict(min_history=20)),
  ],
)
def test_old_hyperparameter_names_are_type_errors(factory, old):
  # One name per idea (issue 13): quantile, history, decay, z_threshold, warmup_steps,
  # adaptation_rate.
  with pytest.raises(TypeError, match=f"unexpected keyword argument '{next(iter(old))}'"):
    factory(**old)


def test_autoclip_default_is_the_papers_10th_percentile():
  norms = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0]
  tx = gnorm_jax.autoclip()
  state = tx.init(jnp.zeros(1))
  for g in norms:
    _, state = tx.update(jnp.array([g]), state)
  assert float(state.max_norm) == pytest.approx(np.percentile(norms, 10))


@pytest.mark.parametrize(
  "factory,name",
  [
    (gnorm_jax.autoclip, "history"),
    (functools.partial(gnorm_jax.skip_spikes, optax.sgd(1.0)), "history"),
  ],
)
def test_buffer_length_must_be_an_int(factory, name):
  with pytest.raises(TypeError, match="static_args"):
    factory(**{name: 2.5})


INJECT = [
  (
    optax.inject_hyperparams(gnorm_jax.autoclip, static_args=("history",)),
    dict(quantile=0.1, history=8),
    "quantile",
    0.9,
  ),
  (
    optax.inject_hyperparams(gnorm_jax.zclip),
    dict(decay=0.9, z_threshold=2.0, warmup_steps=3),
    "z_threshold",
    0.5,
  ),
  (optax.inject_hyperparams(gnorm_jax.quantile_clip), dict(quantile=0.5), "adaptation_rate", 0.9),
  (
    optax.inject_hyperparams(gnorm_jax.skip_spikes, static_args=("history",)),
    dict(inner=optax.sgd(1.0), history=8, warmup_steps=3),
    "z_threshold",
    0.0,
  ),
]


@pytest.mark.parametrize("make,kwargs,hparam,value", INJECT)
def test_inject_hyperparams_changes_behaviour_without_retracing(make, kwargs, hparam, value):
  tx = make(**kwargs)
  chex.clear_trace_counter()  # the counter is per code object, shared by the cases

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(g, state):
    return tx.update(g, state)

  def run(state, norms):
    for g in norms:
      _, state = step(jax.tree.map(lambda u: g * u, UNIT), state)
    return state

  norms = [1.0, 1.5, 0.5, 1.2, 0.8, 30.0]
  state0 = tx.init(_params())
  a = run(state0, norms)
  state0.hyperparams[hparam] = jnp.asarray(value, state0.hyperparams[hparam].dtype)
  b = run(state0, norms)
  assert float(a.inner_state.grad_norm) == float(b.inner_state.grad_norm) == pytest.approx(30.0)
  assert float(a.inner_state.max_norm) != float(b.inner_state.max_norm)


def test_state_fields_are_readable_with_optax_tree_get():
  tx = optax.chain(gnorm_jax.autoclip(0.5), optax.adam(1e-3))
  state = tx.init(_params())
  _, state = tx.update(UNIT, state)
  assert float(optax.tree.get(state, "grad_norm")) == pytest.approx(1.0)
  assert float(optax.tree.get(state, "max_norm")) == pytest.approx(1.0)


def test_skip_spikes_passes_extra_args_to_inner():
  seen = {}

  def update(updates, state, params=None, *, value):
    seen["value"] = value
    return updates, state

  inner = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
  tx = gnorm_jax.skip_spikes(inner)
  tx.update(UNIT, tx.init(_params()), _params(), value=jnp.float32(3.0))
  assert float(seen["value"]) == 3.0


# ---------------------------------------------------------------------------
# Invariants on arbitrary norm streams.

_HYPO_T = 16


@functools.cache
def _hypo_run(name):
  return _scan(ALL[name]())


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(
  norms=st.lists(
    st.one_of(st.just(0.0), st.floats(2.0**-10, 1e4, width=32)),
    min_size=_HYPO_T,
    max_size=_HYPO_T,
  ),
  name=st.sampled_from(list(ALL)),
)
def test_invariants(norms, name):
  updates, states = _hypo_run(name)(_grads(norms))
  measured = np.asarray(states.grad_norm, np.float64)
  out = _norms(updates)
  assert np.isfinite(out).all() and np.all(np.asarray(states.max_norm) >= 0)
  limit = np.asarray(states.max_norm, np.float64)
  if name == "skip_spikes":  # all or nothing: skipped exactly above the threshold
    skipped = np.diff(np.concatenate([[0], np.asarray(states.num_skipped)])) > 0
    np.testing.assert_array_equal(skipped, measured > limit)
    assert np.all(out[skipped] == 0)
  else:  # the update's norm is min(norm, threshold)
    np.testing.assert_allclose(out, np.minimum(measured, limit), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("quantile,expect", [(1.5, 3.0), (-0.1, 1.0)])
def test_traced_quantile_outside_range_is_clipped_into_it(quantile, expect):
  tx = optax.inject_hyperparams(gnorm_jax.autoclip, static_args=("history",))(history=4)
  state = tx.init(_params())
  state.hyperparams["quantile"] = jnp.float32(quantile)
  update = jax.jit(tx.update)  # traced: a concrete bad value is rejected (see below)
  for g in (1.0, 3.0, 2.0):
    _, state = update(jax.tree.map(lambda u: g * u, UNIT), state)
  assert float(state.inner_state.max_norm) == pytest.approx(expect)


@pytest.mark.parametrize("name", list(ALL) + ["inject_zclip", "inject_quantile_clip"])
def test_initial_state_can_be_donated(name):
  """A training step donates its state; init must not reuse one buffer twice."""
  tx = {
    "inject_zclip": lambda: optax.inject_hyperparams(gnorm_jax.zclip)(max_norm=2.0),
    "inject_quantile_clip": lambda: optax.inject_hyperparams(gnorm_jax.quantile_clip)(),
  }.get(name, ALL.get(name))()
  state = tx.init(_params())
  step = jax.jit(lambda g, s: tx.update(g, s)[1], donate_argnums=1)
  jax.block_until_ready(step(UNIT, state))


# Issue 18: overflowing norms, an infinite z_threshold, a bad inner.

BIG = jnp.array([3e38, 3e38], jnp.float32)  # finite; its norm 4.2e38 overflows float32


@pytest.mark.parametrize(
  "make",
  [
    lambda: gnorm_jax.autoclip(0.5, history=4),
    lambda: gnorm_jax.zclip(warmup_steps=2),
    lambda: gnorm_jax.skip_spikes(optax.identity(), warmup_steps=2),
  ],
)
def test_first_update_with_overflowing_norm_passes_unchanged(make):
  # Every threshold is inf on the first step: the update is finite and must
  # pass as it is (it was zeroed: its norm overflowed to inf).
  tx = make()
  out, state = tx.update(BIG, tx.init(BIG))
  np.testing.assert_array_equal(out, BIG)
  assert np.isinf(state.grad_norm)


def test_quantile_clip_clips_an_overflowing_norm_to_its_threshold():
  tx = gnorm_jax.quantile_clip(initial_max_norm=2.0)
  out, _ = tx.update(BIG, tx.init(BIG))
  g64 = np.asarray(BIG, np.float64)
  np.testing.assert_allclose(out, 2.0 * g64 / np.linalg.norm(g64), rtol=1e-6)


def test_overflowing_norm_after_warmup_is_clipped_or_skipped():
  small = jnp.array([1.0, 0.0])
  z = gnorm_jax.zclip(warmup_steps=2)
  s = gnorm_jax.skip_spikes(optax.identity(), warmup_steps=2)
  zs, ss = z.init(small), s.init(small)
  for g in (small, 3 * small):
    _, zs = z.update(g, zs)
    _, ss = s.update(g, ss)
  out, zs = z.update(BIG, zs)  # z = inf: clipped to the mean, 2
  g64 = np.asarray(BIG, np.float64)
  np.testing.assert_allclose(out, 2.0 * g64 / np.linalg.norm(g64), rtol=1e-6)
  out, ss = s.update(BIG, ss)
  np.testing.assert_array_equal(out, np.zeros(2))
  assert int(ss.num_skipped) == 1


def test_infinite_z_threshold_records_an_infinite_max_norm():
  # mean + inf·std was NaN when std = 0 (equal norms); NaN also stopped
  # skip_spikes from recording any norm.
  g = jnp.array([1.0, 0.0])
  z = gnorm_jax.zclip(z_threshold=math.inf, warmup_steps=1)
  s = gnorm_jax.skip_spikes(optax.identity(), z_threshold=math.inf, warmup_steps=1)
  zs, ss = z.init(g), s.init(g)
  for _ in range(3):
    _, zs = z.update(g, zs)
    out, ss = s.update(g, ss)
  assert float(zs.max_norm) == math.inf and float(ss.max_norm) == math.inf
  assert int(ss.num_recorded) == 3 and int(ss.num_skipped) == 0
  np.testing.assert_array_equal(out, g)


@pytest.mark.parametrize("inner", [0.1, lambda u: u, optax.adam])
def test_skip_spikes_names_a_bad_inner(inner):
  with pytest.raises(TypeError, match=r"inner must be an optax.GradientTransformation, got"):
    gnorm_jax.skip_spikes(inner)
