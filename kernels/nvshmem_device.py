"""NVSHMEM device functions for stock-Triton kernels (linked from NVSHMEM's LLVM bitcode).

Kernels that call these must be compiled with ``extern_libs={"libnvshmem_device":
bitcode_path()}`` (``jax_ep.launch.triton_call(..., extern_libs=...)``) and run on the
runtime's nvshmem provider: the handler sees NVSHMEM's device state in the cubin and calls
``nvshmemx_cumodule_init`` on the module before its first launch.

Declared like any ``extern_elementwise``: a call is executed by every thread of the program.
Triton 3.6's LLVM reads the bitcode of NVSHMEM <= 3.7 (the image's 3.4.5), not 3.8's.
"""
from __future__ import annotations

import importlib.util
import os

from triton.language import core


def bitcode_path(arch: int = 90) -> str:
  """Path of NVSHMEM's device bitcode from the nvidia-nvshmem wheel ($JAX_EP_NVSHMEM_BC wins)."""
  env = os.environ.get("JAX_EP_NVSHMEM_BC")
  if env:
    return env
  try:
    spec = importlib.util.find_spec("nvidia.nvshmem")
  except ModuleNotFoundError:  # no nvidia.* wheel at all
    spec = None
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("NVSHMEM device bitcode: install nvidia-nvshmem-cu13 or set "
                            "JAX_EP_NVSHMEM_BC")
  lib = os.path.join(list(spec.submodule_search_locations)[0], "lib")
  for name in (f"libnvshmem_device_sm_{arch}.bc", "libnvshmem_device.bc"):
    if os.path.exists(os.path.join(lib, name)):
      return os.path.join(lib, name)
  raise FileNotFoundError(f"no NVSHMEM device bitcode in {lib}")


@core.extern
def my_pe(_semantic=None):
  """This PE's rank (``nvshmem_my_pe``), int32."""
  return core.extern_elementwise("", "", [], {(): ("nvshmem_my_pe", core.dtype("int32"))},
                                 is_pure=True, _semantic=_semantic)


@core.extern
def n_pes(_semantic=None):
  """Number of PEs (``nvshmem_n_pes``), int32."""
  return core.extern_elementwise("", "", [], {(): ("nvshmem_n_pes", core.dtype("int32"))},
                                 is_pure=True, _semantic=_semantic)
