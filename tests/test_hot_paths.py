"""No conditional or loop on a GPU/TPU hot path (a structural check, not a timing one).

A ``cond``/``while`` whose predicate lives on the device makes XLA:GPU copy it to
the host and wait. gnorm_jax keeps its conditionals (free on CPU) in the CPU form
of :func:`gnorm_jax._numerics.by_platform`; the form lowered for GPU and TPU holds
none. Checked two ways for each hot path, on models without control flow of
their own: the jaxpr with every ``lax.platform_dependent`` resolved for
``cuda``, and ``stablehlo.case``/``while`` in the CUDA lowering (no GPU needed).
"""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gnorm_jax
from gnorm_jax import _numerics
from gnorm_jax._per_example._ghost import RESCUED

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))
from _census import census  # noqa: E402
from per_example_harness import METHODS, SCALES, all_models, case_runner, check_case  # noqa: E402


def _gpu_control_flow(jaxpr, platform="cuda") -> list[str]:
  """Names of the cond/while/scan equations that run when lowered for ``platform``."""
  found = []
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    platforms = eqn.params.get("branches_platforms")
    if name == "cond" and platforms is not None:  # lax.platform_dependent: one branch runs
      index = next(
        (i for i, p in enumerate(platforms) if p is not None and platform in p),
        next(i for i, p in enumerate(platforms) if p is None),
      )
      found += _gpu_control_flow(eqn.params["branches"][index].jaxpr, platform)
      continue
    if name in ("cond", "while", "scan"):
      found.append(name)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          found += _gpu_control_flow(sub, platform)
  return found


def assert_no_gpu_control_flow(fn, *args):
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  assert _gpu_control_flow(jaxpr) == [], "control flow in the GPU form of the jaxpr"
  assert _gpu_control_flow(jaxpr, "tpu") == [], "control flow in the TPU form of the jaxpr"
  counts = census(fn, *args)
  assert (counts["cuda_cases"], counts["cuda_whiles"]) == (0, 0), counts


TREE = {
  "w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4),
  "b": jnp.ones(4),
  "h": jnp.ones((2, 2), jnp.bfloat16),
}


def _step(tx):
  state = tx.init(TREE)
  return lambda g, s: tx.update(g, s, TREE), state


@pytest.mark.parametrize(
  "make",
  [
    pytest.param(lambda: (gnorm_jax.tree_norm, (TREE,)), id="tree_norm"),
    pytest.param(lambda: (lambda t: gnorm_jax.tree_norm(t, 1), (TREE,)), id="tree_norm-ord1"),
    pytest.param(lambda: (gnorm_jax.leaf_norms, (TREE,)), id="leaf_norms"),
    pytest.param(lambda: (jax.grad(gnorm_jax.tree_norm), (TREE,)), id="grad-of-tree_norm"),
    pytest.param(
      lambda: (gnorm_jax.grad_norm(lambda t: jnp.sum(jnp.sin(t["w"])) + jnp.sum(t["b"])), (TREE,)),
      id="grad_norm",
    ),
  ],
)
def test_norms_have_no_gpu_control_flow(make):
  fn, args = make()
  assert_no_gpu_control_flow(fn, *args)


@pytest.mark.parametrize(
  "tx",
  [
    pytest.param(
      lambda: optax.chain(gnorm_jax.clip_by_norm(1.0), optax.adam(1e-3)), id="clip+adam"
    ),
    pytest.param(lambda: gnorm_jax.clip_by_norm(1.0, per="leaf"), id="clip-per-leaf"),
    pytest.param(lambda: gnorm_jax.normalize(), id="normalize"),
    pytest.param(lambda: optax.chain(gnorm_jax.autoclip(), optax.adam(1e-3)), id="autoclip"),
    pytest.param(lambda: optax.chain(gnorm_jax.zclip(), optax.adam(1e-3)), id="zclip"),
    pytest.param(lambda: gnorm_jax.quantile_clip(), id="quantile_clip"),
    pytest.param(lambda: gnorm_jax.skip_spikes(optax.adam(1e-3)), id="skip_spikes"),
    pytest.param(
      lambda: gnorm_jax.dp_noise(1.0, noise_multiplier=1.0, batch_size=8, seed=0), id="dp_noise"
    ),
  ],
)
def test_optimizer_steps_have_no_gpu_control_flow(tx):
  step, state = _step(tx())
  assert_no_gpu_control_flow(step, TREE, state)


