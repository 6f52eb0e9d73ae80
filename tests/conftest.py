"""Test session setup: 8 virtual CPU devices (before jax initializes), shared helpers."""
import os

# Must happen before jax creates its CPU client. GPU platforms are unaffected.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
if "xla_cpu_collective_call_terminate_timeout_seconds" not in _flags:
  # On a loaded 2-core machine a virtual device can miss XLA:CPU's default 40 s collective
  # deadline, which aborts the whole process.
  _flags += " --xla_cpu_collective_call_terminate_timeout_seconds=900"
os.environ["XLA_FLAGS"] = _flags.strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def cpu_mesh(ep_size: int, axis_name: str = "ep"):
  """A 1-D mesh of ``ep_size`` devices of the default backend (Auto axis types)."""
  devices = jax.devices()
  if len(devices) < ep_size:
    pytest.skip(f"needs {ep_size} devices, have {len(devices)}")
  return jax.sharding.Mesh(np.array(devices[:ep_size]), (axis_name,))


@pytest.fixture
def rng(request):
  """A numpy Generator with a fresh seed per test, printed on failure for reproduction."""
  seed = int.from_bytes(os.urandom(4), "little")
  request.node.user_properties.append(("seed", seed))
  print(f"seed={seed}")
  return np.random.default_rng(seed)
