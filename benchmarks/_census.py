"""HLO census: conditionals, while loops and kernels of a compiled function.

A ``conditional`` or ``while`` whose predicate is computed on the device makes
XLA:GPU copy the predicate to the host and wait before each branch or
iteration; kernels (top-level fusions and unfused ops of the entry
computation, and of each conditional's common branch: gnorm_jax's conditionals
guard a rare path as ``lax.cond``'s true branch, so the false one, JAX's branch
0) each cost a launch.
Both are read from the optimized HLO on this machine's backend, and
``case``/``while`` from the CUDA lowering, which needs no GPU (JAX's default
PRNG lowers to while loops on CPU but not on CUDA).
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax

# Entry-computation ops that launch nothing.
_FREE = {
  "parameter",
  "constant",
  "get-tuple-element",
  "tuple",
  "bitcast",
  "after-all",
  "opt-barrier",
  "partition-id",
  "replica-id",
}
_OP = re.compile(r"=\s*(?:\([^=]*?\)|\S+)\s+([a-z][a-z0-9-]*)\(")
# XLA marks every fifth entry of a long tuple type: ``(f32[], ..., /*index=5*/f32[])``.
_INDEX_MARK = re.compile(r"/\*index=\d+\*/")


def _op(line: str) -> str | None:
  """The opcode of an HLO instruction line (None for other lines)."""
  m = _OP.search(_INDEX_MARK.sub("", line))
  return m.group(1) if m else None


_CONST = re.compile(r"^\s*(%[\w.#]+)(?::\d+)? = stablehlo\.constant")
_CASE = re.compile(r'^\s*(%[\w.#]+)(?::\d+)? = "stablehlo\.case"\((%[\w.#]+)\)')


def dynamic_cases(stablehlo: str) -> int:
  """``stablehlo.case`` ops whose index is computed, not a constant.

  ``lax.platform_dependent`` lowers for one platform to cases on constant
  indices (XLA removes them): those are not counted.
  """
  static, count = set(), 0
  for line in stablehlo.splitlines():
    if m := _CONST.match(line):
      static.add(m.group(1))
    elif m := _CASE.match(line):
      if m.group(2) in static:
        static.add(m.group(1))
      else:
        count += 1
  return count


def _body(text: str, start: int) -> list[str]:
  body = text[start:].split("\n")[1:]
  return [line for line in body[: body.index("}")] if "=" in line]


def _entry(text: str) -> list[str]:
  return _body(text, text.index("\nENTRY"))


_BRANCHES = re.compile(
  r"branch_computations=\{([^}]*)\}|true_computation=(%[\w.]+), false_computation=(%[\w.]+)"
)


_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _common_branch(text: str, line: str, names: list[str]) -> str:
  """The branch JAX traced as branch 0 (``lax.cond``'s false branch: the common path
  of ``gnorm_jax._numerics.rare_path``), read from its ops' names: XLA may reorder a
  conditional's branches (a negated predicate is folded by swapping them). The
  smaller branch where the names do not tell."""
  own = _OP_NAME.search(line)
  prefix = own.group(1) + "/branch_" if own else None

  def jax_index(name: str) -> str | None:  # the first op JAX named under this conditional
    for op in _body(text, text.index(f"\n{name} (")):
      m = _OP_NAME.search(op)
      if prefix and m and m.group(1).startswith(prefix):
        return m.group(1)[len(prefix) :].split("_")[0]
    return None

  index = {name: jax_index(name) for name in names}
  zero = [n for n in names if index[n] == "0"]
  if zero:
    return zero[0]
  if len(names) == 2 and None in index.values() and any(index.values()):
    return next(n for n in names if index[n] is None)  # the other one says 1
  return min(names, key=lambda n: _kernels(text, _body(text, text.index(f"\n{n} ("))))


def _kernels(text: str, lines: list[str]) -> int:
  """Ops that launch work among ``lines``; a conditional counts as itself plus its
  common branch (:func:`_common_branch`), a while loop as one."""
  count = 0
  for line in lines:
    op = _op(line)
    if op is None or op in _FREE:
      continue
    count += 1
    if op == "conditional" and (b := _BRANCHES.search(line)):
      names = b.group(1).split(", ") if b.group(1) else [b.group(2), b.group(3)]
      names = [n.strip() for n in names]
      count += _kernels(text, _body(text, text.index(f"\n{_common_branch(text, line, names)} (")))
  return count


def census(fn: Callable[..., Any], *args: Any) -> dict[str, int]:
  """Counts in ``jax.jit(fn)`` at ``args``.

  Returns ``conditionals`` and ``whiles`` (anywhere in the optimized HLO of
  this backend), ``kernels`` (entry-level ops that launch work, a conditional's
  common branch included), and
  ``cuda_cases``/``cuda_whiles`` (``stablehlo.case``/``while`` in the CUDA
  lowering; -1 where this JAX cannot lower for CUDA without a GPU).
  """
  jitted = jax.jit(fn)
  text = jitted.lower(*args).compile().as_text()
  counts = {
    "conditionals": len(re.findall(r"\sconditional\(", text)),
    "whiles": len(re.findall(r"\swhile\(", text)),
    "kernels": _kernels(text, _entry(text)),
  }
  try:
    cuda = jitted.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    counts["cuda_cases"] = dynamic_cases(cuda)
    counts["cuda_whiles"] = cuda.count("stablehlo.while")
  except Exception:  # noqa: BLE001 - a JAX without CUDA lowering support
    counts["cuda_cases"] = counts["cuda_whiles"] = -1
  return counts
