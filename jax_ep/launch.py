"""Launching stock-Triton kernels from JAX as XLA FFI custom calls (the triton backend's launch path).

``triton_call(kernel, *inputs, out_shapes=..., grid=...)`` compiles ``kernel`` (a ``@triton.jit``
function from ``kernels/``) ahead of time to a cubin (jax_ep/_compile.py: cached per signature,
in memory and on disk) and emits ONE ``jax.ffi.ffi_call`` of the FFI target
``jax_ep_triton_launch``. The HLO carries only the kernel's cache key, cubin path, name and launch
shape as attributes; the FFI handler (ffi/jax_ep_ffi.cc) loads the cubin once per device and
launches it on XLA's stream, adding the symmetric-memory parameters at run time. It works under
``jax.jit`` and inside ``jax.shard_map`` (each shard launches on its own device).

Kernel parameter ABI (what the handler passes, in order):
  1. every input buffer, then every output buffer (device pointers);
  2. only when ``symmetric=True``: ``sym_table`` (pointer to int64 [world]: every rank's
     symmetric-region base, as mapped on this device), ``rank`` (i32), ``world`` (i32),
     ``epoch`` (i64: per-device count of symmetric launches, 1 for the first; never reset while
     the runtime is up, so flag protocols need no resets);
  3. each entry of ``scalars``: a Python int passed as i32 when it fits, else i64, or a pair
     ``(value, "i32" | "i64" | "u32" | "u64")`` to fix the type;
  4. constexprs (compile-time only, not passed);
  5. Triton's own trailing ``global_scratch`` / ``profile_scratch`` pointers (added by the handler).

Also here: ``all_gather_int32``, the in-kernel barrier + all-gather of a small int32 vector
(kernels/exchange.py) over the runtime's symmetric world.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep import _ffi
from jax_ep import runtime

# numpy/jax dtype -> Triton pointer element type.
_TRITON_TYPES = {
    "float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
    "int8": "i8", "int16": "i16", "int32": "i32", "int64": "i64",
    "uint8": "u8", "uint16": "u16", "uint32": "u32", "uint64": "u64", "bool": "i1",
    "float8_e4m3fn": "fp8e4nv", "float8_e5m2": "fp8e5",
}
_SCALAR_TYPES = {"i32": 32, "i64": 64, "u32": 32, "u64": 64}


def triton_type(dtype) -> str:
  """The Triton element type name of a JAX/numpy dtype (e.g. bfloat16 -> "bf16")."""
  name = jnp.dtype(dtype).name
  if name not in _TRITON_TYPES:
    raise TypeError(f"jax_ep.launch.triton_call: dtype {name} has no Triton equivalent here; "
                    f"use one of {sorted(_TRITON_TYPES)}")
  return _TRITON_TYPES[name]


def _scalar(value, index: int) -> tuple[int, str]:
  if isinstance(value, tuple):
    v, t = value
    if t not in _SCALAR_TYPES:
      raise TypeError(f"jax_ep.launch.triton_call: scalars[{index}] type {t!r} must be one of "
                      f"{sorted(_SCALAR_TYPES)}")
    return int(v), t
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"jax_ep.launch.triton_call: scalars[{index}]={value!r} must be a Python int "
                    f"(or (int, type)); pass arrays as inputs instead")
  v = int(value)
  return v, ("i32" if -2**31 <= v < 2**31 else "i64")


def target_arch() -> int:
  """Compute capability kernels are compiled for: $JAX_EP_TARGET_ARCH, else the first GPU's,
  else 90 (H100/H200), which also serves lowering for CUDA on a machine without GPUs."""
  env = os.environ.get("JAX_EP_TARGET_ARCH")
  if env:
    return int(env)
  try:
    gpus = jax.devices("gpu")
  except RuntimeError:
    gpus = []
  if gpus:
    cc = getattr(gpus[0], "compute_capability", None)
    if cc:
      major, minor = str(cc).split(".")[:2]
      return int(major) * 10 + int(minor)
  return 90


def _gpu_present() -> bool:
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


def unavailable_reason() -> str | None:
  """None when Triton kernels can be launched here (triton, a CUDA GPU, our FFI library), else why.

  The triton backend and its grouped matmul both start from this check.
  """
  try:
    import triton  # noqa: F401
  except ImportError:
    return "triton is not installed (pip install 'jax_ep[gpu]')"
  if not _gpu_present():
    return "no CUDA GPU is visible to JAX"
  from jax_ep import _ffi
  if not _ffi.available():
    return ("the jax_ep FFI library (libjax_ep_ffi.so) is not built or failed to load; build the "
            "package with CUDA present or set JAX_EP_FFI_LIB")
  return None


def _grid3(grid) -> tuple[int, int, int]:
  g = (grid,) if isinstance(grid, (int, np.integer)) else tuple(grid)
  if not 1 <= len(g) <= 3 or any(not isinstance(v, (int, np.integer)) or v < 0 for v in g):
    raise ValueError(f"jax_ep.launch.triton_call: grid={grid!r} must be 1 to 3 non-negative "
                     f"Python ints")
  g = tuple(int(v) for v in g) + (1,) * (3 - len(g))
  return g  # type: ignore[return-value]


_registered: set[str] = set()  # kernel keys whose cubin the FFI library holds


def triton_call(kernel, *inputs, out_shapes, grid, num_warps: int = 4, num_stages: int = 3,
                constexprs: dict[str, Any] | None = None, scalars: Sequence = (),
                symmetric: bool = False, symmetric_bytes: int = 0,
                stage: tuple[int, int, int] | None = None, name: str | None = None,
                extern_libs: dict[str, str] | None = None) -> tuple[jax.Array, ...]:
  """Runs ``kernel`` on XLA's stream as one FFI custom call; returns its outputs.

  Args:
    kernel: a ``@triton.jit`` function whose parameters follow the ABI in this module's
      docstring.
    *inputs: JAX arrays, passed as device pointers (row-major, as XLA lays them out).
    out_shapes: ``jax.ShapeDtypeStruct`` (or a sequence of them) for the outputs; their contents
      are uninitialized unless the kernel writes them.
    grid: number of programs, an int or a tuple of up to 3 ints (static).
    num_warps, num_stages: Triton compile options.
    constexprs: values of the kernel's ``tl.constexpr`` parameters, by name.
    scalars: run-time integer parameters (see the ABI); they are HLO attributes, not constants
      of the cubin, so changing them does not recompile the kernel.
    symmetric: pass ``sym_table, rank, world, epoch`` (needs ``jax_ep.runtime.initialize``).
    symmetric_bytes: bytes of each rank's symmetric memory, from its start (the runtime's
      exchange area included), that the kernel may touch. The handler refuses the launch with
      an error when the runtime's region is smaller, e.g. re-initialized for smaller configs
      after this step was compiled. 0: not checked.
    stage: ``(input, offset, rank_stride)``, symmetric launches only: before the kernel, on
      the same stream, the handler copies input ``input`` whole into this rank's symmetric
      region at byte ``offset + rank * rank_stride`` (a device-to-device copy by the copy
      engines; refused if it would not fit the region). The kernel may then publish it to its
      peers; it must also keep them from reading it after the launch ends, since the next
      launch's copy overwrites it before any barrier (dispatch pull 4).
    name: a name scope for the custom call in the HLO (default: the kernel's name).
    extern_libs: LLVM bitcode to link, e.g. ``{"libnvshmem_device":
      kernels.nvshmem_device.bitcode_path()}`` for NVSHMEM device calls (then the kernel needs
      the nvshmem provider; the handler runs ``nvshmemx_cumodule_init`` on its module).

  Returns:
    A tuple with one array per entry of ``out_shapes``.
  """
  if isinstance(out_shapes, jax.ShapeDtypeStruct):
    out_shapes = (out_shapes,)
  out_shapes = tuple(out_shapes)
  if stage is not None and (not symmetric or not 0 <= stage[0] < len(inputs)
                            or min(stage[1:]) < 0):
    raise ValueError(f"jax_ep.launch.triton_call: stage={stage} must be (input index < "
                     f"{len(inputs)}, offset >= 0, rank stride >= 0) of a symmetric launch")
  grid3 = _grid3(grid)
  constexprs = dict(constexprs or {})
  scalar_items = [_scalar(v, i) for i, v in enumerate(scalars)]

  runtime_params = [triton_type(x.dtype) for x in inputs] + [triton_type(s.dtype)
                                                             for s in out_shapes]
  runtime_params = ["*" + t for t in runtime_params]
  if symmetric:
    runtime_params += ["*i64", "i32", "i32", "i64"]
  runtime_params += [t for _, t in scalar_items]
  free = [n for n in kernel.arg_names if n not in constexprs]
  if len(free) != len(runtime_params):
    raise TypeError(
        f"jax_ep.launch.triton_call: kernel {kernel.__name__} has {len(free)} non-constexpr "
        f"parameters {free} but the call supplies {len(runtime_params)} ({len(inputs)} inputs, "
        f"{len(out_shapes)} outputs, {'4 symmetric, ' if symmetric else ''}{len(scalar_items)} "
        f"scalars); fix the call or the constexprs={sorted(constexprs)}")
  signature = dict(zip(free, runtime_params))

  if symmetric and not runtime.is_initialized() and _gpu_present():
    raise RuntimeError(
        f"jax_ep.launch.triton_call: kernel {kernel.__name__} needs symmetric memory but the "
        f"jax_ep runtime is not initialized: call jax_ep.runtime.initialize(configs) first "
        f"(after jax.distributed.initialize() when running one process per GPU)")

  from jax_ep import _compile

  compiled = _compile.compile_kernel(kernel, signature, constexprs, num_warps=num_warps,
                                     num_stages=num_stages, arch=target_arch(),
                                     extern_libs=extern_libs)
  if _ffi.available():
    lib = _ffi.library()
    if compiled.key not in _registered:  # the library keeps every cubin for the process
      data = compiled.cubin()
      lib.jep_register_cubin(compiled.key.encode(), data, len(data))
      _registered.add(compiled.key)
    _ffi.register_target()
    if runtime.is_initialized():
      # Load the module on every runtime GPU now, not inside a launch while other jax_ep
      # kernels run (a module load can wait for the device to go idle).
      _ffi.check(lib.jep_preload_kernel(compiled.key.encode(), compiled.name.encode(),
                                        compiled.shared), "jax_ep.launch.triton_call (preload)")

  call = jax.ffi.ffi_call(_ffi.TARGET_NAME, out_shapes, has_side_effect=symmetric,
                          vmap_method="sequential")
  with jax.named_scope(name or kernel.__name__):
    outs = call(
        *inputs,
        kernel_key=compiled.key,
        kernel_path=compiled.path,
        kernel_name=compiled.name,
        grid_x=grid3[0], grid_y=grid3[1], grid_z=grid3[2],
        num_warps=compiled.num_warps,
        num_ctas=compiled.num_ctas,
        shared_mem=compiled.shared,
        global_scratch_size=compiled.global_scratch_size,
        global_scratch_align=compiled.global_scratch_align,
        profile_scratch_size=compiled.profile_scratch_size,
        symmetric=bool(symmetric),
        symmetric_bytes=np.int64(symmetric_bytes if symmetric else 0),
        stage_arg=np.int64(-1 if stage is None else stage[0]),
        stage_offset=np.int64(0 if stage is None else stage[1]),
        stage_rank_stride=np.int64(0 if stage is None else stage[2]),
        scalars=np.array([v for v, _ in scalar_items], dtype=np.int64),
        scalar_bits=np.array([_SCALAR_TYPES[t] for _, t in scalar_items], dtype=np.int64),
    )
  return tuple(outs)


def all_gather_int32(x: jax.Array, *, world: int | None = None, timeout_s: float = 10.0,
                     axis_name: str | None = None) -> tuple[jax.Array, jax.Array]:
  """Barrier + all-gather of a small int32 vector over the symmetric world (in-kernel).

  Call it per shard (inside ``shard_map``) on every rank, the same number of times in the same
  order, as with any collective. Order several calls by data dependencies.

  Args:
    x: ``[N] int32``, this rank's vector.
    world: number of ranks; default: the runtime's world size (or ``axis_name``'s size when
      only lowering, without the runtime, on a machine without GPUs).
    timeout_s: how long a rank waits for a peer before giving up on it.
    axis_name: when given, the mesh axis whose size must equal the runtime's world.

  Returns:
    ``out [world, N] int32`` with ``out[r]`` = rank r's ``x``, and ``status [world] int32``,
    1 where rank r did not arrive within ``timeout_s`` (its row is then stale), else 0.
  """
  from jax_ep.kernels import exchange
  from jax_ep.kernels.ep_sync import next_pow2

  x = jnp.asarray(x)
  if x.ndim != 1 or x.dtype != jnp.int32:
    raise TypeError(f"jax_ep.launch.all_gather_int32: x must be [N] int32, got {x.shape=} "
                    f"{x.dtype=}")
  n = x.shape[0]
  axis_size = jax.lax.axis_size(axis_name) if axis_name is not None else None
  if world is None:
    if runtime.is_initialized():
      world = runtime.world_size()
    elif axis_size is not None:
      world = axis_size
    else:
      raise RuntimeError("jax_ep.launch.all_gather_int32: the jax_ep runtime is not initialized: "
                         "call jax_ep.runtime.initialize(configs) first")
  if axis_size is not None and axis_size != world:
    raise ValueError(f"jax_ep.launch.all_gather_int32: axis {axis_name!r} has size {axis_size} "
                     f"but the symmetric world has {world} ranks; the EP axis must span exactly "
                     f"the devices given to jax_ep.runtime.initialize")
  need = exchange.area_bytes(world, n)
  if need > runtime.EXCHANGE_BYTES:
    raise ValueError(f"jax_ep.launch.all_gather_int32: {x.shape=} needs {need} bytes of the "
                     f"exchange area but it has {runtime.EXCHANGE_BYTES}; gather fewer values")
  if world > exchange.MAX_WORLD:
    raise ValueError(f"jax_ep.launch.all_gather_int32: world={world} exceeds "
                     f"{exchange.MAX_WORLD}")
  out, status = triton_call(
      exchange.all_gather_kernel, x,
      out_shapes=(jax.ShapeDtypeStruct((world, n), jnp.int32),
                  jax.ShapeDtypeStruct((world,), jnp.int32)),
      grid=(1,), num_warps=4,
      constexprs=dict(N=n, BLOCK_N=next_pow2(n), BLOCK_W=next_pow2(world),
                      FLAGS_OFF_=exchange.FLAGS_OFF, DATA_OFF_=exchange.DATA_OFF,
                      SEQ_OFF_=exchange.SEQ_OFF),
      scalars=((runtime.EXCHANGE_OFFSET, "i64"), (int(timeout_s * 1e9), "i64")),
      symmetric=True, symmetric_bytes=runtime.EXCHANGE_BYTES, name="jax_ep_all_gather_int32")
  return out, status
