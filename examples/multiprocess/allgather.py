"""One process per GPU: initialize the jax_ep runtime (NVSHMEM provider) and all-gather counts.

The smallest complete program on the triton backend's runtime: every process contributes a
per-rank int32 vector, the in-kernel exchange (kernels/exchange.py) gives every rank all of
them, and the program checks the result and exits normally (runtime shutdown, NVSHMEM
finalize at exit).

It reads the environment that scripts/launch_multiprocess.sh (or examples/multihost/launch.py
with --gpus) sets for each process:
  JAX_COORDINATOR_ADDRESS  host:port of process 0 (same for every process, every host)
  JAX_NUM_PROCESSES        processes in the job (all hosts)
  JAX_PROCESS_ID           this process, 0 .. JAX_NUM_PROCESSES - 1
  JAX_LOCAL_DEVICE_IDS     the one local GPU this process drives, e.g. "3"

  scripts/launch_multiprocess.sh examples/multiprocess/allgather.py --calls 100
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--calls", type=int, default=100, help="exchanges to run and check")
  ap.add_argument("--n", type=int, default=64, help="int32 values per rank")
  ap.add_argument("--loop", type=int, default=1000,
                  help="exchanges chained in one jitted fori_loop, timed on the device")
  args = ap.parse_args()

  jax.distributed.initialize(
      os.environ["JAX_COORDINATOR_ADDRESS"],
      num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
      process_id=int(os.environ["JAX_PROCESS_ID"]),
      local_device_ids=[int(i) for i in os.environ["JAX_LOCAL_DEVICE_IDS"].split(",")])

  import jax_ep
  from jax_ep import launch, runtime

  rank, world = jax.process_index(), jax.process_count()
  config = jax_ep.EPConfig(num_experts=8 * world, topk=4, hidden=1024, max_tokens_per_rank=256)
  t0 = time.perf_counter()
  runtime.initialize([config])  # collective: every process, same configs
  t_init = time.perf_counter() - t0

  # The EP axis must list devices in runtime rank order (process order here).
  mesh = jax.sharding.Mesh(np.array(sorted(jax.devices(), key=lambda d: d.process_index)),
                           (config.axis_name,))

  def per_shard(counts, step):
    gathered, status = launch.all_gather_int32(counts[0] + step, axis_name=config.axis_name)
    return gathered[None], status[None]

  exchange = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(P("ep"), P()),
                                   out_specs=(P("ep"), P("ep"))))
  mine = (rank * 100_000 + np.arange(args.n)).astype(np.int32)
  counts = jax.make_array_from_process_local_data(NamedSharding(mesh, P("ep")), mine[None])
  everyone = (np.arange(world)[:, None] * 100_000 + np.arange(args.n)[None]).astype(np.int32)

  exchange(counts, np.int32(0))[0].block_until_ready()  # compile + first launch
  t0 = time.perf_counter()
  results = [exchange(counts, np.int32(s)) for s in range(args.calls)]
  bad = 0
  for s, (gathered, status) in enumerate(results):
    got = np.asarray(gathered.addressable_shards[0].data)[0]
    bad += int((got != everyone + s).any() or np.asarray(status.addressable_shards[0].data).any())
  dt = time.perf_counter() - t0
  print(f"[rank {rank}/{world}] provider={runtime.provider()} init={t_init:.2f}s "
        f"{args.calls} exchanges, {bad} wrong, {1e6 * dt / args.calls:.0f} us/call "
        f"(host loop incl. checks)", flush=True)

  # Latency: exchanges chained by data dependencies inside one executable (no host in between).
  def chained(counts):
    def body(_, c):
      gathered, _ = launch.all_gather_int32(c, axis_name=config.axis_name)
      return gathered[(rank_in_axis() + 1) % world]  # next input depends on a peer's vector

    return jax.lax.fori_loop(0, args.loop, body, counts[0])[None]

  def rank_in_axis():
    return jax.lax.axis_index(config.axis_name)

  loop = jax.jit(jax.shard_map(chained, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
  loop(counts).block_until_ready()
  t0 = time.perf_counter()
  final = loop(counts)
  final.block_until_ready()
  dt_loop = time.perf_counter() - t0
  # After `loop` steps rank r holds rank (r + loop) % world's vector.
  want = everyone[(rank + args.loop) % world]
  loop_ok = bool((np.asarray(final.addressable_shards[0].data)[0] == want).all())
  print(f"[rank {rank}/{world}] chained exchanges: {1e6 * dt_loop / args.loop:.1f} us each "
        f"({args.loop} in one jit), result {'ok' if loop_ok else 'WRONG'}", flush=True)
  bad += 0 if loop_ok else 1
  runtime.shutdown()
  if bad:
    raise SystemExit(1)


if __name__ == "__main__":
  main()
