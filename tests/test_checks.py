"""gnorm_jax._checks: the one number policy every public function uses."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gnorm_jax
from gnorm_jax import _checks

NUMBERS = [2, 2.0, np.float32(2.0), np.int64(2), np.array(2.0), jnp.array(2.0), jnp.array(2)]


@pytest.mark.parametrize("value", NUMBERS)
def test_numbers_are_checked(value):
  assert _checks.concrete_number("x", value) == 2
  _checks.check_number("x", value, low=0, finite=True)
  with pytest.raises(ValueError, match=r"x must be a finite number > 2, got x="):
    _checks.check_number("x", value, low=2, low_open=True, finite=True)
  with pytest.raises(ValueError, match=r"x must be in \[0, 1\), got x="):
    _checks.check_number("x", value, low=0, high=1, high_open=True)


@pytest.mark.parametrize("value", [True, np.bool_(False), jnp.array(True)])
def test_bools_are_not_numbers(value):
  with pytest.raises(TypeError, match="x must be a number, not a bool"):
    _checks.check_number("x", value)
  assert not _checks.is_number(value)


@pytest.mark.parametrize("value", ["0.1", [1.0], jnp.ones(2), 1j, np.complex64(1), None, {}])
def test_non_numbers_raise_type_error_naming_the_argument(value):
  with pytest.raises(TypeError, match=r"weight must be a .*got weight=.* Pass 0\.1\."):
    _checks.check_number("weight", value, fix="Pass 0.1.")


def test_nan_is_always_rejected_and_none_only_when_allowed():
  for value in (math.nan, jnp.array(math.nan), np.float32(math.nan)):
    with pytest.raises(ValueError, match="x must be a number, not NaN"):
      _checks.check_number("x", value)
  _checks.check_number("x", None, allow_none=True)


def test_integer_requirement():
  _checks.check_number("n", 25.0, integer=True, low=1)
  with pytest.raises(ValueError, match="n must be an integer >= 1"):
    _checks.check_number("n", jnp.array(2.5), integer=True, low=1)


def test_traced_values_pass_unchecked():
  @jax.jit
  def f(x):
    _checks.check_number("x", x, low=0)  # a tracer: accepted as it is
    return x

  assert float(f(-1.0)) == -1.0


def test_argnums_choices_sizes_and_ord():
  assert _checks.check_argnums("argnums", (0, 2)) == (0, 2)
  assert _checks.check_argnums("argnums", np.int32(1)) == (1,)
  for bad in ((), True, "0", (0, 1.0), None):
    with pytest.raises(TypeError, match="argnums must be an int or a non-empty tuple of ints"):
      _checks.check_argnums("argnums", bad)
  with pytest.raises(ValueError, match=r"negative entries \[-1\]"):
    _checks.check_argnums("argnums", (0, -1))
  with pytest.raises(ValueError, match=r"per must be one of \('global', 'leaf'\), got per=1"):
    _checks.check_choice("per", 1, ("global", "leaf"))
  assert _checks.check_size("history", np.int64(3)) == 3
  for bad in (2.5, True, jnp.ones(())):
    with pytest.raises(TypeError, match=r"static_args=\('history',\)"):
      _checks.check_size("history", bad)
  for ord in (None, 1, 2, math.inf, np.inf, 2.0, np.float32(1.0)):
    _checks.check_ord(ord)
  for ord in (3, True, "fro", -1, jnp.array(2)):
    with pytest.raises(ValueError, match="ord must be None"):
      _checks.check_ord(ord)


def test_threshold_trees():
  _checks.check_threshold_tree("max_norm", {"a": 1.0, "b": [jnp.array(2.0)]}, allow_tree=True)
  with pytest.raises(ValueError, match=r"max_norm\['b'\]\[0\] must be >= 0"):
    _checks.check_threshold_tree("max_norm", {"a": 1.0, "b": [-2.0]}, allow_tree=True)
  with pytest.raises(ValueError, match="needs per='leaf'"):
    _checks.check_threshold_tree("max_norm", {"a": 1.0}, allow_tree=False)


# Issue 18: validation leaks.


def test_signature_is_read_from_the_function():
  # The "The signature is ..." hints come from inspect, not from copies.
  assert _checks.signature(gnorm_jax.grad_norm) == (
    "grad_norm(fun, argnums=0, has_aux=False, *, ord=None)"
  )
  sig = _checks.signature(gnorm_jax.clipped_grad)
  assert sig.startswith("clipped_grad(fun, argnums=0, has_aux=False, *, max_norm,")
  with pytest.raises(TypeError, match=re.escape(f"The signature is {sig}")):
    gnorm_jax.clipped_grad(lambda w, x: 0.0, 1.0, max_norm=1.0)


def test_check_count_accepts_numpy_ints_only():
  assert _checks.check_count("n", np.int64(2)) == 2
  assert _checks.check_count("n", None, allow_none=True) is None
  for bad in (2.0, True, np.bool_(True), "2", jnp.ones(2)):
    with pytest.raises(TypeError, match=r"n must be a Python int"):
      _checks.check_count("n", bad)
  with pytest.raises(ValueError, match=r"n must be an int >= 1, got n=0"):
    _checks.check_count("n", 0)


def test_check_bool_accepts_numpy_bools():
  assert _checks.check_bool("flag", np.bool_(True)) is True
  with pytest.raises(TypeError, match=r"flag must be True or False, got flag='yes'"):
    _checks.check_bool("flag", "yes")


def test_path_str_names_the_root():
  assert _checks.path_str(()) == "<root>"
  assert _checks.path_str(jax.tree_util.tree_flatten_with_path({"a": 1})[0][0][0]) == "['a']"


def test_threshold_none_is_named_not_called_a_pytree():
  with pytest.raises(TypeError, match=r"max_norm must be a number >= 0, got None"):
    _checks.check_threshold_tree("max_norm", None, allow_tree=True)
  with pytest.raises(ValueError, match=r"max_norm has no thresholds, only None"):
    _checks.check_threshold_tree("max_norm", {"a": None}, allow_tree=True)
  # None inside a tree is an empty subtree (an equinox model's non-array field).
  _checks.check_threshold_tree("max_norm", {"a": None, "b": 1.0}, allow_tree=True)


@pytest.mark.parametrize(
  "ord_, expected", [(jnp.array(1), 1), (np.array(math.inf), math.inf), (2.0, 2), (None, None)]
)
def test_canonical_ord_reads_concrete_arrays(ord_, expected):
  assert _checks.canonical_ord(ord_) == expected
