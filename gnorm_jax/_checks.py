"""The one validation policy of gnorm_jax: what a number is, and how bad arguments are reported.

Every public function checks its arguments here, when it is called or built:

* A *number* is a Python int or float, a numpy scalar, or a concrete 0-d
  numpy/jax array of a real dtype. Numbers are checked (range, finiteness,
  integrality) and a bad one raises ValueError.
* Bools are not numbers: ``True`` where a number is meant raises TypeError
  (``momentum=True`` would otherwise run with β = 1).
* Traced values (under ``jit``, ``grad``, ``vmap``, or from
  ``optax.inject_hyperparams`` inside a jitted step) cannot be inspected and
  pass unchecked; each function documents how it treats a bad traced value.
* Anything else (a string, a list, a non-scalar array) where a number is meant
  raises TypeError.

Every message names the argument and the value it got, and says how to fix the
call.
"""

from __future__ import annotations

import inspect
import math
import numbers
import operator
from typing import Any, Callable, Literal, NoReturn, Sequence, TypeAlias, cast, overload

import jax
import jax.numpy as jnp
import numpy as np

_ORDS = (None, 1, 2, math.inf)

# A pytree of arrays (nested dicts, lists, tuples, NamedTuples, registered classes). JAX
# annotates one as Any; the name says what is meant.
PyTree: TypeAlias = Any


def _is_traced(value: Any) -> bool:
  return isinstance(value, jax.core.Tracer)


def is_traced(value: Any) -> bool:
  """True for a traced value (under jit, grad, vmap): it cannot be inspected."""
  return _is_traced(value)


def _fail_type(name: str, value: Any, what: str, fix: str) -> NoReturn:
  raise TypeError(
    f"{name} must be {what}, got {name}={value!r} ({type(value).__name__}). {fix}".rstrip()
  )


def concrete_number(name: str, value: Any, fix: str = "") -> int | float | None:
  """``value`` as a Python int or float, or None if it is traced.

  Raises:
    TypeError: ``value`` is a bool, or not a real scalar (see the module
      docstring); the message names ``name``.
  """
  if _is_traced(value):
    return None
  what = "a real number (a Python or numpy scalar, or a 0-d array)"
  if isinstance(value, (bool, np.bool_)):
    _fail_type(name, value, "a number, not a bool", fix)
  if hasattr(value, "dtype") and hasattr(value, "ndim"):  # numpy/jax arrays and scalars
    dtype = np.dtype(value.dtype)
    if dtype == np.bool_:
      _fail_type(name, value, "a number, not a bool", fix)
    # jnp.issubdtype: bfloat16 and the other ml_dtypes floats are floats too.
    if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
      _fail_type(name, value, what, fix)
    if value.ndim != 0:
      _fail_type(name, value, f"a scalar, not an array of shape {tuple(value.shape)}", fix)
    return value.item()
  if isinstance(value, (int, float)):
    return value
  if isinstance(value, numbers.Real):
    # Another Real (e.g. fractions.Fraction) is returned as it is: it supports the
    # comparisons and float() that the checks apply to an int or float.
    return cast(float, value)
  _fail_type(name, value, what, fix)


def is_number(value: Any) -> bool:
  """True for a concrete number in the sense of this module (never for a bool)."""
  try:
    return concrete_number("value", value) is not None
  except TypeError:
    return False


def _interval(low, high, low_open, high_open) -> str:
  if low is not None and high is not None:
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
  if low is not None:
    return f"{'>' if low_open else '>='} {low:g}"
  if high is not None:
    return f"{'<' if high_open else '<='} {high:g}"
  return ""


def check_number(
  name: str,
  value: Any,
  *,
  low: float | None = None,
  high: float | None = None,
  low_open: bool = False,
  high_open: bool = False,
  finite: bool = False,
  integer: bool = False,
  allow_none: bool = False,
  fix: str = "",
) -> None:
  """Checks a scalar hyperparameter under the number policy.

  Args:
    name: the argument's name, for the message.
    value: the value given.
    low, high: bounds; ``low_open``/``high_open`` exclude them.
    finite: reject ±inf. NaN is always rejected.
    integer: require an integral value (an int, or a float such as 25.0).
    allow_none: accept None (an optional hyperparameter left out).
    fix: a sentence telling the caller what to pass instead.

  Raises:
    TypeError: ``value`` is not a number (a bool, a string, an array of
      shape other than ()).
    ValueError: ``value`` is a concrete number outside the requirements.
  """
  if value is None and allow_none:
    return
  x = concrete_number(name, value, fix)
  if x is None:
    return
  ok = not math.isnan(x)
  ok = ok and not (finite and math.isinf(x))
  ok = ok and not (integer and not float(x).is_integer())
  if low is not None:
    ok = ok and (x > low if low_open else x >= low)
  if high is not None:
    ok = ok and (x < high if high_open else x <= high)
  if not ok:
    kind = "an integer" if integer else ("a finite number" if finite else "")
    requirement = " ".join(s for s in (kind, _interval(low, high, low_open, high_open)) if s)
    raise ValueError(
      f"{name} must be {requirement or 'a number, not NaN'}, got {name}={value!r}. {fix}".rstrip()
    )


