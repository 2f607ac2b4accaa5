"""Differentially private training (DP-SGD) around the per-example engine.

A DP-SGD step (Abadi et al. 2016) samples a batch by Poisson sampling (each of
the N examples independently, with probability q), clips every example's
gradient to norm C and sums (:func:`gnorm_jax.clipped_grad` with
``reduce="sum"``), adds Gaussian noise N(0, σ²C²) to every entry of the sum and
divides by the expected batch size qN. This module supplies the batches
(:func:`poisson_batches`), the noise (:func:`dp_noise`, an Optax
transformation) and the privacy accounting (:func:`dp_epsilon`,
:func:`dp_noise_multiplier`). The accounting is Google's ``dp_accounting``
package, called as it is: nothing here computes a privacy loss by hand.

``dp_accounting`` and ``scipy.stats`` come with the ``[dp]`` extra
(``pip install "gnorm_jax[dp]"``) and are imported inside the functions that
use them: they take about a second to import, which ``import gnorm_jax``
should not pay.
"""

from __future__ import annotations

import functools
import math
import os
import secrets
import warnings
from typing import Any, Callable, Iterator, NamedTuple, Required, TypedDict

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import io_callback

from gnorm_jax._checks import (
  check_choice,
  check_count,
  check_number,
  concrete_number,
  path_str,
)
from gnorm_jax._extras import import_extra
from gnorm_jax._norms import tree_norm
from gnorm_jax._per_example._api import ClippedGradFn

__all__ = [
  "DPNoiseState",
  "PoissonBatches",
  "dp_epsilon",
  "dp_noise",
  "dp_noise_multiplier",
  "poisson_batches",
  "poisson_max_batch_size",
]

_ACCOUNTANTS = ("auto", "pld", "rdp")
# PLD accounting costs memory that grows with ε (its loss grid, 1e-4 apart) and
# time that grows with the steps: measured for σ = 1, q = 0.01, 1e7 steps
# (ε ≈ 1000) took 0.8 GB and 10 s, 1e8 steps (ε ≈ 9000) 3.5 GB and 65 s, and
# 1e9 steps at ε ≈ 0.6 more than 100 s. Beyond these limits only RDP is used.
_PLD_MAX_STEPS = 10**6
_PLD_MAX_EPSILON = 100.0


# Validation, by the one policy of gnorm_jax._checks. dp_noise's hyperparameters
# may be traced (then unchecked); the host-side functions need concrete numbers.


def _host_number(name: str, value: Any, fix: str, **requirements: Any) -> int | float:
  """``value`` as a Python number, checked; TypeError if it is traced."""
  number = concrete_number(name, value, fix)
  if number is None:
    raise TypeError(
      f"{name} must be a concrete number: this function runs on the host, not under"
      f" jit/grad/vmap; got the traced {name}={value!r}. {fix}"
    )
  check_number(name, number, fix=fix, **requirements)
  return number


class _Requirements(TypedDict, total=False):
  """Keyword arguments of check_number: what a hyperparameter must be."""

  low: float
  high: float
  low_open: bool
  high_open: bool
  finite: bool
  integer: bool
  fix: Required[str]


_NOISE_MULTIPLIER = _Requirements(
  low=0,
  finite=True,
  fix="It is σ, the noise std in units of the sensitivity (e.g. 1.0; 0 adds no noise).",
)
_SAMPLING_RATE = _Requirements(
  low=0,
  low_open=True,
  high=1,
  fix="It is q, each example's probability of being in a batch (e.g. 256 / N).",
)
_STEPS = _Requirements(low=1, integer=True, fix="Pass the number of training steps (e.g. 1000).")
_DELTA = _Requirements(
  low=0,
  high=1,
  low_open=True,
  high_open=True,
  fix="Pick δ well below 1/N for N examples (e.g. 1e-5).",
)
_NUM_EXAMPLES = _Requirements(low=1, integer=True, fix="Pass the number of training examples N.")


def _check_accounting(sampling_rate: Any, steps: Any, delta: Any, accountant: Any):
  """(q, T, δ) as Python numbers, with ``accountant`` checked."""
  q = _host_number("sampling_rate", sampling_rate, **_SAMPLING_RATE)
  t = _host_number("steps", steps, **_STEPS)
  d = _host_number("delta", delta, **_DELTA)
  check_choice(
    "accountant",
    accountant,
    _ACCOUNTANTS,
    '"auto" takes the smaller of the two valid bounds; "pld" (privacy loss'
    ' distributions) is usually the tighter, "rdp" (Rényi DP) the faster.',
  )
  return float(q), int(t), float(d)


