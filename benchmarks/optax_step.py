"""One jit-compiled optimizer step, with donated params and state, per variant.

    python benchmarks/optax_step.py [--quick] [--rounds N]

Times ``params, state = step(params, state, grads)`` on a transformer-like tree
(~38M float32 parameters in ~100 leaves; ``--quick``: ~1M) for every entry of
``VARIANTS`` and prints the median time, the ratio to adam alone and XLA's
temp/output memory. To add a variant, add ONE line to ``VARIANTS``: a name and
a zero-argument function building the ``optax.GradientTransformation``.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # _harness, and gnorm_jax from this checkout
import _harness  # noqa: E402

import gnorm_jax  # noqa: E402

LR = 1e-3
MAX_NORM = 1.0  # the gradients below have norm ≫ 1, so clipping is active

# name -> builder of the GradientTransformation; "adam" is the baseline.
VARIANTS: dict[str, Callable[[], optax.GradientTransformation]] = {
  "adam": lambda: optax.adam(LR),
  "optax.clip_by_global_norm + adam": lambda: optax.chain(
    optax.clip_by_global_norm(MAX_NORM), optax.adam(LR)
  ),
  "clip_by_norm + adam": lambda: optax.chain(gnorm_jax.clip_by_norm(MAX_NORM), optax.adam(LR)),
  "clip_by_norm(per='leaf') + adam": lambda: optax.chain(
    gnorm_jax.clip_by_norm(MAX_NORM, per="leaf"), optax.adam(LR)
  ),
  "normalize + adam": lambda: optax.chain(gnorm_jax.normalize(), optax.adam(LR)),
  "normalized_sgd(momentum=0.9)": lambda: gnorm_jax.normalized_sgd(LR, momentum=0.9),
  # Adaptive thresholds: the history work is O(history), not O(params).
  "autoclip + adam": lambda: optax.chain(gnorm_jax.autoclip(0.1), optax.adam(LR)),
  "zclip + adam": lambda: optax.chain(gnorm_jax.zclip(), optax.adam(LR)),
  "quantile_clip + adam": lambda: optax.chain(gnorm_jax.quantile_clip(0.9), optax.adam(LR)),
  "skip_spikes(adam)": lambda: gnorm_jax.skip_spikes(optax.adam(LR)),
}
BASELINE = "adam"


def update(tx: optax.GradientTransformation) -> Callable[..., Any]:
  """The step ``(params, opt_state, grads) -> (params, opt_state)`` of ``tx``."""

  def fn(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return fn


def step(tx: optax.GradientTransformation) -> Callable[..., Any]:
  """``update(tx)`` jit-compiled with params and optimizer state donated."""
  return jax.jit(update(tx), donate_argnums=(0, 1))


def _runner(tx, params, grads) -> Callable[[], Any]:
  """A zero-argument callable running one step on its own (donated) buffers."""
  fn = step(tx)
  carry = {"params": jax.tree.map(jnp.copy, params), "state": None}
  carry["state"] = tx.init(carry["params"])

  def run():
    carry["params"], carry["state"] = fn(carry["params"], carry["state"], grads)
    return carry["params"]

  return run


def main() -> None:
  args = _harness.parse_args(__doc__.splitlines()[0])
  print(_harness.machine_line())
  size = dict(d_model=128, n_layers=4, vocab=4096) if args.quick else {}
  params = _harness.transformer_tree(jax.random.key(0), **size)
  # Gradient-like values with a global norm far above MAX_NORM.
  grads = jax.tree.map(
    lambda x: 1e-2 * x / 0.02, _harness.transformer_tree(jax.random.key(1), **size)
  )
  n_params = sum(x.size for x in jax.tree.leaves(params))
  n_leaves = len(jax.tree.leaves(params))

  txs = {name: build() for name, build in VARIANTS.items()}
  mem = {
    name: _harness.memory(update(tx), params, tx.init(params), grads, donate_argnums=(0, 1))
    for name, tx in txs.items()
  }
  runners = {name: _runner(tx, params, grads) for name, tx in txs.items()}
  rounds = args.rounds or (3 if args.quick else 7)
  times = _harness.time_variants(runners, rounds=rounds)
  print()
  print(
    _harness.table(
      f"Optimizer step, {n_params / 1e6:.1f}M float32 params in {n_leaves} leaves"
      " (jit, donated params and state)",
      times,
      BASELINE,
      mem,
    )
  )


if __name__ == "__main__":
  main()
