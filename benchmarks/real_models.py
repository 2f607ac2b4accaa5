"""Per-example clipping on real models: transformers' Flax GPT-2, BERT, ResNet, ViT, Llama, ...

    python benchmarks/real_models.py [--quick] [--rounds N] [--only NAME ...]

Rows (names for ``--only``): gpt2, bert, resnet, vit, llama, wav2vec2. Each model
is built from a small config of its public class in ``transformers`` 4.x
(``pip install "transformers<5"``; no download, random weights), at batch 32,
and given a single-example loss ``loss(params, x, y)`` that calls the model on
``x[None]``: next-token cross-entropy (GPT-2, Llama), classification
cross-entropy (BERT, ResNet in eval mode with BatchNorm's running averages
closed over, ViT), CTC (Wav2Vec2). Three variants, timed interleaved in one
process:

* plain: ``jax.grad`` of the batch mean of ``vmap(loss)`` (no clipping);
* gnorm_jax: ``gnorm_jax.clipped_grad(loss, max_norm=1.0, batch_argnums=(1, 2))``;
* vmap: ``jax.vmap(jax.grad(loss))``, then per-example global norms, clip
  weights ``min(1, C/‖gᵢ‖)`` and the weighted mean (the materializing baseline).

Each row also gives XLA's temp memory and flop count, the HLO census (kernels,
conditionals, CUDA ``case``/``while`` ops; ``_census.py``; and, where JAX's CUDA
plugin is installed and no GPU is attached, the kernels of XLA:GPU's program for
an H100, compiled here without a GPU), the route of every
parameter leaf from ``gnorm_jax.per_example_plan`` (ghost / direct /
materialized / unused, and how many are streamed), and the largest relative
difference between gnorm_jax's clipped gradient and the vmap baseline's (per
leaf, against the leaf's largest entry). A model that fails prints a FAILED
line and the others still run. The full run takes about 4-5 minutes on 2 CPU
cores, ``--quick`` about 3 (every row stays at B=32).
"""

from __future__ import annotations

import datetime
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import optax

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # _harness, and gnorm_jax from this checkout
from _census import census, gpu_census, use_compile_only_gpu  # noqa: E402

# Before anything starts a JAX backend (see _census.use_compile_only_gpu).
_XLA_GPU = use_compile_only_gpu()

from _harness import machine_line, memory, parse_args, table, time_variants  # noqa: E402

import gnorm_jax  # noqa: E402

CLIP = 1.0
BATCH = 32
ROUTES = ("ghost", "direct", "materialized", "unused")


def _transformers():
  warnings.filterwarnings("ignore", message=".*deprecated.*", category=FutureWarning)
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  try:
    import transformers
  except ImportError:
    sys.exit('real_models.py needs transformers 4.x: pip install "transformers<5"')
  transformers.logging.set_verbosity_error()
  return transformers


def _lm_loss(model):
  def loss(params, tokens, targets):
    logits = model(tokens[None], params=params, train=False).logits[0]
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  return loss


def _class_loss(model, params_key=None, frozen=None):
  def loss(params, x, label):
    full = params if params_key is None else {params_key: params, **frozen}
    logits = model(x[None], params=full, train=False).logits[0]
    return optax.softmax_cross_entropy_with_integer_labels(logits, label)

  return loss


def _tokens(key, vocab, seq):
  x = jax.random.randint(key, (BATCH, seq), 0, vocab)
  return x, jnp.roll(x, -1, axis=1)


def gpt2(tf, key, q):
  d, layers, seq, vocab = (64, 2, 32, 1024) if q else (128, 2, 64, 4096)
  cfg = tf.GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=d, n_layer=layers, n_head=4)
  model = tf.FlaxGPT2LMHeadModel(cfg, input_shape=(1, seq), seed=0)
  size = f"FlaxGPT2LMHeadModel, {layers} layers, d={d}, 4 heads, T={seq}, vocab {vocab}, tied head"
  return size, _lm_loss(model), model.params, _tokens(key, vocab, seq)


def llama(tf, key, q):
  d, layers, seq, vocab = (64, 2, 32, 1024) if q else (128, 2, 64, 4096)
  cfg = tf.LlamaConfig(
    vocab_size=vocab,
    hidden_size=d,
    intermediate_size=int(d * 8 / 3 + 15) // 16 * 16,
    num_hidden_layers=layers,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=seq,
  )
  model = tf.FlaxLlamaForCausalLM(cfg, input_shape=(1, seq), seed=0)
  size = (
    f"FlaxLlamaForCausalLM, {layers} layers, d={d}, 4 heads / 2 KV heads, T={seq}, vocab {vocab}"
  )
  return size, _lm_loss(model), model.params, _tokens(key, vocab, seq)


