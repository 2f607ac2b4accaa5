"""Public per-example API: per_example_grad_norms and clipped_grad."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from gnorm_jax.clipping import clip_factor
from gnorm_jax.norms import tree_norm
from gnorm_jax.per_example import _engine
from gnorm_jax.per_example._analysis import analyze
from gnorm_jax.transforms import check_argnums

_METHODS = ("auto", "ghost", "vmap")
_REDUCTIONS = ("mean", "sum")


def _as_tuple(nums: int | Sequence[int]) -> tuple[int, ...]:
  return tuple(nums) if isinstance(nums, (tuple, list)) else (nums,)


class _PerExample:
  """Validated configuration shared by per_example_grad_norms and clipped_grad."""

  def __init__(self, loss, argnums, batch_argnums, method, caller):
    if not callable(loss):
      raise TypeError(f"{caller} expects the single-example loss as a callable, got {loss!r}.")
    check_argnums(argnums, "argnums")
    check_argnums(batch_argnums, "batch_argnums")
    if method not in _METHODS:
      raise ValueError(f"method must be one of {_METHODS}, got method={method!r}.")
    self.loss = loss
    self.argnums = _as_tuple(argnums)
    self.batch_argnums = _as_tuple(batch_argnums)
    overlap = set(self.argnums) & set(self.batch_argnums)
    if overlap:
      raise ValueError(
          f"argnums={argnums!r} and batch_argnums={batch_argnums!r} share {sorted(overlap)}:"
          " differentiated parameters are shared by all examples and carry no batch axis."
      )
    self.single_params = not isinstance(argnums, (tuple, list))
    self.method = method

  # ---------------------------------------------------------------- helpers

  def _check_call(self, args: tuple) -> int:
    needed = max(self.argnums + self.batch_argnums) + 1
    if len(args) < needed:
      raise TypeError(
          f"argnums={self.argnums} and batch_argnums={self.batch_argnums} need at least"
          f" {needed} positional arguments, got {len(args)}."
      )
    sizes = {
        (i, jax.tree_util.keystr(path)): jnp.shape(x)[0] if jnp.ndim(x) else None
        for i in self.batch_argnums
        for path, x in jax.tree_util.tree_flatten_with_path(args[i])[0]
    }
    distinct = set(sizes.values())
    if not sizes or None in distinct or len(distinct) != 1:
      raise ValueError(
          "every leaf of the batched arguments (batch_argnums) needs the same leading batch"
          f" axis; got leading sizes {sizes} (None: a scalar leaf)."
      )
    for i in self.argnums:
      for path, x in jax.tree_util.tree_flatten_with_path(args[i])[0]:
        if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
          raise TypeError(
              f"parameters must be floating point to be differentiated; argument {i} has a"
              f" leaf {jax.tree_util.keystr(path)} of dtype {jnp.result_type(x)}."
          )
    return distinct.pop()

  def _in_axes(self, args):
    return tuple(0 if i in self.batch_argnums else None for i in range(len(args)))

  def _params(self, args):
    return tuple(args[i] for i in self.argnums)

  def _unflatten_params(self, args, leaves):
    trees = self._params(args)
    treedef = jax.tree.structure(trees)
    out = jax.tree.unflatten(treedef, leaves)
    return out[0] if self.single_params else out

  # ---------------------------------------------------------------- methods

  def _vmap(self, args, max_norm, reduce):
    grad = jax.grad(self.loss, argnums=self.argnums)
    per_example = jax.vmap(grad, in_axes=self._in_axes(args))(*args)
    norms = jax.vmap(tree_norm)(per_example)
    if max_norm is None:
      return None, norms
    weights = clip_factor(norms, max_norm)
    leaves = [_weighted_sum(weights, g) for g in jax.tree.leaves(per_example)]
    return self._reduce(args, leaves, norms.shape[0], reduce), norms

  def _setup(self, args):
    """Traces the single-example loss and plans every parameter leaf."""
    batch_size = self._check_call(args)
    dynamic = sorted(set(self.argnums) | set(self.batch_argnums))
    # Arguments that are neither parameters nor batched are closed over as they
    # are (a Python bool stays a bool), as vmap of grad would pass them.

    def loss_of_dynamic(*dyn):
      full = list(args)
      for i, x in zip(dynamic, dyn):
        full[i] = x
      return self.loss(*full)

    single = [
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x)), args[i])
        if i in self.batch_argnums else args[i]
        for i in dynamic
    ]
    closed = jax.make_jaxpr(loss_of_dynamic)(*single)
    out_aval = closed.out_avals[0]
    if len(closed.out_avals) != 1 or out_aval.shape != () or not jnp.issubdtype(
        out_aval.dtype, jnp.floating
    ):
      raise TypeError(
          "loss must return one real scalar per example (it is the single-example loss,"
          f" called without the batch axis); got {closed.out_avals}."
      )
    # Flat argument positions (as make_jaxpr flattened them) of the batched
    # leaves and of the parameter leaves, numbered in jax.grad's output order.
    arg_leaves = {i: jax.tree.leaves(args[i]) for i in dynamic}
    offsets, n = {}, 0
    for i in dynamic:
      offsets[i], n = n, n + len(arg_leaves[i])
    flat_args = [leaf for i in dynamic for leaf in arg_leaves[i]]
    batch_positions = [offsets[i] + j for i in self.batch_argnums
                       for j in range(len(arg_leaves[i]))]
    param_positions = {}
    for i in self.argnums:
      for j in range(len(arg_leaves[i])):
        param_positions[offsets[i] + j] = len(param_positions)
    params_flat = [jnp.asarray(flat_args[p]) for p in param_positions]
    analysis = analyze(closed, param_positions)
    routes = {}
    for leaf, w in enumerate(params_flat):
      if leaf in analysis.fallback:
        routes[leaf] = _engine.LeafRoute(
            "materialized", None, batch_size * w.size * w.dtype.itemsize,
            analysis.fallback[leaf])
      else:
        routes[leaf] = _engine.plan_leaf(analysis.uses[leaf], w, batch_size)

    def assemble(leaves, batch_vals):
      flat = list(flat_args)
      for pos, leaf in param_positions.items():
        flat[pos] = leaves[leaf]
      for pos, x in zip(batch_positions, batch_vals):
        flat[pos] = x
      return flat

    return _Setup(closed, analysis, routes, assemble, params_flat,
                  [flat_args[p] for p in batch_positions], batch_size)

  def _ghost(self, args, max_norm, reduce):
    setup = self._setup(args)
    if self.method == "ghost" and setup.analysis.fallback:
      paths = self._paths(args)
      why = "; ".join(f"{paths[l]}: {r}" for l, r in sorted(setup.analysis.fallback.items()))
      raise ValueError(
          "method='ghost' needs a per-example rule for every parameter leaf, but these have"
          f" none: {why}. Use method='auto' to compute exact per-example gradients for just"
          " those leaves, and gnorm_jax.per_example_plan to see every leaf's route."
      )
    if self.method == "auto" and _all_materialized(setup.routes):
      return self._vmap(args, max_norm, reduce)
    clip = None if max_norm is None else (lambda norms: clip_factor(norms, max_norm))
    norms, sums, _ = _engine.run(
        setup.closed, setup.analysis, setup.routes, setup.assemble, setup.params_flat,
        setup.batch_flat, setup.batch_size, clip)
    if sums is None:
      return None, norms
    return self._reduce(args, sums, setup.batch_size, reduce), norms

  def _paths(self, args):
    params = self._params(args)
    return _param_paths(params[0] if self.single_params else params)

  def plan(self, args) -> "PerExamplePlan":
    setup = self._setup(args)
    paths = self._paths(args)
    leaves = []
    for leaf, w in enumerate(setup.params_flat):
      r = setup.routes[leaf]
      rules = tuple(dict.fromkeys(u.rule.name for u in setup.analysis.uses.get(leaf, [])))
      leaves.append(LeafPlan(paths[leaf], tuple(w.shape), rules, r.route, r.flops, r.bytes,
                             r.why))
    method = "vmap" if _all_materialized(setup.routes) else "ghost"
    return PerExamplePlan(tuple(leaves), setup.batch_size, method)

  def _reduce(self, args, leaves, batch_size, reduce):
    if reduce == "mean":
      leaves = [(g / batch_size).astype(g.dtype) for g in leaves]
    return self._unflatten_params(args, leaves)

  def __call__(self, args, max_norm=None, reduce="mean"):
    if self.method == "vmap":
      self._check_call(args)
      return self._vmap(args, max_norm, reduce)
    return self._ghost(args, max_norm, reduce)


_weighted_sum = _engine.weighted_sum


def _all_materialized(routes) -> bool:
  """True when no leaf has a rule: vmap of grad is then as cheap and simpler."""
  return all(r.route in ("materialized", "unused") for r in routes.values()) and any(
      r.route == "materialized" for r in routes.values())


@dataclasses.dataclass(frozen=True)
class _Setup:
  closed: Any
  analysis: Any
  routes: dict
  assemble: Callable
  params_flat: list
  batch_flat: list
  batch_size: int


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """The route of one parameter leaf.

  Attributes:
    path: the leaf's path in the parameters (``jax.tree_util.keystr``).
    shape: its shape.
    rules: the rules that recognized its uses, in order of first use.
    route: ``"ghost"`` (norm from Gram matrices of the layer's inputs and output
      cotangents, no per-example gradient), ``"direct"`` (per-example gradient
      formed from the recorded inputs and cotangents), ``"materialized"`` (no
      rule: exact per-example gradients, as vmap of grad) or ``"unused"``.
    flops: estimated flops of the route for the whole batch (None: not estimated,
      a materialized leaf costs what its share of vmap of grad costs).
    bytes: estimated extra memory of the route for the whole batch.
    why: for a materialized leaf, the use no rule recognized.
  """

  path: str
  shape: tuple
  rules: tuple
  route: str
  flops: int | None
  bytes: int
  why: str = ""


@dataclasses.dataclass(frozen=True)
class PerExamplePlan:
  """What :func:`per_example_grad_norms` and :func:`clipped_grad` will do.

  Attributes:
    leaves: one :class:`LeafPlan` per parameter leaf, in ``jax.tree.leaves`` order.
    batch_size: the batch size the plan was made for.
    method: what ``method="auto"`` runs: ``"ghost"`` (the engine) or ``"vmap"``
      (no leaf has a rule, so vmap of grad is as cheap).
  """

  leaves: tuple
  batch_size: int
  method: str

  def __str__(self) -> str:
    rows = [f"per-example plan (batch {self.batch_size}, auto runs {self.method!r})",
            "| leaf | shape | rules | route | GFLOP | MiB | note |",
            "|---|---|---|---|---:|---:|---|"]
    for l in self.leaves:
      gflop = "—" if l.flops is None else f"{l.flops / 1e9:.3g}"
      rows.append(f"| {l.path} | {l.shape} | {', '.join(l.rules) or '—'} | {l.route} |"
                  f" {gflop} | {l.bytes / 2**20:.3g} | {l.why} |")
    return "\n".join(rows)


def _param_paths(params) -> list[str]:
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def per_example_grad_norms(
    loss: Callable[..., jax.Array],
    *,
    argnums: int | Sequence[int] = 0,
    batch_argnums: int | Sequence[int] = 1,
    method: str = "auto",
) -> Callable[..., jax.Array]:
  r"""Returns a function computing the Euclidean norm of every example's gradient.

  .. math::
    (\theta, x_{1..B}) \mapsto \big(\|\nabla_\theta \ell(\theta, x_i)\|\big)_{i=1}^{B}

  ``loss(params, *example)`` is the loss of ONE example; the arguments at
  ``batch_argnums`` carry a leading batch axis. With ``method="auto"`` the loss
  is traced to a jaxpr and every parameter that enters only through matrix
  products (``dot_general``, possibly after transpose/reshape/cast, possibly
  used several times — tied or shared weights are summed before the norm) gets
  its per-example norm from the layer's inputs and output cotangents, without
  forming a per-example gradient (ghost clipping, Goodfellow 2015; mixed
  ghost/direct rule, Bu et al. 2022). All other leaves (biases, norm scales,
  embedding gathers, convolutions, anything inside scan/while/cond or a custom
  derivative) get exact per-example gradients of just those leaves in the same
  pass. Results equal ``vmap`` of ``jax.grad`` up to float rounding.

  Args:
    loss: the single-example loss, returning a real scalar.
    argnums: which argument(s) are the parameters (int or tuple).
    batch_argnums: which argument(s) carry the leading batch axis.
    method: ``"auto"``; ``"ghost"`` (the same, but raise a ValueError naming
      any leaf that needs per-example gradients); ``"vmap"`` (materialize all
      per-example gradients: the reference, memory B×P).

  Returns:
    A function ``(*args) -> norms`` with ``norms`` of shape ``[B]``, float32
    (float64 under x64).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import gnorm_jax
    >>> def loss(w, x, y):  # one example: x [3], y []
    ...   return (x @ w - y) ** 2
    >>> w = jnp.array([1.0, 0.0, 0.0])
    >>> x, y = jnp.eye(3), jnp.zeros(3)
    >>> norms = jax.jit(gnorm_jax.per_example_grad_norms(loss, batch_argnums=(1, 2)))(w, x, y)
    >>> [round(float(n), 4) for n in norms]
    [2.0, 0.0, 0.0]

  References:
    Goodfellow 2015, https://arxiv.org/abs/1510.01799; Li et al. 2021,
    https://arxiv.org/abs/2110.05679; Bu et al. 2022, "Scalable and Efficient
    Training of Large Convolutional Neural Networks with Differential Privacy".
  """
  spec = _PerExample(loss, argnums, batch_argnums, method, "per_example_grad_norms")

  @functools.wraps(loss)
  def norms_fn(*args):
    return spec(args)[1]

  return norms_fn


def clipped_grad(
    loss: Callable[..., jax.Array],
    max_norm: float | jax.Array,
    *,
    argnums: int | Sequence[int] = 0,
    batch_argnums: int | Sequence[int] = 1,
    method: str = "auto",
    reduce: str = "mean",
    return_norms: bool = False,
) -> Callable[..., Any]:
  r"""Returns a function computing the aggregate of per-example clipped gradients.

  .. math::
    \bar g = \frac{1}{B}\sum_{i=1}^{B} \min\!\Big(1, \frac{C}{\|g_i\|}\Big)\, g_i,
    \qquad g_i = \nabla_\theta \ell(\theta, x_i)

  (``reduce="sum"`` drops the 1/B). This is the core of DP-SGD (Abadi et al.
  2016); adding noise is the caller's. Per-example norms come from the same
  engine as :func:`per_example_grad_norms`; for the recognized matmul
  parameters the clipped sum is one weighted contraction of the recorded layer
  inputs and cotangents (book-keeping, Bu et al. 2023), so no second backward
  pass and no per-example gradient is formed. An example with ‖gᵢ‖ = 0 has
  weight 1 (nothing to clip), never NaN.

  Args:
    loss: the single-example loss, returning a real scalar.
    max_norm: the clipping threshold C ≥ 0 (a Python number is checked here; a
      traced value is used as it is).
    argnums: which argument(s) are the parameters (int or tuple).
    batch_argnums: which argument(s) carry the leading batch axis.
    method: ``"auto"``, ``"ghost"`` or ``"vmap"``, as in
      :func:`per_example_grad_norms`.
    reduce: ``"mean"`` or ``"sum"`` over the batch.
    return_norms: also return the per-example norms (before clipping).

  Returns:
    A function ``(*args) -> grads`` (``(grads, norms)`` with ``return_norms``);
    ``grads`` has the structure of the parameters (a tuple of trees when
    ``argnums`` is a tuple), as ``jax.grad`` would return.

  Raises:
    ValueError: ``max_norm`` is a negative or NaN Python number, or ``reduce``
      or ``method`` is not one of the accepted values.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import gnorm_jax
    >>> loss = lambda w, x: jnp.sum(x * w)  # gradient of example i is x_i
    >>> x = jnp.array([[3.0, 4.0], [0.3, 0.4]])  # norms 5 and 0.5
    >>> g = gnorm_jax.clipped_grad(loss, 1.0, reduce="sum")(jnp.zeros(2), x)
    >>> [round(float(v), 4) for v in g]  # 0.2·(3,4) + 1·(0.3,0.4)
    [0.9, 1.2]

  References:
    Abadi et al. 2016, https://arxiv.org/abs/1607.00133; Bu et al. 2023,
    https://arxiv.org/abs/2210.00038.
  """
  if isinstance(max_norm, (int, float)) and not (max_norm >= 0):
    raise ValueError(
        f"max_norm must be a non-negative number, got max_norm={max_norm!r}. Pass the"
        " clipping threshold C ≥ 0 (e.g. 1.0)."
    )
  if reduce not in _REDUCTIONS:
    raise ValueError(f"reduce must be one of {_REDUCTIONS}, got reduce={reduce!r}.")
  spec = _PerExample(loss, argnums, batch_argnums, method, "clipped_grad")

  @functools.wraps(loss)
  def clipped_fn(*args):
    grads, norms = spec(args, max_norm, reduce)
    return (grads, norms) if return_norms else grads

  return clipped_fn


def per_example_plan(
    loss: Callable[..., jax.Array],
    *,
    argnums: int | Sequence[int] = 0,
    batch_argnums: int | Sequence[int] = 1,
) -> Callable[..., PerExamplePlan]:
  """Returns a function showing how each parameter leaf's per-example norm is computed.

  The loss is traced (nothing is computed); for every parameter leaf the plan
  names the rules that recognized its uses, the route chosen by the cost model
  (``"ghost"``, ``"direct"``, ``"materialized"`` or ``"unused"``) and its
  estimated flops and extra memory for the batch given. ``print(plan)`` shows
  a table: a slow model's materialized leaves, and why, are in it.

  Args:
    loss: the single-example loss, as for :func:`per_example_grad_norms`.
    argnums: which argument(s) are the parameters (int or tuple).
    batch_argnums: which argument(s) carry the leading batch axis.

  Returns:
    A function ``(*args) -> PerExamplePlan`` taking the same arguments as the
    function :func:`per_example_grad_norms` returns.

  Examples:
    >>> import jax.numpy as jnp
    >>> import gnorm_jax
    >>> def loss(p, x):  # a dense layer with a bias, used at 3 positions
    ...   return jnp.sum(jnp.tanh(x @ p["w"] + p["b"]))
    >>> p = {"w": jnp.ones((4, 5)), "b": jnp.zeros(5)}
    >>> plan = gnorm_jax.per_example_plan(loss)(p, jnp.ones((8, 3, 4)))
    >>> [(l.path, l.rules, l.route) for l in plan.leaves]
    [("['b']", ('bias',), 'direct'), ("['w']", ('dot_general',), 'ghost')]
  """
  spec = _PerExample(loss, argnums, batch_argnums, "auto", "per_example_plan")

  def plan_fn(*args):
    return spec.plan(args)

  return plan_fn