# Zoo models whose own loss has control flow (scans, loops, conds) are left out.
def _flow_free(models):
  out = []
  for name, build in models.items():
    loss, params, batch = build()
    one = jax.tree.map(lambda x: x[0], batch)
    if not _gpu_control_flow(jax.make_jaxpr(loss)(params, *one).jaxpr):
      out.append(name)
  return out


MODELS = all_models()
FLOW_FREE = _flow_free(MODELS)


def test_most_zoo_models_are_checked():
  assert len(FLOW_FREE) >= 40, FLOW_FREE


@pytest.mark.parametrize("name", FLOW_FREE)
def test_per_example_engine_has_no_gpu_control_flow(name):
  loss, params, batch = MODELS[name]()
  argnums = tuple(range(1, 1 + len(batch)))
  clipped = gnorm_jax.clipped_grad(loss, max_norm=1.0, batch_argnums=argnums, return_norms=True)
  assert_no_gpu_control_flow(clipped, params, *batch)


# ------------------------------------------------ the GPU/TPU form's rescue


@pytest.fixture
def gpu_form(monkeypatch):
  """Traces the GPU/TPU form of every :func:`~gnorm_jax._numerics.by_platform` here."""
  monkeypatch.setattr(_numerics, "_FORCE_FORM", "default")
  jax.clear_caches()
  yield
  jax.clear_caches()


def _cancelling(n, b=12, d=64):
  """A d×d weight at two positions with opposite cotangents, x₁ = x₀ + δ·noise, δ = 1e-4
  for the first ``n`` examples (their gradients nearly cancel) and 1 for the others. At two
  positions the ghost route is the cheaper one."""
  k = jax.random.split(jax.random.key(31), 4)
  w = jax.random.normal(k[0], (d, d)) / np.sqrt(d)
  x0, c = jax.random.normal(k[1], (b, d)), jax.random.normal(k[2], (b, d))
  delta = jnp.where(jnp.arange(b) < n, 1e-4, 1.0)[:, None]
  x1 = x0 + delta * jax.random.normal(k[3], (b, d))
  x, cc = jnp.stack([x0, x1], 1), jnp.stack([c, -c], 1)
  x0, x1, c = (np.asarray(a, np.float64) for a in (x0, x1, c))
  want = np.linalg.norm(x0 - x1, axis=1) * np.linalg.norm(c, axis=1)
  return (lambda w, x, cc: jnp.sum((x @ w) * cc)), w, (x, cc), want


@pytest.mark.parametrize("n", [1, RESCUED, RESCUED + 3, 12])
def test_gpu_form_recomputes_the_worst_and_bounds_the_rest(gpu_form, n):
  loss, w, batch, want = _cancelling(n)
  plan = gnorm_jax.per_example_plan(loss, batch_argnums=(1, 2))(w, *batch)
  assert [leaf.route for leaf in plan.leaves] == ["ghost"]
  norms = np.asarray(
    jax.jit(gnorm_jax.per_example_grad_norms(loss, batch_argnums=(1, 2)))(w, *batch)
  )
  # float32 loses ~eps/δ = 1e-3 of the cancelling gradients whatever the method.
  exact = np.isclose(norms, want, rtol=1e-2, atol=0)
  assert np.all(exact[n:]), "an example whose ghost sum is accurate is not exact"
  assert np.sum(exact[:n]) >= min(n, RESCUED), "fewer than RESCUED flagged examples recomputed"
  if n <= RESCUED:
    assert np.all(exact)
  # The others take the upper end of the error bound: never below the norm.
  assert np.all(norms[~exact] >= want[~exact])
  # So a clipped example's contribution stays within the threshold.
  max_norm = float(np.median(want))
  clipped = gnorm_jax.clipped_grad(
    loss, max_norm=max_norm, batch_argnums=(1, 2), reduce="sum", return_norms=True
  )
  _, reported = jax.jit(clipped)(w, *batch)
  weights = np.minimum(1.0, max_norm / np.asarray(reported, np.float64))
  assert np.all(weights * want <= max_norm * (1 + 1e-2))


