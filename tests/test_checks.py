"""gnorm_jax._checks: the one number policy every public function uses."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