def check_size(name: str, value: Any) -> int:
  """A buffer length of an optax transformation: a Python int >= 1 (it is the state's shape)."""
  return check_count(
    name,
    value,
    fix=f"It fixes the shape of the state; with optax.inject_hyperparams, pass"
    f" static_args=({name!r},).",
  )


def check_argnums(name: str, argnums: Any, fix: str = "") -> tuple[int, ...]:
  """Checks ``argnums`` (an int or a non-empty tuple of ints >= 0) and returns it as a tuple.

  Raises:
    TypeError: not an int or a non-empty tuple/list of ints (bools and floats
      are not ints); the message ends with ``fix``.
    ValueError: some entries are negative (the message names them).
  """
  given = argnums if isinstance(argnums, (tuple, list)) else (argnums,)
  nums: tuple[int, ...] = ()
  try:
    ok = bool(given) and not any(isinstance(a, (bool, np.bool_)) for a in given)
    nums = tuple(operator.index(a) for a in given) if ok else ()
  except TypeError:
    ok = False
  if not ok:
    raise TypeError(
      f"{name} must be an int or a non-empty tuple of ints, got {name}={argnums!r}. {fix}".rstrip()
    )
  negative = [a for a in nums if a < 0]
  if negative:
    raise ValueError(
      f"{name} must count positional arguments from 0, got {name}={argnums!r} with negative"
      f" entries {negative}. Pass the position from the left, e.g. {name}=1 for the second"
      " argument."
    )
  return nums


def signature(fn: Callable[..., Any]) -> str:
  """``fn``'s name and parameter list without annotations, read by ``inspect``.

  E.g. ``"grad_norm(fun, argnums=0, has_aux=False, *, ord=None)"``: the one
  source of the signatures that error messages quote, so they cannot drift
  from the code.
  """
  sig = inspect.signature(fn)
  params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
  plain = sig.replace(parameters=params, return_annotation=inspect.Signature.empty)
  return f"{fn.__name__}{plain}"


def signature_fix(fn: Callable[..., Any]) -> str:
  """The sentence that ends an error about a value in the wrong slot of ``fn``.

  A call written for an older order (``clipped_grad(loss, 1.0)``) puts a
  hyperparameter where ``argnums`` or ``has_aux`` now is; the sentence quotes
  :func:`signature` of ``fn``.
  """
  return (
    f"The signature is {signature(fn)}: argnums and has_aux follow fun, as in jax.grad;"
    " pass the other arguments by keyword."
  )


def check_grad_args(fn: Callable[..., Any], argnums: Any, has_aux: Any) -> tuple[int, ...]:
  """Checks ``argnums`` and ``has_aux`` of ``fn``, a transformation with jax.grad's signature.

  Returns ``argnums`` as a tuple; every message quotes ``fn``'s signature
  (see :func:`signature_fix`).

  Raises:
    TypeError: ``argnums`` is not an int or a non-empty tuple of ints, or
      ``has_aux`` is not a bool.
    ValueError: ``argnums`` has negative entries.
  """
  fix = signature_fix(fn)
  nums = check_argnums("argnums", argnums, fix)
  check_bool("has_aux", has_aux, fix)
  return nums