def test_cpu_form_recomputes_every_flagged_example():
  loss, w, batch, want = _cancelling(12)
  norms = jax.jit(gnorm_jax.per_example_grad_norms(loss, batch_argnums=(1, 2)))(w, *batch)
  np.testing.assert_allclose(norms, want, rtol=1e-2)


# A cross-section of the zoo (dense, conv, attention, embeddings and tied heads,
# norms, scans streamed and not, a parameter-only value), checked against vmap(grad)
# at every loss scale in the GPU/TPU form; CI runs the whole zoo in the CPU form.
GPU_FORM_MODELS = [
  "linen_dense",
  "linen_cnn",
  "linen_conv2d_grouped",
  "linen_gpt_tied",
  "haiku_self_attention",
  "eqx_embedding",
  "gather_axis_tied_transposed",
  "nnx_layernorm",
  "linen_scan_remat_gpt",
  "linen_rnn_lstm",
  "concat_linen_vit_cls",
  "param_only_linen_weightnorm",
]
_GPU_CASE = case_runner({name: MODELS[name] for name in GPU_FORM_MODELS})


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", GPU_FORM_MODELS)
def test_gpu_form_matches_vmap_of_grad(gpu_form, name, method):
  for scale in SCALES:
    check_case(_GPU_CASE, name, method, scale)


def test_the_census_counts_real_control_flow_and_not_platform_selection():
  x = jnp.ones(3)
  cond = lambda x: jax.lax.cond(x.sum() > 0, jnp.sin, jnp.cos, x)
  loop = lambda x: jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] * 2), (0, x))
  chosen = lambda x: jax.lax.platform_dependent(x, cpu=cond, default=jnp.sin)
  assert census(cond, x)["cuda_cases"] == 1 and census(cond, x)["conditionals"] == 1
  assert census(loop, x)["cuda_whiles"] == 1 and census(loop, x)["whiles"] == 1
  counts = census(chosen, x)
  assert (counts["cuda_cases"], counts["cuda_whiles"], counts["conditionals"]) == (0, 0, 1)
  assert _gpu_control_flow(jax.make_jaxpr(chosen)(x).jaxpr) == []
  assert _gpu_control_flow(jax.make_jaxpr(cond)(x).jaxpr) == ["cond"]


def test_the_census_counts_the_kernels_of_a_conditionals_branches():
  x = jnp.ones((8, 8))

  def three_dots(x):
    return jnp.tanh(jnp.tanh(x @ x) @ x) @ x

  both = lambda x: jax.lax.cond(x.sum() > 0, three_dots, lambda x: three_dots(x.T), x)
  rare = lambda x: jax.lax.cond(x.sum() > 0, three_dots, lambda x: x, x)
  common = lambda x: jax.lax.cond(x.sum() > 0, lambda x: x, three_dots, x)
  plain = census(three_dots, x)["kernels"]
  assert plain >= 3
  # The conditional itself, its predicate, and its false (common) branch's kernels, as
  # rare_path lays them out.
  assert census(both, x)["kernels"] >= plain + 1
  assert census(rare, x)["kernels"] < plain
  assert census(common, x)["kernels"] >= plain + 1


def test_the_census_counts_a_conditional_with_many_outputs():
  # XLA writes a tuple of six or more as (..., /*index=5*/...): still one conditional.
  xs = [jnp.full((8, 8), float(i)) for i in range(8)]

  def dots(xs):
    return [jnp.tanh(x @ x) for x in xs]

  many = lambda xs: jax.lax.cond(xs[0].sum() > 0, lambda xs: xs, dots, xs)
  assert census(dots, xs)["kernels"] >= 8
  assert census(many, xs)["kernels"] >= census(dots, xs)["kernels"] + 1
