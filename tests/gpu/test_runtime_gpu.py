"""GPU tests of the runtime and launch path, one process driving every visible GPU (peer provider).

Run by scripts/gpu_tests.sh with CUDA_VISIBLE_DEVICES selecting 2 or 4 GPUs. Skipped cleanly
where there is no CUDA GPU or no FFI library.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

pytestmark = pytest.mark.gpu


def _gpus():
  try:
    return jax.devices("gpu")
  except RuntimeError:
    return []


if not _gpus():
  pytest.skip("needs CUDA GPUs", allow_module_level=True)

from jax_ep import EPConfig, _ffi, launch, runtime  # noqa: E402

if not _ffi.available():
  pytest.skip("libjax_ep_ffi.so not built (see docs/RUNTIME.md)", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

CONFIG = EPConfig(num_experts=64, topk=4, hidden=256, max_tokens_per_rank=64)


@triton.jit
def _axpy_kernel(x_ptr, y_ptr, out_ptr, alpha, n, BLOCK: tl.constexpr):
  offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
  m = offs < n
  x = tl.load(x_ptr + offs, mask=m)
  y = tl.load(y_ptr + offs, mask=m)
  tl.store(out_ptr + offs, alpha * x + y, mask=m)


@pytest.fixture
def fresh_runtime():
  runtime.shutdown()
  yield
  runtime.shutdown()


def _mesh():
  gpus = _gpus()
  return jax.sharding.Mesh(np.array(gpus), ("ep",)), len(gpus)


def _gather_fn(mesh, timeout_s=10.0):
  def per_shard(x, i):
    out, status = launch.all_gather_int32(x[0] + i * (1 + x[0]), axis_name="ep",
                                          timeout_s=timeout_s)
    return out[None], status[None]

  return jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(P("ep"), P()),
                               out_specs=(P("ep"), P("ep"))))


def test_plain_kernel_without_runtime(fresh_runtime):
  """A non-symmetric kernel runs through the handler with no runtime; int scalars arrive."""
  rng = np.random.default_rng(0)
  n = 5000
  x = jnp.asarray(rng.standard_normal(n, dtype=np.float32))
  y = jnp.asarray(rng.standard_normal(n, dtype=np.float32))

  @jax.jit
  def f(x, y):
    (out,) = launch.triton_call(_axpy_kernel, x, y,
                                out_shapes=jax.ShapeDtypeStruct((n,), jnp.float32),
                                grid=(triton.cdiv(n, 1024),), constexprs={"BLOCK": 1024},
                                scalars=[3, n])
    return out

  # The kernel may fuse the multiply-add (one rounding), numpy rounds twice.
  np.testing.assert_allclose(np.asarray(f(x, y)), 3 * np.asarray(x) + np.asarray(y), rtol=1e-5,
                             atol=1e-6)


def test_uninitialized_error(fresh_runtime):
  mesh, w = _mesh()
  x = jnp.zeros((w, 8), jnp.int32)
  with pytest.raises(RuntimeError, match=r"jax_ep.runtime.initialize"):
    _gather_fn(mesh)(x, jnp.int32(0))
  with pytest.raises(runtime.RuntimeNotInitializedError, match="initialize"):
    runtime.world_size()


def test_all_gather_1000_calls(fresh_runtime):
  """Every rank receives every rank's vector, over 1,000 calls with changing values."""
  mesh, w = _mesh()
  runtime.initialize([CONFIG])
  assert runtime.provider() == "peer" and runtime.world_size() == w
  for r, d in enumerate(mesh.devices.flat):
    assert runtime.rank_of(d) == r
  n = 37
  x_host = (np.arange(w)[:, None] * 1000 + np.arange(n)[None, :]).astype(np.int32)
  x = jax.device_put(x_host, NamedSharding(mesh, P("ep")))
  f = _gather_fn(mesh)
  outs, stats = [], []
  calls = 1000
  for i in range(calls):
    out, status = f(x, jnp.int32(i))
    outs.append(out)
    stats.append(status)
  outs = np.stack([np.asarray(o) for o in outs])      # [calls, w, w, n]
  stats = np.stack([np.asarray(s) for s in stats])    # [calls, w, w]
  i = np.arange(calls)[:, None, None]
  want = x_host[None] + i * (1 + x_host[None])         # [calls, w, n]
  assert (stats == 0).all(), f"timeouts in {np.argwhere(stats)[:5]}"
  for receiver in range(w):
    np.testing.assert_array_equal(outs[:, receiver], want)
  info = runtime.device_info(mesh.devices.flat[0])
  assert info["epoch"] == calls and info["world"] == w


