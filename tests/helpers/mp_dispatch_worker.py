"""One process of the multi-process test: 2 CPU devices here, a global EP mesh over all processes.

Usage: python mp_dispatch_worker.py COORDINATOR_PORT NUM_PROCESSES PROCESS_ID OUT_NPZ SEED
Process 0 writes the gathered results to OUT_NPZ.
"""
import sys

import jax

port, nproc, pid, out_path, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], \
    int(sys.argv[5])
jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid,
                           initialization_timeout=60)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jax_ep  # noqa: E402
from mp_dispatch_problem import make_problem, step_fn  # noqa: E402

config, x, idx, weights, w1 = make_problem(seed, ep_size=len(jax.devices()))
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("ep",))
sharding = NamedSharding(mesh, P("ep"))
n_local = x.shape[0] // nproc
local = lambda a: a[pid * n_local:(pid + 1) * n_local]
put = lambda a: jax.make_array_from_process_local_data(sharding, local(a), a.shape)
w_local = w1.shape[0] // nproc
w1_arr = jax.make_array_from_process_local_data(
    sharding, w1[pid * w_local:(pid + 1) * w_local], w1.shape)
outs = jax.jit(step_fn(config, mesh))(put(x), put(idx), put(weights), w1_arr)
gathered = [np.asarray(multihost_utils.process_allgather(o, tiled=True)) for o in outs]
if pid == 0:
  np.savez(out_path, *gathered)
print(f"process {pid}: done", flush=True)
