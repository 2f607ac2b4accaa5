"""Public per-example API: per_example_grad_norms and clipped_grad."""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from gnorm_jax.clipping import clip_factor
from gnorm_jax.norms import accumulation_dtype, safe_sqrt, sum_of_squares, tree_norm
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

  def _ghost(self, args, max_norm, reduce):
    batch_size = self._check_call(args)
    single = [
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x)), a)
        if i in self.batch_argnums
        else a
        for i, a in enumerate(args)
    ]
    closed = jax.make_jaxpr(self.loss)(*single)
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
    arg_leaves = [jax.tree.leaves(a) for a in args]
    offsets = [sum(len(ls) for ls in arg_leaves[:i]) for i in range(len(args))]
    flat_args = [leaf for ls in arg_leaves for leaf in ls]
    batch_positions = [
        offsets[i] + j for i in self.batch_argnums for j in range(len(arg_leaves[i]))
    ]
    batch_flat = [flat_args[p] for p in batch_positions]
    param_positions = {}
    for i in self.argnums:
      for j in range(len(arg_leaves[i])):
        param_positions[offsets[i] + j] = len(param_positions)
    param_order = [flat_args[p] for p in param_positions]
    analysis = analyze(closed, param_positions)
    if self.method == "ghost" and analysis.fallback:
      params = self._params(args)
      paths = _param_paths(params[0] if self.single_params else params)
      why = "; ".join(f"{paths[l]}: {r}" for l, r in sorted(analysis.fallback.items()))
      raise ValueError(
          "method='ghost' needs every parameter leaf to enter the loss only through matrix"
          f" products, but these do not: {why}. Use method='auto' to compute exact"
          " per-example gradients for just those leaves."
      )

    def assemble(leaves, batch_vals):
      flat = list(flat_args)
      for pos, leaf in param_positions.items():
        flat[pos] = leaves[leaf]
      for pos, x in zip(batch_positions, batch_vals):
        flat[pos] = x
      return flat

    fb_grads, acts, cots = _engine.batched_pass(
        closed, analysis, assemble, param_order, batch_flat, batch_size
    )

    def per_use(leaf, tree):
      return [tree[u.key] for u in analysis.uses[leaf]]

    sq = jnp.zeros((batch_size,), jnp.float32)
    plans = {}
    for leaf in analysis.recognized:
      w = param_order[leaf]
      plans[leaf] = _engine.plan_leaf(analysis.uses[leaf], w.ndim)
      sq = sq + _engine.leaf_sq_norms(
          plans[leaf], analysis.uses[leaf], per_use(leaf, acts), per_use(leaf, cots), w
      )
    for leaf, g in fb_grads.items():
      sq = sq + jax.vmap(sum_of_squares)(g)
    norms = safe_sqrt(sq)
    if max_norm is None:
      return None, norms
    weights = clip_factor(norms, max_norm)
    leaves = []
    for leaf, w in enumerate(param_order):
      if leaf in fb_grads:
        leaves.append(_weighted_sum(weights, fb_grads[leaf]))
      elif analysis.uses[leaf]:
        uses = analysis.uses[leaf]
        leaves.append(
            _engine.weighted_leaf_grad(uses, per_use(leaf, acts), per_use(leaf, cots), weights, w)
        )
      else:
        leaves.append(jnp.zeros_like(w))
    return self._reduce(args, leaves, batch_size, reduce), norms

  def _reduce(self, args, leaves, batch_size, reduce):
    if reduce == "mean":
      leaves = [(g / batch_size).astype(g.dtype) for g in leaves]
    return self._unflatten_params(args, leaves)

  def __call__(self, args, max_norm=None, reduce="mean"):
    if self.method == "vmap":
      self._check_call(args)
      return self._vmap(args, max_norm, reduce)
    return self._ghost(args, max_norm, reduce)


def _weighted_sum(weights: jax.Array, per_example: jax.Array) -> jax.Array:
  """Σᵢ wᵢ·gᵢ over the leading axis, accumulated in at least float32."""
  acc = accumulation_dtype(per_example.dtype)
  return jnp.tensordot(weights.astype(acc), per_example.astype(acc), axes=1).astype(
      per_example.dtype
  )


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