def bert(tf, key, q):
  d, layers, seq, vocab = (64, 2, 32, 1024) if q else (128, 2, 128, 4096)
  cfg = tf.BertConfig(
    vocab_size=vocab,
    hidden_size=d,
    num_hidden_layers=layers,
    num_attention_heads=4,
    intermediate_size=4 * d,
    max_position_embeddings=seq,
    num_labels=2,
  )
  model = tf.FlaxBertForSequenceClassification(cfg, input_shape=(1, seq), seed=0)
  k1, k2 = jax.random.split(key)
  x = jax.random.randint(k1, (BATCH, seq), 0, vocab)
  y = jax.random.randint(k2, (BATCH,), 0, 2)
  size = (
    f"FlaxBertForSequenceClassification, {layers} layers, d={d}, 4 heads, T={seq}, vocab {vocab}"
  )
  return size, _class_loss(model), model.params, (x, y)


def _images(key, px, labels, channels=3):
  k1, k2 = jax.random.split(key)
  x = jax.random.normal(k1, (BATCH, channels, px, px))  # NCHW, as transformers takes them
  return x, jax.random.randint(k2, (BATCH,), 0, labels)


def resnet(tf, key, q):
  px, widths = (32, [16, 32, 64, 128]) if q else (64, [32, 64, 128, 256])
  cfg = tf.ResNetConfig(
    embedding_size=widths[0],
    hidden_sizes=widths,
    depths=[1, 1, 1, 1],
    layer_type="basic",
    num_labels=10,
  )
  model = tf.FlaxResNetForImageClassification(cfg, input_shape=(1, px, px, 3), seed=0)
  # Eval mode: BatchNorm uses its running averages (closed over, not trained).
  params = model.params["params"]
  loss = _class_loss(model, "params", {"batch_stats": model.params["batch_stats"]})
  size = (
    f"FlaxResNetForImageClassification, basic blocks [1,1,1,1], widths {widths},"
    f" {px}x{px}x3, BatchNorm eval"
  )
  return size, loss, params, _images(key, px, 10)


def vit(tf, key, q):
  px, d = (16, 64) if q else (32, 128)
  cfg = tf.ViTConfig(
    image_size=px,
    patch_size=4,
    hidden_size=d,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=4 * d,
    num_labels=10,
  )
  model = tf.FlaxViTForImageClassification(cfg, input_shape=(1, px, px, 3), seed=0)
  size = (
    f"FlaxViTForImageClassification, 2 layers, d={d}, 4 heads, {px}x{px}x3,"
    f" patch 4 ({(px // 4) ** 2 + 1} tokens)"
  )
  return size, _class_loss(model), model.params, _images(key, px, 10)


def wav2vec2(tf, key, q):
  # The weight-normed grouped positional convolution costs the engine what
  # vmap(grad) costs (see docs/benchmarks.md): this row is kept small.
  samples, d = (800, 32) if q else (1600, 64)
  cfg = tf.Wav2Vec2Config(
    vocab_size=32,
    hidden_size=d,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=4 * d,
    conv_dim=(32, 32, 32),
    conv_stride=(5, 2, 2),
    conv_kernel=(10, 3, 3),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
    feat_extract_norm="layer",
    do_stable_layer_norm=True,  # the only variant transformers' Flax Wav2Vec2 supports
  )
  model = tf.FlaxWav2Vec2ForCTC(cfg, input_shape=(1, samples), seed=0)
  frames = int(model._get_feat_extract_output_lengths(samples))
  label_len = frames // 4
  k1, k2 = jax.random.split(key)
  x = jax.random.normal(k1, (BATCH, samples))
  y = jax.random.randint(k2, (BATCH, label_len), 1, 32)

  def loss(params, audio, labels):
    logits = model(audio[None], params=params, train=False).logits
    zeros = jnp.zeros(logits.shape[:2])
    return optax.ctc_loss(logits, zeros, labels[None], jnp.zeros(labels[None].shape))[0]

  size = (
    f"FlaxWav2Vec2ForCTC, conv 3x32 (layer norm), 2 layers, d={d}, {samples} samples"
    f" ({frames} frames), weight-normed conv positions, CTC"
  )
  return size, loss, model.params, (x, y)


