"""The gather rule on any looked-up axis: penzai-style [D, V] tables read as ``E[:, ids]`` or
``jnp.take(E, ids, axis=1)``, and a table looked up along a middle axis, checked against
``jax.vmap(jax.grad(loss))`` (per_example_harness)."""

import haiku as hk
import jax.numpy as jnp
import numpy as np
from per_example_harness import check, check_plan, zoo_tests
from per_example_models import VOCAB, B, D, T, haiku, language, next_token_loss, plain

RULES = {"gather", "dot_general", "bias"}


def _transposed_table(p, tokens):
  return jnp.tanh(p["table"][:, tokens]).T @ p["out"]


def _haiku_take_axis_1(tokens):
  table = hk.get_parameter("table", (D, VOCAB), init=hk.initializers.RandomNormal())
  return hk.Linear(VOCAB)(jnp.tanh(jnp.take(table, tokens, axis=1).T))


def _middle_axis(p, tokens):
  x = p["table"][:, tokens, :]  # [2, T, D/2]
  return jnp.tanh(jnp.transpose(x, (1, 0, 2)).reshape(tokens.shape[0], D)) @ p["out"]


def _tied_transposed(p, tokens):
  """Lookup and output projection of one [D, V] table (the route is direct: the two uses'
  factor layouts differ)."""
  return jnp.tanh(p["table"][:, tokens]).T @ p["table"]


MODELS = {
  "gather_axis_transposed_table": lambda: language(
    plain(_transposed_table, {"table": (D, VOCAB), "out": (D, VOCAB)}), 70
  ),
  "gather_axis_haiku_take": lambda: language(haiku(_haiku_take_axis_1), 71),
  "gather_axis_middle": lambda: language(
    plain(_middle_axis, {"table": (2, VOCAB, D // 2), "out": (D, VOCAB)}), 72
  ),
  "gather_axis_tied_transposed": lambda: language(
    plain(_tied_transposed, {"table": (D, VOCAB)}), 73
  ),
}

test_zoo_matches_vmap_of_grad, test_zoo_plan_materializes_nothing = zoo_tests(MODELS, RULES)


def test_a_wide_transposed_table_takes_the_ghost_route():
  """A [D, V] table with V much larger than the positions: the index factor on axis 1, repeated
  tokens included (their cross terms)."""
  vocab = 512
  rng = np.random.default_rng(74)
  tokens = jnp.asarray(rng.integers(0, vocab, (B, T)))
  tokens = tokens.at[:, 1].set(tokens[:, 3])
  params = {
    name: jnp.asarray(0.3 * rng.normal(size=(D, vocab)), jnp.float32) for name in ("table", "out")
  }

  def loss(p, tokens):
    return next_token_loss(jnp.tanh(p["table"][:, tokens]).T @ p["out"], tokens)

  plan = check_plan(loss, params, tokens, rules=RULES)
  assert {leaf.path: leaf.route for leaf in plan.leaves}["['table']"] == "ghost", plan
  check(loss, params, tokens)
