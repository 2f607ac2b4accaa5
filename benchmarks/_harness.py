"""Shared timing harness for gnorm_jax benchmarks (the method: docs/benchmarks.md).

Every variant is compiled and warmed up first, then variants are interleaved in
rounds (A B C, A B C, ...); each variant's time is the median over rounds of its
per-round median. Tables print ratios to a named baseline.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


def machine_line() -> str:
  devices = jax.devices()
  return (
    f"jax {jax.__version__} | backend {jax.default_backend()} |"
    f" {len(devices)} x {devices[0].device_kind} | os.cpu_count()={os.cpu_count()}"
  )


def parse_args(description: str) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer rounds")
  parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds")
  parser.add_argument("--only", nargs="*", default=None, help="run only these rows (by name)")
  return parser.parse_args()


def time_variants(
  variants: dict[str, Callable[[], Any]],
  *,
  rounds: int = 7,
  reps: int = 3,
  warmup: int = 2,
) -> dict[str, float]:
  """Median milliseconds per call of each zero-argument callable, interleaved.

  Each callable must run the (jitted) computation and return its outputs; they
  are blocked on. A callable that donates buffers must manage its own inputs.
  """
  for fn in variants.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  per_round: dict[str, list[float]] = {name: [] for name in variants}
  for _ in range(rounds):
    for name, fn in variants.items():
      samples = []
      for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        samples.append(time.perf_counter() - t0)
      per_round[name].append(statistics.median(samples))
  return {name: 1e3 * statistics.median(ts) for name, ts in per_round.items()}


def memory(fn: Callable[..., Any], *args: Any, **jit_kwargs: Any) -> dict[str, int]:
  """XLA's memory analysis of ``jax.jit(fn, **jit_kwargs)`` at ``args``."""
  compiled = jax.jit(fn, **jit_kwargs).lower(*args).compile()
  analysis = compiled.memory_analysis()
  if analysis is None:  # some backends do not report
    return {"temp": -1, "output": -1}
  return {
    "temp": int(analysis.temp_size_in_bytes),
    "output": int(analysis.output_size_in_bytes),
  }


def _mib(n: int) -> str:
  return "n/a" if n < 0 else f"{n / 2**20:.1f}"


def table(
  title: str,
  times_ms: dict[str, float],
  baseline: str,
  mem: dict[str, dict[str, int]] | None = None,
) -> str:
  """A markdown table: variant, median ms, ratio to baseline [, memory MiB]."""
  head = "| variant | median ms | ratio to " + baseline + " |"
  sep = "|---|---:|---:|"
  if mem:
    head += " XLA temp MiB | XLA output MiB |"
    sep += "---:|---:|"
  lines = [f"### {title}", "", head, sep]
  base = times_ms[baseline]
  for name, ms in times_ms.items():
    row = f"| {name} | {ms:.2f} | {ms / base:.2f}x |"
    if mem:
      m = mem.get(name, {"temp": -1, "output": -1})
      row += f" {_mib(m['temp'])} | {_mib(m['output'])} |"
    lines.append(row)
  return "\n".join(lines) + "\n"


def transformer_tree(
  key: jax.Array, *, d_model: int = 512, n_layers: int = 10, vocab: int = 12288
) -> dict[str, Any]:
  """Random float32 parameters shaped like a small transformer.

  Defaults: 10 layers x 10 leaves + embedding + final norm = 103 leaves,
  37.8M parameters.
  """
  shapes = {"embed": (vocab, d_model), "final_ln/scale": (d_model,), "final_ln/bias": (d_model,)}
  for i in range(n_layers):
    p = f"layer{i:02d}/"
    shapes.update(
      {
        p + "ln1": (2, d_model),
        p + "attn/w_qkv": (d_model, 3 * d_model),
        p + "attn/b_qkv": (3 * d_model,),
        p + "attn/w_out": (d_model, d_model),
        p + "attn/b_out": (d_model,),
        p + "ln2": (2, d_model),
        p + "mlp/w_in": (d_model, 4 * d_model),
        p + "mlp/b_in": (4 * d_model,),
        p + "mlp/w_out": (4 * d_model, d_model),
        p + "mlp/b_out": (d_model,),
      }
    )
  keys = jax.random.split(key, len(shapes))
  return {
    name: 0.02 * jax.random.normal(k, shape, jnp.float32)
    for k, (name, shape) in zip(keys, sorted(shapes.items()))
  }