MODELS = {
  "gpt2": gpt2,
  "bert": bert,
  "resnet": resnet,
  "vit": vit,
  "llama": llama,
  "wav2vec2": wav2vec2,
}


def variants(loss):
  """name -> function of (params, x, y)."""

  def plain(p, x, y):
    return jax.grad(lambda p: jnp.mean(jax.vmap(loss, in_axes=(None, 0, 0))(p, x, y)))(p)

  def vmap_clip(p, x, y):
    g = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(p, x, y)
    sq = sum(jnp.sum(jnp.square(l).reshape(l.shape[0], -1), axis=1) for l in jax.tree.leaves(g))
    norms = jnp.sqrt(sq)
    w = jnp.where(norms > CLIP, CLIP / jnp.where(norms > CLIP, norms, 1.0), 1.0) / x.shape[0]
    return jax.tree.map(lambda l: jnp.tensordot(w, l, axes=1), g)

  return {
    "plain batch-mean grad": plain,
    "gnorm_jax clipped_grad": gnorm_jax.clipped_grad(loss, max_norm=CLIP, batch_argnums=(1, 2)),
    "vmap(grad) + clip": vmap_clip,
  }


def max_rel_diff(got, ref):
  """Largest over leaves of max|got - ref| / max|ref|.

  A leaf's scale is floored at 1e-4 of the largest entry of the whole reference:
  some leaves' true gradient is zero and their computed one rounding noise (an
  attention key bias: softmax ignores a shift shared by all keys).
  """
  floor = 1e-4 * max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(ref))
  worst = 0.0
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    scale = max(float(jnp.max(jnp.abs(b))), floor)
    worst = max(worst, float(jnp.max(jnp.abs(a - b))) / scale)
  return worst


def route_mix(plan):
  counts = {r: sum(l.route == r for l in plan.leaves) for r in ROUTES}
  counts["streamed"] = sum(l.streamed for l in plan.leaves)
  gflop = {r: sum(l.flops or 0 for l in plan.leaves if l.route == r) / 1e9 for r in ROUTES[:2]}
  text = ", ".join(f"{n} {r}" for r, n in counts.items() if n)
  if plan.method != "engine":
    text += f" (runs {plan.method})"
  odd = [
    f"{l.path} {l.shape}: {l.why or l.route}" for l in plan.leaves if l.route == "materialized"
  ]
  return text, gflop, odd


def _gflop(fn, *args):
  """XLA's flop count of ``jax.jit(fn)`` at ``args``, in GFLOP (-1: not reported)."""
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return (cost or {}).get("flops", -1e9) / 1e9


def _seconds(call):
  t0 = time.perf_counter()
  jax.block_until_ready(call())
  return time.perf_counter() - t0