def check_bool(name: str, value: Any, fix: str = "") -> bool:
  """``value`` as a Python bool; TypeError unless it is a Python or numpy bool."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be True or False, got {name}={value!r}. {fix}".rstrip())
  return bool(value)


@overload
def check_count(
  name: str, value: Any, *, allow_none: Literal[False] = False, fix: str = ""
) -> int: ...


@overload
def check_count(name: str, value: Any, *, allow_none: bool, fix: str = "") -> int | None: ...


def check_count(name: str, value: Any, *, allow_none: bool = False, fix: str = "") -> int | None:
  """A count that fixes a shape or a loop (a Python or numpy int >= 1), never traced.

  Raises:
    TypeError: ``value`` is not an int (a float such as 2.0, a bool, a traced
      or non-scalar array).
    ValueError: ``value`` is an int below 1.
  """
  if value is None and allow_none:
    return None
  size = None
  if not isinstance(value, (bool, np.bool_)) and not _is_traced(value):
    try:
      size = operator.index(value)
    except TypeError:
      pass
  if size is None:
    raise TypeError(
      f"{name} must be a Python int{' or None' if allow_none else ''}, got {name}={value!r}"
      f" ({type(value).__name__}). {fix}".rstrip()
    )
  if size < 1:
    raise ValueError(f"{name} must be an int >= 1, got {name}={value!r}. {fix}".rstrip())
  return size


def path_str(path: Any) -> str:
  """A pytree path as ``jax.tree_util.keystr`` writes it; ``<root>`` for the root itself."""
  return jax.tree_util.keystr(tuple(path)) or "<root>"


def check_choice(name: str, value: Any, choices: Sequence[Any], fix: str = "") -> None:
  """Raises ValueError unless ``value`` is one of ``choices`` (compared by type and value)."""
  if not any(type(value) is type(c) and value == c for c in choices):
    raise ValueError(
      f"{name} must be one of {tuple(choices)!r}, got {name}={value!r}. {fix}".rstrip()
    )


def check_ord(ord: Any) -> None:
  """Raises ValueError unless ``ord`` is one of None, 1, 2 or inf (a static Python/numpy scalar)."""
  scalar = isinstance(ord, numbers.Real) and not isinstance(ord, (bool, np.bool_))
  if not any(ord is o or (o is not None and scalar and ord == o) for o in _ORDS):
    raise ValueError(
      f"ord must be None (Euclidean), 1, 2 or inf (math.inf / jnp.inf); got ord={ord!r}."
    )


def check_fun(fun: Any, caller: str) -> None:
  """Raises TypeError unless ``fun`` (the first argument of ``caller``) is callable."""
  if not callable(fun):
    raise TypeError(f"{caller} expects a callable as its first argument, got {fun!r}.")


def is_tree(value: Any) -> bool:
  """True if ``value`` is a pytree container (a dict, list, ...), not one leaf."""
  leaves = jax.tree.leaves(value)
  return not (len(leaves) == 1 and leaves[0] is value)


def check_threshold_tree(
  name: str, value: Any, *, allow_tree: bool, fix: str = "", check_arrays: bool = True
) -> None:
  """A threshold >= 0: one number, or (with ``allow_tree``) a pytree of them.

  A tree of thresholds is a prefix of the tree it applies to; its structure is
  checked against that tree when the transformation runs. None alone is not a
  threshold; inside a tree it is an empty subtree (as in an equinox model's
  parameters), matching no parameter. With ``check_arrays=False`` a jax array leaf is
  treated as a traced one (type-checked, range unchecked): under
  ``optax.inject_hyperparams`` the factory gets concrete arrays at init and
  tracers in update, and both must behave alike.

  Raises:
    TypeError: ``value`` is None, or a leaf is not a number.
    ValueError: a concrete leaf is negative or NaN, ``value`` is an empty
      tree, or ``value`` is a tree and ``allow_tree`` is False.
  """
  is_none = lambda x: x is None
  leaves = jax.tree_util.tree_flatten_with_path(value, is_leaf=is_none)[0]
  if not leaves:
    raise ValueError(f"{name} has no leaves: got {name}={value!r}. {fix}".rstrip())
  if is_tree(value) and value is not None and not allow_tree:
    raise ValueError(
      f"{name} must be one number here, got the pytree {name}={value!r}. A pytree of"
      " thresholds (one per leaf or subtree) needs per='leaf'."
    )
  if value is None:
    raise TypeError(f"{name} must be a number >= 0, got None. {fix}".rstrip())
  # Inside a tree, None is an empty subtree, as in the parameters it mirrors (an equinox
  # model's non-array fields): it holds no threshold, and needs no parameter under it.
  leaves = [(path, leaf) for path, leaf in leaves if leaf is not None]
  if not leaves:
    raise ValueError(f"{name} has no thresholds, only None: got {name}={value!r}. {fix}".rstrip())
  for path, leaf in leaves:
    leaf_name = f"{name}{jax.tree_util.keystr(path)}"
    if not check_arrays and isinstance(leaf, jax.Array):
      concrete_number(leaf_name, leaf, fix)
    else:
      check_number(leaf_name, leaf, low=0, fix=fix)


def canonical_ord(ord: Any) -> Any:
  """``ord`` as None, 1, 2 or ``math.inf``; a traced ``ord`` is returned as it is.

  A concrete 0-d array is accepted (``optax.inject_hyperparams`` turns
  ``ord=1`` into ``Array(1)``); then the value decides.

  Raises:
    ValueError: ``ord`` is not one of the accepted values.
  """
  if _is_traced(ord):
    return ord
  if isinstance(ord, (np.ndarray, jax.Array)) and ord.ndim == 0 and ord.dtype != np.bool_:
    ord = ord.item()
  check_ord(ord)
  return None if ord is None else (math.inf if ord == math.inf else int(ord))