# The transformation.

# JAX's PRNG implementations, as ``jax.random.key(seed, impl=...)`` names them, less
# philox2x32: its 32-bit key space can be searched exhaustively.
_PRNG_IMPLS = ("threefry2x32", "threefry4x32", "philox4x32", "rbg", "unsafe_rbg")
_RNGS = ("auto", *_PRNG_IMPLS, "secure")
# rng="auto" by backend (jax.default_backend()); any other backend gets threefry2x32.
# On CPU (benchmarks/dp_step.py) philox4x32 and threefry4x32 draw in 0.6-0.7x threefry2x32's
# time, but philox4x32 fails to compile under multi-device jit (JAX 0.10.2 cannot
# partition its mulhi) and threefry4x32 compiles 4-5x slower per leaf; rbg draws slower.
# TPU: rbg, the hardware's RngBitGenerator, as JAX's documentation advises for speed
# there (not measured here).
_AUTO_IMPL = {"tpu": "rbg"}
_RNG_FIX = (
  "'auto' picks a JAX PRNG for the backend, a name picks that JAX PRNG, and"
  " 'secure' draws on the host from the operating system's cryptographic source"
  " (philox2x32 is left out: its 32-bit key space can be searched exhaustively)."
)
# Samples per os.urandom request of rng="secure": 32 bytes each, 32 MiB a request.
_SECURE_CHUNK = 2**20


class DPNoiseState(NamedTuple):
  """State of :func:`dp_noise`.

  Attributes:
    key: uint32 key data of the noise PRNG, split at every step: shape [2] for
      threefry2x32 and philox4x32, [4] for threefry4x32, rbg and unsafe_rbg; [0]
      for ``rng="secure"``, which keeps no key.
    noise_std: σΔ, the std of the noise added to the sum at the last step (0
      before any): a () float32 scalar, float64 under x64.
  """

  key: jax.Array
  noise_std: jax.Array


def _sensitivity(max_norm: Any) -> jax.Array:
  """Δ = ‖(C_g)_g‖₂ over the leaves of ``max_norm`` (Δ = C for a number).

  float32, or float64 under x64 (a Python number is not rounded to float32 first).
  """
  dtype = jnp.result_type(float)  # float64 under x64, else float32
  return tree_norm(jax.tree.map(lambda c: jnp.asarray(c).astype(dtype), max_norm))


def _thresholds(max_norm: Any) -> Any:
  """The thresholds ``max_norm`` gives: itself, or those its :class:`ClippedGradFn` carries."""
  if isinstance(max_norm, ClippedGradFn):
    if max_norm.reduce != "sum":
      raise ValueError(
        f"max_norm is a clipped_grad function with reduce={max_norm.reduce!r}, but dp_noise"
        " adds the noise to the clipped sum and divides by batch_size itself. Build it with"
        " clipped_grad(..., reduce='sum')."
      )
    return max_norm.max_norm
  if callable(max_norm):
    raise TypeError(
      f"max_norm is a function that carries no clipping threshold, got max_norm={max_norm!r}."
      " Pass the ClippedGradFn that clipped_grad(..., reduce='sum') returns (not a jax.jit or"
      " other wrapper of it), or the threshold itself (e.g. max_norm=1.0)."
    )
  return max_norm


def _is_key(seed: Any) -> bool:
  return isinstance(seed, jax.Array) and jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key)


_SEED_FIX = "Pass an integer in [-2**63, 2**63) (e.g. seed=0), or a PRNG key from jax.random.key."


def _check_seed(seed: Any) -> Any:
  """``seed`` as a Python int, a typed PRNG key, or a traced integer."""
  if _is_key(seed):
    if seed.shape != ():
      raise TypeError(f"seed must be one PRNG key, got keys of shape {seed.shape}. {_SEED_FIX}")
    return seed
  check_number("seed", seed, integer=True, low=-(2**63), high=2**63 - 1, fix=_SEED_FIX)
  value = concrete_number("seed", seed, _SEED_FIX)
  return seed if value is None else int(value)


