"""Ahead-of-time compilation of stock-Triton kernels to cubins, cached in memory and on disk.

``compile_kernel`` turns a ``@triton.jit`` function plus a full signature into a ``CompiledKernel``:
the cubin path and the launch metadata the FFI handler needs. No GPU is needed: Triton compiles
for ``GPUTarget("cuda", arch, 32)`` with its bundled ptxas.

Cache: ``$JAX_EP_CACHE_DIR`` (default ``~/.cache/jax_ep/kernels``), one folder per key holding
``<name>.cubin`` and ``meta.json``. The key hashes the kernel's source (Triton's ``cache_key``,
which covers the functions it calls), the signature, the constexprs, the launch options, the
target architecture and the Triton version. Writes are atomic (temp file + rename), so several
processes may compile the same kernel at once. The cubin path goes into the HLO, so every
process that runs an executable (e.g. one loaded from JAX's persistent compilation cache) must
see the same cache folder, or have compiled the kernel itself.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import threading
from typing import Any

_lock = threading.Lock()
_memory_cache: dict[str, "CompiledKernel"] = {}


@dataclasses.dataclass(frozen=True)
class CompiledKernel:
  """A cubin on disk and what launching it needs.

  Attributes:
    key: hex digest identifying the compiled kernel (signature, constexprs, options, arch).
    path: absolute path of the cubin file.
    name: the kernel's entry point (the Python function's name).
    arch: compute capability it was compiled for, e.g. 90.
    num_warps, num_ctas, shared: launch shape and dynamic shared memory bytes.
    global_scratch_size, global_scratch_align, profile_scratch_size: per-program scratch bytes
      that Triton's ABI expects after the kernel's own parameters.
  """

  key: str
  path: str
  name: str
  arch: int
  num_warps: int
  num_ctas: int
  shared: int
  global_scratch_size: int
  global_scratch_align: int
  profile_scratch_size: int

  def cubin(self) -> bytes:
    with open(self.path, "rb") as f:
      return f.read()


def cache_dir() -> str:
  """The on-disk kernel cache folder (created on demand)."""
  d = os.environ.get("JAX_EP_CACHE_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "jax_ep", "kernels")
  os.makedirs(d, exist_ok=True)
  return d


def _value_key(v: Any) -> str:
  return f"{type(v).__name__}:{v!r}"


def _extern_libs_key(extern_libs: dict[str, str] | None) -> str:
  parts = []
  for name, path in sorted((extern_libs or {}).items()):
    st = os.stat(path)
    parts.append(f"{name}={os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}")
  return ";".join(parts)


def kernel_key(fn, signature: dict[str, str], constexprs: dict[str, Any], num_warps: int,
               num_stages: int, arch: int, attrs: dict | None = None,
               extern_libs: dict[str, str] | None = None) -> str:
  """The cache key of one compilation (a sha256 hex digest)."""
  import triton

  parts = [
      "jax_ep-kernel-v1",
      triton.__version__,
      fn.cache_key,
      repr(sorted(signature.items())),
      repr(sorted((k, _value_key(v)) for k, v in constexprs.items())),
      f"warps={num_warps}",
      f"stages={num_stages}",
      f"arch={arch}",
      "fp_fusion=1",
      repr(sorted((attrs or {}).items())),
      _extern_libs_key(extern_libs),
  ]
  return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _atomic_write(path: str, data: bytes) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _signature(fn, signature: dict[str, str], constexprs: dict[str, Any],
               pointer_alignment: int) -> tuple[dict[str, str], dict]:
  """(Triton signature of every parameter, attrs declaring pointer alignment) of ``fn``."""
  full_sig = {}
  for name in fn.arg_names:
    if name in constexprs:
      full_sig[name] = "constexpr"
    elif name in signature:
      full_sig[name] = signature[name]
    else:
      raise TypeError(f"jax_ep: kernel {fn.__name__} parameter {name!r} has neither a type in "
                      f"the signature nor a constexpr value")
  unknown = set(constexprs) - set(fn.arg_names)
  if unknown:
    raise TypeError(f"jax_ep: kernel {fn.__name__} has no parameters {sorted(unknown)}")
  attrs = {}
  if pointer_alignment:
    for i, name in enumerate(fn.arg_names):
      if full_sig[name].startswith("*"):
        attrs[(i,)] = [["tt.divisibility", pointer_alignment]]
  return full_sig, attrs


def _triton_compile(fn, full_sig, constexprs, attrs, num_warps, num_stages, arch, extern_libs):
  import triton
  from triton.backends.compiler import GPUTarget
  from triton.compiler import ASTSource
  if getattr(fn, "is_gluon", lambda: False)():  # a @gluon.jit kernel (explicit layouts)
    from triton.experimental.gluon._runtime import GluonASTSource as ASTSource
  src = ASTSource(fn=fn, signature=full_sig, constexprs=constexprs, attrs=attrs)
  # FMA contraction stated, not left to Triton's default (on through 3.9, off from 3.10): the
  # kernels' bits then do not depend on the Triton version.
  options = {"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True}
  if extern_libs:
    options["extern_libs"] = tuple(sorted(extern_libs.items()))
  return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def build(fn, signature: dict[str, str], constexprs: dict[str, Any] | None = None, *,
          num_warps: int = 4, num_stages: int = 3, arch: int = 90, pointer_alignment: int = 16,
          extern_libs: dict[str, str] | None = None):
  """``compile_kernel`` without the cache: Triton's compiled kernel itself (``.asm["ptx"]``,
  ``.asm["cubin"]``, ``.metadata``), for inspecting what a launch would run."""
  constexprs = dict(constexprs or {})
  full_sig, attrs = _signature(fn, signature, constexprs, pointer_alignment)
  return _triton_compile(fn, full_sig, constexprs, attrs, num_warps, num_stages, arch,
                         extern_libs)


def compile_kernel(fn, signature: dict[str, str], constexprs: dict[str, Any] | None = None, *,
                   num_warps: int = 4, num_stages: int = 3, arch: int = 90,
                   pointer_alignment: int = 16,
                   extern_libs: dict[str, str] | None = None) -> CompiledKernel:
  """Compiles ``fn`` (a ``@triton.jit`` function) to a cubin for ``sm_<arch>``, or reuses the cache.

  Args:
    fn: the Triton kernel.
    signature: Triton type string for every non-constexpr parameter, by name, e.g.
      ``{"x_ptr": "*i32", "rank": "i32"}``; constexpr parameters may be left out.
    constexprs: value of every constexpr parameter, by name.
    num_warps, num_stages: Triton launch/compile options.
    arch: compute capability as an int (90 for H100/H200).
    pointer_alignment: every pointer parameter is declared divisible by this many bytes
      (XLA's buffers and the runtime's tables are at least 16-byte aligned).
    extern_libs: LLVM bitcode libraries to link, by name, e.g.
      ``{"libnvshmem_device": kernels.nvshmem_device.bitcode_path()}``.
  """
  constexprs = dict(constexprs or {})
  full_sig, attrs = _signature(fn, signature, constexprs, pointer_alignment)
  key = kernel_key(fn, full_sig, constexprs, num_warps, num_stages, arch,
                   {str(k): v for k, v in attrs.items()}, extern_libs)
  with _lock:
    hit = _memory_cache.get(key)
    if hit is not None:
      return hit
    folder = os.path.join(cache_dir(), key[:2], key)
    meta_path = os.path.join(folder, "meta.json")
    if os.path.exists(meta_path):
      with open(meta_path) as f:
        meta = json.load(f)
      k = CompiledKernel(**meta)
      if os.path.exists(k.path):
        _memory_cache[key] = k
        return k
    compiled = _triton_compile(fn, full_sig, constexprs, attrs, num_warps, num_stages, arch,
                               extern_libs)
    md = compiled.metadata
    os.makedirs(folder, exist_ok=True)
    cubin_path = os.path.join(folder, f"{compiled.name}.cubin")
    _atomic_write(cubin_path, compiled.asm["cubin"])
    k = CompiledKernel(
        key=key, path=cubin_path, name=compiled.name, arch=arch, num_warps=md.num_warps,
        num_ctas=md.num_ctas, shared=md.shared,
        global_scratch_size=getattr(md, "global_scratch_size", 0) or 0,
        global_scratch_align=getattr(md, "global_scratch_align", 1) or 1,
        profile_scratch_size=getattr(md, "profile_scratch_size", 0) or 0)
    _atomic_write(meta_path, json.dumps(dataclasses.asdict(k)).encode())
    _memory_cache[key] = k
    return k
