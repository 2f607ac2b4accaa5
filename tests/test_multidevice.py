"""gnorm_jax on 8 simulated CPU devices: NamedSharding under jit, and shard_map.

The device count is fixed when jax starts, so the checks run in a child Python
whose environment sets ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
before jax is imported. The child compares every sharded result with the same
computation on one device, asserts, and prints its relative errors as JSON;
this test checks the child's return code and output.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Float32 sums added in another order (per-device partial sums, another CPU's
# vector width) differ by a few ulps per partial sum: ~sqrt(n)·eps relative for
# n-term sums, about 3e-6 for the 65536-entry sums below. 3e-5 leaves a margin
# of 10 while still catching any real disagreement (a wrong shard is O(1)).
RTOL = 3e-5

CHILD = textwrap.dedent(
  r'''
    import json
    import math

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import gnorm_jax

    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:  # older jax
      from jax.experimental.shard_map import shard_map

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "model"))
    one = jax.devices()[0]
    errors = {}


    def record(name, sharded, single):
      """Largest leaf-wise relative error max|s - r| / max|r| (for scalars |s - r|/|r|).

      Arrays (gradients, clipped updates) are compared normwise: the sharded
      matmuls add in another order, so entries near zero differ by a larger
      fraction of themselves while the leaf as a whole agrees to float32 rounding.
      """
      worst = 0.0
      for s, r in zip(jax.tree.leaves(sharded), jax.tree.leaves(single), strict=True):
        s, r = np.asarray(s, np.float64), np.asarray(r, np.float64)
        assert s.shape == r.shape, (name, s.shape, r.shape)
        scale = max(np.max(np.abs(r), initial=0.0), np.finfo(np.float32).tiny)
        worst = max(worst, float(np.max(np.abs(s - r), initial=0.0) / scale))
      errors[name] = worst  # the parent compares; one bad case must not hide the others


    rng = np.random.default_rng(0)
    params = {
        "w1": rng.normal(size=(16, 32)),
        "b1": np.zeros(32),
        "w2": rng.normal(size=(32, 8)),
        "huge": 1e20 * rng.normal(size=(8, 4)),   # squares overflow float32
        "tiny": 1e-30 * rng.normal(size=(4, 8)),  # squares underflow float32
        "half": rng.normal(size=(8, 8)),
    }
    params = {k: jnp.asarray(v, jnp.bfloat16 if k == "half" else jnp.float32)
              for k, v in params.items()}
    specs = {
        "w1": P("data", "model"), "b1": P("model"), "w2": P(None, "model"),
        "huge": P("data"), "tiny": P(None, "data"), "half": P("model", "data"),
    }
    x = jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)
    sharded = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, specs)
    local = jax.device_put(params, one)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ys = jax.device_put(y, NamedSharding(mesh, P("data")))
    assert len(sharded["w1"].sharding.device_set) == 8


    def loss(p, x, y):
      h = jnp.tanh(x @ p["w1"] + p["b1"])
      return jnp.mean((h @ p["w2"] - y) ** 2) + 1e-3 * jnp.sum(p["half"].astype(jnp.float32) ** 2)


    # ---- NamedSharding under jit: XLA partitions the reductions (GSPMD).
    for ord in (None, 1, math.inf):
      tag = {None: "2", 1: "1", math.inf: "inf"}[ord]
      f = jax.jit(lambda t, ord=ord: gnorm_jax.tree_norm(t, ord))
      record(f"named/tree_norm/ord={tag}", f(sharded), f(local))
      g = jax.jit(lambda t, ord=ord: gnorm_jax.leaf_norms(t, ord))
      record(f"named/leaf_norms/ord={tag}", g(sharded), g(local))
    gn = jax.jit(gnorm_jax.grad_norm(loss))
    record("named/grad_norm", gn(sharded, xs, ys), gn(local, x, y))
    vgn = jax.jit(gnorm_jax.value_grad_and_norm(loss))
    record("named/value_grad_and_norm", vgn(sharded, xs, ys), vgn(local, x, y))
    # The same gradient values, laid out like the params: isolates the clipping.
    grads = jax.jit(jax.grad(loss))(local, x, y)
    sharded_grads = jax.tree.map(
        lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), grads, specs)
    for per in ("global", "leaf"):
      tx = gnorm_jax.clip_by_norm(0.5, per=per)
      step = jax.jit(tx.update)
      record(f"named/clip_by_norm/{per}", step(sharded_grads, tx.init(sharded)),
             step(grads, tx.init(local)))
    # The update keeps the gradients' sharding.
    clipped, _ = jax.jit(gnorm_jax.clip_by_norm(0.5).update)(
        sharded_grads, gnorm_jax.clip_by_norm(0.5).init(sharded))
    assert clipped["w1"].sharding.is_equivalent_to(sharded_grads["w1"].sharding, 2)

    # ---- shard_map, data parallel: params replicated, the batch split 8 ways.
    dp = Mesh(np.asarray(jax.devices()), ("batch",))
    rep = jax.device_put(params, NamedSharding(dp, P()))
    bx = jax.device_put(x, NamedSharding(dp, P("batch")))
    by = jax.device_put(y, NamedSharding(dp, P("batch")))
    tx = gnorm_jax.clip_by_norm(0.5)


    def dp_step(p, x, y):
      mean_loss = lambda p: jax.lax.pmean(loss(p, x, y), "batch")
      # p is replicated (unvarying over "batch"), so jax sums the per-device
      # cotangents: g is already the full-batch gradient on every device.
      value, g, norm = gnorm_jax.value_grad_and_norm(mean_loss)(p)
      return {
          "value": value,
          "norm": norm,
          "grad_norm": gnorm_jax.grad_norm(mean_loss)(p),
          "tree_norm": gnorm_jax.tree_norm(g),
          "leaf_norms": gnorm_jax.leaf_norms(g),
          "clipped": tx.update(g, tx.init(p))[0],
      }


    out = jax.jit(shard_map(
        dp_step, mesh=dp, in_specs=(P(), P("batch"), P("batch")), out_specs=P()))(rep, bx, by)
    ref_value, ref_grads, ref_norm = jax.jit(gnorm_jax.value_grad_and_norm(loss))(local, x, y)
    record("shard_map/value", out["value"], ref_value)
    record("shard_map/value_grad_and_norm", out["norm"], ref_norm)
    record("shard_map/grad_norm", out["grad_norm"], ref_norm)
    record("shard_map/tree_norm", out["tree_norm"], ref_norm)
    record("shard_map/leaf_norms", out["leaf_norms"], gnorm_jax.leaf_norms(ref_grads))
    record("shard_map/clip_by_norm", out["clipped"], tx.update(ref_grads, tx.init(local))[0])

    # ---- shard_map, per-device values: each shard's norm equals the norm of the same slice on
    # one device.
    per_shard = jax.jit(shard_map(
        lambda w: gnorm_jax.tree_norm(w)[None], mesh=dp, in_specs=P("batch"), out_specs=P("batch")))
    w = jnp.asarray(1e20 * rng.normal(size=(64, 4)), jnp.float32)
    expected = jnp.stack([gnorm_jax.tree_norm(c) for c in np.split(np.asarray(w), 8)])
    record("shard_map/per_shard_tree_norm", per_shard(w), expected)

    # ---- DP-SGD, the batch sharded over devices (NamedSharding under jit): the
    # per-example norms, clipped sums and a whole noisy step equal one device's.
    dparams = {"w1": rng.normal(size=(16, 32)), "b1": np.zeros(32), "w2": rng.normal(size=(32, 8))}
    dparams = {k: jnp.asarray(v, jnp.float32) for k, v in dparams.items()}


    def example_loss(p, x, y):  # one example; x and y are both batched (batch_argnums)
      return jnp.sum((jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] - y) ** 2)


    mask = jnp.arange(32) < 29  # Poisson-style padding rows, split unevenly over devices
    dlocal = jax.device_put(dparams, one)
    drep = jax.device_put(dparams, NamedSharding(dp, P()))
    bmask = jax.device_put(mask, NamedSharding(dp, P("batch")))
    for reduce in ("mean", "sum"):
      cg = jax.jit(gnorm_jax.clipped_grad(
          example_loss, max_norm=1.0, batch_argnums=(1, 2), reduce=reduce, return_norms=True))
      record(f"named/clipped_grad/{reduce}",
             cg(drep, bx, by, mask=bmask), cg(dlocal, x, y, mask=mask))
    pen = jax.jit(gnorm_jax.per_example_grad_norms(example_loss, batch_argnums=(1, 2)))
    record("named/per_example_grad_norms", pen(drep, bx, by), pen(dlocal, x, y))
    clipped_sum = gnorm_jax.clipped_grad(
        example_loss, max_norm=1.0, batch_argnums=(1, 2), reduce="sum")
    dp_tx = optax.chain(gnorm_jax.dp_noise(1.0, 1.1, batch_size=29, seed=0), optax.adam(1e-2))


    def dp_sgd_step(p, state, x, y, mask):
      updates, state = dp_tx.update(clipped_sum(p, x, y, mask=mask), state, p)
      return optax.apply_updates(p, updates), state


    step = jax.jit(dp_sgd_step)
    p_s, s_s = drep, dp_tx.init(drep)
    p_1, s_1 = dlocal, dp_tx.init(dlocal)
    for _ in range(3):  # same seed: the same noise draws on 8 devices as on one
      p_s, s_s = step(p_s, s_s, bx, by, bmask)
      p_1, s_1 = step(p_1, s_1, x, y, mask)
    record("named/dp_sgd_step", p_s, p_1)

    # ---- shard_map: each device clips its own shard, the clipped sums are psum'd, and the
    # noise is added ONCE, after the psum (the same key on every device: one replicated draw).
    # check_vma=False: clipped_grad re-binds the loss's jaxpr without jax's varying-axes
    # annotations; the gradient of replicated p is then each device's own (no implicit psum).
    noise_tx = gnorm_jax.dp_noise(1.0, 1.1, batch_size=29, seed=0)


    def sharded_noisy_mean(p, x, y, mask):
      total = jax.lax.psum(clipped_sum(p, x, y, mask=mask), "batch")
      noisy, _ = noise_tx.update(total, noise_tx.init(p))
      return total, noisy


    total, noisy = jax.jit(shard_map(
        sharded_noisy_mean, mesh=dp, in_specs=(P(), P("batch"), P("batch"), P("batch")),
        out_specs=(P(), P()), check_vma=False))(drep, bx, by, bmask)
    ref_total = clipped_sum(dlocal, x, y, mask=mask)
    ref_noisy, _ = noise_tx.update(ref_total, noise_tx.init(dlocal))
    record("shard_map/clipped_sum", total, ref_total)
    record("shard_map/dp_noise_once", noisy, ref_noisy)
    # The noise itself, B·noisy - sum: one draw of std σC = 1.1 (8 draws would have std
    # sqrt(8)·1.1, or 8·1.1 with the same key on every device).
    noise = jax.tree.map(lambda a, t: 29 * a - t, noisy, total)
    record("shard_map/dp_noise_draw", noise,
           jax.tree.map(lambda a, t: 29 * a - t, ref_noisy, ref_total))
    noise_std = float(np.std(np.concatenate([np.ravel(a) for a in jax.tree.leaves(noise)])))
    assert 0.9 < noise_std / 1.1 < 1.1, noise_std

    # ---- the sharded-use examples: the one below, and docs/sharding.md's as written there.
    print("RESULTS", json.dumps(errors), flush=True)

    exec(%(example)r, {})
    exec(%(page)r, {})
    print("EXAMPLES OK")
    '''
)

SHARDED_EXAMPLE = textwrap.dedent(
  """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import gnorm_jax

    mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "model"))
    params = {"w": jnp.ones((1024, 512)), "b": jnp.ones(512)}
    params = jax.device_put(params, {"w": NamedSharding(mesh, P("data", "model")),
                                     "b": NamedSharding(mesh, P("model"))})
    # Sharded arrays under jit: XLA splits the sums of squares across devices
    # and adds them; the result is the same as on one device.
    norm = jax.jit(gnorm_jax.tree_norm)(params)
    assert abs(float(norm) - float(np.sqrt(1024 * 512 + 512))) < 1e-3

    # shard_map, data parallel: replicated params, the batch split over devices.
    dp = Mesh(np.asarray(jax.devices()), ("batch",))
    loss = lambda p, x: jnp.mean((x @ p["w"] + p["b"]) ** 2)

    def step(p, x):
      # p is the same on every device, so jax sums the per-device gradients
      # of the pmean'd loss: the full-batch gradient norm on every device.
      return gnorm_jax.grad_norm(lambda p: jax.lax.pmean(loss(p, x), "batch"))(p)

    x = jnp.linspace(-1, 1, 64 * 1024).reshape(64, 1024)
    norm = jax.jit(jax.shard_map(
        step, mesh=dp, in_specs=(P(), P("batch")), out_specs=P()))(params, x)
    single = gnorm_jax.grad_norm(loss)(jax.device_put(params, jax.devices()[0]), x)
    assert abs(float(norm) / float(single) - 1) < 1e-4  # float32, another summation order
    """
)


@pytest.fixture(scope="module")
def child_output(tmp_path_factory):
  script = tmp_path_factory.mktemp("multidevice") / "child.py"
  page = "".join(
    re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "sharding.md").read_text(), re.S)
  )
  script.write_text(CHILD % {"rtol": RTOL, "example": SHARDED_EXAMPLE, "page": page})
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
  proc = subprocess.run(
    [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
  )
  return proc


def test_child_ran_on_8_devices_without_error(child_output):
  assert child_output.returncode == 0, child_output.stdout + child_output.stderr


def test_sharded_examples_run(child_output):
  assert "EXAMPLES OK" in child_output.stdout, child_output.stdout + child_output.stderr


def _results(child_output):
  line = next(l for l in child_output.stdout.splitlines() if l.startswith("RESULTS "))
  return json.loads(line.removeprefix("RESULTS "))


@pytest.mark.parametrize(
  "name",
  [
    *(f"named/{fn}/ord={o}" for fn in ("tree_norm", "leaf_norms") for o in ("2", "1", "inf")),
    "named/grad_norm",
    "named/value_grad_and_norm",
    "named/clip_by_norm/global",
    "named/clip_by_norm/leaf",
    "shard_map/value",
    "shard_map/value_grad_and_norm",
    "shard_map/grad_norm",
    "shard_map/tree_norm",
    "shard_map/leaf_norms",
    "shard_map/clip_by_norm",
    "shard_map/per_shard_tree_norm",
    "named/clipped_grad/mean",
    "named/clipped_grad/sum",
    "named/per_example_grad_norms",
    "named/dp_sgd_step",
    "shard_map/clipped_sum",
    "shard_map/dp_noise_once",
    "shard_map/dp_noise_draw",
  ],
)
def test_sharded_equals_single_device(child_output, name):
  assert _results(child_output)[name] <= RTOL
