"""Loading the jax_ep FFI library (``libjax_ep_ffi.so``) and registering its XLA FFI target.

The library is optional: it is built only where its headers were found (ffi/CMakeLists.txt).
Where it is, ``library()`` returns a ctypes handle whose ``jep_*`` functions the runtime calls;
``register_target()`` registers the launch handler with XLA for platform CUDA.

Search order for the library:
  1. ``$JAX_EP_FFI_LIB`` (a file path);
  2. ``jax_ep/libjax_ep_ffi.so`` (an installed wheel);
  3. ``<source checkout>/build/**/jax_ep/libjax_ep_ffi.so`` (a CMake build in the checkout).
"""
from __future__ import annotations

import ctypes
import glob
import os
import threading

TARGET_NAME = "jax_ep_triton_launch"
LIB_NAME = "libjax_ep_ffi.so"
ABI_VERSION = 4

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_error: str | None = None
_registered = False


class FFILibraryError(RuntimeError):
  """The jax_ep FFI library is missing or failed to load."""


def candidate_paths() -> list[str]:
  """Where ``library()`` looks, in order."""
  here = os.path.dirname(os.path.abspath(__file__))
  paths = []
  env = os.environ.get("JAX_EP_FFI_LIB")
  if env:
    paths.append(env)
  paths.append(os.path.join(here, LIB_NAME))
  src_root = os.path.dirname(here)
  paths += sorted(glob.glob(os.path.join(src_root, "build", "**", "jax_ep", LIB_NAME),
                            recursive=True))
  return paths


def _declare(lib: ctypes.CDLL) -> None:
  c = ctypes
  sigs = {
      "jep_abi_version": (c.c_int, []),
      "jep_last_error": (c.c_char_p, []),
      "jep_has_nvshmem_support": (c.c_int, []),
      "jep_cuda_device_count": (c.c_int, []),
      "jep_register_cubin": (c.c_int, [c.c_char_p, c.c_char_p, c.c_size_t]),
      "jep_provider": (c.c_int, []),
      "jep_device_info": (c.c_int, [c.c_int, c.POINTER(c.c_int64)]),
      "jep_read_symmetric": (c.c_int, [c.c_int, c.c_size_t, c.c_void_p, c.c_size_t]),
      "jep_preload_kernel": (c.c_int, [c.c_char_p, c.c_char_p, c.c_int64]),
      "jep_peer_init": (c.c_int, [c.POINTER(c.c_int), c.c_int, c.c_size_t, c.c_size_t]),
      "jep_nvshmem_open": (c.c_int, [c.c_char_p]),
      "jep_nvshmem_uniqueid_size": (c.c_size_t, []),
      "jep_nvshmem_get_uniqueid": (c.c_int, [c.c_void_p]),
      "jep_nvshmem_init": (c.c_int, [c.c_int, c.c_int, c.c_int, c.c_void_p, c.c_size_t,
                                     c.c_size_t]),
      "jep_shutdown": (c.c_int, []),
      "jep_nvshmem_finalize": (c.c_int, []),
  }
  for name, (restype, argtypes) in sigs.items():
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = argtypes


def library() -> ctypes.CDLL:
  """The loaded FFI library; raises FFILibraryError saying how to build it when absent."""
  global _lib, _lib_error
  with _lock:
    if _lib is not None:
      return _lib
    if _lib_error is not None:
      raise FFILibraryError(_lib_error)
    tried = []
    for path in candidate_paths():
      if not os.path.isfile(path):
        tried.append(path)
        continue
      try:
        lib = ctypes.CDLL(path)  # RTLD_LOCAL: nothing of it may interpose XLA's symbols
        _declare(lib)
      except (OSError, AttributeError) as e:
        _lib_error = f"jax_ep: cannot load the FFI library {path}: {e}"
        raise FFILibraryError(_lib_error) from e
      if lib.jep_abi_version() != ABI_VERSION:
        _lib_error = (f"jax_ep: the FFI library {path} has ABI {lib.jep_abi_version()}, this "
                      f"package expects {ABI_VERSION}: rebuild it (cmake --build ...)")
        raise FFILibraryError(_lib_error)
      _lib = lib
      return lib
    _lib_error = (
        "jax_ep: the FFI library libjax_ep_ffi.so was not found (looked at: "
        + ", ".join(tried) + "). It is built by `pip install --no-build-isolation .` where "
        "jaxlib and CUDA headers are present, or by `cmake -S . -B build/ffi && cmake --build "
        "build/ffi`; or point JAX_EP_FFI_LIB at it. Without it only the xla backend works.")
    raise FFILibraryError(_lib_error)


def available() -> bool:
  """Whether the FFI library can be loaded."""
  try:
    library()
    return True
  except FFILibraryError:
    return False


def last_error() -> str:
  return library().jep_last_error().decode(errors="replace")


def check(rc: int, api: str) -> int:
  """Raises RuntimeError with the library's message when ``rc`` is negative."""
  if rc < 0:
    raise RuntimeError(f"{api}: {last_error()}")
  return rc


def register_target() -> None:
  """Registers the launch handler with XLA for platform CUDA (once; needs the library)."""
  global _registered
  if _registered:
    return
  import jax

  lib = library()
  with _lock:
    if _registered:
      return
    capsule = jax.ffi.pycapsule(getattr(lib, TARGET_NAME))
    jax.ffi.register_ffi_target(TARGET_NAME, capsule, platform="CUDA")
    _registered = True
