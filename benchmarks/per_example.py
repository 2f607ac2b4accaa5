"""Per-example gradient norms and clipped gradients: gnorm_jax vs vmap vs jax_privacy.

    python benchmarks/per_example.py [--quick] [--only NAME ...]

Models: an MLP 512-1024-1024-1024-10 at B=256; a hand-written transformer block
(tied embedding, einsum attention) at T=128; a flax GPT block (d=256, T=64,
B=32, vocab 8000, nn.Embed + attend); a flax CNN on 32×32×3 at B=64 (six
convolutions incl. strided, 1×1 and depthwise, GroupNorm, two Dense); flax
nn.RNN(LSTMCell(128)) at T=32, B=64; a 4-layer GPT written as
nn.scan(nn.remat(Block)) (d=256, T=64, B=32, vocab 1000); and, compiled only,
the memory of one GPT-2-small-shaped block (vocab 50257, d=768, 12 heads,
T=128, B=32).
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
import _models  # noqa: E402
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


KEEP = "gnorm_jax clipped_grad, keep_scan_factors"


def variants(loss, params, batch, scanned=False):
  """name -> (jittable function of (params, *batch)); for a rematerialized scan
  (``scanned``), also clipped_grad on its one-pass route."""

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
      loss, max_norm=CLIP, batch_argnums=(1, 2), method="vmap"
    ),
    "gnorm_jax clipped_grad": gnorm_jax.clipped_grad(loss, max_norm=CLIP, batch_argnums=(1, 2)),
  }
  if scanned:
    out[KEEP] = gnorm_jax.clipped_grad(
      loss, max_norm=CLIP, batch_argnums=(1, 2), keep_scan_factors=True
    )
  try:
    from jax_privacy import clipping
  except ImportError:
    print("(jax_privacy not installed: `pip install jax-privacy` adds its column)")
  else:
    jp = clipping.clipped_grad(loss, l2_clip_norm=CLIP, batch_argnums=(1, 2), keep_batch_dim=False)
    out["jax_privacy clipped_grad"] = lambda p, *b: jax.tree.map(
      lambda g: g / b[0].shape[0], jp(p, *b)
    )
  return out


def run(title, loss, params, batch, rounds, goal_time=1.3, goal_memory=1.5, scanned=False):
  fns = variants(loss, params, batch, scanned)
  jitted = {name: jax.jit(fn) for name, fn in fns.items()}
  # Agreement check before timing: the fast paths must equal the reference.
  ref = jitted["vmap per-example norms"](params, *batch)
  got = jitted["gnorm_jax per_example_grad_norms"](params, *batch)
  rel = float(jnp.max(jnp.abs(got - ref) / ref))
  plan = gnorm_jax.per_example_plan(loss, batch_argnums=(1, 2))(params, *batch)
  routes = {r: sum(l.route == r for l in plan.leaves) for r in ("ghost", "direct", "materialized")}
  print(f"{title}: max relative difference ghost vs vmap norms = {rel:.1e}; leaf routes {routes}")
  # Two interleaved groups. The materializing baselines allocate gigabytes,
  # and the call right after one frees them can be 10x slower while the OS
  # reclaims and re-faults memory, whichever variant it is: so the cost of
  # gnorm_jax against the plain gradient is timed without them in the rounds.
  cheap = ["plain batch-mean grad", "gnorm_jax per_example_grad_norms", "gnorm_jax clipped_grad"]
  cheap += [KEEP] if scanned else []
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
    f"per-example norms speed-up over vmap: {vs['vmap per-example norms'] / vs[cheap[1]]:.1f}x",
    f"clipped_grad / batch-mean grad: {times[cheap[2]] / times[cheap[0]]:.2f}x"
    f" (goal <= {goal_time}x)",
    f"XLA temp memory clipped_grad / batch-mean grad:"
    f" {mem[cheap[2]]['temp'] / max(mem[cheap[0]]['temp'], 1):.2f}x (goal <= {goal_memory}x);"
    f" vmap clipped grad {mem['vmap clipped grad']['temp'] / max(mem[cheap[0]]['temp'], 1):.2f}x",
  ]
  if scanned:
    lines.append(
      f"clipped_grad(keep_scan_factors=True) / batch-mean grad:"
      f" {times[KEEP] / times[cheap[0]]:.2f}x, XLA temp"
      f" {mem[KEEP]['temp'] / max(mem[cheap[0]]['temp'], 1):.2f}x"
    )
  if "jax_privacy clipped_grad" in vs:
    jp = "jax_privacy clipped_grad"
    lines.append(
      f"jax_privacy clipped_grad / gnorm_jax clipped_grad: time {vs[jp] / vs[cheap[2]]:.1f}x,"
      f" XLA peak memory {peak(mem[jp]) / peak(mem[cheap[2]]):.1f}x"
    )
  print("\n".join("- " + line for line in lines) + "\n")


def memory_only(title, loss, params, batch, goal):
  """Compiles (never runs) the plain gradient, clipped_grad and vmap: XLA's temp memory."""
  fns = variants(loss, params, batch)
  names = ["plain batch-mean grad", "gnorm_jax clipped_grad", "vmap clipped grad"]
  mem = {n: memory(fns[n], params, *batch) for n in names}
  rows = [
    f"### {title}: compiled only (XLA memory_analysis)",
    "",
    "| variant | temp MiB | ratio to plain |",
    "|---|---:|---:|",
  ]
  base = mem[names[0]]["temp"]
  for n in names:
    rows.append(f"| {n} | {mem[n]['temp'] / 2**20:.0f} | {mem[n]['temp'] / base:.2f}x |")
  print("\n".join(rows))
  print(
    f"- temp memory clipped_grad / plain: {mem[names[1]]['temp'] / base:.2f}x (goal <= {goal}x)\n"
  )


