"""Runtime of the triton backend: symmetric buffers outside XLA (GPU runtime issue).

Not built yet: the xla backend needs no runtime.
"""
from __future__ import annotations


def is_initialized() -> bool:
  """Whether ``initialize`` has set up the triton backend's buffers in this process."""
  return False


def initialize(configs) -> None:
  raise NotImplementedError(
      "jax_ep.runtime.initialize: the triton backend's runtime is not available in this build; "
      "use EPConfig(backend='xla')."
  )


def shutdown() -> None:
  """Release the runtime's buffers (a no-op when nothing was initialized)."""
