"""jax_ep: expert-parallel token dispatch and combine for Mixture-of-Experts models in JAX.

Public API (see API.md in the design docs):
  EPConfig, dispatch, combine, grouped_matmul, DispatchLayout, runtime, nn, testing
"""
import os as _os

# In a source checkout the top-level ``kernels/`` folder sits beside this package; an installed
# wheel carries it as ``jax_ep/kernels``. Let ``import jax_ep.kernels`` work in both.
_here = _os.path.dirname(_os.path.abspath(__file__))
_src_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "kernels")) and _os.path.isfile(
    _os.path.join(_src_root, "kernels", "__init__.py")
):
  __path__.append(_src_root)  # type: ignore[name-defined]

from jax_ep.config import EPConfig
from jax_ep.layout import DispatchLayout
from jax_ep.api import combine, dispatch, grouped_matmul
from jax_ep import experts, runtime


def __getattr__(name):
  # jax_ep.nn needs flax (the optional "flax" extra) and jax_ep.testing is for tests: import
  # them only when asked for.
  if name in ("nn", "testing"):
    import importlib
    return importlib.import_module(f"jax_ep.{name}")
  raise AttributeError(f"module 'jax_ep' has no attribute {name!r}")


__all__ = [
    "EPConfig",
    "DispatchLayout",
    "dispatch",
    "combine",
    "grouped_matmul",
    "experts",
    "runtime",
    "nn",
    "testing",
]
__version__ = "0.1.0"
