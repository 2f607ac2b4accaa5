"""Speed of gnorm_jax's norms against one fused flat pass and against optax.

    python benchmarks/norms.py [--quick] [--rounds N]

Prints, in one run (the method: docs/benchmarks.md):

1. Global norms of a transformer-like pytree (~38M float32 parameters in ~100
   leaves; ``--quick``: ~1M): ``tree_norm`` and ``optax.tree.norm`` against one
   fused ``sqrt(sum(x * x))`` over a single flat array of the same size — the
   fastest a norm can be. ``leaf_norms`` (one norm per leaf), the rare
   rescaled branch (a tree whose squares overflow float32) and a second copy
   of the flat pass (the noise floor) are timed too.
2. ``value_grad_and_norm`` against ``jax.value_and_grad`` on an MLP.
3. Compile time (``jit(f).lower(...).compile()``, caches cleared before each)
   on a dict of 1000 small float32 leaves (``--quick``: 300): ``tree_norm``
   (also its gradient, and on mixed float32/bfloat16/float16 leaves) against
   ``optax.tree.norm``, and a ``clip_by_norm`` + adam step against
   ``optax.clip_by_global_norm`` + adam (``per="leaf"`` against optax's
   per-leaf ``clip_by_block_rms``). One compile per variant, each gnorm_jax
   variant next to its optax baseline.

Goals: tree_norm <= 1.15x the flat pass; value_grad_and_norm <= 1.05x
value_and_grad; the 1000-leaf clip + adam step compiles within about 2x of
optax's.
"""

from __future__ import annotations

import os
import sys
import time

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


def small_leaves(n: int, dtypes=(jnp.float32,)) -> dict[str, jax.Array]:
  """``n`` small leaves of six shapes, (16,) to (64, 8), cycling through ``dtypes``."""
  shapes = [(16,), (32,), (64,), (16, 8), (64, 8), (8, 8, 4)]
  return {f"p{i:04d}": jnp.ones(shapes[i % len(shapes)], dtypes[i % len(dtypes)]) for i in range(n)}


def compile_seconds(fn, *args) -> float:
  """Seconds to trace, lower and compile ``jax.jit(fn)`` at ``args``, caches cleared first."""
  jax.clear_caches()
  t0 = time.perf_counter()
  jax.jit(fn).lower(*args).compile()
  return time.perf_counter() - t0


def update_step(tx: optax.GradientTransformation, params):
  return (lambda g, s: tx.update(g, s)), (params, tx.init(params))


def bench_compile(quick: bool) -> str:
  n = 300 if quick else 1000
  tree = small_leaves(n)
  adam = optax.adam(1e-3)
  mixed = small_leaves(n, (jnp.float32, jnp.bfloat16, jnp.float16))
  pairs = {
    "tree_norm (optax.tree.norm)": ((gnorm_jax.tree_norm, (tree,)), (optax.tree.norm, (tree,))),
    "jax.grad(tree_norm) (jax.grad(optax.tree.norm))": (
      (jax.grad(gnorm_jax.tree_norm), (tree,)),
      (jax.grad(optax.tree.norm), (tree,)),
    ),
    "tree_norm, float32/bfloat16/float16 leaves (optax.tree.norm)": (
      (gnorm_jax.tree_norm, (mixed,)),
      (optax.tree.norm, (mixed,)),
    ),
    "clip_by_norm + adam step (optax.clip_by_global_norm + adam)": (
      update_step(optax.chain(gnorm_jax.clip_by_norm(1.0), adam), tree),
      update_step(optax.chain(optax.clip_by_global_norm(1.0), adam), tree),
    ),
    'clip_by_norm(per="leaf") + adam step (optax.clip_by_block_rms + adam)': (
      update_step(optax.chain(gnorm_jax.clip_by_norm(1.0, per="leaf"), adam), tree),
      update_step(optax.chain(optax.clip_by_block_rms(1.0), adam), tree),
    ),
  }
  lines = [
    f"### Compile time (trace, lower and compile) of {n} small leaves",
    "",
    "| variant (baseline) | gnorm_jax s | baseline s | ratio |",
    "|---|---:|---:|---:|",
  ]
  for name, ((fn, args), (base_fn, base_args)) in pairs.items():
    ours, base = compile_seconds(fn, *args), compile_seconds(base_fn, *base_args)
    lines.append(f"| {name} | {ours:.2f} | {base:.2f} | {ours / base:.2f}x |")
  return "\n".join(lines) + "\n"


def main() -> None:
  args = _harness.parse_args(__doc__.splitlines()[0])
  rounds = args.rounds or (3 if args.quick else 7)
  print(_harness.machine_line(), flush=True)
  print()
  print(bench_tree_norms(args.quick, rounds), flush=True)
  print(bench_value_grad_and_norm(args.quick, rounds), flush=True)
  print(bench_compile(args.quick), flush=True)


if __name__ == "__main__":
  main()
