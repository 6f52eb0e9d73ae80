"""CPU tests of the GPU runtime's build, compile and lowering paths (no GPU needed).

* the FFI library builds with CMake where its headers are, or is skipped cleanly where not;
* the exchange kernel compiles to an sm_90 cubin, and the kernel cache works across processes;
* a jitted shard_map using the launch path lowers for CUDA on this machine, names our FFI target
  and carries no device addresses;
* runtime errors say what to call.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jax_ep import EPConfig, runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

triton = pytest.importorskip("triton")
tl = triton.language


@pytest.fixture(autouse=True)
def _kernel_cache(tmp_path_factory, monkeypatch):
  monkeypatch.setenv("JAX_EP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kernel_cache"))


# -- build --------------------------------------------------------------------------------------

def _cmake(build_dir, *defs):
  cmd = ["cmake", "-S", REPO, "-B", str(build_dir), f"-DPython_EXECUTABLE={sys.executable}",
         *defs]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_ffi_library_builds_or_is_skipped(tmp_path):
  cfg = _cmake(tmp_path / "b")
  assert cfg.returncode == 0, cfg.stdout + cfg.stderr
  if "jax_ep: building the FFI library" not in cfg.stdout:
    assert "jax_ep: FFI library skipped" in cfg.stdout, cfg.stdout
    pytest.skip("FFI headers absent here: the build skipped the library, as designed")
  build = subprocess.run(["cmake", "--build", str(tmp_path / "b"), "-j2"], capture_output=True,
                         text=True, timeout=600)
  assert build.returncode == 0, build.stdout + build.stderr
  lib = tmp_path / "b" / "jax_ep" / "libjax_ep_ffi.so"
  assert lib.exists()
  syms = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True,
                        text=True).stdout
  for name in ("jax_ep_triton_launch", "jep_peer_init", "jep_nvshmem_init", "jep_shutdown"):
    assert re.search(rf"\bT {name}\b", syms), name
  # No link-time dependency on CUDA or NVSHMEM: both are dlopen'ed at run time.
  needed = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True).stdout
  assert "libcuda" not in needed and "nvshmem" not in needed and "cudart" not in needed
  # It loads and reports the missing driver instead of crashing.
  probe = subprocess.run(
      [sys.executable, "-c",
       "import ctypes,sys; l=ctypes.CDLL(sys.argv[1]); l.jep_last_error.restype=ctypes.c_char_p;"
       "n=l.jep_cuda_device_count(); print(n, l.jep_last_error().decode())", str(lib)],
      capture_output=True, text=True, timeout=60)
  assert probe.returncode == 0, probe.stderr
  count, _, msg = probe.stdout.strip().partition(" ")
  assert int(count) > 0 or "libcuda" in msg or "cuInit" in msg, probe.stdout


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
@pytest.mark.parametrize("var", ["JAX_EP_XLA_INCLUDE", "JAX_EP_CUDA_INCLUDE"])
def test_ffi_build_skips_without_headers(tmp_path, var):
  cfg = _cmake(tmp_path / "b", f"-D{var}=/nonexistent")
  assert cfg.returncode == 0, cfg.stdout + cfg.stderr
  assert "jax_ep: FFI library skipped" in cfg.stdout


# -- compile ------------------------------------------------------------------------------------

EXCHANGE_SIG = {"x_ptr": "*i32", "out_ptr": "*i32", "status_ptr": "*i32", "sym_table": "*i64",
                "rank": "i32", "world": "i32", "epoch": "i64", "area_offset": "i64",
                "timeout_ns": "i64"}


def _exchange_constexprs(world, n):
  from jax_ep.kernels import exchange
  from jax_ep.kernels.ep_sync import next_pow2
  return dict(N=n, BLOCK_N=next_pow2(n), BLOCK_W=next_pow2(world),
              FLAGS_OFF_=exchange.FLAGS_OFF, DATA_OFF_=exchange.DATA_OFF,
              SEQ_OFF_=exchange.SEQ_OFF)


@pytest.mark.parametrize("world,n", [(2, 1), (4, 37), (8, 256)])
def test_exchange_kernel_compiles_for_sm90(world, n):
  from jax_ep import _compile
  from jax_ep.kernels import exchange

  k = _compile.compile_kernel(exchange.all_gather_kernel, EXCHANGE_SIG,
                              _exchange_constexprs(world, n), arch=90)
  data = k.cubin()
  assert data[:4] == b"\x7fELF" and k.name == "all_gather_kernel" and k.arch == 90
  assert k.num_ctas == 1 and k.global_scratch_size == 0


def test_exchange_kernel_ptx_uses_system_scope():
  """The flag protocol needs system-scope release/acquire (peers are other GPUs)."""
  from triton.backends.compiler import GPUTarget
  from triton.compiler import ASTSource

  from jax_ep.kernels import exchange

  cx = _exchange_constexprs(4, 16)
  sig = {n: EXCHANGE_SIG.get(n, "constexpr") for n in exchange.all_gather_kernel.arg_names}
  ptx = triton.compile(ASTSource(exchange.all_gather_kernel, sig, cx),
                       target=GPUTarget("cuda", 90, 32),
                       options={"enable_fp_fusion": True}).asm["ptx"]  # as jax_ep._compile
  assert re.search(r"atom\.global\.sys\.release\.exch\.b64", ptx)
  assert "ld.global.acquire.sys.b64" in ptx
  assert "fence.acq_rel.sys" in ptx
  # 9 parameters of ours + Triton's two scratch pointers.
  assert len(re.findall(r"\.param .* all_gather_kernel_param_\d+", ptx)) == 11


def test_kernel_cache_is_shared_across_processes(tmp_path, monkeypatch):
  from jax_ep import _compile
  from jax_ep.kernels import exchange

  monkeypatch.setenv("JAX_EP_CACHE_DIR", str(tmp_path))
  k = _compile.compile_kernel(exchange.all_gather_kernel, EXCHANGE_SIG,
                              _exchange_constexprs(2, 5))
  mtime = os.path.getmtime(k.path)
  code = ("import sys; sys.path.insert(0, sys.argv[1]);"
          "from jax_ep import _compile; from jax_ep.kernels import exchange;"
          "from tests.test_runtime_cpu import EXCHANGE_SIG, _exchange_constexprs;"
          "k = _compile.compile_kernel(exchange.all_gather_kernel, EXCHANGE_SIG,"
          " _exchange_constexprs(2, 5)); print(k.key, k.path)")
  out = subprocess.run([sys.executable, "-c", code, REPO], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "JAX_EP_CACHE_DIR": str(tmp_path),
                                         "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  key, path = out.stdout.split()[-2:]
  assert (key, path) == (k.key, k.path)
  assert os.path.getmtime(k.path) == mtime  # read from disk, not recompiled
  other = _compile.compile_kernel(exchange.all_gather_kernel, EXCHANGE_SIG,
                                  _exchange_constexprs(2, 6))
  assert other.key != k.key


# -- lowering -----------------------------------------------------------------------------------

@triton.jit
def _scale_kernel(x_ptr, out_ptr, alpha, n, BLOCK: tl.constexpr):
  offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
  m = offs < n
  tl.store(out_ptr + offs, alpha * tl.load(x_ptr + offs, mask=m), mask=m)


def _custom_calls(text):
  return [l for l in text.splitlines() if "stablehlo.custom_call" in l]


def _ints_in(attr_text):
  return [int(v) for v in re.findall(r"-?\d{4,}", attr_text)]


def test_all_gather_lowers_for_cuda_without_addresses():
  from jax_ep import launch

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("ep",))

  def per_shard(x):
    out, status = launch.all_gather_int32(x[0], axis_name="ep", timeout_s=3.0)
    return out[None], status[None]

  f = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=P("ep"), out_specs=(P("ep"),) * 2))
  x = jax.ShapeDtypeStruct((4, 16), jnp.int32)
  text = f.trace(x).lower(lowering_platforms=("cuda",)).as_text()
  calls = _custom_calls(text)
  assert len(calls) == 1 and "@jax_ep_triton_launch" in calls[0], calls
  call = calls[0]
  assert "has_side_effect = true" in call and "symmetric = true" in call
  # It touches the exchange area only: the handler refuses it on a smaller region.
  assert f"symmetric_bytes = {runtime.EXCHANGE_BYTES} : i64" in call
  assert 'kernel_name = "all_gather_kernel"' in call
  assert "(tensor<16xi32>) -> (tensor<4x16xi32>, tensor<4xi32>)" in call
  # The only large integers are the kernel's documented scalars (exchange offset, timeout):
  # no device pointer is baked into the HLO.
  scalars = re.search(r"scalars = dense<\[(.*?)\]>", call).group(1)
  assert [int(v) for v in scalars.split(",")] == [runtime.EXCHANGE_OFFSET, 3_000_000_000]
  rest = call.replace(scalars, "").split("kernel_key")[0]
  assert all(abs(v) < 2**20 for v in _ints_in(rest)), rest
  # Lowering does not depend on process state: it is identical the second time.
  assert _custom_calls(f.trace(x).lower(lowering_platforms=("cuda",)).as_text()) == calls


def test_triton_call_lowers_inside_jit():
  from jax_ep import launch

  n = 3000

  @jax.jit
  def f(x):
    (y,) = launch.triton_call(_scale_kernel, x, out_shapes=jax.ShapeDtypeStruct(x.shape, x.dtype),
                              grid=(triton.cdiv(n, 1024),), constexprs={"BLOCK": 1024},
                              scalars=[5, n])
    return y * 2

  text = f.trace(jax.ShapeDtypeStruct((n,), jnp.float32)).lower(
      lowering_platforms=("cuda",)).as_text()
  (call,) = _custom_calls(text)
  assert "@jax_ep_triton_launch" in call and "symmetric = false" in call
  assert "symmetric_bytes = 0 : i64" in call
  assert "grid_x = 3" in call and "scalars = dense<[5, 3000]>" in call
  assert "scalar_bits = dense<32>" in call
  assert "has_side_effect" not in call
  assert "stage_arg = -1 : i64" in call  # no staging copy unless asked for
  # A staging copy is a symmetric launch's: asked for elsewhere, or of an input that does not
  # exist, it is refused with the argument named.
  x = jnp.zeros((n,), jnp.float32)
  for stage in [(0, 0, 0), (1, 0, 0)]:
    with pytest.raises(ValueError, match=r"stage=.*symmetric launch"):
      launch.triton_call(_scale_kernel, x, out_shapes=jax.ShapeDtypeStruct(x.shape, x.dtype),
                         grid=(3,), constexprs={"BLOCK": 1024}, scalars=[5, n],
                         symmetric=stage[0] == 1, stage=stage)


def test_triton_call_checks_parameter_count():
  from jax_ep import launch

  with pytest.raises(TypeError, match=r"_scale_kernel has 4 non-constexpr parameters"):
    launch.triton_call(_scale_kernel, jnp.zeros(4),
                       out_shapes=jax.ShapeDtypeStruct((4,), jnp.float32), grid=1,
                       constexprs={"BLOCK": 4}, scalars=[1])
  with pytest.raises(TypeError, match=r"scalars\[0\]"):
    launch.triton_call(_scale_kernel, jnp.zeros(4),
                       out_shapes=jax.ShapeDtypeStruct((4,), jnp.float32), grid=1,
                       constexprs={"BLOCK": 4}, scalars=[1.5, 4])


# -- runtime API --------------------------------------------------------------------------------

def test_runtime_errors_without_gpu():
  cfg = EPConfig(num_experts=8, topk=2, hidden=16, max_tokens_per_rank=4)
  assert not runtime.is_initialized()
  with pytest.raises(runtime.RuntimeNotInitializedError, match=r"jax_ep.runtime.initialize"):
    runtime.world_size()
  with pytest.raises(runtime.RuntimeNotInitializedError, match="initialize"):
    runtime.check_config(cfg)
  with pytest.raises(RuntimeError, match=r"needs CUDA GPUs.*backend='xla'"):
    runtime.initialize([cfg])
  with pytest.raises(TypeError, match="EPConfig"):
    runtime.initialize([])
  with pytest.raises(ValueError, match="provider"):
    runtime.initialize(cfg, provider="mpi")
  runtime.shutdown()  # a no-op


def test_region_sizes_grow_with_the_config(monkeypatch):
  small = EPConfig(num_experts=8, topk=2, hidden=16, max_tokens_per_rank=4)
  big = EPConfig(num_experts=64, topk=8, hidden=7168, max_tokens_per_rank=4096)
  s, b = runtime.required_bytes([small], 4), runtime.required_bytes([big], 4)
  assert 0 < s < b and b % (1 << 21) == 0
  assert runtime.required_bytes([small, big], 4) == b
  monkeypatch.setenv("NVSHMEM_SYMMETRIC_SIZE", "2G")
  assert runtime.nvshmem_heap_bytes() == 2 << 30
  monkeypatch.setenv("NVSHMEM_SYMMETRIC_SIZE", "1073741824")
  assert runtime.nvshmem_heap_bytes() == 1 << 30


def test_all_gather_inside_fori_loop_lowers():
  """A chain of exchanges in a loop (ordered by the carried data) lowers to one custom call in
  a while body."""
  from jax_ep import launch

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("ep",))

  def per_shard(x):
    def body(_, c):
      g, _ = launch.all_gather_int32(c, axis_name="ep")
      return g[(jax.lax.axis_index("ep") + 1) % 2]
    return jax.lax.fori_loop(0, 10, body, x[0])[None]

  f = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
  text = f.trace(jax.ShapeDtypeStruct((2, 8), jnp.int32)).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "stablehlo.while" in text and len(_custom_calls(text)) == 1


def test_nvshmem_bitcode_kernel_compiles_and_is_detected():
  """Kernels calling NVSHMEM device functions link the wheel's bitcode; the cubin then carries
  the device state the handler looks for (to run nvshmemx_cumodule_init)."""
  from jax_ep import _compile
  from jax_ep.kernels import nvshmem_device

  try:
    bc = nvshmem_device.bitcode_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))

  @triton.jit
  def pe_kernel(out_ptr):
    tl.store(out_ptr, nvshmem_device.my_pe())
    tl.store(out_ptr + 1, nvshmem_device.n_pes())

  k = _compile.compile_kernel(pe_kernel, {"out_ptr": "*i32"}, num_warps=1,
                              extern_libs={"libnvshmem_device": bc})
  assert b"nvshmemi_device_state_d" in k.cubin()
  from jax_ep.kernels import exchange
  plain = _compile.compile_kernel(exchange.all_gather_kernel, EXCHANGE_SIG,
                                  _exchange_constexprs(2, 4))
  assert b"nvshmemi_device_state_d" not in plain.cubin()
