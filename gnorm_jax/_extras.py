"""Optional dependencies, imported where they are used, naming the extra that installs them."""

from __future__ import annotations

import importlib
from types import ModuleType


def import_extra(module: str, extra: str) -> ModuleType:
  """Imports ``module``, or raises ImportError saying which extra of gnorm_jax installs it."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    package = module.partition(".")[0]
    raise ImportError(
      f"{package} is not installed; this part of gnorm_jax needs the [{extra}] extra:"
      f' pip install "gnorm_jax[{extra}]"'
    ) from e
