"""Per-example gradient norms and clipped gradients: gnorm_jax vs vmap vs jax_privacy.

    python benchmarks/per_example.py [--quick]

Models: an MLP 512-1024-1024-1024-10 at B=256, and a transformer block
(tied embedding, 4-head einsum attention, layer norms, GELU MLP) at T=128.
Baselines, in the same process: the plain batch-mean gradient (jax.grad of the
mean loss), vmap of jax.grad (materializes B gradients), and
jax_privacy.clipped_grad when it is installed (`pip install jax-privacy`).
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # _harness, and gnorm_jax from this checkout
from _harness import machine_line, memory, parse_args, table, time_variants  # noqa: E402

import gnorm_jax  # noqa: E402

CLIP = 1.0


def mlp(key, sizes, batch):
  keys = jax.random.split(key, len(sizes) + 1)
  params = [
      {
          "w": jax.random.normal(k, (m, n)) / jnp.sqrt(m),
          "b": jnp.zeros(n),
      }
      for k, m, n in zip(keys, sizes[:-1], sizes[1:])
  ]

  def loss(p, x, y):
    h = x
    for layer in p[:-1]:
      h = jax.nn.relu(h @ layer["w"] + layer["b"])
    logits = h @ p[-1]["w"] + p[-1]["b"]
    return -jax.nn.log_softmax(logits)[y]

  x = jax.random.normal(keys[-1], (batch, sizes[0]))
  y = jax.random.randint(keys[-1], (batch,), 0, sizes[-1])
  return loss, params, (x, y)


def transformer(key, batch, seq, d=256, heads=4, vocab=512):
  ks = iter(jax.random.split(key, 16))
  dh = d // heads

  def init(*shape):
    return jax.random.normal(next(ks), shape) / jnp.sqrt(shape[0])

  params = {
      "emb": init(vocab, d),
      "wq": init(d, heads, dh),
      "wk": init(d, heads, dh),
      "wv": init(d, heads, dh),
      "wo": init(heads, dh, d),
      "ln1": jnp.ones(d),
      "ln2": jnp.ones(d),
      "w1": init(d, 4 * d),
      "b1": jnp.zeros(4 * d),
      "w2": init(4 * d, d),
      "b2": jnp.zeros(d),
  }

  def layer_norm(x, scale):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + 1e-5) * scale

  def loss(p, tokens, targets):
    x = p["emb"][tokens]
    h = layer_norm(x, p["ln1"])
    q = jnp.einsum("td,dhk->thk", h, p["wq"])
    k = jnp.einsum("td,dhk->thk", h, p["wk"])
    v = jnp.einsum("td,dhk->thk", h, p["wv"])
    att = jax.nn.softmax(jnp.einsum("thk,shk->hts", q, k) / jnp.sqrt(dh), axis=-1)
    x = x + jnp.einsum("hts,shk,hkd->td", att, v, p["wo"])
    h = layer_norm(x, p["ln2"])
    x = x + jax.nn.gelu(h @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    logp = jax.nn.log_softmax(x @ p["emb"].T)
    return -jnp.mean(jnp.take_along_axis(logp, targets[:, None], axis=1))

  tokens = jax.random.randint(next(ks), (batch, seq), 0, vocab)
  targets = jax.random.randint(next(ks), (batch, seq), 0, vocab)
  return loss, params, (tokens, targets)


def variants(loss, params, batch):
  """name -> (jittable function of (params, *batch))."""

  def batch_mean_grad(p, *b):
    return jax.grad(lambda p: jnp.mean(jax.vmap(loss, in_axes=(None, 0, 0))(p, *b)))(p)

  out = {
      "plain batch-mean grad": batch_mean_grad,
      "vmap per-example norms": gnorm_jax.per_example_grad_norms(
          loss, batch_argnums=(1, 2), method="vmap"
      ),
      "gnorm_jax per_example_grad_norms": gnorm_jax.per_example_grad_norms(
          loss, batch_argnums=(1, 2)
      ),
      "vmap clipped grad": gnorm_jax.clipped_grad(
          loss, CLIP, batch_argnums=(1, 2), method="vmap"
      ),
      "gnorm_jax clipped_grad": gnorm_jax.clipped_grad(loss, CLIP, batch_argnums=(1, 2)),
  }
  try:
    from jax_privacy import clipping
  except ImportError:
    print("(jax_privacy not installed: `pip install jax-privacy` adds its column)")
  else:
    jp = clipping.clipped_grad(
        loss, l2_clip_norm=CLIP, batch_argnums=(1, 2), keep_batch_dim=False
    )
    out["jax_privacy clipped_grad"] = lambda p, *b: jax.tree.map(
        lambda g: g / b[0].shape[0], jp(p, *b)
    )
  return out


def run(title, loss, params, batch, rounds):
  fns = variants(loss, params, batch)
  jitted = {name: jax.jit(fn) for name, fn in fns.items()}
  # Agreement check before timing: the fast paths must equal the reference.
  ref = jitted["vmap per-example norms"](params, *batch)
  got = jitted["gnorm_jax per_example_grad_norms"](params, *batch)
  rel = float(jnp.max(jnp.abs(got - ref) / ref))
  print(f"{title}: max relative difference ghost vs vmap norms = {rel:.1e}")
  # Two interleaved groups. The materializing baselines allocate gigabytes,
  # and the call right after one frees them can be 10x slower while the OS
  # reclaims and re-faults memory, whichever variant it is: so the cost of
  # gnorm_jax against the plain gradient is timed without them in the rounds.
  cheap = ["plain batch-mean grad", "gnorm_jax per_example_grad_norms", "gnorm_jax clipped_grad"]
  calls = {name: (lambda f=f: f(params, *batch)) for name, f in jitted.items()}
  mem = {name: memory(fn, params, *batch) for name, fn in fns.items()}
  times = time_variants({n: calls[n] for n in cheap}, rounds=max(rounds, 5), reps=5, warmup=2)
  print(table(f"{title}: cost against the plain gradient", times, cheap[0], mem))
  heavy = cheap[1:] + [n for n in calls if n not in cheap]
  vs = time_variants({n: calls[n] for n in heavy}, rounds=rounds, reps=3, warmup=1)
  print(table(f"{title}: against materializing per-example gradients", vs, cheap[1], mem))

  def peak(m):
    return m["temp"] + m["output"]

  lines = [
      f"per-example norms speed-up over vmap: {vs['vmap per-example norms'] / vs[cheap[1]]:.1f}x"
      " (goal >= 30x)",
      f"clipped_grad / batch-mean grad: {times[cheap[2]] / times[cheap[0]]:.2f}x (goal <= 1.3x)",
      "XLA peak (temp+output) clipped_grad / batch-mean grad:"
      f" {peak(mem[cheap[2]]) / peak(mem[cheap[0]]):.2f}x (goal <= 1.5x)",
  ]
  if "jax_privacy clipped_grad" in vs:
    jp = "jax_privacy clipped_grad"
    lines.append(
        f"jax_privacy clipped_grad / gnorm_jax clipped_grad: time {vs[jp] / vs[cheap[2]]:.1f}x,"
        f" XLA peak memory {peak(mem[jp]) / peak(mem[cheap[2]]):.1f}x"
    )
  print("\n".join("- " + line for line in lines) + "\n")


def main():
  args = parse_args(__doc__)
  print(machine_line())
  key = jax.random.key(0)
  rounds = args.rounds or 3
  if args.quick:
    run("MLP 512-256-256-10, B=64", *mlp(key, [512, 256, 256, 10], 64), rounds)
    run("transformer block d=64, T=32, B=8", *transformer(key, 8, 32, d=64, vocab=128), rounds)
  else:
    run("MLP 512-1024-1024-1024-10, B=256", *mlp(key, [512, 1024, 1024, 1024, 10], 256), rounds)
    run("transformer block d=256, T=128, B=32", *transformer(key, 32, 128), rounds)


if __name__ == "__main__":
  main()
