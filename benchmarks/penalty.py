"""Gradient of the penalized objective J + λ‖∇J‖², per method, vs one value_and_grad.

    python benchmarks/penalty.py [--quick] [--rounds N]

For an MLP and a small conv net (cross-entropy on random data), times the
jit-compiled ``(value, grad)`` of every method of
``gnorm_jax.penalized_value_and_grad`` and of plain ``jax.value_and_grad(J)``
(the baseline) in one interleaved run, and prints median ms, the ratio to the
baseline and XLA's temp/output memory, then each goal (hvp ≤ 3x and
never slower than double_backprop; finite_difference ≤ 2.2x) as measured and
as XLA's flop count, which the machine's noise does not touch.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # _harness, and gnorm_jax from this checkout
import _harness  # noqa: E402

import gnorm_jax  # noqa: E402

WEIGHT = 0.1
CLASSES = 10
BASELINE = "value_and_grad"


def _dense(key, n_in, n_out):
  return {"w": jax.random.normal(key, (n_in, n_out)) / jnp.sqrt(n_in), "b": jnp.zeros(n_out)}


def mlp(key, *, batch, width, depth, d_in=784):
  """A tanh MLP d_in → width × depth → 10; returns (loss, params, x, y)."""
  keys = jax.random.split(key, depth + 3)
  sizes = [d_in] + [width] * depth + [CLASSES]
  params = [_dense(k, a, b) for k, a, b in zip(keys, sizes[:-1], sizes[1:])]

  def logits(params, x):
    for layer in params[:-1]:
      x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]

  x = jax.random.normal(keys[-2], (batch, d_in))
  y = jax.random.randint(keys[-1], (batch,), 0, CLASSES)
  return _xent(logits), params, x, y


def convnet(key, *, batch, channels, size=32):
  """conv3x3(c) → pool → conv3x3(2c) → pool → dense 10, gelu; NHWC inputs."""
  k = jax.random.split(key, 5)
  c = channels

  def conv_init(key, c_in, c_out):
    return {
      "w": jax.random.normal(key, (3, 3, c_in, c_out)) / jnp.sqrt(9 * c_in),
      "b": jnp.zeros(c_out),
    }

  params = {
    "c1": conv_init(k[0], 3, c),
    "c2": conv_init(k[1], c, 2 * c),
    "out": _dense(k[2], 2 * c * (size // 4) ** 2, CLASSES),
  }

  def conv(p, x):
    y = jax.lax.conv_general_dilated(
      x, p["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jax.nn.gelu(y + p["b"])

  def pool(x):
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4

  def logits(params, x):
    x = pool(conv(params["c1"], x))
    x = pool(conv(params["c2"], x))
    return x.reshape(x.shape[0], -1) @ params["out"]["w"] + params["out"]["b"]

  x = jax.random.normal(k[3], (batch, size, size, 3))
  y = jax.random.randint(k[4], (batch,), 0, CLASSES)
  return _xent(logits), params, x, y


def _xent(logits_fn):
  def loss(params, x, y):
    logp = jax.nn.log_softmax(logits_fn(params, x))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

  return loss


def variants(loss: Callable[..., Any]) -> dict[str, Callable[..., Any]]:
  """name -> (params, x, y) -> (value, grad); the baseline first."""
  out = {BASELINE: jax.value_and_grad(loss)}
  for method in ("hvp", "double_backprop", "finite_difference"):
    out[method] = gnorm_jax.penalized_value_and_grad(loss, weight=WEIGHT, method=method)
  out["hvp, unsquared"] = gnorm_jax.penalized_value_and_grad(loss, weight=WEIGHT, squared=False)
  return out


def _gflops(fn, *args) -> float:
  """XLA's own count of floating-point operations per call (machine-independent)."""
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", -1)) / 1e9


def _goals(times: dict[str, float], flops: dict[str, float]) -> str:
  """The goals, measured (time) and in XLA's flop count (noise-free)."""
  t = {k: v / times[BASELINE] for k, v in times.items()}
  f = {k: v / flops[BASELINE] for k, v in flops.items()}
  mark = lambda ok: "met" if ok else "MISSED"
  return (
    "\n".join(
      [
        f"- hvp <= 3x: {t['hvp']:.2f}x ({mark(t['hvp'] <= 3)}); XLA flops {f['hvp']:.2f}x",
        f"- hvp <= double_backprop: {t['hvp'] / t['double_backprop']:.2f}x"
        f" ({mark(t['hvp'] <= t['double_backprop'])}); XLA flops"
        f" {f['hvp'] / f['double_backprop']:.2f}x",
        f"- finite_difference <= 2.2x: {t['finite_difference']:.2f}x"
        f" ({mark(t['finite_difference'] <= 2.2)}); XLA flops {f['finite_difference']:.2f}x",
      ]
    )
    + "\n"
  )


def bench(title: str, loss, params, x, y, rounds: int) -> str:
  fns = variants(loss)
  mem = {name: _harness.memory(fn, params, x, y) for name, fn in fns.items()}
  flops = {name: _gflops(fn, params, x, y) for name, fn in fns.items()}
  jitted = {name: jax.jit(fn) for name, fn in fns.items()}
  runners = {name: (lambda f=f: f(params, x, y)) for name, f in jitted.items()}
  times = _harness.time_variants(runners, rounds=rounds)
  n = sum(p.size for p in jax.tree.leaves(params))
  table = _harness.table(f"{title}, {n / 1e6:.2f}M params (jit, float32)", times, BASELINE, mem)
  return table + "\n" + _goals(times, flops)


def main() -> None:
  args = _harness.parse_args(__doc__.splitlines()[0])
  print(_harness.machine_line())
  rounds = args.rounds or (3 if args.quick else 7)
  key_mlp, key_cnn = jax.random.split(jax.random.key(0))
  if args.quick:
    mlp_size = dict(batch=64, width=256, depth=2)
    cnn_size = dict(batch=8, channels=8, size=16)
  else:
    mlp_size = dict(batch=256, width=1024, depth=3)
    cnn_size = dict(batch=32, channels=32, size=32)
  print()
  print(
    bench(
      f"MLP 784-{mlp_size['width']}x{mlp_size['depth']}-10, batch {mlp_size['batch']}",
      *mlp(key_mlp, **mlp_size),
      rounds,
    )
  )
  print(
    bench(
      f"conv net {cnn_size['channels']}/{2 * cnn_size['channels']} channels,"
      f" {cnn_size['size']}x{cnn_size['size']}x3, batch {cnn_size['batch']}",
      *convnet(key_cnn, **cnn_size),
      rounds,
    )
  )


if __name__ == "__main__":
  main()
