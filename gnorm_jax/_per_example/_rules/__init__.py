"""The rule registry: one module per kind of layer.

A *use* is an equation of the single-example loss's jaxpr where a value
derived from ONE parameter leaf (through a chain of unary ops: layout changes,
casts, scalar factors) meets values that depend on the example. A rule
recognizes a use and says how the per-example gradient of that use's
parameter operand factorizes. The engine needs nothing else from it:

* the *direct* route — the per-example gradient of the leaf formed from the
  recorded operands and output cotangent (a vjp of the one equation), exact
  for any rule;
* the *ghost* route — when the gradient is a sum over positions t of outer
  products P_t ⊗ Q_t over two groups of the leaf's axes, its squared norm is
  Σ_ts ⟨P_t, P_s⟩⟨Q_t, Q_s⟩ (Goodfellow 2015; Li et al. 2021), with no
  per-example copy of the leaf. Uses of one leaf whose groups agree stack
  along positions, so cross terms between uses (a tied embedding's lookup and
  output projection) are part of the norm;
* the *book-keeping* clipped sum Σᵢ wᵢ gᵢ — one contraction of the ghost
  factors with the weights (Bu et al. 2023), or a weighted sum of the direct
  route's per-example gradients.

Adding a layer kind is one module here that calls :func:`register`: every
module of this package is imported the first time the engine looks for a rule
(:func:`load_rules`). README.md beside this file is the guide for rule
authors: what a use is and what a rule is given (the :class:`Eqn` fields a
match may read, the batched operands, cotangent, ``perm`` and ``coef``), what
it returns (a :class:`Verdict`; :class:`Ghost` factors in the [B, H, T, K]
layout, :class:`Dense` or :class:`Index`, and why P holds the smaller leaf
axis; a :class:`FlopsFn`), when each route is exact, and a worked example: a
new rule file with its test module in tests/rules/ on the shared harness.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
from collections.abc import Sequence
from typing import Protocol

import jax
import jax.numpy as jnp

from gnorm_jax._per_example._jaxpr import Eqn

# Chain ops that only permute, cast or scale the parameter: the ghost route
# sees through them. Others in CHAIN_OPS are exact for the direct route only.
LAYOUT_OPS = frozenset({"transpose", "convert_element_type", "copy", "copy_p", "reduce_precision"})
SCALAR_OPS = frozenset({"neg", "mul", "div"})  # with a literal scalar operand
CHAIN_OPS = (
  LAYOUT_OPS
  | SCALAR_OPS
  | frozenset(
    {
      "reshape",
      "squeeze",
      "expand_dims",
      "broadcast_in_dim",
      "add",
      "sub",
      "integer_pow",
      "exp",
      "log",
      "tanh",
      "logistic",
      "sqrt",
      "rsqrt",
      "abs",
      "square",
      # parts of the parameter (fused gate kernels split, W[:, :k], a flipped kernel)
      "slice",
      "split",
      "dynamic_slice",
      "rev",
      "pad",
    }
  )
)


@dataclasses.dataclass(frozen=True)
class Use:
  """One recognized use of a parameter leaf.

  ``eqn`` is the equation; ``operand`` the index of its parameter-derived input.
  The use may sit inside scan bodies: ``scopes`` lists them from the outside in,
  each ``("const", length)`` (the value enters every step whole: the steps are
  extra positions) or ``("xs", length)`` (the value is scanned over: step l
  sees slice l, its own part of the leaf). ``chain`` holds one tuple of
  equations per level: applied at the top, then inside each scope.
  """

  key: tuple  # path of equation indices from the top-level jaxpr
  leaf: int
  chain: tuple  # len(scopes) + 1 tuples of equations
  operand: int
  eqn: Eqn
  rule: "Rule"
  scopes: tuple = ()

  @property
  def steps(self) -> tuple:
    return tuple(n for _, n in self.scopes)

  @property
  def out_aval(self):
    return self.eqn.out_avals[0]

  def operand_aval(self, i: int):
    return self.eqn.in_avals[i]


@dataclasses.dataclass(frozen=True)
class Dense:
  """Factor values [B, H, T, K] (kind "act" or "cot")."""

  value: jax.Array
  kind: str


@dataclasses.dataclass(frozen=True)
class Index:
  """One-hot factor: row ``index`` [B, H, T] of a size-``size`` axis, where ``valid``."""

  index: jax.Array
  valid: jax.Array
  size: int
  kind: str = "index"


@dataclasses.dataclass(frozen=True)
class Ghost:
  """A use's per-example gradient as Σ_t P_t ⊗ Q_t over leaf axis groups.

  ``layout`` = (head axes, P axes, Q axes) of the leaf, each sorted; the P group
  is the one holding the smaller leaf axis, so uses with equal layouts stack.
  """

  layout: tuple
  p: Dense | Index
  q: Dense


@dataclasses.dataclass(frozen=True)
class Verdict:
  """A rule's answer to "do you handle this use?": ``ok``, or ``why`` not."""

  ok: bool
  why: str = ""


