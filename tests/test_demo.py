"""Tests of gnorm_jax.demo: what the training does (it learns the digits, the clippers act on
the corrupted batches, the figure is written) and each step's measurements against
independent references. Nothing here pins the printed text."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gnorm_jax
from gnorm_jax import demo

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 100  # enough to learn the digits well above chance; spikes at steps 45 and 70
SIZES = (demo.PIXELS, *demo.Config.hidden, demo.CLASSES)


def run_main(argv):
  with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    return demo.main(argv)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  """Every set-up, trained side by side for STEPS steps."""
  figure = tmp_path_factory.mktemp("demo") / "nested" / "norms.png"
  return figure, run_main(["--steps", str(STEPS), "--out", str(figure)])


def by_key(result, key):
  """The curves of the set-up with this --runs key."""
  name = next(r.name for r in demo.RUNS if r.key == key)
  return result["curves"][name]


# ---------------------------------------------------------------------------
# The data: scikit-learn's digits, held out by class.


def test_data_is_the_digits_split_into_disjoint_stratified_sets():
  x_train, y_train, x_test, y_test = demo.make_data(demo.Config())
  assert len(x_train) + len(x_test) == 1797  # every image of load_digits, once
  assert x_train.shape[1:] == x_test.shape[1:] == (demo.PIXELS,)
  assert x_train.dtype == np.float32 and y_train.dtype == np.int32
  assert set(np.unique(y_train)) == set(np.unique(y_test)) == set(range(demo.CLASSES))
  rows = {row.tobytes() for row in x_train}
  assert sum(row.tobytes() in rows for row in x_test) < 0.02 * len(x_test)  # held out
  np.testing.assert_allclose(x_train.mean(0), 0, atol=1e-5)  # standardized on the training set


def test_corrupted_batches_are_gradient_spikes():
  x, y, _, _ = demo.make_data(demo.Config())
  x, y = jnp.asarray(x[:64]), jnp.asarray(y[:64])
  params = demo.init_mlp(jax.random.key(0), SIZES)
  norm = lambda x, y: float(jax.jit(gnorm_jax.grad_norm(demo.batch_loss))(params, x, y))
  x_bad, y_bad = demo.corrupt_batch(x, y, jnp.bool_(True), demo.Config.spike_factor)
  assert np.all(np.asarray(y_bad) != np.asarray(y))
  assert norm(x_bad, y_bad) > 5 * norm(x, y)
  x_same, y_same = demo.corrupt_batch(x, y, jnp.bool_(False), demo.Config.spike_factor)
  np.testing.assert_array_equal(x_same, x)
  np.testing.assert_array_equal(y_same, y)


# ---------------------------------------------------------------------------
# main(): training, the clippers, the checks and the figure.


@pytest.mark.parametrize("key", demo.RUN_KEYS)
def test_every_set_up_learns_the_digits(full_run, key):
  _, result = full_run
  name = next(r.name for r in demo.RUNS if r.key == key)
  loss = by_key(result, key)["loss"]
  assert np.all(np.isfinite(loss))
  assert np.mean(loss[-10:]) < 0.75 * np.mean(loss[:10])  # normalized SGD learns slowest
  assert result["accuracy"][name] > 0.5  # chance is 0.1 on the held-out digits


def test_clipping_run_clips_the_spikes(full_run):
  _, result = full_run
  curves = by_key(result, "clip")
  spikes = demo.spike_steps(demo.Config(steps=STEPS))
  assert spikes
  assert np.all(curves["clipped"][spikes])
  assert np.all(curves["clipped"] == (curves["grad_norm"] > demo.MAX_NORM))
  np.testing.assert_array_equal(curves["threshold"], demo.MAX_NORM)
  # Clipped, the spike moves Adam less than unclipped.
  adam = by_key(result, "adam")
  assert np.all(curves["update_norm"][spikes] < adam["update_norm"][spikes])


def test_adaptive_clippers_act_and_skip_spikes_skips_them(full_run):
  _, result = full_run
  spikes = demo.spike_steps(demo.Config(steps=STEPS))
  for key in ("autoclip", "zclip", "quantile"):
    assert by_key(result, key)["num_clipped"][-1] >= 1, key
  skipped = by_key(result, "skip")["num_skipped"]
  assert skipped[-1] >= 1
  assert np.all(np.diff(skipped)[np.asarray(spikes) - 1] == 1)  # each spike step is skipped


def test_per_example_clipping_clips_some_examples(full_run):
  _, result = full_run
  fraction = by_key(result, "dp")["examples_clipped"]
  assert np.all((0 <= fraction) & (fraction <= 1))
  assert 0 < np.mean(fraction) < 1


def test_fast_paths_agree_with_references(full_run):
  _, result = full_run
  assert result["checks"]["per_example_rel_err"] < 1e-5
  assert result["checks"]["penalty_grad_rel_err"] < 1e-4


def test_per_layer_norms_cover_every_layer(full_run):
  _, result = full_run
  expected = {f"grad_norm/dense{i}/{w}" for i in range(3) for w in ("kernel", "bias")}
  assert set(result["layer_norms"]) == expected
  assert all(value > 0 for value in result["layer_norms"].values())
  assert set(by_key(result, "adam")["layer_norms"]) == {p.split("/", 1)[1] for p in expected}


def test_figure_is_written_where_asked(full_run):
  figure, result = full_run
  assert result["figure"] == str(figure)
  assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert figure.stat().st_size > 10_000


def test_every_set_up_is_reported(full_run):
  _, result = full_run
  names = [run.name for run in demo.RUNS]
  assert list(result["curves"]) == [r["set-up"] for r in result["rows"]] == names
  assert list(result["accuracy"]) == names


def test_runs_flag_selects_set_ups_in_order():
  args = demo.parse_args(["--runs", "dp, clip", "--steps", "7", "--seed", "3"])
  assert [run.key for run in args.runs] == ["dp", "clip"]
  assert (args.steps, args.seed) == (7, 3)


@pytest.mark.parametrize(
  "argv", [["--steps", "0"], ["--runs", "adam,bogus"], ["--runs", ","], ["--steps", "many"]]
)
def test_bad_arguments_exit_with_usage_error(argv, capsys):
  with pytest.raises(SystemExit) as exit_info:
    demo.parse_args(argv)
  assert exit_info.value.code == 2
  assert capsys.readouterr().err  # argparse explains


def test_runs_as_a_module():
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run(
    [sys.executable, "-m", "gnorm_jax.demo", "--help"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr
  for flag in ("--steps", "--out", "--runs", "--seed"):
    assert flag in proc.stdout


# ---------------------------------------------------------------------------
# The step's measurements against independent float64 references.


@functools.lru_cache(maxsize=None)
def one_step(key, batch_size=16):
  """A set-up's jitted run_step on one batch (compiled once per set-up)."""
  cfg = demo.Config(steps=10)
  x, y, _, _ = demo.make_data(cfg)
  x, y = jnp.asarray(x[:batch_size]), jnp.asarray(y[:batch_size])
  params = demo.init_mlp(jax.random.key(1), SIZES)
  run = next(r for r in demo.RUNS if r.key == key)
  opt = run.optimizer(optax.constant_schedule(cfg.learning_rate))
  tracker = gnorm_jax.noise_scale_tracker(0.5)
  state = demo.RunState(params, opt.init(params), tracker.init())
  step = jax.jit(lambda s, clean: demo.run_step(run, opt, tracker, s, x, y, clean))
  return run, opt, state, step, x, y


