"""One DP-SGD training step against a plain Adam step, and the noise of each generator.

    python benchmarks/dp_step.py [--quick] [--rounds N] [--only GENERATOR ...]

Model: the MLP 512-1024-1024-1024-10 of benchmarks/per_example.py at B=256, 2.6M
parameters (``--quick``: 512-256-256-10 at B=64). Every variant is one
jit-compiled step with the parameters and optimizer state donated:

- plain adam step: ``jax.grad`` of the batch-mean loss, then adam;
- gnorm_jax DP step: ``clipped_grad(reduce="sum")`` + ``dp_noise`` + adam, with
  ``rng="auto"``, and (not with ``--quick``) once per generator ``dp_noise``
  offers (``rng=...``);
- jax_privacy clipped grad + noise: ``jax_privacy.clipping.clipped_grad`` (the
  clipped sum) + the same ``dp_noise`` + adam, when jax_privacy is installed.

A second table times the noise alone: ``dp_noise``'s update (draw, add, divide)
per generator against adam's update alone, on a gradient of the model's shape,
and prints the time each update took to compile. ``--only`` names the
generators to time (e.g. ``--only threefry2x32 philox4x32``).

Goal: the gnorm_jax DP step at most 1.15x the plain step.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # _harness, and gnorm_jax from this checkout
from _harness import machine_line, memory, parse_args, table, time_variants  # noqa: E402
from per_example import mlp  # noqa: E402

import gnorm_jax  # noqa: E402

CLIP = 1.0
NOISE_MULTIPLIER = 1.1
LEARNING_RATE = 1e-3
BASELINE = "plain adam step"
GOAL = 1.15
# The generators of dp_noise (rng=...), each timed in a row of its own.
GENERATORS = ("threefry2x32", "threefry4x32", "philox4x32", "rbg", "unsafe_rbg", "secure")
NOISE_BASELINE = "adam update alone"


def dp_optimizer(clipped_sum, batch_size, rng="auto") -> optax.GradientTransformation:
  seed = None if rng == "secure" else 0
  noise = gnorm_jax.dp_noise(
    clipped_sum, NOISE_MULTIPLIER, batch_size=batch_size, seed=seed, rng=rng
  )
  return optax.chain(noise, optax.adam(LEARNING_RATE))


def steps(
  loss, batch_size, generators=GENERATORS
) -> dict[str, tuple[Callable[..., Any], optax.GradientTransformation]]:
  """name -> (step (params, state, x, y) -> (params, state), its optimizer)."""

  def batch_mean_grad(p, x, y):
    return jax.grad(lambda p: jnp.mean(jax.vmap(loss, in_axes=(None, 0, 0))(p, x, y)))(p)

  clipped_sum = gnorm_jax.clipped_grad(loss, max_norm=CLIP, batch_argnums=(1, 2), reduce="sum")
  dp_tx = dp_optimizer(clipped_sum, batch_size)
  grads = {
    BASELINE: (batch_mean_grad, optax.adam(LEARNING_RATE)),
    "gnorm_jax DP step": (clipped_sum, dp_tx),
  }
  for rng in generators:
    grads[f"gnorm_jax DP step, rng={rng}"] = (
      clipped_sum,
      dp_optimizer(clipped_sum, batch_size, rng),
    )
  try:
    from jax_privacy import clipping
  except ImportError:
    print("(jax_privacy not installed: `pip install jax-privacy` adds its row)")
  else:
    grads["jax_privacy clipped grad + noise"] = (
      clipping.clipped_grad(loss, l2_clip_norm=CLIP, batch_argnums=(1, 2), keep_batch_dim=False),
      dp_tx,
    )

  def make(grad_fn, tx):
    def step(params, state, x, y):
      updates, state = tx.update(grad_fn(params, x, y), state, params)
      return optax.apply_updates(params, updates), state

    return step

  return {name: (make(g, tx), tx) for name, (g, tx) in grads.items()}


def _runner(step, tx, params, batch) -> Callable[[], Any]:
  """A zero-argument callable running one step on its own (donated) buffers."""
  fn = jax.jit(step, donate_argnums=(0, 1))
  carry = {"params": jax.tree.map(jnp.copy, params)}
  carry["state"] = tx.init(carry["params"])

  def run():
    carry["params"], carry["state"] = fn(carry["params"], carry["state"], *batch)
    return carry["params"]

  return run


def noise_runners(params, batch_size, compile_s, generators) -> dict[str, Callable[[], Any]]:
  """adam's update alone, and dp_noise's update per generator, on a gradient of params' shape.

  Each is compiled here, ahead of time; ``compile_s`` receives the seconds it took.
  """
  grads = jax.tree.map(jnp.ones_like, params)
  txs = {NOISE_BASELINE: optax.adam(LEARNING_RATE)}
  for rng in generators:
    seed = None if rng == "secure" else 0
    txs[f"dp_noise update, rng={rng}"] = gnorm_jax.dp_noise(
      CLIP, NOISE_MULTIPLIER, batch_size=batch_size, seed=seed, rng=rng
    )

  def runner(name, tx):
    carry = {"state": tx.init(params)}
    start = time.perf_counter()
    update = (
      jax.jit(lambda g, s, p: tx.update(g, s, p), donate_argnums=(1,))
      .lower(grads, carry["state"], params)
      .compile()
    )
    compile_s[name] = time.perf_counter() - start

    def run():
      updates, carry["state"] = update(grads, carry["state"], params)
      return updates

    return run

  return {name: runner(name, tx) for name, tx in txs.items()}


def main() -> None:
  args = parse_args(__doc__.splitlines()[0])
  print(machine_line())
  q = args.quick
  sizes, batch_size = ([512, 256, 256, 10], 64) if q else ([512, 1024, 1024, 1024, 10], 256)
  loss, params, batch = mlp(jax.random.key(0), sizes, batch_size)
  generators = tuple(args.only) if args.only else GENERATORS
  variants = steps(loss, batch_size, () if q else generators)  # --quick: generators in table 2
  mem = {
    name: memory(step, params, tx.init(params), *batch, donate_argnums=(0, 1))
    for name, (step, tx) in variants.items()
  }
  runners = {name: _runner(step, tx, params, batch) for name, (step, tx) in variants.items()}
  times = time_variants(runners, rounds=args.rounds or (3 if q else 7))
  title = "-".join(map(str, sizes))
  print()
  print(
    table(
      f"DP-SGD step, MLP {title}, B={batch_size} (jit, donated params and state)",
      times,
      BASELINE,
      mem,
    )
  )
  ratio = times["gnorm_jax DP step"] / times[BASELINE]
  print(
    f"gnorm_jax DP step / plain adam step: {ratio:.2f}x (goal <= {GOAL}x:"
    f" {'met' if ratio <= GOAL else 'MISSED'})"
  )
  compile_s: dict[str, float] = {}
  noise_times = time_variants(
    noise_runners(params, batch_size, compile_s, generators), rounds=args.rounds or (3 if q else 7)
  )
  n = sum(leaf.size for leaf in jax.tree.leaves(params))
  print()
  print(
    table(f"The noise alone, {n / 1e6:.2f}M float32 parameters (jit)", noise_times, NOISE_BASELINE)
  )
  leaves = len(jax.tree.leaves(params))
  print(f"Compile time, one compile of each update ({leaves} leaves: one draw per leaf):")
  print(
    "; ".join(
      f"{name.removeprefix('dp_noise update, ')} {t:.2f} s" for name, t in compile_s.items()
    )
  )
  jp = "jax_privacy clipped grad + noise"
  if jp in times:
    print(f"{jp} / gnorm_jax DP step: {times[jp] / times['gnorm_jax DP step']:.1f}x")


if __name__ == "__main__":
  main()
