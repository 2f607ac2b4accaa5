"""Optax transformations that act on the norm: clipping and normalization."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def clip_factor(norm: jax.Array, max_norm: jax.Array | float) -> jax.Array:
  """The factor min(1, max_norm/norm): exactly 1 at or below the threshold.

  NaN-free and with finite derivatives at norm = 0 and max_norm = 0 (the
  division only happens where norm > max_norm ≥ 0, so norm > 0 there).
  """
  norm = jnp.asarray(norm)
  max_norm = jnp.asarray(max_norm, norm.dtype)
  over = norm > max_norm
  return jnp.where(over, max_norm / jnp.where(over, norm, 1), jnp.ones_like(norm))


def scale_tree(tree: Any, factor: Any) -> Any:
  """Multiplies every leaf by ``factor`` (a scalar, or a pytree prefix of scalars).

  The product is formed in the factor's dtype (at least float32) and cast back
  to the leaf's dtype, so float16 updates are scaled precisely. One elementwise
  op per leaf: XLA fuses it into whatever consumes the update next.
  """

  def scale(leaf, f):
    if leaf is None:
      return None
    return (leaf * f.astype(jnp.promote_types(leaf.dtype, f.dtype))).astype(leaf.dtype)

  if jax.tree_util.treedef_is_leaf(jax.tree.structure(factor)):
    factor = jnp.asarray(factor)
    return jax.tree.map(lambda x: scale(x, factor), tree)
  return jax.tree.map(scale, tree, factor, is_leaf=lambda x: x is None)
