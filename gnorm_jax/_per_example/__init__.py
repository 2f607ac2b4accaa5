"""Per-example gradient norms and clipped gradients (the ghost engine)."""

from gnorm_jax._per_example._api import (
  LeafPlan,
  PerExamplePlan,
  clipped_grad,
  per_example_grad_norms,
  per_example_plan,
)

__all__ = [
  "per_example_grad_norms",
  "clipped_grad",
  "per_example_plan",
  "PerExamplePlan",
  "LeafPlan",
]
