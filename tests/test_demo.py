"""Tests of gnorm_jax.demo: the command line, the printed table, the figure, and
the step's measurements against independent references."""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import pathlib
import re
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
STEPS = 6
TABLE_HEAD = [
    "set-up", "train loss", "test acc", "median ‖∇J‖", "max ‖∇J‖",
    "median ‖update‖", "B_simple (EMA, end)", "norm-based action",
]


def run_main(argv):
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    result = demo.main(argv)
  return result, out.getvalue(), err.getvalue()


def table_rows(text):
  """The markdown table printed by the demo, as a list of cell lists."""
  lines = [l for l in text.splitlines() if l.startswith("|")]
  return [[c.strip() for c in l.strip("|").split("|")] for l in lines]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  figure = tmp_path_factory.mktemp("demo") / "nested" / "norms.png"
  result, out, err = run_main(["--steps", str(STEPS), "--out", str(figure)])
  return figure, result, out, err


# ---------------------------------------------------------------------------
# main(): figure, table, checks, progress bar.


def test_figure_is_written_where_it_says(full_run):
  figure, result, out, _ = full_run
  assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert figure.stat().st_size > 10_000
  assert result["figure"] == str(figure)
  assert f"Figure written to {figure}" in out


def test_summary_table_has_a_row_per_set_up(full_run):
  _, result, out, _ = full_run
  rows = table_rows(out)
  assert rows[0] == TABLE_HEAD
  assert rows[1] == ["---"] * len(TABLE_HEAD)
  assert [r[0] for r in rows[2:]] == [run.name for run in demo.RUNS]
  assert [r["set-up"] for r in result["rows"]] == [run.name for run in demo.RUNS]
  for row in result["rows"]:
    assert math.isfinite(row["train loss"]) and row["train loss"] > 0
    assert 0 <= row["test acc"] <= 1
    assert 0 < row["median ‖∇J‖"] <= row["max ‖∇J‖"] < math.inf
    assert 0 < row["median ‖update‖"] < math.inf


def test_table_says_what_the_norm_based_step_did(full_run):
  _, result, _, _ = full_run
  action = {r["set-up"]: r["norm-based action"] for r in result["rows"]}
  assert action["adam"] == "-" and action["normalize + sgd"] == "-"
  for name in ("clip_by_norm + adam", "autoclip + adam", "zclip + adam", "quantile_clip + adam"):
    assert re.fullmatch(r"\d+ steps? clipped", action[name])
    assert 0 <= int(action[name].split()[0]) <= STEPS
  assert re.fullmatch(r"\d+ steps? skipped", action["skip_spikes(adam)"])
  assert action["per-example clip + adam"].endswith("% of examples clipped")


def test_fast_paths_agree_with_references(full_run):
  _, result, out, _ = full_run
  assert result["checks"]["per_example_rel_err"] < 1e-5
  assert result["checks"]["penalty_grad_rel_err"] < 1e-4
  assert "ghost per-example norms vs vmap(grad)" in out


def test_per_layer_norms_are_printed(full_run):
  _, result, out, _ = full_run
  expected = {f"grad_norm/dense{i}/{w}" for i in range(3) for w in ("kernel", "bias")}
  assert set(result["layer_norms"]) == expected
  for path, value in result["layer_norms"].items():
    assert path in out and value > 0
  assert "global (tree_norm)" in out and "B_simple ≈" in out


def test_progress_bar_goes_to_stderr(full_run):
  _, _, out, err = full_run
  assert f"training {len(demo.RUNS)} set-ups |" in err
  assert f"{STEPS}/{STEPS}" in err.splitlines()[-1]
  assert "set-ups |" not in out


def test_runs_flag_selects_set_ups(tmp_path):
  figure = tmp_path / "two.png"
  result, out, _ = run_main(["--steps", "3", "--runs", "clip,dp", "--out", str(figure)])
  assert [r[0] for r in table_rows(out)[2:]] == ["clip_by_norm + adam", "per-example clip + adam"]
  assert figure.exists()
  assert re.fullmatch(r"\d+ steps? clipped", result["rows"][0]["norm-based action"])


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--steps", "0"], "--steps must be at least 1"),
        (["--runs", "adam,bogus"], "unknown set-up"),
        (["--runs", ","], "unknown set-up"),
        (["--steps", "many"], "invalid int value"),
    ],
)
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    demo.parse_args(argv)
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err


def test_help_from_the_command_line():
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run(
      [sys.executable, "-m", "gnorm_jax.demo", "--help"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
  )
  assert proc.returncode == 0, proc.stderr
  for flag in ("--steps", "--out", "--runs", "--seed"):
    assert flag in proc.stdout
  assert proc.stdout.startswith("usage: python -m gnorm_jax.demo")


# ---------------------------------------------------------------------------
# The step's measurements against independent float64 references.


@functools.lru_cache(maxsize=None)
def one_step(key, batch_size=16):
  """A set-up's jitted run_step on one batch (compiled once per set-up)."""
  cfg = demo.Config(steps=10)
  x, y, _, _ = demo.make_data(cfg)
  x, y = jnp.asarray(x[:batch_size]), jnp.asarray(y[:batch_size])
  params = demo.init_mlp(jax.random.key(1), (cfg.dim, *cfg.hidden, cfg.classes))
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
      new_state.params, optax.apply_updates(params, updates),
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
  assert int(state.noise_state.skipped) == 1
  assert np.isfinite(second["b_simple"])  # the raw estimate is still reported
  np.testing.assert_allclose(second["b_simple_ema"], first["b_simple_ema"], rtol=1e-5)


def test_spikes_only_in_runs_long_enough_to_show_them():
  assert demo.spike_steps(demo.Config(steps=300)) == [135, 210]
  assert demo.spike_steps(demo.Config(steps=STEPS)) == []


# ---------------------------------------------------------------------------
# Helpers.


class FakeTerminal(io.StringIO):
  def isatty(self):
    return True


@pytest.mark.parametrize("stream_type", [io.StringIO, FakeTerminal])
def test_progress_bar(stream_type):
  stream = stream_type()
  bar = demo.ProgressBar("train", 8, width=8, stream=stream)
  for done in range(1, 9):
    bar.update(done, "info")
  bar.close("done")
  text = stream.getvalue()
  assert "train |########| 8/8" in text
  assert text.rstrip().endswith("done")
  if stream_type is FakeTerminal:
    assert text.count("\r") == 9 and text.count("\n") == 1
  else:  # a log: one line per quarter, then the final line
    lines = text.splitlines()
    assert "\r" not in text and len(lines) == 4
    assert [l.split("| ")[1].split()[0] for l in lines] == ["2/8", "4/8", "6/8", "8/8"]


@pytest.mark.parametrize(
    "curve,text",
    [
        ({"num_skipped": np.array([0, 1, 1])}, "1 step skipped"),
        ({"num_clipped": np.array([1, 2, 3])}, "3 steps clipped"),
        ({"clipped": np.array([True, False, True])}, "2 steps clipped"),
        ({"loss": np.ones(3)}, "-"),
    ],
)
def test_acted(curve, text):
  assert demo.acted(curve) == text


def test_markdown_table():
  rows = [{"a": "x", "b": 1.23456}, {"a": "y", "b": 2.0}]
  assert demo.markdown_table(rows) == "| a | b |\n|---|---|\n| x | 1.235 |\n| y | 2 |"
