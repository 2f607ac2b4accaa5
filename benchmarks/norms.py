"""Speed of gnorm_jax's norms against one fused flat pass and against optax.

    python benchmarks/norms.py [--quick] [--rounds N]

Prints, in one run (see shared BENCHMARKS.md for the method):

1. Global norms of a transformer-like pytree (~38M float32 parameters in ~100
   leaves; ``--quick``: ~1M): ``tree_norm`` and ``optax.tree.norm`` against one
   fused ``sqrt(sum(x * x))`` over a single flat array of the same size — the
   fastest a norm can be. ``leaf_norms`` (one norm per leaf), the rare
   rescaled branch (a tree whose squares overflow float32) and a second copy
   of the flat pass (the noise floor) are timed too.
2. ``value_grad_and_norm`` against ``jax.value_and_grad`` on an MLP.

Goals (issue 2): tree_norm <= 1.15x the flat pass; value_grad_and_norm <=
1.05x value_and_grad.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import optax

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # _harness, and gnorm_jax from this checkout
import _harness  # noqa: E402

import gnorm_jax  # noqa: E402


def flat_norm(x: jax.Array) -> jax.Array:
  """The reference: one fused pass over one array, no safety, no tree."""
  return jnp.sqrt(jnp.sum(x * x))


def bench_tree_norms(quick: bool, rounds: int) -> str:
  sizes = dict(d_model=128, n_layers=10, vocab=1024) if quick else {}
  tree = _harness.transformer_tree(jax.random.key(0), **sizes)
  leaves = jax.tree.leaves(tree)
  n = sum(x.size for x in leaves)
  flat = jnp.concatenate([x.ravel() for x in leaves])
  # Entries of 1e20 overflow a float32 sum of squares: the rare rescaled branch.
  huge = jax.tree.map(lambda x: x * 1e22, tree)
  fns = {
      "flat sqrt(sum(x*x))": (jax.jit(flat_norm), flat),
      # The same pass again, separately jitted: the noise floor of the ratios.
      "flat sqrt(sum(x*x)), repeated": (jax.jit(lambda x: flat_norm(x)), flat),
      "gnorm_jax.tree_norm": (jax.jit(gnorm_jax.tree_norm), tree),
      "optax.tree.norm": (jax.jit(optax.tree.norm), tree),
      "gnorm_jax.leaf_norms": (jax.jit(gnorm_jax.leaf_norms), tree),
      "gnorm_jax.tree_norm, rare branch (entries ~1e20)": (jax.jit(gnorm_jax.tree_norm), huge),
  }
  times = _harness.time_variants(
      {name: (lambda f=f, a=a: f(a)) for name, (f, a) in fns.items()}, rounds=rounds
  )
  mem = {name: _harness.memory(f, a) for name, (f, a) in fns.items()}
  title = f"Global norm of {n / 1e6:.1f}M float32 parameters in {len(leaves)} leaves"
  return _harness.table(title, times, "flat sqrt(sum(x*x))", mem)


def mlp_params(key: jax.Array, widths: list[int]) -> list[dict[str, jax.Array]]:
  keys = jax.random.split(key, len(widths) - 1)
  return [
      {"w": jax.random.normal(k, (m, n)) / jnp.sqrt(m), "b": jnp.zeros(n)}
      for k, m, n in zip(keys, widths[:-1], widths[1:])
  ]


def mlp_loss(params: list[dict[str, jax.Array]], x: jax.Array, y: jax.Array) -> jax.Array:
  for layer in params[:-1]:
    x = jax.nn.gelu(x @ layer["w"] + layer["b"])
  out = x @ params[-1]["w"] + params[-1]["b"]
  return jnp.mean((out - y) ** 2)


def bench_value_grad_and_norm(quick: bool, rounds: int) -> str:
  width, depth, batch = (256, 3, 64) if quick else (1024, 4, 256)
  widths = [width] * (depth + 1)
  params = mlp_params(jax.random.key(1), widths)
  kx, ky = jax.random.split(jax.random.key(2))
  x = jax.random.normal(kx, (batch, width))
  y = jax.random.normal(ky, (batch, width))
  n = sum(p.size for p in jax.tree.leaves(params))
  fns = {
      "jax.value_and_grad": jax.jit(jax.value_and_grad(mlp_loss)),
      "gnorm_jax.value_grad_and_norm": jax.jit(gnorm_jax.value_grad_and_norm(mlp_loss)),
  }
  times = _harness.time_variants(
      {name: (lambda f=f: f(params, x, y)) for name, f in fns.items()}, rounds=rounds
  )
  mem = {name: _harness.memory(f, params, x, y) for name, f in fns.items()}
  title = (
      f"value, grad and norm of an MLP loss ({depth} x {width}x{width} layers,"
      f" {n / 1e6:.1f}M params, batch {batch})"
  )
  return _harness.table(title, times, "jax.value_and_grad", mem)


def main() -> None:
  args = _harness.parse_args(__doc__.splitlines()[0])
  rounds = args.rounds or (3 if args.quick else 7)
  print(_harness.machine_line(), flush=True)
  print()
  print(bench_tree_norms(args.quick, rounds), flush=True)
  print(bench_value_grad_and_norm(args.quick, rounds), flush=True)


if __name__ == "__main__":
  main()
