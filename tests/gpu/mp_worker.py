"""One rank of the multi-process GPU test (NVSHMEM provider): one process, one GPU.

Started by test_nvshmem_multiprocess.py as ``python mp_worker.py RANK WORLD COORDINATOR CALLS``;
prints one line ``RESULT {json}`` with what it checked.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback


def main(rank: int, world: int, coordinator: str, calls: int) -> dict:
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  jax.distributed.initialize(coordinator, num_processes=world, process_id=rank,
                             local_device_ids=[rank])
  from jax_ep import EPConfig, launch, runtime

  res: dict = {"rank": rank, "world": world}
  devices = sorted(jax.devices(), key=lambda d: d.process_index)
  mesh = jax.sharding.Mesh(np.array(devices), ("ep",))

  def per_shard(x, i):
    out, status = launch.all_gather_int32(x[0] + i * (1 + x[0]), axis_name="ep", timeout_s=20.0)
    return out[None], status[None]

  f = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(P("ep"), P()),
                            out_specs=(P("ep"), P("ep"))))
  n = 29
  x_all = (np.arange(world)[:, None] * 1000 + np.arange(n)[None, :]).astype(np.int32)
  x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("ep")), x_all[rank][None])

  # 1. Without initialize: the documented error.
  try:
    f(x, np.int32(0))
    res["uninitialized_error"] = "no error raised"
  except RuntimeError as e:
    res["uninitialized_error"] = "ok" if "jax_ep.runtime.initialize" in str(e) else str(e)

  # 2. Initialize (NVSHMEM), 1,000 calls with changing values.
  config = EPConfig(num_experts=64, topk=4, hidden=256, max_tokens_per_rank=64)
  t0 = time.time()
  runtime.initialize([config])
  res["init_s"] = round(time.time() - t0, 3)
  res["provider"] = runtime.provider()
  res["runtime_rank"] = runtime.rank()
  res["runtime_world"] = runtime.world_size()
  outs, stats = [], []
  t0 = time.time()
  for i in range(calls):
    out, status = f(x, np.int32(i))
    outs.append(out.addressable_shards[0].data)
    stats.append(status.addressable_shards[0].data)
  got = np.stack([np.asarray(o)[0] for o in outs])      # [calls, world, n]
  st = np.stack([np.asarray(s)[0] for s in stats])      # [calls, world]
  res["calls_s"] = round(time.time() - t0, 3)
  i = np.arange(calls)[:, None, None]
  want = x_all[None] + i * (1 + x_all[None])
  res["calls"] = calls
  res["wrong_calls"] = int((got != want).any(axis=(1, 2)).sum())
  res["timeouts"] = int(st.sum())
  res["epoch"] = runtime.device_info(jax.local_devices()[0])["epoch"]

  # 3. shutdown / initialize again, and a stale executable's error in between.
  runtime.shutdown()
  try:
    np.asarray(f(x, np.int32(0))[0].addressable_shards[0].data)
    res["after_shutdown_error"] = "no error raised"
  except Exception as e:  # noqa: BLE001 -- XlaRuntimeError
    res["after_shutdown_error"] = "ok" if "initialize" in str(e) else str(e)[:300]
  runtime.initialize([config])
  bad = 0
  for i in range(5):
    out, status = f(x, np.int32(i))
    o = np.asarray(out.addressable_shards[0].data)[0]
    bad += int((o != x_all + i * (1 + x_all)).any() or np.asarray(status.addressable_shards[0].data).any())
  res["reinit_wrong_calls"] = bad

  # 4. A kernel linking NVSHMEM device bitcode: the handler runs nvshmemx_cumodule_init.
  import jax.numpy as jnp
  import triton
  import triton.language as tl

  from jax_ep.kernels import nvshmem_device

  @triton.jit
  def pe_kernel(out_ptr):
    tl.store(out_ptr, nvshmem_device.my_pe())
    tl.store(out_ptr + 1, nvshmem_device.n_pes())

  def per_shard_pe():
    (o,) = launch.triton_call(pe_kernel, out_shapes=jax.ShapeDtypeStruct((2,), jnp.int32),
                              grid=1, num_warps=1,
                              extern_libs={"libnvshmem_device": nvshmem_device.bitcode_path()})
    return o[None]

  g = jax.jit(jax.shard_map(per_shard_pe, mesh=mesh, in_specs=(), out_specs=P("ep")))
  pe = np.asarray(g().addressable_shards[0].data)[0].tolist()
  res["nvshmem_device_call"] = "ok" if pe == [rank, world] else f"got {pe}"
  runtime.shutdown()
  return res


if __name__ == "__main__":
  rank, world, coord, calls = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
  try:
    result = main(rank, world, coord, calls)
  except Exception:  # noqa: BLE001 -- report, the test prints it
    result = {"rank": rank, "error": traceback.format_exc()[-3000:]}
  print("RESULT " + json.dumps(result), flush=True)
  # Leave without exit-time collectives (NVSHMEM finalize, JAX distributed shutdown), which
  # would hang if a peer already failed; examples/multiprocess/ shows the normal exit path.
  os._exit(0)
