"""gnorm_jax: gradient norms for JAX — measure ‖∇f‖, clip by it, normalize by it, penalize it.

Everything public is importable from here; submodules are private.
"""

from gnorm_jax.norms import leaf_norms, tree_norm
from gnorm_jax.transforms import grad_norm, value_grad_and_norm

__version__ = "0.1.0.dev0"

__all__ = [
    # norms
    "tree_norm",
    "leaf_norms",
    # transforms
    "grad_norm",
    "value_grad_and_norm",
]
