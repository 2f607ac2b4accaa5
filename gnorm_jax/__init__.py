"""gnorm_jax: gradient norms for JAX — measure ‖∇f‖, clip by it, normalize by it, penalize it.

Everything public is importable from here; submodules are private.
"""

from gnorm_jax._adaptive import (
  AutoClipState,
  QuantileClipState,
  SkipSpikesState,
  ZClipState,
  autoclip,
  quantile_clip,
  skip_spikes,
  zclip,
)
from gnorm_jax._clipping import (
  ClipByNormState,
  NormalizeState,
  clip_by_norm,
  normalize,
  normalized_sgd,
)
from gnorm_jax._diagnostics import (
  NoiseScale,
  NoiseScaleTracker,
  NoiseScaleTrackerState,
  RecordLeafNormsState,
  flat_leaf_norms,
  gradient_noise_scale,
  noise_scale_from_two_batches,
  noise_scale_tracker,
  record_leaf_norms,
)
from gnorm_jax._dp import (
  DPNoiseState,
  PoissonBatches,
  dp_epsilon,
  dp_noise,
  dp_noise_multiplier,
  poisson_batches,
  poisson_max_batch_size,
)
from gnorm_jax._norms import leaf_norms, tree_norm
from gnorm_jax._penalty import (
  gradient_penalty,
  interpolate,
  penalized,
  penalized_value_and_grad,
  r1_penalty,
)
from gnorm_jax._per_example import (
  LeafPlan,
  PerExamplePlan,
  clipped_grad,
  per_example_grad_norms,
  per_example_plan,
)
from gnorm_jax._per_example._api import ClippedGradFn
from gnorm_jax._transforms import grad_norm, value_grad_and_norm

__version__ = "0.1.0.dev0"

__all__ = [
  # norms of pytrees and of gradients
  "tree_norm",
  "leaf_norms",
  "grad_norm",
  "value_grad_and_norm",
  # clipping and normalized updates (Optax)
  "clip_by_norm",
  "normalize",
  "normalized_sgd",
  "ClipByNormState",
  "NormalizeState",
  # adaptive clipping and spike protection (Optax)
  "autoclip",
  "zclip",
  "quantile_clip",
  "skip_spikes",
  "AutoClipState",
  "ZClipState",
  "QuantileClipState",
  "SkipSpikesState",
  # gradient-norm penalties and GAN penalties
  "penalized",
  "penalized_value_and_grad",
  "gradient_penalty",
  "r1_penalty",
  "interpolate",
  # per-example norms and clipping
  "per_example_grad_norms",
  "per_example_plan",
  "PerExamplePlan",
  "LeafPlan",
  "clipped_grad",
  "ClippedGradFn",
  # differential privacy (DP-SGD)
  "dp_noise",
  "DPNoiseState",
  "dp_epsilon",
  "dp_noise_multiplier",
  "poisson_batches",
  "PoissonBatches",
  "poisson_max_batch_size",
  # diagnostics
  "gradient_noise_scale",
  "noise_scale_from_two_batches",
  "NoiseScale",
  "noise_scale_tracker",
  "NoiseScaleTracker",
  "NoiseScaleTrackerState",
  "flat_leaf_norms",
  "record_leaf_norms",
  "RecordLeafNormsState",
]