def run(name, builder, tf, key, rounds, quick):
  t_start = time.perf_counter()
  size, loss, params, (x, y) = builder(tf, key, quick)
  n_params = sum(l.size for l in jax.tree.leaves(params))
  fns = variants(loss)
  jitted = {n: jax.jit(f) for n, f in fns.items()}
  names = list(fns)
  plain, ours, vm = names

  plan = gnorm_jax.per_example_plan(loss, max_norm=CLIP, batch_argnums=(1, 2))(params, x, y)
  routes, gflop, odd = route_mix(plan)
  outs = {n: jax.block_until_ready(jitted[n](params, x, y)) for n in names}  # compiles
  rel = max_rel_diff(outs[ours], outs[vm])
  del outs
  # After the calls above, jax.jit(fn) of the same fn reuses their compilation.
  mem = {n: memory(fns[n], params, x, y) for n in names}
  cen = {n: census(fns[n], params, x, y) for n in names}
  h100 = {n: gpu_census(fns[n], params, x, y) for n in names} if _XLA_GPU else None
  flops = {n: _gflop(fns[n], params, x, y) for n in names}
  calls = {n: (lambda f=jitted[n]: f(params, x, y)) for n in names}
  # A row whose slowest variant takes over half a second gets one call per round.
  slowest = max(_seconds(calls[n]) for n in names)
  reps = 1 if slowest > 0.5 else 3
  times = time_variants(calls, rounds=rounds, reps=reps, warmup=0)

  print(f"{name}: {size}; B={BATCH}; {n_params / 1e6:.2f}M parameters in {len(plan.leaves)} leaves")
  print(table(f"{name}: B={BATCH}", times, plain, mem))
  print(
    f"- routes: {routes}; estimated GFLOP ghost {gflop['ghost']:.3g}, direct {gflop['direct']:.3g}"
  )
  for line in odd:
    print(f"  - materialized {line}")
  print("- XLA GFLOP plain / gnorm_jax / vmap: " + " / ".join(f"{flops[n]:.2f}" for n in names))
  for n in names:
    c = cen[n]
    print(
      f"- census {n}: kernels {c['kernels']}, conditionals {c['conditionals']},"
      f" whiles {c['whiles']}, cuda cases {c['cuda_cases']}, cuda whiles {c['cuda_whiles']}"
    )
  if h100 is not None:
    print(
      "- XLA:GPU (H100 target, compiled here) kernels plain / gnorm_jax / vmap: "
      + " / ".join(_gpu_kernels(h100[n]) for n in names)
      + "; conditionals / whiles gnorm_jax: "
      + f"{h100[ours]['conditionals']} / {h100[ours]['whiles']}"
    )
  print(f"- max relative difference gnorm_jax vs vmap clipped grad: {rel:.1e}")
  est = plan.estimates

  def added(variant):
    return times[variant] - times[plain]

  measured = "engine" if times[ours] <= times[vm] else "vmap"
  print(
    f"- cost model on {plan.platform}, what each adds to the plain gradient: engine"
    f" {est['engine'] * 1e3:.3g} ms, vmap {est['vmap'] * 1e3:.3g} ms (estimated engine/vmap"
    f" {est['engine'] / est['vmap']:.2f}, measured {added(ours) / added(vm):.2f}; whole calls"
    f" measured {times[ours] / times[vm]:.2f}); auto runs {plan.method}, faster measured:"
    f" {measured}"
  )
  print(f"- row took {time.perf_counter() - t_start:.0f} s\n", flush=True)
  return {
    "name": name,
    "times": times,
    "mem": mem,
    "census": cen,
    "h100": h100,
    "routes": routes,
    "rel": rel,
  }


def _gpu_kernels(c):
  """XLA:GPU's kernel count, † where every matrix product went to cuBLAS."""
  return f"{c['kernels']}{'†' if c['cublas'] else ''}"


def summary(rows):
  head = (
    "| model | plain ms | clipped_grad / plain | vmap / plain | temp MiB plain / ours / vmap"
    " | kernels plain / ours / vmap | XLA:GPU kernels plain / ours / vmap"
    " | conditionals ours / vmap | CUDA case / while ours"
    " | routes (leaves) | max rel. diff vs vmap |"
  )
  sep = "|---|---:|---:|---:|---|---|---|---|---|---|---:|"
  lines = [f"### Real models: summary, B={BATCH}", "", head, sep]
  for r in rows:
    t, m, c, g = r["times"], r["mem"], r["census"], r["h100"]
    plain, ours, vm = list(t)
    temps = " / ".join(f"{m[n]['temp'] / 2**20:.1f}" for n in (plain, ours, vm))
    lines.append(
      f"| {r['name']} | {t[plain]:.1f} | {t[ours] / t[plain]:.2f}x | {t[vm] / t[plain]:.2f}x"
      f" | {temps}"
      f" | {' / '.join(str(c[n]['kernels']) for n in (plain, ours, vm))}"
      f" | {' / '.join(_gpu_kernels(g[n]) for n in (plain, ours, vm)) if g else '—'}"
      f" | {c[ours]['conditionals']} / {c[vm]['conditionals']}"
      f" | {c[ours]['cuda_cases']} / {c[ours]['cuda_whiles']}"
      f" | {r['routes']} | {r['rel']:.1e} |"
    )
  return "\n".join(lines) + "\n"


def main():
  args = parse_args(__doc__)
  print(machine_line())
  print(f"date {datetime.date.today().isoformat()}")
  tf = _transformers()
  print(f"transformers {tf.__version__}, flax {__import__('flax').__version__}\n")
  rounds = args.rounds or (3 if args.quick else 5)
  key = jax.random.key(0)
  t0 = time.perf_counter()
  rows = []
  for name in args.only or MODELS:
    try:
      rows.append(run(name, MODELS[name], tf, key, rounds, args.quick))
    except Exception as e:  # noqa: BLE001 - one model's failure is a row, not the end of the run
      print(f"{name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}\n", flush=True)
  print(summary(rows))
  print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
  main()
