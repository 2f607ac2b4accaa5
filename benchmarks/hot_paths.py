"""HLO census of the hot paths: conditionals, while loops and kernels, next to optax's.

    python benchmarks/hot_paths.py [--quick]

A conditional or while loop whose predicate lives on the device makes XLA:GPU
copy the predicate to the host and wait; each kernel costs a launch. For each
hot path this prints, from the optimized HLO on this machine's backend, the
conditionals, while loops and kernels (entry-level fusions and unfused ops) of

* the form compiled here (on CPU, the CPU form: its conditionals are free), and
* the GPU/TPU form compiled here (``lax.platform_dependent`` resolved as on a
  GPU), by XLA:CPU, whose fusion decisions differ from XLA:GPU's;
* where JAX's CUDA plugin is installed and no GPU is attached, XLA:GPU's own
  program for an NVIDIA H100, compiled here without a GPU (a compile-only
  device: ``pip install jax-cuda12-plugin==V jax-cuda12-pjrt==V
  nvidia-cuda-nvcc-cu12``, V this JAX's version; see ``_census.gpu_census``);

and ``stablehlo.case``/``while`` in the CUDA lowering (no GPU needed). The
baselines are optax's ``clip_by_global_norm`` + adam, adam alone, the plain
batch-mean gradient and ``vmap`` of ``jax.grad``.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

import jax
import jax.numpy as jnp
import optax

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
from _census import census, gpu_census, use_compile_only_gpu  # noqa: E402

# Before anything starts a JAX backend: without a GPU, the CUDA plugin's
# compile-only device needs jax_platforms="cpu".
_XLA_GPU = use_compile_only_gpu()

import _models  # noqa: E402
import per_example  # noqa: E402
from _harness import machine_line, parse_args  # noqa: E402

import gnorm_jax  # noqa: E402
from gnorm_jax import _numerics  # noqa: E402


def both_forms(fn, *args):
  """census() of the form compiled here and of the GPU/TPU form."""
  here = census(fn, *args)
  _numerics._FORCE_FORM = "default"
  jax.clear_caches()
  try:
    gpu = census(fn, *args)
  finally:
    _numerics._FORCE_FORM = None
    jax.clear_caches()
  return here, gpu


def row(name, fn, *args):
  here, gpu = both_forms(fn, *args)
  xla_gpu = "— | — | —"
  if _XLA_GPU:
    h100 = gpu_census(fn, *args)
    mark = "†" if h100["cublas"] else ""
    xla_gpu = f"{h100['conditionals']} | {h100['whiles']} | {h100['kernels']}{mark}"
  return (
    f"| {name} | {here['conditionals']} | {here['whiles']} | {here['kernels']} |"
    f" {gpu['conditionals']} | {gpu['whiles']} | {gpu['kernels']} | {xla_gpu} |"
    f" {here['cuda_cases']} | {here['cuda_whiles']} |"
  )


HEAD = (
  "| hot path | cond (here) | while (here) | kernels (here) | cond (GPU form) |"
  " while (GPU form) | kernels (GPU form) | cond (XLA:GPU) | while (XLA:GPU) |"
  " kernels (XLA:GPU) | CUDA case | CUDA while |\n"
  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def optimizer_rows(params):
  grads = jax.tree.map(lambda x: 0.01 * jnp.ones_like(x), params)
  txs = {
    "optax adam": optax.adam(1e-3),
    "optax clip_by_global_norm + adam": optax.chain(
      optax.clip_by_global_norm(1.0), optax.adam(1e-3)
    ),
    "gnorm_jax clip_by_norm + adam": optax.chain(gnorm_jax.clip_by_norm(1.0), optax.adam(1e-3)),
    "gnorm_jax clip_by_norm(per='leaf') + adam": optax.chain(
      gnorm_jax.clip_by_norm(1.0, per="leaf"), optax.adam(1e-3)
    ),
    "gnorm_jax zclip + adam": optax.chain(gnorm_jax.zclip(), optax.adam(1e-3)),
    "gnorm_jax autoclip + adam": optax.chain(gnorm_jax.autoclip(), optax.adam(1e-3)),
    "gnorm_jax quantile_clip + adam": optax.chain(gnorm_jax.quantile_clip(), optax.adam(1e-3)),
    "gnorm_jax skip_spikes(adam)": gnorm_jax.skip_spikes(optax.adam(1e-3)),
  }
  rows = [
    row("optax.global_norm", optax.global_norm, grads),
    row("gnorm_jax.tree_norm", gnorm_jax.tree_norm, grads),
  ]
  for name, tx in txs.items():
    state = tx.init(params)
    rows.append(row(name, lambda g, s, tx=tx: tx.update(g, s, params), grads, state))
  return rows


def per_example_rows(title, loss, params, batch):
  fns = per_example.variants(loss, params, batch)
  names = [
    "plain batch-mean grad",
    "vmap clipped grad",
    "gnorm_jax per_example_grad_norms",
    "gnorm_jax clipped_grad",
  ]
  return [row(f"{title}: {n}", fns[n], params, *batch) for n in names]


def dp_rows(loss, params, batch):
  b = batch[0].shape[0]
  clipped = gnorm_jax.clipped_grad(loss, max_norm=1.0, batch_argnums=(1, 2))
  tx = optax.chain(gnorm_jax.dp_noise(1.0, noise_multiplier=1.0, batch_size=b), optax.adam(1e-3))
  state = tx.init(params)

  def dp_step(p, s, *bt):
    updates, s = tx.update(clipped(p, *bt), s, p)
    return optax.apply_updates(p, updates), s

  adam = optax.adam(1e-3)
  adam_state = adam.init(params)

  def plain_step(p, s, *bt):
    g = jax.grad(lambda p: jnp.mean(jax.vmap(loss, in_axes=(None, 0, 0))(p, *bt)))(p)
    updates, s = adam.update(g, s, p)
    return optax.apply_updates(p, updates), s

  return [
    row("MLP: plain gradient + adam step", plain_step, params, adam_state, *batch),
    row("MLP: DP-SGD step (clipped_grad + dp_noise + adam)", dp_step, params, state, *batch),
  ]


def main():
  args = parse_args(__doc__)
  print(machine_line())
  print(
    f"XLA:GPU columns: an H100 target compiled here without a GPU, jax-cuda12-plugin"
    f" {importlib.metadata.version('jax-cuda12-plugin')}"
    if _XLA_GPU
    else "XLA:GPU columns: — (needs JAX's CUDA plugin and no attached GPU; see the docstring)"
  )
  key = jax.random.key(0)
  q = args.quick
  mlp = per_example.mlp(key, [64, 128, 128, 10] if q else [512, 1024, 1024, 1024, 10], 32)
  gpt = _models.gpt(
    key, batch=8 if q else 32, seq=32 if q else 64, d=64 if q else 256, heads=4, vocab=1000
  )
  cnn = _models.cnn(key, batch=8 if q else 64)
  rows = optimizer_rows(gpt[1])
  rows += per_example_rows("MLP", *mlp)
  rows += per_example_rows("flax GPT block", *gpt)
  rows += per_example_rows("flax CNN", *cnn)
  rows += dp_rows(*mlp)
  print("\n### Hot paths: conditionals, while loops, kernels\n")
  print(HEAD)
  print("\n".join(rows))


if __name__ == "__main__":
  main()