def _os_key_data(impl: str) -> np.ndarray:
  """Key data of ``impl`` with every bit from the operating system's cryptographic source."""
  shape = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=impl))).shape
  return np.frombuffer(secrets.token_bytes(4 * math.prod(shape)), np.uint32).reshape(shape)


def _generator(rng: Any, seed: Any) -> Any:
  """What draws the noise: "secure", a PRNG name, or the implementation of a key ``seed``."""
  check_choice("rng", rng, _RNGS, _RNG_FIX)
  if rng == "secure":
    if seed is not None:
      raise ValueError(
        f"rng='secure' draws every sample from the operating system and takes no seed, got"
        f" seed={seed!r}. Leave seed out, or pick a PRNG (e.g. rng='auto') for noise that a"
        " seed reproduces."
      )
    return rng
  if _is_key(seed):
    own = jax.random.key_impl(seed)
    if rng not in ("auto", str(own)):
      raise ValueError(
        f"rng must be 'auto' or the key's own implementation {str(own)!r} when seed is a"
        f" PRNG key, got rng={rng!r}. Pass rng='auto' with this key, or an integer seed to"
        f" draw with {rng!r}."
      )
    return own
  return _AUTO_IMPL.get(jax.default_backend(), "threefry2x32") if rng == "auto" else rng


def _secure_standard_normal(size: int) -> np.ndarray:
  """``size`` float64 samples of N(0, 1), every bit from :func:`os.urandom`.

  Each sample is (g₁ + g₂ + g₃ + g₄)/2 of four Box–Muller normals: the sum of 2n
  Gaussians of Holohan & Braghin 2021 with n = 2, as Opacus' secure mode draws it.
  The uniforms are 53-bit integers offset by half a step, in (0, 1), so a Box–Muller
  normal is bounded by 8.6 and a sample by 17.2 (a tail of probability below 1e-17).
  """
  out = np.empty(size)
  for start in range(0, size, _SECURE_CHUNK):
    n = min(_SECURE_CHUNK, size - start)
    bits = np.frombuffer(os.urandom(32 * n), np.uint64).reshape(2, 2, n)
    uniform = ((bits >> np.uint64(11)) + 0.5) * 2.0**-53
    radius = np.sqrt(-2.0 * np.log(uniform[0]))
    angle = (2 * np.pi) * uniform[1]
    out[start : start + n] = (radius * (np.cos(angle) + np.sin(angle))).sum(0) / 2
  return out


def _host_noise(specs: list[jax.ShapeDtypeStruct], std: np.ndarray) -> list[np.ndarray]:
  """On the host: one N(0, std²) array per spec, from :func:`_secure_standard_normal`."""
  sizes = [math.prod(spec.shape) for spec in specs]
  scale = np.float64(std)
  noise = scale * _secure_standard_normal(sum(sizes)) if scale != 0 else np.zeros(sum(sizes))
  parts = np.split(noise, np.cumsum(sizes)[:-1])
  return [part.reshape(spec.shape).astype(spec.dtype) for part, spec in zip(parts, specs)]


def _secure_noise(std: jax.Array, specs: list[jax.ShapeDtypeStruct]) -> list[jax.Array]:
  """The noise of rng="secure": drawn on the host by an ordered callback, once per call."""
  if not specs:
    return []
  # ordered: every step calls the host once, in program order, never cached or elided.
  return io_callback(functools.partial(_host_noise, specs), specs, std, ordered=True)


def _prng_noise(
  key: jax.Array, std: jax.Array, specs: list[jax.ShapeDtypeStruct]
) -> tuple[jax.Array, list[jax.Array]]:
  """The next key, and one N(0, std²) array per spec from a split of ``key``.

  One draw per leaf in the leaf's shape (as optax.add_noise): under sharding each
  device draws only its shard.
  """
  key, noise_key = jax.random.split(key)
  keys = jax.random.split(noise_key, len(specs))
  return key, [
    std.astype(spec.dtype) * jax.random.normal(k, spec.shape, spec.dtype)
    for k, spec in zip(keys, specs)
  ]


def _add_noise(leaf: jax.Array, noise: jax.Array, batch_size: Any) -> jax.Array:
  """(leaf + noise) / batch_size in the noise's dtype, cast back to the leaf's dtype."""
  dtype = noise.dtype
  return ((leaf.astype(dtype) + noise) / jnp.asarray(batch_size, dtype)).astype(leaf.dtype)