def test_chained_calls_in_one_jit(fresh_runtime):
  """Two exchanges ordered by a data dependency inside one jitted shard_map."""
  mesh, w = _mesh()
  runtime.initialize(CONFIG)

  def per_shard(x):
    a, s1 = launch.all_gather_int32(x[0], axis_name="ep")
    b, s2 = launch.all_gather_int32(a.sum(axis=0) + x[0], axis_name="ep")
    return b[None], (s1 + s2)[None]

  f = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=P("ep"), out_specs=(P("ep"), P("ep"))))
  x_host = np.random.default_rng(1).integers(-1000, 1000, (w, 16)).astype(np.int32)
  for _ in range(3):
    b, s = f(jax.device_put(x_host, NamedSharding(mesh, P("ep"))))
    total = x_host.sum(axis=0)
    want = total[None] + x_host
    assert (np.asarray(s) == 0).all()
    for receiver in range(w):
      np.testing.assert_array_equal(np.asarray(b)[receiver], want)


def test_initialize_shutdown_initialize(fresh_runtime):
  mesh, w = _mesh()
  x_host = np.arange(w * 8, dtype=np.int32).reshape(w, 8)
  x = jax.device_put(x_host, NamedSharding(mesh, P("ep")))
  runtime.initialize([CONFIG])
  runtime.initialize([CONFIG])  # compatible: a no-op
  small = EPConfig(num_experts=8, topk=2, hidden=64, max_tokens_per_rank=8)
  runtime.initialize(small)  # fits: a no-op
  big = EPConfig(num_experts=64, topk=8, hidden=8192, max_tokens_per_rank=4096)
  with pytest.raises(RuntimeError, match="shutdown"):
    runtime.initialize([big])
  f = _gather_fn(mesh)
  out, _ = f(x, jnp.int32(0))
  np.testing.assert_array_equal(np.asarray(out)[w - 1], x_host)
  runtime.shutdown()
  # An executable compiled while initialized fails cleanly after shutdown.
  with pytest.raises(Exception, match="initialize"):
    np.asarray(f(x, jnp.int32(1))[0])
  runtime.initialize([CONFIG])
  for i in range(3):
    out, st = f(x, jnp.int32(i))
    np.testing.assert_array_equal(np.asarray(out)[0], x_host + i * (1 + x_host))
    assert (np.asarray(st) == 0).all()


def test_timeout_reports_missing_peer(fresh_runtime):
  """A rank whose peers never arrive stops waiting after timeout_s and flags them."""
  mesh, w = _mesh()
  if w < 2:
    pytest.skip("needs 2 GPUs")
  runtime.initialize(CONFIG)
  d0 = mesh.devices.flat[0]
  one = jax.sharding.Mesh(np.array([d0]), ("solo",))

  def per_shard(x):
    out, status = launch.all_gather_int32(x[0], world=w, timeout_s=0.2)
    return out[None], status[None]

  f = jax.jit(jax.shard_map(per_shard, mesh=one, in_specs=P("solo"), out_specs=(P("solo"),) * 2))
  _, status = f(jax.device_put(np.zeros((1, 4), np.int32), d0))
  status = np.asarray(status)[0]
  assert status[0] == 0 and (status[1:] == 1).all(), status
  runtime.shutdown()  # the other ranks' flags are now out of step; start over


def test_chained_loop_of_exchanges(fresh_runtime):
  """1,001 exchanges chained in one jitted fori_loop: correct, and their latency printed (an odd
  count, so the expected rotation is not the identity for W = 2, 4 or 8)."""
  import time

  mesh, w = _mesh()
  runtime.initialize(CONFIG)
  steps = 1001

  def per_shard(x):
    def body(_, c):
      g, _ = launch.all_gather_int32(c, axis_name="ep")
      return g[(jax.lax.axis_index("ep") + 1) % w]
    return jax.lax.fori_loop(0, steps, body, x[0])[None]

  f = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
  x_host = np.random.default_rng(2).integers(0, 1 << 30, (w, 64)).astype(np.int32)
  x = jax.device_put(x_host, NamedSharding(mesh, P("ep")))
  f(x).block_until_ready()
  t0 = time.perf_counter()
  out = f(x)
  out.block_until_ready()
  dt = time.perf_counter() - t0
  print(f"\npeer provider, {w} GPUs: {1e6 * dt / steps:.1f} us per chained exchange")
  np.testing.assert_array_equal(np.asarray(out), x_host[(np.arange(w) + steps) % w])


def test_nvshmem_device_code_needs_the_nvshmem_provider(fresh_runtime):
  """A kernel linking NVSHMEM bitcode is refused with a clear error under the peer provider."""
  try:
    from jax_ep.kernels import nvshmem_device
    bc = nvshmem_device.bitcode_path()
  except (ImportError, FileNotFoundError) as e:
    pytest.skip(f"no NVSHMEM bitcode: {e}")

  @triton.jit
  def pe_kernel(out_ptr):
    tl.store(out_ptr, nvshmem_device.my_pe())

  runtime.initialize(CONFIG)
  f = jax.jit(lambda: launch.triton_call(pe_kernel, out_shapes=jax.ShapeDtypeStruct((1,), jnp.int32),
                                         grid=1, num_warps=1,
                                         extern_libs={"libnvshmem_device": bc})[0])
  with pytest.raises(Exception, match="NVSHMEM provider"):
    np.asarray(f())
