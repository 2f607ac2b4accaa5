"""Per-example gradient norms and clipped gradients (the ghost engine)."""

from gnorm_jax.per_example._api import clipped_grad, per_example_grad_norms

__all__ = ["per_example_grad_norms", "clipped_grad"]