def _check_updates(updates: Any, max_norm: Any) -> None:
  """TypeError for non-float leaves; ValueError if a ``max_norm`` tree is no prefix."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(updates)[0]:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise TypeError(
        f"dp_noise adds real Gaussian noise and needs real floating-point updates, but"
        f" the leaf at {path_str(path)} has dtype {jnp.result_type(leaf)}."
        " Cast it (e.g. `x.astype(jnp.float32)`) or leave it out of the update tree."
      )
  treedef = jax.tree.structure(max_norm)
  if not jax.tree_util.treedef_is_leaf(treedef):
    try:
      # PyTreeDef comes from jaxlib's C extension, which has no type stubs.
      treedef.flatten_up_to(updates)  # type: ignore[attr-defined]
    except (ValueError, TypeError) as error:
      raise ValueError(
        f"A per-layer max_norm must be a prefix of the update tree (one threshold per"
        f" layer or per leaf), but max_norm has structure {treedef} and the updates"
        f" {jax.tree.structure(updates)}. Give the thresholds the parameters' structure,"
        f" as passed to clipped_grad."
      ) from error


def dp_noise(
  max_norm: Any,
  noise_multiplier: float | jax.Array,
  *,
  batch_size: float | jax.Array,
  seed: int | jax.Array | None = None,
  rng: str = "auto",
) -> optax.GradientTransformation:
  """Adds the Gaussian noise of DP-SGD to a clipped gradient sum (Abadi et al. 2016).

  Returns (Σᵢ ḡᵢ + 𝒩(0, σ²Δ²I)) / B for the sum Σᵢ ḡᵢ of clipped per-example gradients
  (``clipped_grad(..., reduce="sum")``), with Δ its sensitivity (C, or √(Σ_g C_g²) for per-layer
  thresholds C_g), σ the noise multiplier and B the expected batch size qN. Pass the
  :class:`ClippedGradFn` as ``max_norm`` and Δ is read from it: the noise matches the clipping.

  **Warning:** by default the noise comes from a JAX PRNG, which is not cryptographically
  secure; ``rng="secure"`` draws it from :func:`os.urandom` instead, at a cost. **Keep the seed
  secret:** noise that anyone can regenerate can be subtracted, so with no ``seed`` the key is
  drawn from the operating system's cryptographic source; pass a seed only for tests and
  reproducible experiments. Generators, dtypes and costs: :doc:`/differential_privacy`.

  Args:
    max_norm: the threshold C ≥ 0 the per-example gradients were clipped to, a tree of
      per-layer thresholds C_g (a prefix of the parameters), or the :class:`ClippedGradFn` that
      ``clipped_grad(..., reduce="sum")`` returns. A tree or a ``ClippedGradFn`` is static: with
      ``optax.inject_hyperparams`` name it in ``static_args=("max_norm",)``.
    noise_multiplier: σ ≥ 0, finite.
    batch_size: the expected batch size B = qN > 0 (a float is fine).
    seed: None (a key from the operating system's cryptographic source, different at every
      call), an integer in [-2**63, 2**63), or a PRNG key; ``rng="secure"`` takes none.
    rng: ``"auto"`` (``"rbg"`` on TPU, ``"threefry2x32"`` elsewhere), ``"threefry2x32"``,
      ``"threefry4x32"``, ``"philox4x32"``, ``"rbg"``, ``"unsafe_rbg"`` or ``"secure"``.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`DPNoiseState`, whose ``noise_std``
    is σΔ of the last step.

  Raises:
    ValueError: at construction, a negative, NaN or infinite ``max_norm`` leaf or
      ``noise_multiplier``, an empty ``max_norm`` tree, a ``reduce="mean"`` ``ClippedGradFn``, a
      ``batch_size`` not finite and positive, or a ``seed`` or ``rng`` outside the choices above
      (or not matching each other); at the update, a ``max_norm`` tree that is not a prefix of
      the update tree.
    TypeError: at construction, a bool or a non-number, or a function other than a
      ``ClippedGradFn`` as ``max_norm``; at the update, a leaf that is not real floating-point.

  Examples:
    >>> import jax.numpy as jnp, optax, gnorm_jax
    >>> grad_sum = jnp.array([2.0, 4.0])  # from clipped_grad(..., reduce="sum")
    >>> tx = gnorm_jax.dp_noise(1.0, 0.0, batch_size=4)  # σ = 0: just the mean
    >>> [float(u) for u in tx.update(grad_sum, tx.init(grad_sum))[0]]
    [0.5, 1.0]
    >>> loss = lambda p, x: jnp.sum(x @ p["w"]) + jnp.sum(p["b"])
    >>> clipped_sum = gnorm_jax.clipped_grad(loss, max_norm={"w": 3.0, "b": 4.0}, reduce="sum")
    >>> tx = gnorm_jax.dp_noise(clipped_sum, 1.1, batch_size=256)  # Δ from the clipping
    >>> grads = {"w": jnp.zeros((10, 10)), "b": jnp.zeros(10)}
    >>> _, state = tx.update(grads, tx.init(grads))
    >>> round(float(optax.tree.get(state, "noise_std")), 4)  # σ·√(3² + 4²)
    5.5

  References:
    Abadi et al. 2016, https://arxiv.org/abs/1607.00133; Mironov 2012,
    https://doi.org/10.1145/2382196.2382264; Holohan & Braghin 2021,
    https://arxiv.org/abs/2107.10138.
  """
  thresholds = _thresholds(max_norm)
  if not jax.tree.leaves(thresholds):
    raise ValueError(
      f"max_norm has no leaves: got max_norm={thresholds!r}. Pass the clipping threshold"
      " C (e.g. 1.0) or a tree of per-layer thresholds."
    )
  for path, c in jax.tree_util.tree_flatten_with_path(thresholds)[0]:
    check_number(
      f"max_norm{jax.tree_util.keystr(path)}",
      c,
      low=0,
      finite=True,
      fix="Pass the threshold the per-example gradients were clipped to (e.g. 1.0).",
    )
  check_number("noise_multiplier", noise_multiplier, **_NOISE_MULTIPLIER)
  check_number(
    "batch_size",
    batch_size,
    low=0,
    low_open=True,
    finite=True,
    fix="Pass the expected batch size q·N under Poisson sampling (e.g. 256).",
  )
  seed = seed if seed is None else _check_seed(seed)
  generator = _generator(rng, seed)
  os_key = _os_key_data(generator) if seed is None and generator != "secure" else None

  def init_fn(params):
    del params
    # Raw key data, not a typed key: numpy, chex and checkpointers read the state as it is.
    if generator == "secure":
      key = jnp.zeros([0], jnp.uint32)
    elif os_key is not None:
      key = jnp.asarray(os_key)
    else:
      key = jax.random.key_data(seed if _is_key(seed) else jax.random.key(seed, impl=generator))
    return DPNoiseState(key=key, noise_std=jnp.zeros([], jnp.result_type(float)))

  def update_fn(updates, state, params=None):
    del params
    _check_updates(updates, thresholds)
    delta = _sensitivity(thresholds)
    std = jnp.asarray(noise_multiplier).astype(delta.dtype) * delta
    leaves, treedef = jax.tree.flatten(updates)
    leaves = [jnp.asarray(leaf) for leaf in leaves]
    specs = [jax.ShapeDtypeStruct(x.shape, jnp.promote_types(x.dtype, std.dtype)) for x in leaves]
    if generator == "secure":
      key, noise = state.key, _secure_noise(std, specs)
    else:
      typed_key, noise = _prng_noise(
        jax.random.wrap_key_data(state.key, impl=generator), std, specs
      )
      key = jax.random.key_data(typed_key)
    noisy = [_add_noise(leaf, n, batch_size) for leaf, n in zip(leaves, noise)]
    return jax.tree.unflatten(treedef, noisy), DPNoiseState(key=key, noise_std=std)

  return optax.GradientTransformation(init_fn, update_fn)


# Accounting, by dp_accounting.


def _dp_sgd_event(noise_multiplier: float, sampling_rate: float, steps: int) -> Any:
  """The DpEvent of DP-SGD: ``steps`` Poisson-subsampled Gaussian mechanisms."""
  dp_event = import_extra("dp_accounting.dp_event", "dp")
  return dp_event.SelfComposedDpEvent(
    dp_event.PoissonSampledDpEvent(sampling_rate, dp_event.GaussianDpEvent(noise_multiplier)),
    steps,
  )


def _pld_feasible(epsilon: float, steps: int) -> bool:
  """Whether PLD accounting fits in memory and time (see ``_PLD_MAX_STEPS``)."""
  return steps <= _PLD_MAX_STEPS and epsilon <= _PLD_MAX_EPSILON


def _pld_too_costly(epsilon: float, steps: int) -> ValueError:
  return ValueError(
    f"accountant='pld' would need gigabytes or minutes here (steps={steps}, ε about"
    f" {epsilon:.3g}; PLD is used up to steps={_PLD_MAX_STEPS} and ε={_PLD_MAX_EPSILON:g})."
    " Use accountant='rdp' (or 'auto', which falls back to RDP by itself)."
  )


def _epsilon(accountant: str, sigma: float, q: float, t: int, d: float) -> float:
  return float(_make_accountant(accountant)().compose(_dp_sgd_event(sigma, q, t)).get_epsilon(d))


def _make_accountant(accountant: str) -> Callable[[], Any]:
  if accountant == "pld":
    return import_extra("dp_accounting.pld", "dp").PLDAccountant
  return import_extra("dp_accounting.rdp", "dp").RdpAccountant


def dp_epsilon(
  noise_multiplier: float,
  sampling_rate: float,
  steps: int,
  delta: float,
  *,
  accountant: str = "auto",
) -> float:
  """The ε of DP-SGD at a given δ: (ε, δ)-DP after ``steps`` steps.

  The Gaussian mechanism with noise multiplier σ, Poisson-subsampled at rate q and composed over
  T steps, under add-or-remove-one neighbours. ε comes from ``dp_accounting``, whose PLD and RDP
  accountants both give valid upper bounds: :ref:`the DP guide <dp-accountants>`.

  Args:
    noise_multiplier: σ ≥ 0 (0 gives ε = inf).
    sampling_rate: q in (0, 1], each example's probability of being in a batch.
    steps: T ≥ 1, the number of noisy steps.
    delta: δ in (0, 1).
    accountant: ``"auto"`` (the smaller of the PLD and RDP bounds), ``"pld"`` or ``"rdp"``.

  Returns:
    ε as a Python float (``inf`` when σ = 0).

  Raises:
    ValueError: a number out of its range above (NaN included), a non-integer ``steps``, an
      unknown ``accountant``, or ``"pld"`` beyond its limits (``steps`` > 1e6, RDP ε > 100).
    TypeError: a bool, a non-number or a traced value where a number is meant.

  Examples:
    >>> import gnorm_jax
    >>> round(gnorm_jax.dp_epsilon(1.0, 0.01, steps=100, delta=1e-5), 1)
    0.7

  References:
    Abadi et al. 2016, https://arxiv.org/abs/1607.00133; Mironov 2017,
    https://arxiv.org/abs/1702.07476; Doroshenko et al. 2022, https://arxiv.org/abs/2207.04380.
  """
  sigma = float(_host_number("noise_multiplier", noise_multiplier, **_NOISE_MULTIPLIER))
  q, t, d = _check_accounting(sampling_rate, steps, delta, accountant)
  if sigma == 0:  # no noise: no privacy, whatever the accountant
    return math.inf
  eps_rdp = _epsilon("rdp", sigma, q, t, d)
  if accountant == "rdp":
    return eps_rdp
  if not _pld_feasible(eps_rdp, t):
    if accountant == "pld":
      raise _pld_too_costly(eps_rdp, t)
    return eps_rdp
  eps_pld = _epsilon("pld", sigma, q, t, d)
  return eps_pld if accountant == "pld" else min(eps_pld, eps_rdp)


def dp_noise_multiplier(
  epsilon: float,
  sampling_rate: float,
  steps: int,
  delta: float,
  *,
  accountant: str = "auto",
) -> float:
  """The smallest noise multiplier σ for which DP-SGD is (ε, δ)-DP after ``steps`` steps.

  The inverse of :func:`dp_epsilon` (same ``accountant``): :ref:`the DP guide <dp-accountants>`.

  Args:
    epsilon: the target ε > 0, finite.
    sampling_rate: q in (0, 1].
    steps: T ≥ 1.
    delta: δ in (0, 1).
    accountant: ``"auto"`` (the smaller σ of PLD and RDP), ``"pld"`` or ``"rdp"``.

  Returns:
    σ as a Python float.

  Raises:
    ValueError: as for :func:`dp_epsilon`, or ``epsilon`` is not a finite number > 0.
    TypeError: a bool, a non-number or a traced value where a number is meant.

  Examples:
    >>> import gnorm_jax
    >>> sigma = gnorm_jax.dp_noise_multiplier(2.0, 0.01, 100, 1e-5, accountant="rdp")
    >>> round(sigma, 2), gnorm_jax.dp_epsilon(sigma, 0.01, 100, 1e-5, accountant="rdp") <= 2.0
    (0.83, True)

  References:
    Doroshenko et al. 2022, https://arxiv.org/abs/2207.04380.
  """
  eps = float(
    _host_number(
      "epsilon",
      epsilon,
      low=0,
      low_open=True,
      finite=True,
      fix="Pass the privacy budget ε (e.g. 8.0).",
    )
  )
  q, t, d = _check_accounting(sampling_rate, steps, delta, accountant)
  dp_accounting = import_extra("dp_accounting", "dp")

  def calibrate(name, bracket):
    return float(
      dp_accounting.calibrate_dp_mechanism(
        _make_accountant(name),
        lambda sigma: _dp_sgd_event(sigma, q, t),
        eps,
        d,
        bracket_interval=bracket,
      )
    )

  if accountant == "pld" and not _pld_feasible(eps, t):
    raise _pld_too_costly(eps, t)
  if accountant == "pld":
    return calibrate("pld", dp_accounting.LowerEndpointAndGuess(0.0, 1.0))
  sigma_rdp = calibrate("rdp", dp_accounting.LowerEndpointAndGuess(0.0, 1.0))
  if accountant == "rdp" or not _pld_feasible(eps, t):
    return sigma_rdp
  # PLD's σ is searched in [σ_rdp/2, σ_rdp] (small σ make PLD slow); there is
  # none there when PLD's bound is the looser one, and then RDP's σ is kept.
  try:
    return min(
      calibrate("pld", dp_accounting.ExplicitBracketInterval(sigma_rdp / 2, sigma_rdp)), sigma_rdp
    )
  except ValueError:
    if _epsilon("pld", sigma_rdp / 2, q, t, d) > eps:
      return sigma_rdp
    return calibrate("pld", dp_accounting.LowerEndpointAndGuess(0.0, sigma_rdp / 2))


# Poisson sampling.


class PoissonBatches(Iterator[tuple[np.ndarray, np.ndarray]]):
  """The iterator :func:`poisson_batches` returns.

  Attributes:
    num_examples: N, as given.
    sampling_rate: q, as given.
    max_batch_size: the fixed batch shape, as given.
    steps: the number of batches it yields, or None (infinite).
    num_batches: batches drawn so far.
    num_truncated: of those, batches whose Poisson draw had more than
      ``max_batch_size`` examples and was cut down to ``max_batch_size``.
  """

  def __init__(self, num_examples, sampling_rate, max_batch_size, seed, steps):
    self.num_examples = num_examples
    self.sampling_rate = sampling_rate
    self.max_batch_size = max_batch_size
    self.steps = steps
    self.num_batches = 0
    self.num_truncated = 0
    self._rng = np.random.default_rng(seed)

  def __iter__(self) -> PoissonBatches:
    return self

  def __next__(self) -> tuple[np.ndarray, np.ndarray]:
    if self.steps is not None and self.num_batches >= self.steps:
      raise StopIteration
    # Poisson sampling = a Binomial(N, q) size, then a uniform subset of that
    # size; a uniform subset of max_batch_size of it is a uniform subset of N.
    drawn = int(self._rng.binomial(self.num_examples, self.sampling_rate))
    size = min(drawn, self.max_batch_size)
    self.num_batches += 1
    if drawn > self.max_batch_size:
      self.num_truncated += 1
      if self.num_truncated == 1:
        warnings.warn(
          f"poisson_batches drew {drawn} examples, more than max_batch_size="
          f"{self.max_batch_size}; the batch is a uniformly random subset of"
          f" {self.max_batch_size} of them. The privacy accounting assumes no truncation:"
          f" raise max_batch_size (see poisson_max_batch_size). `.num_truncated` counts"
          f" these batches; this warning is given once.",
          stacklevel=2,
        )
    indices = np.zeros(self.max_batch_size, np.int64)
    indices[:size] = np.sort(self._rng.choice(self.num_examples, size, replace=False))
    return indices, np.arange(self.max_batch_size) < size


def poisson_batches(
  num_examples: int,
  sampling_rate: float,
  *,
  max_batch_size: int,
  seed: int = 0,
  steps: int | None = None,
) -> PoissonBatches:
  """Batches of Poisson sampling, padded to a fixed shape for ``jit``.

  Every example is in a batch independently with probability q, as :func:`dp_epsilon` assumes.
  Each batch is ``(indices, mask)``, numpy arrays of shape ``[max_batch_size]``: the sampled
  indices, then padding (``mask`` False); pass ``mask=mask`` to the :func:`clipped_grad`
  function. A larger draw is truncated, counted and warned about: see the DP guide.

  Args:
    num_examples: N ≥ 1, the size of the dataset.
    sampling_rate: q in (0, 1].
    max_batch_size: the fixed batch shape, ≥ 1 (see :func:`poisson_max_batch_size`).
    seed: a non-negative integer seeding a ``numpy.random.Generator``.
    steps: the number of batches, or None for an infinite iterator.

  Returns:
    A :class:`PoissonBatches` iterator of ``(indices, mask)``.

  Raises:
    ValueError: a non-integer or non-positive ``num_examples``, ``max_batch_size`` or
      ``steps``, a ``sampling_rate`` outside (0, 1], or a negative or non-integer ``seed``.
    TypeError: a bool, a non-number or a traced value where a number is meant, or a
      ``max_batch_size`` that is not a Python int (it fixes the shapes).

  Examples:
    >>> import gnorm_jax
    >>> batches = gnorm_jax.poisson_batches(1000, 0.01, max_batch_size=30, steps=3)
    >>> [(indices.shape, int(mask.sum()) <= 30) for indices, mask in batches]
    [((30,), True), ((30,), True), ((30,), True)]

  References:
    Abadi et al. 2016, https://arxiv.org/abs/1607.00133.
  """
  n = int(_host_number("num_examples", num_examples, **_NUM_EXAMPLES))
  q = float(_host_number("sampling_rate", sampling_rate, **_SAMPLING_RATE))
  size = check_count(
    "max_batch_size",
    max_batch_size,
    fix="It is the fixed shape of every batch (jit compiles once for it); see"
    " poisson_max_batch_size.",
  )
  seed = int(_host_number("seed", seed, low=0, integer=True, fix="Pass e.g. seed=0."))
  if steps is not None:
    steps = int(_host_number("steps", steps, **_STEPS))
  return PoissonBatches(n, q, size, seed, steps)


def poisson_max_batch_size(
  num_examples: int, sampling_rate: float, *, failure_probability: float = 1e-9
) -> int:
  """The smallest size a Poisson batch exceeds with probability at most ``failure_probability``.

  m = min{m ≥ 1 : P[Binomial(N, q) > m] ≤ p}, from ``scipy.stats.binom``. As ``max_batch_size``
  of :func:`poisson_batches` it makes truncation happen with probability at most p per step (at
  most T·p over T steps, by the union bound).

  Args:
    num_examples: N ≥ 1.
    sampling_rate: q in (0, 1].
    failure_probability: p in (0, 1), the allowed probability of a larger draw.

  Returns:
    m as a Python int (at least 1).

  Raises:
    ValueError: a non-integer or non-positive ``num_examples``, a ``sampling_rate`` outside
      (0, 1], or a ``failure_probability`` outside (0, 1).
    TypeError: a bool, a non-number or a traced value where a number is meant.

  Examples:
    >>> import gnorm_jax
    >>> gnorm_jax.poisson_max_batch_size(60_000, 256 / 60_000)  # mean 256
    357
  """
  n = int(_host_number("num_examples", num_examples, **_NUM_EXAMPLES))
  q = float(_host_number("sampling_rate", sampling_rate, **_SAMPLING_RATE))
  p = float(
    _host_number(
      "failure_probability",
      failure_probability,
      low=0,
      high=1,
      low_open=True,
      high_open=True,
      fix="Pass e.g. 1e-9.",
    )
  )
  stats = import_extra("scipy.stats", "dp")
  m = stats.binom.isf(p, n, q)
  return max(int(m), 1)
