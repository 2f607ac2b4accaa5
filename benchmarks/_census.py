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

:func:`gpu_census` reads the same counts from XLA:GPU's own optimized HLO for an
NVIDIA H100, compiled on a machine without a GPU: a compile-only device of
JAX's CUDA plugin (``pip install jax-cuda12-plugin==V jax-cuda12-pjrt==V
nvidia-cuda-nvcc-cu12``, V this JAX's version). Where no GPU is attached, the
process must run on ``jax_platforms="cpu"`` (:func:`use_compile_only_gpu`),
set before JAX starts a backend.
"""

from __future__ import annotations

import functools
import importlib.util
import os
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


def _counts(text: str) -> dict[str, int]:
  """Conditionals and while loops anywhere in an optimized HLO text, and its kernels."""
  return {
    "conditionals": len(re.findall(r"\sconditional\(", text)),
    "whiles": len(re.findall(r"\swhile\(", text)),
    "kernels": _kernels(text, _entry(text)),
  }


def census(fn: Callable[..., Any], *args: Any) -> dict[str, int]:
  """Counts in ``jax.jit(fn)`` at ``args``.

  Returns ``conditionals`` and ``whiles`` (anywhere in the optimized HLO of
  this backend), ``kernels`` (entry-level ops that launch work, a conditional's
  common branch included), and
  ``cuda_cases``/``cuda_whiles`` (``stablehlo.case``/``while`` in the CUDA
  lowering; -1 where this JAX cannot lower for CUDA without a GPU).
  """
  jitted = jax.jit(fn)
  counts = _counts(jitted.lower(*args).compile().as_text())
  try:
    cuda = jitted.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    counts["cuda_cases"] = dynamic_cases(cuda)
    counts["cuda_whiles"] = cuda.count("stablehlo.while")
  except Exception:  # noqa: BLE001 - a JAX without CUDA lowering support
    counts["cuda_cases"] = counts["cuda_whiles"] = -1
  return counts


# The device description XLA:GPU compiles for: an H100 SXM (80 GB HBM3), CUDA 12.8,
# cuDNN 9.7.
_H100 = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84929347584
  shared_memory_per_block_optin: 232448 cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 7 }
runtime_version { major: 12 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


def use_compile_only_gpu() -> bool:
  """Whether :func:`gpu_census` can run here: JAX's CUDA plugin is installed and no
  NVIDIA GPU is attached. Then sets ``jax_platforms="cpu"`` (call this before
  anything starts a JAX backend): the plugin's compile-only device needs no GPU,
  but starting its backend does."""
  if importlib.util.find_spec("jax_cuda12_plugin") is None or os.path.exists("/dev/nvidia0"):
    return False
  jax.config.update("jax_platforms", "cpu")
  return True


@functools.cache
def _h100():
  from jax.experimental import topologies

  topology = topologies.get_topology_desc(platform="cuda", target_config=_H100, topology="1x1x1")
  mesh = topologies.make_mesh(topology, (1,), ("x",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def gpu_census(fn: Callable[..., Any], *args: Any) -> dict[str, int]:
  """``conditionals``, ``whiles`` and ``kernels`` (as :func:`census`) in XLA:GPU's
  optimized HLO of ``jax.jit(fn)`` at ``args``' shapes, compiled for an H100
  without a GPU (see :func:`use_compile_only_gpu`; gnorm_jax's per-example plans
  priced for a GPU), and ``cublas``: whether the
  default compilation failed and every matrix product went to cuBLAS."""
  from gnorm_jax._per_example import _plan

  sharding = _h100()
  specs = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(jax.numpy.shape(a), a.dtype, sharding=sharding),
    args,
  )
  # The per-example plan priced for a GPU, as it would be on one (traced here,
  # JAX's default backend is the CPU).
  _plan._PLATFORM = "gpu"
  try:
    lowered = jax.jit(fn).lower(*specs)
  finally:
    _plan._PLATFORM = None
  try:
    text, cublas = lowered.compile().as_text(), False
  except jax.errors.JaxRuntimeError:
    # Without a GPU to autotune on, XLA:GPU's Triton GEMM fails to tile some
    # products (a ViT's, in JAX 0.10.2): then cuBLAS for every product, which
    # fuses fewer neighbours into a product than Triton does.
    text, cublas = lowered.compile({"xla_gpu_enable_triton_gemm": False}).as_text(), True
  return {**_counts(text), "cublas": cublas}