def main():
  args = parse_args(__doc__)
  print(machine_line())
  key = jax.random.key(0)
  rounds = args.rounds or 3
  q = args.quick
  rows = {
    "mlp": lambda: run(
      "MLP 512-1024-1024-1024-10, B=256" if not q else "MLP 512-256-256-10, B=64",
      *mlp(
        key, [512, 1024, 1024, 1024, 10] if not q else [512, 256, 256, 10], 256 if not q else 64
      ),
      rounds,
      goal_time=1.1,
    ),
    "transformer": lambda: run(
      "transformer block d=256, T=128, B=32" if not q else "transformer block d=64, T=32, B=8",
      *(transformer(key, 32, 128) if not q else transformer(key, 8, 32, d=64, vocab=128)),
      rounds,
      goal_time=1.2,
    ),
    "gpt": lambda: run(
      "flax GPT block d=256, T=64, B=32, vocab 8000, tied" if not q else "flax GPT block small",
      *_models.gpt(
        key,
        batch=32 if not q else 8,
        seq=64 if not q else 16,
        d=256 if not q else 32,
        heads=4,
        vocab=8000 if not q else 500,
      ),
      rounds,
      goal_time=1.2,
    ),
    "cnn": lambda: run(
      f"flax CNN 32x32x3, B={64 if not q else 8}",
      *_models.cnn(key, batch=64 if not q else 8),
      rounds,
      goal_time=1.2,
      goal_memory=2.0,
    ),
    "lstm": lambda: run(
      "flax nn.RNN(LSTMCell(128)), T=32, B=64" if not q else "flax LSTM small",
      *_models.lstm(
        key, batch=64 if not q else 8, seq=32 if not q else 8, hidden=128 if not q else 16
      ),
      rounds,
      goal_time=1.2,
    ),
    "scanned_gpt": lambda: run(
      "4-layer GPT as nn.scan(nn.remat(Block)), d=256, T=64, B=32, vocab 1000"
      if not q
      else "scanned GPT small",
      *_models.gpt(
        key,
        batch=32 if not q else 8,
        seq=64 if not q else 16,
        d=256 if not q else 32,
        heads=4,
        vocab=1000 if not q else 100,
        layers=4 if not q else 2,
        scanned=True,
      ),
      rounds,
      goal_time=1.3,
      goal_memory=2.0,
      scanned=True,
    ),
    "gpt2_memory": lambda: memory_only(
      "GPT-2-small-shaped block (vocab 50257, d=768, 12 heads, T=128, B=32, tied)"
      if not q
      else "GPT-2-shaped block, small",
      *_models.gpt(
        key,
        batch=32 if not q else 4,
        seq=128 if not q else 16,
        d=768 if not q else 64,
        heads=12 if not q else 4,
        vocab=50257 if not q else 5000,
      ),
      goal=1.3,
    ),
  }
  for name in args.only or rows:
    rows[name]()


if __name__ == "__main__":
  main()