ACCEPT = Verdict(True)


def refuse(why: str) -> Verdict:
  """A :class:`Verdict` declining a use, saying why (shown by ``per_example_plan``)."""
  return Verdict(False, why)


class MatchFn(Protocol):
  """Whether a rule handles the parameter-derived input ``operand`` of ``eqn``.

  Reads only ``eqn.name``, ``eqn.params`` (the primitive's own parameters)
  and ``eqn.in_avals``/``eqn.out_avals``.
  """

  def __call__(self, eqn: Eqn, operand: int) -> Verdict: ...


class GhostFn(Protocol):
  """The use's per-example gradient as ghost factors, or None (no ghost route).

  Args:
    use: the matched use.
    operands: the equation's inputs, batched [B, ...] (``B`` examples, or examples
      times scan steps); the parameter's slot, and slots of rules that do not
      record, are None.
    cot: the output cotangent, batched [B, ...].
    perm: the leaf axis of each axis of the parameter operand (the chain's
      transposes).
    coef: the chain's scalar factor (multiply the cotangent factor by it).
  """

  def __call__(
    self,
    use: Use,
    operands: Sequence[jax.Array | None],
    cot: jax.Array,
    perm: Sequence[int],
    coef: complex,
  ) -> Ghost | None: ...


class FlopsFn(Protocol):
  """Per-example flops of the direct route (the vjp of the one equation)."""

  def __call__(self, use: Use) -> int: ...


@dataclasses.dataclass(frozen=True)
class Rule:
  """A kind of layer.

  Attributes:
    name: shown by ``per_example_plan``.
    primitives: normalized primitive names it may match (``Eqn.name``).
    match: a :class:`MatchFn`.
    ghost: a :class:`GhostFn`, or None when the rule has no ghost route (the
      direct route, a vjp of the equation, is always exact).
    direct_flops: a :class:`FlopsFn`.
    records: whether the engine must record the other operands (a bias's
      gradient does not depend on what it is added to).
  """

  name: str
  primitives: tuple[str, ...]
  match: MatchFn
  ghost: GhostFn | None
  direct_flops: FlopsFn
  records: bool = True


_REGISTRY: dict[str, list[Rule]] = {}


def register(rule: Rule) -> Rule:
  for p in rule.primitives:
    _REGISTRY.setdefault(p, []).append(rule)
  return rule


def find_rule(eqn: Eqn, operand: int) -> tuple[Rule | None, str]:
  """The rule handling input ``operand`` of ``eqn``, or (None, why not)."""
  load_rules()
  whys = []
  for rule in _REGISTRY.get(eqn.name, ()):
    verdict = rule.match(eqn, operand)
    if verdict.ok:
      return rule, ""
    whys.append(verdict.why)
  return None, f"used by {eqn.name}" + (f" ({'; '.join(whys)})" if whys else "")


def size(shape) -> int:
  return math.prod(shape)


def layout_of(groups: dict[str, tuple]) -> tuple[tuple, bool]:
  """(layout, swapped): orders the two factor groups so P holds the smaller axis."""
  first, second = groups["first"], groups["second"]
  lo = lambda g: min(g, default=math.inf)  # noqa: E731
  swapped = lo(second) < lo(first)
  p, q = (second, first) if swapped else (first, second)
  return (tuple(sorted(groups["head"])), tuple(sorted(p)), tuple(sorted(q))), swapped


def to_factor(
  x: jax.Array, head: list, pos: list, feat: list, feat_leaf_axes: list, head_leaf_axes: list
) -> jax.Array:
  """[B, H, T, K] from batched ``x`` [B, ...]: axes of x (single-example numbering)
  for heads, positions and features; heads and features in leaf-axis order."""
  head = [head[i] for i in sorted(range(len(head)), key=lambda i: head_leaf_axes[i])]
  feat = [feat[i] for i in sorted(range(len(feat)), key=lambda i: feat_leaf_axes[i])]
  order = [0] + [1 + d for d in (*head, *pos, *feat)]
  x = jnp.transpose(x, order)
  shape = x.shape[1:]
  nh, nt = len(head), len(pos)
  return x.reshape(x.shape[0], size(shape[:nh]), size(shape[nh : nh + nt]), size(shape[nh + nt :]))


_LOADED: list[str] = []


def load_rules() -> list[str]:
  """Imports every module of this package once (each registers its rules); returns
  their names. A new rule is a new module: nothing here lists them."""
  if not _LOADED:
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    for name in names:
      importlib.import_module(f"{__name__}.{name}")
    _LOADED.extend(names)
  return list(_LOADED)
