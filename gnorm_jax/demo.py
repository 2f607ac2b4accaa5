"""``python -m gnorm_jax.demo``: the toolkit at work on a small classifier.

An MLP learns to read handwritten digits — scikit-learn's ``load_digits``: 1797
8×8 images of 10 classes that ship inside the package (no download), split into
training and held-out test images — under eleven training set-ups that differ
only in what they do with the gradient norm:

* plain Adam, watched by :func:`gnorm_jax.record_leaf_norms` (per-layer norms);
* clipping: :func:`gnorm_jax.clip_by_norm` and the adaptive clippers
  :func:`gnorm_jax.autoclip`, :func:`gnorm_jax.zclip`,
  :func:`gnorm_jax.quantile_clip`, and :func:`gnorm_jax.skip_spikes`;
* normalized updates: :func:`gnorm_jax.normalize` + SGD and
  :func:`gnorm_jax.normalized_sgd`;
* penalties: the gradient-norm penalty :math:`J + \\lambda\\|\\nabla J\\|^2`
  (:func:`gnorm_jax.penalized_value_and_grad`) and an input-gradient penalty
  (:func:`gnorm_jax.gradient_penalty`);
* per-example clipping as in DP-SGD, without noise (:func:`gnorm_jax.clipped_grad`).

Every step of every run also measures the global gradient norm, the per-example
norms (:func:`gnorm_jax.per_example_grad_norms`) and from them the gradient
noise scale (:func:`gnorm_jax.gradient_noise_scale`, smoothed by
:func:`gnorm_jax.noise_scale_tracker`). Two batches are corrupted (pixels
multiplied by 5 and every label replaced by the next digit) to show what the
clippers do with a gradient spike; the noise-scale tracker is given NaN for
them, which it skips.

All set-ups train side by side in one jitted step (one compilation). The
output: a tqdm progress bar (stderr), checks of the ghost per-example norms and
of the penalty gradient against their references, per-layer norms, a summary
table with each set-up's held-out accuracy, and a PNG figure of the norm curves
at ``--out``. About 20-40 s on 2 CPU cores, most of it compilation.

It needs the ``[demo]`` extra (scikit-learn, tqdm, matplotlib):
``pip install "gnorm_jax[demo]"``.

Usage: ``python -m gnorm_jax.demo [--steps 300] [--out gnorm_demo.png]
[--runs adam,clip,...] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gnorm_jax
from gnorm_jax._extras import import_extra

# ---------------------------------------------------------------------------
# 1. Data and model.


@dataclasses.dataclass(frozen=True)
class Config:
  steps: int = 300
  batch_size: int = 64
  hidden: tuple[int, ...] = (64, 64)
  test_fraction: float = 0.25  # held-out digits, stratified by class
  learning_rate: float = 3e-3
  spike_factor: float = 5.0  # corrupted batches: pixels times this, labels shifted
  seed: int = 0


PIXELS = 64  # 8×8 images, flattened
CLASSES = 10


def make_data(cfg: Config) -> tuple[np.ndarray, ...]:
  """The digits as ``(x_train, y_train, x_test, y_test)``: x float32 [n, 64], y int32 [n].

  Pixels (0-16) are centred by the training images' mean and divided by their
  standard deviation; the split is stratified, so both sets hold every class.
  """
  digits = import_extra("sklearn.datasets", "demo").load_digits()
  split = import_extra("sklearn.model_selection", "demo").train_test_split
  x_train, x_test, y_train, y_test = split(
    digits.data,
    digits.target,
    test_size=cfg.test_fraction,
    random_state=cfg.seed,
    stratify=digits.target,
  )
  mean, std = x_train.mean(0), x_train.std()
  x_train, x_test = ((x - mean) / std for x in (x_train, x_test))
  return (
    x_train.astype(np.float32),
    y_train.astype(np.int32),
    x_test.astype(np.float32),
    y_test.astype(np.int32),
  )


def init_mlp(key: jax.Array, sizes: Sequence[int]) -> dict[str, dict[str, jax.Array]]:
  """{"dense0": {"kernel", "bias"}, ...} with He-scaled kernels."""
  params = {}
  keys = jax.random.split(key, len(sizes) - 1)
  for i, (k, d_in, d_out) in enumerate(zip(keys, sizes[:-1], sizes[1:])):
    params[f"dense{i}"] = {
      "kernel": jax.random.normal(k, (d_in, d_out)) * math.sqrt(2.0 / d_in),
      "bias": jnp.zeros(d_out),
    }
  return params


def mlp(params: dict, x: jax.Array) -> jax.Array:
  layers = [params[k] for k in sorted(params)]
  for layer in layers[:-1]:
    x = jax.nn.relu(x @ layer["kernel"] + layer["bias"])
  return x @ layers[-1]["kernel"] + layers[-1]["bias"]


def example_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  """Cross-entropy of ONE example (x [64], y []): what per-example tools take."""
  logits = mlp(params, x)
  return jax.nn.logsumexp(logits) - logits[y]


def batch_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  """The mean loss; its gradient is the mean of the per-example gradients."""
  return jnp.mean(jax.vmap(example_loss, (None, 0, 0))(params, x, y))


# ---------------------------------------------------------------------------
# 2. The training set-ups: an optimizer and a way to get the gradient.

PENALTY_WEIGHT = 0.01  # λ in J + λ‖∇J‖²
INPUT_PENALTY_WEIGHT = 0.05  # weight of the mean ‖∇ₓ ℓᵢ‖²
EXAMPLE_MAX_NORM = 1.0  # per-example clipping threshold
MAX_NORM = 1.0  # global clipping threshold: above the typical ‖∇J‖ of ~0.3


class Run(NamedTuple):
  """One training set-up: how its update direction is made and transformed."""

  key: str  # short name for --runs
  name: str
  optimizer: Callable[[optax.Schedule], optax.GradientTransformation]
  gradient: str = "plain"  # "plain", "penalty", "input_penalty" or "per_example_clip"


def _by_path(tree: Any) -> dict[str, Any]:
  """A tree's leaves by their path, ``{"dense0/kernel": leaf}``, for the plots and tables."""
  return {
    jax.tree_util.keystr(path, simple=True, separator="/"): leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _normalized_lr(lr: optax.Schedule) -> optax.Schedule:
  """Normalized steps have length lr·‖u/‖u‖‖ = lr: a larger rate than Adam's."""
  return lambda count: 10 * lr(count)


RUNS = (
  # record_leaf_norms first in the chain: its state holds per-layer gradient norms.
  Run("adam", "adam", lambda lr: optax.chain(gnorm_jax.record_leaf_norms(), optax.adam(lr))),
  Run(
    "clip",
    "clip_by_norm + adam",
    lambda lr: optax.chain(gnorm_jax.clip_by_norm(MAX_NORM), optax.adam(lr)),
  ),
  Run(
    "autoclip",
    "autoclip + adam",
    lambda lr: optax.chain(gnorm_jax.autoclip(0.1, history=1000), optax.adam(lr)),
  ),
  Run("zclip", "zclip + adam", lambda lr: optax.chain(gnorm_jax.zclip(), optax.adam(lr))),
  Run(
    "quantile",
    "quantile_clip + adam",
    lambda lr: optax.chain(gnorm_jax.quantile_clip(0.9), optax.adam(lr)),
  ),
  Run(
    "skip",
    "skip_spikes(adam)",
    lambda lr: gnorm_jax.skip_spikes(optax.adam(lr), history=64, z_threshold=6.0),
  ),
  Run(
    "normalize",
    "normalize + sgd",
    lambda lr: optax.chain(gnorm_jax.normalize(), optax.sgd(_normalized_lr(lr))),
  ),
  Run(
    "nsgd", "normalized_sgd", lambda lr: gnorm_jax.normalized_sgd(_normalized_lr(lr), momentum=0.9)
  ),
  Run("penalty", "‖∇J‖² penalty + adam", optax.adam, "penalty"),
  Run("input_penalty", "input-grad penalty + adam", optax.adam, "input_penalty"),
  Run("dp", "per-example clip + adam", optax.adam, "per_example_clip"),
)
RUN_KEYS = tuple(r.key for r in RUNS)

_penalty_value_and_grad = gnorm_jax.penalized_value_and_grad(batch_loss, weight=PENALTY_WEIGHT)
_per_example_norms = gnorm_jax.per_example_grad_norms(example_loss, batch_argnums=(1, 2))
_per_example_clipped = gnorm_jax.clipped_grad(
  example_loss, max_norm=EXAMPLE_MAX_NORM, batch_argnums=(1, 2), return_norms=True
)
_value_grad_and_norm = gnorm_jax.value_grad_and_norm(batch_loss)


def _input_penalized_loss(params, x, y):
  """Mean loss + weight · mean over examples of ‖∇ₓ ℓ(params, xᵢ, yᵢ)‖²."""
  critic = lambda xs: jax.vmap(example_loss, (None, 0, 0))(params, xs, y)
  gp = gnorm_jax.gradient_penalty(critic, x, target=0.0)
  return batch_loss(params, x, y) + INPUT_PENALTY_WEIGHT * gp


def _update_direction(kind: str, params, x, y, plain_grads):
  """The gradient the optimizer is given, and the per-example gradient norms.

  The per-example clipped gradient measures those norms anyway (``return_norms``);
  every other kind measures them once for the noise scale.
  """
  if kind == "per_example_clip":
    return _per_example_clipped(params, x, y)
  example_norms = _per_example_norms(params, x, y)
  if kind == "plain":
    return plain_grads, example_norms
  if kind == "penalty":
    return _penalty_value_and_grad(params, x, y)[1], example_norms
  if kind == "input_penalty":
    return jax.grad(_input_penalized_loss)(params, x, y), example_norms
  raise ValueError(f"unknown gradient kind {kind!r}")


# ---------------------------------------------------------------------------
# 3. One training step: the update, plus every norm a person would watch.


class RunState(NamedTuple):
  """What one set-up carries from step to step."""

  params: Any
  opt_state: Any
  noise_state: gnorm_jax.NoiseScaleTrackerState


def run_step(run: Run, optimizer, tracker, state: RunState, x, y, clean):
  """One step of one set-up; returns the new state and this step's metrics."""
  params, opt_state, noise_state = state
  loss, grads, grad_norm = _value_grad_and_norm(params, x, y)
  direction, example_norms = _update_direction(run.gradient, params, x, y, grads)
  # Per-example norms -> the noise scale of McCandlish et al. (B_small = 1).
  estimate = gnorm_jax.gradient_noise_scale(example_norms**2, grad_norm**2, x.shape[0])
  # A corrupted batch is not a sample of the data whose noise scale we want:
  # a NaN estimate makes the tracker skip it (and count it in `num_skipped`).
  gated = jax.tree.map(lambda v: jnp.where(clean, v, jnp.nan), estimate)
  smoothed, noise_state = tracker.update(gated, noise_state)

  updates, opt_state = optimizer.update(direction, opt_state, params)
  params = optax.apply_updates(params, updates)

  metrics = {
    "loss": loss,
    "grad_norm": grad_norm,
    "update_norm": gnorm_jax.tree_norm(updates),
    "b_simple": estimate.b_simple,
    "b_simple_ema": smoothed.b_simple,
    "examples_clipped": jnp.mean(example_norms > EXAMPLE_MAX_NORM),
  }
  # What the norm-based transformations kept in their states.
  leaf_norms = optax.tree.get(opt_state, "leaf_norms")
  if leaf_norms is not None:
    metrics["layer_norms"] = _by_path(leaf_norms)
  acting = optax.tree.get(opt_state, "grad_norm")  # the norm a clipper measured
  threshold = optax.tree.get(opt_state, "max_norm")  # and the threshold it applied
  if acting is not None and threshold is not None:
    metrics["threshold"] = threshold
    metrics["clipped"] = acting > threshold
  for name in ("num_clipped", "num_skipped"):
    count = optax.tree.get(opt_state, name)
    if count is not None:
      metrics[name] = count
  return RunState(params, opt_state, noise_state), metrics


def make_train_step(runs: Sequence[Run], cfg: Config):
  """init() and a jitted step over all set-ups: one compiled program for the lot."""
  schedule = optax.cosine_decay_schedule(cfg.learning_rate, cfg.steps, alpha=0.1)
  optimizers = [run.optimizer(schedule) for run in runs]
  tracker = gnorm_jax.noise_scale_tracker(0.98)  # averages over ~50 steps

  def init(params):
    states = [RunState(params, opt.init(params), tracker.init()) for opt in optimizers]
    # Fresh buffers: a donated argument may not hold one array twice (the runs
    # share the initial parameters, and some inits reuse one zero array).
    return jax.tree.map(jnp.copy, states)

  @functools.partial(jax.jit, donate_argnums=0)
  def step(states, x_all, y_all, idx, corrupt):
    x, y = corrupt_batch(x_all[idx], y_all[idx], corrupt, cfg.spike_factor)
    out = [
      run_step(run, opt, tracker, state, x, y, ~corrupt)
      for run, opt, state in zip(runs, optimizers, states)
    ]
    return [s for s, _ in out], [m for _, m in out]

  return init, step


# ---------------------------------------------------------------------------
# 4. The training loop, with a tqdm progress bar.


def corrupt_batch(x, y, corrupt, factor: float):
  """A data-pipeline accident, if ``corrupt``: pixels times ``factor``, labels off by one.

  Either alone is no spike: a ReLU network scores scaled digits with more confidence
  (smaller gradients); together they give a gradient ~100 times the typical one.
  """
  x = jnp.where(corrupt, x * factor, x)
  y = jnp.where(corrupt, (y + 1) % CLASSES, y)
  return x, y


def spike_steps(cfg: Config) -> list[int]:
  """Steps whose batch is corrupted (none in very short runs)."""
  return [s for s in (int(0.45 * cfg.steps), int(0.7 * cfg.steps)) if s >= 30]


def train(runs: Sequence[Run], cfg: Config, x_train, y_train, batches: np.ndarray):
  """Trains every set-up from the same initialization on the same batches."""
  tqdm = import_extra("tqdm", "demo").tqdm
  init, step = make_train_step(runs, cfg)
  states = init(init_mlp(jax.random.key(cfg.seed), (PIXELS, *cfg.hidden, CLASSES)))
  corrupt = np.zeros(cfg.steps, bool)
  corrupt[spike_steps(cfg)] = True

  def info(m):
    return (
      f"{runs[0].name}: loss {float(m[0]['loss']):.3f}"
      f" ‖∇J‖ {float(m[0]['grad_norm']):.3f} B_simple {float(m[0]['b_simple_ema']):.0f}"
    )

  history = []
  every = max(1, cfg.steps // 50)  # the postfix fetches from the device: not every step
  with tqdm(total=cfg.steps, desc=f"training {len(runs)} set-ups", unit="step") as bar:
    for t in range(cfg.steps):
      states, metrics = step(states, x_train, y_train, batches[t], corrupt[t])
      history.append(metrics)  # device arrays: fetched once, at the end
      if (t + 1) % every == 0 or t + 1 == cfg.steps:
        bar.set_postfix_str(info(jax.device_get(metrics)), refresh=False)
      bar.update()
  history = jax.device_get(history)
  curves = {
    run.name: jax.tree.map(lambda *xs: np.stack(xs), *[h[i] for h in history])
    for i, run in enumerate(runs)
  }
  return {run.name: s.params for run, s in zip(runs, states)}, curves


# ---------------------------------------------------------------------------
# 5. Checks and tables.


def _relative_error(a, b) -> jax.Array:
  return gnorm_jax.tree_norm(jax.tree.map(jnp.subtract, a, b)) / gnorm_jax.tree_norm(b)


@functools.partial(jax.jit, static_argnames="batch_size")
def evaluate(finals: list, x_test, y_test, batch_size: int) -> dict[str, Any]:
  """Everything measured after training, in one compiled program.

  Test accuracy of every set-up; for the first (reference) set-up: the ghost
  per-example norms and the penalty's Hessian-vector-product gradient against
  their references on one batch, per-layer and global gradient norms and the
  per-example gradient norms on the whole test set.
  """
  ref = finals[0]
  x, y = x_test[:batch_size], y_test[:batch_size]
  direct = gnorm_jax.per_example_grad_norms(example_loss, batch_argnums=(1, 2), method="vmap")
  exact_penalty_grad = jax.grad(gnorm_jax.penalized(batch_loss, weight=PENALTY_WEIGHT))
  full_grads = jax.grad(batch_loss)(ref, x_test, y_test)
  return {
    "accuracy": [jnp.mean(jnp.argmax(mlp(p, x_test), -1) == y_test) for p in finals],
    "checks": {
      "per_example_rel_err": _relative_error(_per_example_norms(ref, x, y), direct(ref, x, y)),
      "penalty_grad_rel_err": _relative_error(
        _penalty_value_and_grad(ref, x, y)[1], exact_penalty_grad(ref, x, y)
      ),
    },
    "layer_norms": gnorm_jax.flat_leaf_norms(full_grads, prefix="grad_norm"),
    "global_norm": gnorm_jax.tree_norm(full_grads),
    "example_norms": _per_example_norms(ref, x_test, y_test),
  }


def acted(curve: dict[str, np.ndarray]) -> str:
  """What a set-up's norm-based transformation did over the run."""

  def steps(n, what):
    return f"{int(n)} step{'' if n == 1 else 's'} {what}"

  if "num_skipped" in curve:
    return steps(curve["num_skipped"][-1], "skipped")
  if "num_clipped" in curve:
    return steps(curve["num_clipped"][-1], "clipped")
  if "clipped" in curve:
    return steps(np.sum(curve["clipped"]), "clipped")
  return "-"


def summarize(runs, curves, accuracy, steps: int) -> list[dict[str, Any]]:
  tail = max(1, steps // 10)
  rows = []
  for run in runs:
    c = curves[run.name]
    action = acted(c)
    if run.gradient == "per_example_clip":
      action = f"{100 * np.mean(c['examples_clipped']):.0f}% of examples clipped"
    rows.append(
      {
        "set-up": run.name,
        "train loss": float(np.mean(c["loss"][-tail:])),
        "test acc": accuracy[run.name],
        "median ‖∇J‖": float(np.median(c["grad_norm"])),
        "max ‖∇J‖": float(np.max(c["grad_norm"])),
        "median ‖update‖": float(np.median(c["update_norm"])),
        "B_simple (EMA, end)": float(c["b_simple_ema"][-1]),
        "norm-based action": action,
      }
    )
  return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
  def fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)

  head = list(rows[0])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lines += ["| " + " | ".join(fmt(r[k]) for k in head) + " |" for r in rows]
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# 6. The figure.


def plot(runs, curves, rows, example_norms, spikes, path: str) -> None:
  import_extra("matplotlib", "demo").use("Agg")
  plt = import_extra("matplotlib.pyplot", "demo")

  names = [run.name for run in runs]
  base = curves[names[0]]
  steps = np.arange(1, len(base["loss"]) + 1)
  colors = {name: plt.cm.tab20(2 * i % 20 + (2 * i // 20)) for i, name in enumerate(names)}
  fig, axes = plt.subplots(2, 4, figsize=(24, 10), constrained_layout=True)

  def panel(ax, title, ylabel, series, log=True):
    for label, values, style in series:
      ax.plot(steps, values, label=label, **style)
    for s in spikes:
      ax.axvline(s + 1, color="grey", ls=":", lw=1)
    ax.set(title=title, xlabel="step", ylabel=ylabel, yscale="log" if log else "linear")
    ax.legend(fontsize=7)

  panel(
    axes[0, 0],
    "Training loss (dotted: corrupted batches)",
    "batch loss",
    [(n, curves[n]["loss"], {"color": colors[n], "lw": 1}) for n in names],
  )
  panel(
    axes[0, 1],
    "Global gradient norm ‖∇J‖ (value_grad_and_norm)",
    "‖∇J‖",
    [(n, curves[n]["grad_norm"], {"color": colors[n], "lw": 1}) for n in names],
  )
  if "layer_norms" in base:
    panel(
      axes[0, 2],
      f"Per-layer gradient norms ({names[0]}, record_leaf_norms)",
      "‖∇J‖ of the layer's leaf",
      [(k, v, {"lw": 1}) for k, v in base["layer_norms"].items()],
    )
  thresholds = [
    (
      f"threshold: {n}",
      np.where(np.isfinite(curves[n]["threshold"]), curves[n]["threshold"], np.nan),
      {"color": colors[n], "lw": 1.2},
    )
    for n in names
    if "threshold" in curves[n]
  ]
  panel(
    axes[0, 3],
    "Clipping thresholds (state max_norm) vs ‖∇J‖",
    "norm",
    [(f"‖∇J‖ ({names[0]})", base["grad_norm"], {"color": "black", "lw": 0.8})] + thresholds,
  )
  panel(
    axes[1, 0],
    "Update norm ‖Δθ‖ (normalized updates: = step size)",
    "‖update‖",
    [
      (n, curves[n]["update_norm"], {"color": colors[n], "lw": 1})
      for n in names
      if n == names[0] or "normal" in n or "clip_by_norm" in n
    ],
  )
  raw = base["b_simple"]
  panel(
    axes[1, 1],
    "Gradient noise scale B_simple = tr(Σ)/‖G‖²\n(corrupted batches skipped)",
    "B_simple (examples)",
    [
      (
        "one step's estimate, " + names[0],
        np.where(raw > 0, raw, np.nan),
        {"color": "grey", "ls": "", "marker": ".", "ms": 2, "alpha": 0.5},
      )
    ]
    + [
      (
        f"EMA (noise_scale_tracker): {n}",
        curves[n]["b_simple_ema"],
        {"color": colors[n], "lw": 1.5},
      )
      for n in names[:1] + names[-1:]
    ],
  )

  ax = axes[1, 2]
  positive = example_norms[example_norms > 0]
  bins = np.geomspace(positive.min(), positive.max() * 1.01, 40) if positive.size else 10
  ax.hist(example_norms, bins=bins, color=colors[names[0]])
  ax.axvline(
    EXAMPLE_MAX_NORM, color="red", ls="--", label=f"per-example clip C = {EXAMPLE_MAX_NORM}"
  )
  ax.set(
    title=f"Per-example gradient norms, test set\n({names[0]}, per_example_grad_norms)",
    xlabel="‖∇ℓᵢ‖",
    ylabel="examples",
    xscale="log",
  )
  ax.legend(fontsize=7)

  ax = axes[1, 3]
  ax.barh(names, [r["test acc"] for r in rows], color=[colors[n] for n in names])
  ax.set(title="Test accuracy after training", xlabel="accuracy", xlim=(0, 1))
  ax.invert_yaxis()
  ax.tick_params(axis="y", labelsize=8)

  fig.suptitle("gnorm_jax demo: gradient norms while an MLP learns handwritten digits", fontsize=14)
  fig.savefig(path, dpi=72)
  plt.close(fig)


# ---------------------------------------------------------------------------
# 7. main.


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m gnorm_jax.demo",
    description="Train a small MLP on scikit-learn's handwritten digits under eleven"
    " gradient-norm set-ups"
    " (clipping, adaptive clipping, spike skipping, normalized updates, penalties,"
    " per-example clipping) and show global, per-layer and per-example norms and the"
    " gradient noise scale: a progress bar, a summary table and a PNG figure.",
  )
  parser.add_argument(
    "--steps", type=int, default=Config.steps, help="training steps (default %(default)s)"
  )
  parser.add_argument(
    "--out", default="gnorm_demo.png", help="path of the PNG figure (default %(default)s)"
  )
  parser.add_argument(
    "--runs",
    default=",".join(RUN_KEYS),
    help="comma-separated set-ups to train, the first is the reference (default: all: %(default)s)",
  )
  parser.add_argument("--seed", type=int, default=Config.seed, help="data and initialization seed")
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error(f"--steps must be at least 1, got {args.steps}")
  keys = [k.strip() for k in args.runs.split(",") if k.strip()]
  unknown = [k for k in keys if k not in RUN_KEYS]
  if unknown or not keys:
    parser.error(f"--runs: unknown set-up(s) {unknown}; choose from {', '.join(RUN_KEYS)}")
  args.runs = [r for k in keys for r in RUNS if r.key == k]
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the demo; returns the summary rows, per-step curves, held-out accuracy of each
  set-up, the checks and the figure path."""
  args = parse_args(argv)
  import_extra("matplotlib", "demo")  # the figure comes last: fail before training, not after
  runs, cfg = args.runs, Config(steps=args.steps, seed=args.seed)
  t0 = time.perf_counter()
  x_train, y_train, x_test, y_test = (jnp.asarray(a) for a in make_data(cfg))
  batches = np.random.default_rng(cfg.seed + 1).integers(
    0, len(y_train), (cfg.steps, cfg.batch_size), dtype=np.int32
  )
  sizes = (PIXELS, *cfg.hidden, CLASSES)
  shapes = jax.eval_shape(lambda k: init_mlp(k, sizes), jax.random.key(0))
  n_params = sum(x.size for x in jax.tree.leaves(shapes))
  print(
    f"gnorm_jax demo | jax {jax.__version__} on {jax.default_backend()} |"
    f" digits: {len(y_train)} training and {len(y_test)} held-out 8×8 images, 10 classes |"
    f" MLP {'-'.join(map(str, sizes))} ({n_params} parameters), batch {cfg.batch_size},"
    f" {cfg.steps} steps"
  )
  spikes = spike_steps(cfg)
  if spikes:
    print(
      f"The batches of steps {', '.join(map(str, spikes))} are corrupted (pixels"
      f" x{cfg.spike_factor:g}, every label replaced by the next digit) to show what the"
      " clippers do with a gradient spike."
    )
  print(f"Set-ups: {', '.join(r.name for r in runs)}. All compile into one program.\n")

  # Training, then every measurement after it in one jitted call.
  finals, curves = train(runs, cfg, x_train, y_train, batches)
  results = jax.device_get(evaluate([finals[r.name] for r in runs], x_test, y_test, cfg.batch_size))
  accuracy = {r.name: float(a) for r, a in zip(runs, results["accuracy"])}
  checks = {k: float(v) for k, v in results["checks"].items()}
  layer_norms = {k: float(v) for k, v in results["layer_norms"].items()}
  example_norms = np.asarray(results["example_norms"])

  ref = runs[0].name
  print(f"\nChecks on a test batch ({ref} parameters after training):")
  print(
    f"  ghost per-example norms vs vmap(grad):    relative error "
    f"{checks['per_example_rel_err']:.1e}"
  )
  print(
    f"  ‖∇J‖² penalty gradient, HVP vs jax.grad:  relative error "
    f"{checks['penalty_grad_rel_err']:.1e}"
  )
  print(
    f"\nPer-layer gradient norms on the test set ({ref}; flat_leaf_norms,"
    " ready for a metrics logger):"
  )
  for path, value in layer_norms.items():
    print(f"  {path:<26} {value:.4g}")
  print(f"  {'global (tree_norm)':<26} {float(results['global_norm']):.4g}")
  print(
    f"Per-example gradient norms on the test set: median {np.median(example_norms):.3g},"
    f" 99th percentile {np.percentile(example_norms, 99):.3g}, max {example_norms.max():.3g}."
  )
  b_end = curves[ref]["b_simple_ema"][-1]
  print(
    f"Gradient noise scale ({ref}, EMA at the end): B_simple ≈ {b_end:.0f} examples;"
    f" batches much larger than this gain little per example (this demo uses"
    f" {cfg.batch_size})."
  )

  rows = summarize(runs, curves, accuracy, cfg.steps)
  print("\nSummary (train loss: mean over the last 10% of steps):\n")
  print(markdown_table(rows))

  out = os.path.abspath(args.out)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  plot(runs, curves, rows, example_norms, spikes, out)
  print(f"\nFigure written to {out}")
  print(f"Total time {time.perf_counter() - t0:.1f}s")
  return {
    "rows": rows,
    "curves": curves,
    "accuracy": accuracy,
    "checks": checks,
    "layer_norms": layer_norms,
    "figure": out,
  }


if __name__ == "__main__":
  main()