per_example_grads = jax.jit(jax.vmap(jax.grad(demo.example_loss), (None, 0, 0)))


def reference_noise_scale(params, x, y):
  """B_simple from vmap(jax.grad) per-example gradients, in float64 numpy."""
  per_ex = per_example_grads(params, x, y)
  flat = np.concatenate(
    [np.asarray(g, np.float64).reshape(x.shape[0], -1) for g in jax.tree.leaves(per_ex)], 1
  )
  small = np.mean(np.sum(flat**2, 1))
  big = np.sum(flat.mean(0) ** 2)
  b = x.shape[0]
  grad_sq = (b * big - small) / (b - 1)
  trace_cov = (small - big) / (1 - 1 / b)
  return trace_cov / grad_sq, np.sqrt(big)


@pytest.mark.parametrize("key", ["adam", "clip", "dp"])
def test_step_metrics_match_references(key):
  run, opt, state, step, x, y = one_step(key)
  params = state.params
  new_state, m = step(state, True)

  b_simple, grad_norm = reference_noise_scale(params, x, y)
  np.testing.assert_allclose(m["grad_norm"], grad_norm, rtol=1e-5)
  np.testing.assert_allclose(m["b_simple"], b_simple, rtol=1e-3)
  np.testing.assert_allclose(m["b_simple_ema"], b_simple, rtol=1e-3)  # first step: no smoothing

  # The parameters moved by what the optimizer makes of the reference direction.
  @jax.jit
  def reference_step(params):
    if run.gradient == "per_example_clip":
      per_ex = per_example_grads(params, x, y)
      norms = jax.vmap(gnorm_jax.tree_norm)(per_ex)
      w = jnp.minimum(1.0, demo.EXAMPLE_MAX_NORM / norms)
      direction = jax.tree.map(lambda g: jnp.tensordot(w, g, 1) / x.shape[0], per_ex)
    else:
      direction = jax.grad(demo.batch_loss)(params, x, y)
    return direction, opt.update(direction, opt.init(params), params)[0]

  direction, updates = reference_step(params)
  np.testing.assert_allclose(m["update_norm"], gnorm_jax.tree_norm(updates), rtol=1e-4)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
    new_state.params,
    optax.apply_updates(params, updates),
  )
  if key == "adam":
    layer = m["layer_norms"]["dense0/kernel"]
    np.testing.assert_allclose(layer, np.linalg.norm(direction["dense0"]["kernel"]), rtol=1e-5)
  if key == "clip":
    assert float(m["threshold"]) == demo.MAX_NORM
    assert bool(m["clipped"]) == (grad_norm > demo.MAX_NORM)


def test_corrupted_batches_are_skipped_by_the_noise_scale_tracker():
  _, _, state, step, _, _ = one_step("adam")
  state, first = step(state, True)
  state, second = step(state, False)
  assert int(state.noise_state.num_skipped) == 1
  assert np.isfinite(second["b_simple"])  # the raw estimate is still reported
  np.testing.assert_allclose(second["b_simple_ema"], first["b_simple_ema"], rtol=1e-5)


def test_spikes_only_in_runs_long_enough_to_show_them():
  assert demo.spike_steps(demo.Config(steps=300)) == [135, 210]
  assert demo.spike_steps(demo.Config(steps=10)) == []
